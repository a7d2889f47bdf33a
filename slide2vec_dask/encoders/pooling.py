"""Published pooled outputs as thin wrappers around a timm ViT.

Most pathology ViTs publish their CLS token; some publish the CLS token
concatenated with the mean of the patch tokens (register tokens excluded).
`TokenPooler` computes either from ``forward_features`` (the final norm
applied), and keeps the wrapped model's state-dict keys unprefixed, so the
wrapper loads and saves exactly the official checkpoint layout.
"""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("cls", "cls_mean")


def _strip_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "model.")]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


class TokenPooler(nn.Module):
    """``(B, 3, H, W) -> (B, D)``: the CLS token, or CLS ++ mean of the patch tokens."""

    def __init__(self, model: nn.Module, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.pooling = pooling
        # CLS + registers come first in timm's token layout.
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        # torch < 2.5 has the state-dict post hook under its private name only.
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, num_prefix_tokens={self.num_prefix_tokens}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


class ConchImageEncoder(nn.Module):
    """CONCH's image tower as a tile encoder: ``encode_image`` before the contrastive projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, proj_contrast=False, normalize=False)


class CocaAttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH v1.5 publishes it: learned queries cross-attend to all tokens.

    Parameter names and shapes are the checkpoint's (``query``, ``ln_k``, ``ln_q``,
    ``to_q``, ``to_kv``, ``to_out``; no biases).  ``to_kv`` packs ``[k; v]`` and heads
    split the channel dimension head-major, as ``rearrange('(h d)')`` does.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, context_dim) -> (B, n_queries, d_model)``."""
        import torch.nn.functional as F

        b = x.shape[0]
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Encoder(nn.Module):
    """CONCH v1.5's image tower: ViT-L/16 trunk, attentional pooler over all its tokens, LayerNorm.

    The pooled contrastive query is the published 768-d tile embedding (TITAN's
    ``return_conch()`` model); state-dict keys are the checkpoint's
    (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``).
    """

    def __init__(self, trunk: nn.Module, embed_dim: int = 768, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = CocaAttentionalPooler(embed_dim, trunk.embed_dim, n_head, n_queries)
        self.ln_contrast = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # CLS + patches, after the trunk's final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
