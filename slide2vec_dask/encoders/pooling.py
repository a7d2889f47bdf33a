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

POOLINGS = ("cls", "cls_mean", "patch_mean")


def _strip_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "model.")]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


class TokenPooler(nn.Module):
    """``(B, 3, H, W) -> (B, D)``: the CLS token, CLS ++ mean of the patch tokens, or that mean alone.

    ``patch_mean`` is what timm's ``global_pool="avg"`` returns for models
    with registers (DINOv3): the mean over patch tokens, prefix tokens excluded.
    """

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
        patch_mean = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        if self.pooling == "patch_mean":
            return patch_mean
        return torch.cat([cls, patch_mean], dim=-1)


class TimmPooled(nn.Module):
    """``(B, 3, H, W) -> (B, C)``: a timm model's own pooled output, without a classifier.

    For a ``features_only`` CNN (CLAM's truncated ResNet-50: ImageNet ResNet-50
    stages 1-3, 1024 channels) the global average of its last feature map; for a
    model built with ``num_classes=0`` (CTransPath's Swin) its ``forward``, i.e.
    timm's pooling after the final norm.  The state-dict keys are the wrapped
    network's own (``conv1.*``, ``layers.*``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        post_hook = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        return out.mean(dim=(2, 3)) if out.ndim == 4 else out


class MettleRefineHead(nn.Module):
    """Mettle's refinement of the CLS embedding: a content-mixed sum of low-rank updates plus a shift.

    ``mix`` weighs ``num_atoms`` rank-``rank`` maps ``x -> (x P_k) Q_k^T``;
    ``shift`` adds a small MLP of ``x``.  Hyperparameters and parameter names
    follow the published ``config.json`` / ``model.safetensors`` (``head.P``,
    ``head.Q``, ``head.mix.{0,2}``, ``head.shift.{0,2}``).
    """

    def __init__(self, dim: int = 1536, num_atoms: int = 16, rank: int = 8, hidden: int = 256):
        super().__init__()
        self.P = nn.Parameter(torch.zeros(num_atoms, dim, rank))
        self.Q = nn.Parameter(torch.zeros(num_atoms, dim, rank))
        self.mix = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_atoms))
        self.shift = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = torch.einsum("bd,kdr->bkr", x, self.P)
        updates = torch.einsum("bkr,kdr->bkd", low_rank, self.Q)
        weights = self.mix(x).unsqueeze(-1)
        return x + (weights * updates).sum(dim=1) + self.shift(x)


class MettleEncoder(nn.Module):
    """Mettle: an H-optimus-0 ViT-g/14 trunk (``backbone.*``) and `MettleRefineHead` (``head.*``).

    ``cls``: the refined CLS token; ``cls_patch_mean`` (default): refined CLS ++
    the *unrefined* mean of the patch tokens.  The head and the mean run in
    float32 with autocast off, as the published code does.
    """

    def __init__(self, backbone: nn.Module, output_variant: str = "cls_patch_mean"):
        super().__init__()
        self.backbone = backbone
        self.head = MettleRefineHead(dim=backbone.embed_dim)
        self.output_variant = output_variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            cls = self.head(tokens[:, 0].float())
            if self.output_variant == "cls":
                return cls
            patch_mean = tokens[:, self.backbone.num_prefix_tokens:].float().mean(dim=1)
            return torch.cat([cls, patch_mean], dim=-1)


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


class ISightEncoder(nn.Module):
    """iSight's tile features: CLIP ViT-L/14-336's last hidden states, a learned token projection, pooled.

    ``trunk`` is timm's OpenAI-CLIP ViT-L/14 at 336 px (quick-GELU) *without* its final
    LayerNorm: iSight reads ``hidden_states[-1]``, which precedes ``post_layernorm``.
    ``visual_token_projection`` (1024 -> 1024) is applied to every token; ``token_mean``
    (default) is the mean over all tokens, CLS included, ``cls`` the projected CLS token.
    """

    def __init__(self, trunk: nn.Module, output_variant: str = "token_mean"):
        super().__init__()
        self.trunk = trunk
        self.visual_token_projection = nn.Linear(trunk.embed_dim, trunk.embed_dim)
        self.output_variant = output_variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.visual_token_projection(self.trunk.forward_features(x))
        return tokens[:, 0] if self.output_variant == "cls" else tokens.mean(dim=1)
