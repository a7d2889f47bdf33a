"""TITAN (MahmoodLab/TITAN): a slide ViT over CONCH v1.5 tile features laid on the 2D tile grid.

A native PyTorch re-implementation of TITAN's vision tower, the ``vision_encoder.*``
part of the hub's ``model.safetensors`` (which also holds ``text_encoder.*``; CONCH
v1.5 ships separately as ``conch_v1_5_pytorch_model.bin``, see the ``conchv15`` tile
preset).  What the official code (``vision_transformer.py``, ``modeling_titan.py``)
does, and this module reproduces:

* Grid.  ``offset`` is the per-axis minimum of the level-0 tile coordinates; a tile
  sits in cell ``floor((xy - offset) / patch_size_lv0)``.  Features landing in one
  cell are summed (``index_add_`` into a zero grid); cells whose feature vector is
  all zero are background (padding) and are dropped, tiles included.  Tokens follow
  the grid's x-major flattening (cell ``gx * n_y + gy``), after one CLS token.
* Attention.  2D ALiBi: head ``h`` adds ``-slope_h * |cell_i - cell_j|`` (Euclidean,
  in cells) to the logits between tiles, 0 on the CLS row and column; the slopes are
  ALiBi's, interleaved for 12 heads.  There is no position embedding.
* Embedding.  ``attn_pool_contrastive`` (1 query, 8 heads) over CLS + tiles after the
  final LayerNorm, without ``proj`` (``encode_slide_from_patch_features`` passes
  ``no_proj=True``).  Output variant ``"proj"`` applies ``proj`` (the image-text space
  TITAN's zero-shot uses, before its L2 normalisation).  The latents are the 128
  ``attn_pool`` tokens (the CoCa caption tokens TITAN's report decoder reads).

Unlike the official code, the ``(heads, N, N)`` bias is never materialised: attention
runs over query blocks whose bias rows are computed on the fly (exact, since softmax
is per row), so memory grows with ``N``, not ``N**2``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slide2vec_dask.encoders.aggregators.base import AggregatorSpec, SlideEncoding
from slide2vec_dask.encoders.base import load_into_meta, read_state_dict
from slide2vec_dask.encoders.registry import get_preset, register_preset
from slide2vec_dask.encoders.weights import Weights

HUB_ID = "MahmoodLab/TITAN"
HUB_FILES = ("model.safetensors",)
URL = f"https://huggingface.co/{HUB_ID}"
WEIGHTS = Weights(HUB_ID, HUB_FILES, gated=True, licence="CC-BY-NC-ND-4.0")
VISION_PREFIX = "vision_encoder."
TEXT_PREFIX = "text_encoder."
TILE_PRESET = "conchv15"

# vision_config of MahmoodLab/TITAN's config.json
IN_DIM = 768          # mlp_patch_embed_dim: CONCH v1.5 features
EMBED_DIM = 768
DEPTH = 6
NUM_HEADS = 12
MLP_RATIO = 4.0
POOL_HEADS = 8
POOL_QUERIES = 128    # attn_pool (caption tokens); attn_pool_contrastive has 1
# text_config (open_clip TextTransformer, embed_cls, no projection bias): only for random checkpoints
TEXT = dict(vocab_size=32007, context_length=128, width=768, layers=12, mlp_ratio=4.0)

OUTPUTS = {"default": EMBED_DIM, "proj": EMBED_DIM}
# Official recipe: 512 px tiles at 20x (0.5 µm/px) resized to 448 px by CONCH v1.5's eval
# transform (README "patch_size_lv0 ... 512 if slide is 20x"; TRIDENT --mag 20 --patch_size 512).
# As one tile contract: 448 px at 0.5 * 512 / 448 µm/px, i.e. the same 256 µm field, read at the
# 0.5 µm level as 512 px and resized to 448 on the device.
TILE_SIZE_PX = 448
TILE_SPACING_UM = 0.5 * 512 / 448
MAX_BIAS_ELEMENTS = 2**25  # bias block of (heads, rows, N): 128 MiB in fp32


# -- grid and ALiBi --------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes; for a non-power of two, the next power's every other slope fills in."""

    def geometric(n: int) -> list[float]:
        p = 2.0 ** -(2.0 ** -(math.log2(n) - 3))  # 2 ** (-8 / n)
        return [p * p**i for i in range(n)]

    base = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(base)
    if base != num_heads:
        slopes += geometric(2 * base)[0::2][: num_heads - base]
    return slopes


def tile_cells(coords: torch.Tensor, patch_size_lv0: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Grid cell ``(gx, gy)`` of each tile and the grid shape ``(n_x, n_y)``, as TITAN places them."""
    offset = coords.min(dim=0).values
    cells = torch.div(coords - offset, patch_size_lv0, rounding_mode="floor")
    shape = cells.max(dim=0).values + 1
    return cells, (int(shape[0]), int(shape[1]))


def grid_tokens(features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int):
    """Foreground cells in TITAN's token order: ``(features (M, D), cells (M, 2))``.

    Same values as TITAN's dense grid + background mask, without allocating the
    empty cells: features are summed per occupied cell in input order (as
    ``index_add_``), and cells whose sum is all zero are dropped.
    """
    cells, (_, n_y) = tile_cells(coords, patch_size_lv0)
    flat = cells[:, 0] * n_y + cells[:, 1]
    occupied, slot = torch.unique(flat, sorted=True, return_inverse=True)
    summed = features.new_zeros(len(occupied), features.shape[-1]).index_add_(0, slot, features)
    keep = (summed != 0).any(dim=1)
    kept = occupied[keep]
    return summed[keep], torch.stack([torch.div(kept, n_y, rounding_mode="floor"), kept % n_y], dim=1)


def alibi_bias_rows(cells: torch.Tensor, rows: slice, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bias of token rows ``rows`` against all ``1 + len(cells)`` tokens (token 0 is CLS): ``(H, r, 1 + M)``."""
    n_tok = 1 + len(cells)
    start, stop = rows.start, min(rows.stop, n_tok)
    padded = -(-n_tok // 8) * 8  # rows aligned to 8 elements so fused SDPA kernels accept the bias
    bias = torch.zeros(len(slopes), stop - start, padded, dtype=dtype, device=cells.device)
    first = max(start, 1)
    if first < stop:
        diff = cells[first - 1 : stop - 1, None, :] - cells[None, :, :]
        dist = diff.square().sum(-1).double().sqrt().float()  # TITAN: float64 distances, float32 bias
        bias[:, first - start :, 1:n_tok] = (dist.unsqueeze(0) * slopes.view(-1, 1, 1) * -1).to(dtype)
    return bias[..., :n_tok]


# -- the model ---------------------------------------------------------------------------
class TitanAttention(nn.Module):
    """Multi-head self-attention with the 2D ALiBi bias, over blocks of query rows."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cells: torch.Tensor, slopes: torch.Tensor, block_rows: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = []
        for start in range(0, n, block_rows):
            bias = alibi_bias_rows(cells, slice(start, start + block_rows), slopes, q.dtype)
            out.append(F.scaled_dot_product_attention(q[:, :, start : start + block_rows], k, v,
                                                      attn_mask=bias.unsqueeze(0)))
        return self.proj(torch.cat(out, dim=2).transpose(1, 2).reshape(b, n, c))


class TitanMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TitanBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TitanAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TitanMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, cells, slopes, block_rows):
        x = x + self.attn(self.norm1(x), cells, slopes, block_rows)
        return x + self.mlp(self.norm2(x))


class TitanBlocks(nn.Module):
    """Holds the blocks under ``modules_list`` (TITAN's ``CustomSequential`` key layout)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class TitanAttentionalPooler(nn.Module):
    """TITAN's CoCa pooler: learned queries attend to the LayerNormed tokens (``nn.MultiheadAttention``)."""

    def __init__(self, dim: int, num_heads: int, num_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(L, D) -> (num_queries, D)``."""
        k = self.ln_k(tokens)
        return self.attn(self.ln_q(self.query), k, k, need_weights=False)[0]


class TitanSlideEncoder(nn.Module):
    """TITAN's slide encoder; parameter names and shapes are those of ``vision_encoder.*``."""

    def __init__(self, output_variant: str = "default", *, in_dim: int = IN_DIM, embed_dim: int = EMBED_DIM,
                 depth: int = DEPTH, num_heads: int = NUM_HEADS, mlp_ratio: float = MLP_RATIO,
                 pool_heads: int = POOL_HEADS, pool_queries: int = POOL_QUERIES,
                 max_bias_elements: int = MAX_BIAS_ELEMENTS):
        super().__init__()
        if output_variant not in OUTPUTS:
            raise ValueError(f"TITAN has no output_variant {output_variant!r}; choose one of {list(OUTPUTS)}")
        self.output_variant = output_variant
        self.num_heads = num_heads
        self.max_bias_elements = max_bias_elements
        self.slopes = tuple(alibi_slopes(num_heads))
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = TitanBlocks([TitanBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = TitanAttentionalPooler(embed_dim, pool_heads, pool_queries)
        self.attn_pool_contrastive = TitanAttentionalPooler(embed_dim, pool_heads, 1)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    def forward_tokens(self, features: torch.Tensor, coords: torch.Tensor, tile_size_lv0: int) -> torch.Tensor:
        """``(1 + M, D)``: CLS + foreground tokens after the last block and the final norm."""
        if features.ndim != 2 or coords.shape != (len(features), 2):
            raise ValueError(f"TITAN expects features (N, D) and coords (N, 2), got {tuple(features.shape)} "
                             f"and {tuple(coords.shape)}")
        if len(features) == 0:
            raise ValueError("TITAN needs at least one tile")
        if int(tile_size_lv0) <= 0:
            raise ValueError(f"tile_size_lv0 must be a positive number of level-0 pixels, got {tile_size_lv0!r}")
        tokens, cells = grid_tokens(features.float(), coords.long(), int(tile_size_lv0))
        if len(tokens) == 0:
            raise ValueError("every tile feature is all zero: TITAN treats such cells as background")
        x = torch.cat([self.cls_token, self.patch_embed(tokens).unsqueeze(0)], dim=1)
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=x.device)
        block_rows = max(1, self.max_bias_elements // (self.num_heads * x.shape[1]))
        for block in self.blocks.modules_list:
            x = block(x, cells, slopes, block_rows)
        return self.norm(x)[0]

    def encode_slide(self, features: torch.Tensor, coords: torch.Tensor, tile_size_lv0: int) -> SlideEncoding:
        """The slide embedding ``(768,)`` and the 128 caption tokens ``(128, 768)``, float32."""
        x = self.forward_tokens(features, coords, tile_size_lv0)
        pooled = self.attn_pool_contrastive(x)[0]
        if self.output_variant == "proj":
            pooled = pooled @ self.proj
        return SlideEncoding(pooled.float(), self.attn_pool(x).float())


# -- weights -------------------------------------------------------------------------------
def vision_state_dict(state: dict, what: str) -> dict:
    """The ``vision_encoder.*`` tensors, prefix stripped; a bare vision-encoder state dict passes as is."""
    vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    if vision:
        return vision
    if any(k.startswith(TEXT_PREFIX) for k in state):
        raise ValueError(f"{what}: the checkpoint has text_encoder.* but no vision_encoder.* tensors")
    return dict(state)


@dataclass(frozen=True)
class TitanBuilder:
    """Builds TITAN's slide encoder and loads its weights strictly (picklable; runs on the worker)."""

    checkpoint_path: str | None = None
    output_variant: str = "default"

    def __call__(self) -> TitanSlideEncoder:
        what = f"preset 'titan' ({HUB_ID})"
        path = WEIGHTS.resolve("titan", self.checkpoint_path)
        state = vision_state_dict(read_state_dict(path, what), what)
        with torch.device("meta"):
            model = TitanSlideEncoder(self.output_variant)
        return load_into_meta(model, state, f"{what}: checkpoint {path} does not fit TITAN's slide encoder: "
                                            f"{{problems}}. Pass {HUB_FILES[0]} of {URL} (its vision_encoder.* "
                                            "tensors are loaded), or leave checkpoint_path unset to fetch it from "
                                            "the hub.")


@register_preset("titan", level="slide", architecture="ViT (6 x 768, 12 heads), 2D ALiBi, CoCa attentional poolers",
                 outputs=OUTPUTS, architecture_module=lambda: TitanSlideEncoder())
def titan(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None) -> AggregatorSpec:
    """TITAN: 768-d slide embedding over CONCH v1.5 tiles (512 px at 20x, resized to 448)."""
    variant = "default" if output_variant is None else output_variant
    if variant not in OUTPUTS:
        raise ValueError(f"preset 'titan' has no output_variant {variant!r}; choose one of {list(OUTPUTS)} "
                         "(default 'default')")
    weights = WEIGHTS.with_checkpoint("titan", checkpoint_path)
    tile = get_preset(TILE_PRESET)(checkpoint_path=tile_checkpoint_path)
    tile = dataclasses.replace(tile, spacing_um=TILE_SPACING_UM, tile_size_px=TILE_SIZE_PX)
    return AggregatorSpec(
        name="titan", level="slide", build=TitanBuilder(weights.checkpoint_path, variant), tile_encoder=tile,
        feature_dim=OUTPUTS[variant], latent_dim=EMBED_DIM, default_precision="fp16",
        key=weights.cache_key("titan", variant, IN_DIM, EMBED_DIM, DEPTH, NUM_HEADS, POOL_QUERIES),
        info={**weights.info(), "architecture": "ViT (6 x 768, 12 heads) with 2D ALiBi + CoCa attentional poolers",
              "output_variant": variant, "latents": "the 128 attn_pool (caption) tokens"})
