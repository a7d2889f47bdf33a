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
