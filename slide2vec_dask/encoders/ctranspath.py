"""CTransPath: timm's Swin-T with a convolutional stem, loading the published (old timm) key layout.

CTransPath (Wang et al., Medical Image Analysis 2022) is ``swin_tiny_patch4_window7_224``
whose 4x4 patch projection is replaced by a small convolutional stem (two stride-2 3x3
convolutions with BatchNorm and ReLU, ``embed_dim/8`` then ``embed_dim/4`` channels, and a
1x1 convolution to ``embed_dim``), followed by the Swin LayerNorm.  Its output is timm's
pooled output: the mean of the final-stage tokens after the last LayerNorm (768-d), the
head removed.  TRIDENT builds it with the ``timm_ctp`` fork (timm 0.5.4) and loads
``CHIEF_CTransPath.pth`` (CHIEF's tile encoder weights) from it.

Checkpoints from that era use timm 0.5's Swin layout; current timm differs only in
where a stage's patch merging lives (``layers.N.downsample`` at the *end* of stage N then,
at the *start* of stage N+1 now; the merged channel order is the same) and in treating
``relative_position_index`` / ``attn_mask`` as computed, non-persistent buffers.
`from_official_layout` renames accordingly and drops only those computed buffers; every
other tensor must fit exactly.
"""

from __future__ import annotations

import re

from torch import nn

OLD_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
COMPUTED_BUFFERS = ("relative_position_index", "attn_mask")


class ConvStem(nn.Module):
    """CTransPath's patch embedding: conv-BN-ReLU x2 (stride 2 each), 1x1 conv, LayerNorm; NHWC out.

    Accepts the keyword arguments current timm's Swin passes to its ``embed_layer``;
    the keys are the published ones (``proj.0/1/3/4/6``, ``norm``).
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=False, output_fmt="NHWC", **factory):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError(f"CTransPath's stem needs patch_size 4 and embed_dim divisible by 8, "
                             f"got {patch_size}, {embed_dim}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt = output_fmt
        width = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, width, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, embed_dim, kernel_size=1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        if self.output_fmt == "NHWC":
            x = x.permute(0, 2, 3, 1)
        else:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


def from_official_layout(state: dict) -> dict:
    """timm 0.5 Swin keys -> current timm keys (downsample moved one stage on; computed buffers dropped).

    A state dict already in current timm's layout (no ``layers.0.downsample``) passes unchanged.
    """
    if not any(k.startswith("layers.0.downsample.") for k in state):
        return {k: v for k, v in state.items() if not k.endswith(COMPUTED_BUFFERS)}
    out = {}
    for key, value in state.items():
        if key.endswith(COMPUTED_BUFFERS):
            continue
        out[OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)] = value
    return out


def to_official_layout(state: dict) -> dict:
    """The inverse key renaming (current timm -> timm 0.5), for writing checkpoints as published."""
    new = re.compile(r"^layers\.(\d+)\.downsample\.")
    return {new.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v for k, v in state.items()}
