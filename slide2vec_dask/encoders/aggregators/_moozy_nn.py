"""MOOZY's two transformers as plain torch modules, named as in the checkpoint.

Parameter and buffer names mirror ``moozy.pt`` (AtlasAnalyticsLab/MOOZY):
``teacher_slide_encoder`` loads into `SlideTransformer`, ``case_transformer``
into `CaseTransformer`.  Only the inference path of the official ``encode``
is implemented (no masking, dropout or drop-path: they are training-only).

Slide geometry follows ``moozy/data/features/grid.py``: level-0 tile
coordinates are snapped to a grid whose step is the level-0 tile size, tiles
whose features are all zero count as background and are dropped, tokens run
in row-major grid order, and an optional deterministic token cap keeps
``floor(i * n / cap)``-th valid tokens.  Position enters only through a
2-D ALiBi bias: ``-slope_h * euclidean_distance / tile_size_lv0`` between
tiles, 0 for every pair touching the CLS or a register token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slide2vec_dask.encoders.aggregators.base import SlideEncoding

GRID_STEP_TOLERANCE = 0.25  # fraction of a step a coordinate may sit off the grid (official value)


def alibi_slopes(num_heads: int) -> list[float]:
    """The positive ALiBi head slopes of Press et al. (geometric; interleaved for non powers of 2)."""

    def geometric(n: int) -> list[float]:
        first = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [first ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return geometric(num_heads)
    base = 2 ** math.floor(math.log2(num_heads))
    return geometric(base) + geometric(2 * base)[0::2][: num_heads - base]


class Alibi2D(nn.Module):
    """Holds the (negative) head slopes; one instance is shared by every block."""

    def __init__(self, num_heads: int, learnable: bool = False):
        super().__init__()
        slopes = -torch.tensor(alibi_slopes(num_heads), dtype=torch.float32).unsqueeze(1)
        if learnable:
            self.slopes = nn.Parameter(slopes)
        else:
            self.register_buffer("slopes", slopes)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PreNormBlock(nn.Module):
    """Pre-norm attention + GELU MLP with separate q/k/v projections (both MOOZY stages)."""

    def __init__(self, dim: int, heads: int, ffn: int, qk_norm: bool, layerscale: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide width {dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ls_attn = LayerScale(dim) if layerscale else nn.Identity()
        self.ls_mlp = LayerScale(dim) if layerscale else nn.Identity()

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        q = self.q_norm(self._split(self.q_proj(h)))
        k = self.k_norm(self._split(self.k_proj(h)))
        v = self._split(self.v_proj(h))
        if bias is not None:
            bias = bias.to(q.dtype)  # no-op once the caller built it in q's dtype
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.ls_attn(self.out_proj(attn.transpose(1, 2).reshape(x.shape)))
        return x + self.ls_mlp(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class SlideBlock(PreNormBlock):
    """A slide-encoder block: also holds the shared ALiBi module (the checkpoint stores its slopes per block)."""

    def __init__(self, alibi: Alibi2D, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pos_bias = alibi


# -- token cap ------------------------------------------------------------------------
# (total GPU memory in GiB, tile tokens) calibrated by the authors for inference
# (moozy/data/features/token_cap.py, INFERENCE_TOKEN_PRESETS).
INFERENCE_TOKEN_PRESETS = ((16.0, 12000), (20.0, 13500), (24.0, 14500), (40.0, 19000), (48.0, 21000),
                           (80.0, 27000))


def token_cap_for_memory(total_gib: float) -> int:
    """The official cap for a GPU of ``total_gib``: linear between presets, sqrt-scaled past the last."""
    points = sorted(INFERENCE_TOKEN_PRESETS)
    total_gib = max(0.0, float(total_gib))
    if total_gib <= points[0][0]:
        return max(1, int(round(points[0][1] * (total_gib / points[0][0]))))
    for (lo_gib, lo_tok), (hi_gib, hi_tok) in zip(points[:-1], points[1:]):
        if total_gib <= hi_gib:
            return max(1, int(round(lo_tok + (total_gib - lo_gib) / (hi_gib - lo_gib) * (hi_tok - lo_tok))))
    last_gib, last_tok = points[-1]
    return max(1, int(round(last_tok * math.sqrt(total_gib / last_gib))))


def vram_token_cap(device: torch.device) -> int:
    """What the official ``encode`` caps a slide at on ``device``: by total GPU memory, none off-GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return token_cap_for_memory(torch.cuda.get_device_properties(index).total_memory / 1024 ** 3)


# -- slide geometry -------------------------------------------------------------------
def grid_tokens(features: np.ndarray, coords: np.ndarray, step: float,
                max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Which tiles become tokens, in token order, and their snapped level-0 positions.

    Returns ``(index, positions)``: ``index`` into the input rows (row-major
    grid order, background and capped tiles left out; where two tiles snap
    to one cell the later one wins) and ``positions`` ``(n, 2)`` int64 x, y.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise ValueError(f"coords must be a non-empty (N, 2) array, got shape {coords.shape}")
    step = float(step)
    if not step > 0:
        raise ValueError(f"tile_size_lv0 must be positive, got {step}")
    min_x, min_y = float(coords[:, 0].min()), float(coords[:, 1].min())
    width = int(np.floor((float(coords[:, 0].max()) - min_x) / step + 0.5)) + 1
    col = np.round((coords[:, 0] - min_x) / step).astype(np.int64)
    row = np.round((coords[:, 1] - min_y) / step).astype(np.int64)
    off_x = np.abs(min_x + col * step - coords[:, 0]).max()
    off_y = np.abs(min_y + row * step - coords[:, 1]).max()
    if off_x > GRID_STEP_TOLERANCE * step or off_y > GRID_STEP_TOLERANCE * step:
        raise ValueError(f"tile coordinates are not on a grid of step {step:g} (level-0 tile size): "
                         f"off by up to {max(off_x, off_y):g} px, tolerance {GRID_STEP_TOLERANCE * step:g}")
    cell = row * width + col
    # Last occurrence of each cell, in ascending (row-major) cell order.
    order = np.argsort(cell, kind="stable")
    last = np.r_[cell[order][1:] != cell[order][:-1], True]
    index = order[last]
    index = index[np.any(np.asarray(features)[index] != 0, axis=1)]
    n = len(index)
    if 0 < max_tokens < n:
        index = index[(np.arange(max_tokens, dtype=np.int64) * n) // max_tokens]
    positions = np.stack([(min_x + col[index] * step).astype(np.int64),
                          (min_y + row[index] * step).astype(np.int64)], axis=1)
    return index, positions


def alibi_bias(slopes: torch.Tensor, positions: torch.Tensor, step: float, prefix: int,
               dtype: torch.dtype, chunk: int = 2048) -> torch.Tensor:
    """The additive attention bias ``(1, H, P + n, P + n)`` in ``dtype``.

    Distances are computed in float32 (as the official code does) a block
    of rows at a time, so only one ``(chunk, n, 2)`` difference is alive.
    """
    heads, n = slopes.shape[0], positions.shape[0]
    total = prefix + n
    bias = torch.zeros(1, heads, total, total, dtype=dtype, device=positions.device)
    if n == 0:
        return bias
    pos = positions.to(torch.float32)
    size = torch.tensor(max(float(step), 1e-6), dtype=torch.float32, device=pos.device)
    slopes = slopes.detach().to(device=pos.device, dtype=torch.float32).view(heads, 1, 1)
    for start in range(0, n, chunk):
        rows = pos[start:start + chunk]
        dist = torch.norm(rows.unsqueeze(1) - pos.unsqueeze(0), dim=-1) / size
        bias[0, :, prefix + start:prefix + start + rows.shape[0], prefix:] = (slopes * dist).to(dtype)
    return bias


class SlideTransformer(nn.Module):
    """MOOZY's slide encoder: lunit tile features on a grid -> CLS embedding (``d_model``)."""

    def __init__(self, feat_dim: int = 384, d_model: int = 768, n_heads: int = 12, n_layers: int = 6,
                 dim_feedforward: int = 3072, num_registers: int = 4, qk_norm: bool = False,
                 layerscale: bool = False, learnable_alibi: bool = False, max_tokens: int | None = None):
        super().__init__()
        self.feat_dim, self.d_model, self.num_registers = feat_dim, d_model, num_registers
        self.max_tokens = max_tokens
        self.input_proj = nn.Sequential(nn.Linear(feat_dim, d_model), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, d_model)) if num_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model))  # masked-modelling token: training only
        self.pos_bias = Alibi2D(n_heads, learnable_alibi)
        self.blocks = nn.ModuleList(
            SlideBlock(self.pos_bias, d_model, n_heads, dim_feedforward, qk_norm, layerscale)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def token_cap(self) -> int:
        """0 (none) or the most tile tokens a slide keeps; ``None`` resolves as the official encode does."""
        if self.max_tokens is not None:
            return int(self.max_tokens)
        return vram_token_cap(self.cls_token.device)

    def forward_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, step: float) -> torch.Tensor:
        """CLS output for ``tokens`` ``(n, feat_dim)`` at level-0 ``positions`` ``(n, 2)``, in that order."""
        x = self.input_proj(tokens.unsqueeze(0))
        prefix = [self.cls_token] + ([self.register_tokens] if self.register_tokens is not None else [])
        x = torch.cat([*prefix, x], dim=1)  # dtypes promote as in the official concatenation
        bias = alibi_bias(self.pos_bias.slopes, positions, step, 1 + self.num_registers, self._query_dtype(x))
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)[0, 0]

    def _query_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype attention queries have here (autocast, qk-norm): the bias is built in it once."""
        block = self.blocks[0] if len(self.blocks) else None
        if block is None:
            return x.dtype
        return block.q_norm(block._split(block.q_proj(block.norm1(x[:, :1])))).dtype

    def encode_slide(self, features: torch.Tensor, coords: torch.Tensor, tile_size_lv0: int):
        if features.ndim != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"MOOZY's slide encoder takes ({self.feat_dim},)-d tile features, "
                             f"got {tuple(features.shape)}")
        if coords.shape != (features.shape[0], 2):
            raise ValueError(f"coords must be ({features.shape[0]}, 2), got {tuple(coords.shape)}")
        index, positions = grid_tokens(features.detach().cpu().numpy(), coords.detach().cpu().numpy(),
                                       tile_size_lv0, self.token_cap())
        device = features.device
        tokens = features[torch.from_numpy(index).to(device)]
        return SlideEncoding(self.forward_tokens(tokens, torch.from_numpy(positions).to(device), tile_size_lv0))


class CaseTransformer(nn.Module):
    """MOOZY's case (patient) transformer: slide CLS embeddings -> the [CASE] token output."""

    def __init__(self, d_model: int = 768, num_layers: int = 3, num_heads: int = 12, dim_feedforward: int = 3072,
                 qk_norm: bool = False, layerscale: bool = True, num_registers: int = 0):
        super().__init__()
        self.d_model = d_model
        self.case_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, d_model)) if num_registers else None
        self.blocks = nn.ModuleList(
            PreNormBlock(d_model, num_heads, dim_feedforward, qk_norm, layerscale) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def encode_patient(self, slide_embeddings: torch.Tensor) -> torch.Tensor:
        if slide_embeddings.ndim != 2 or slide_embeddings.shape[0] == 0 or slide_embeddings.shape[1] != self.d_model:
            raise ValueError(f"MOOZY's case transformer takes (S >= 1, {self.d_model}) slide embeddings, "
                             f"got {tuple(slide_embeddings.shape)}")
        prefix = [self.case_token] + ([self.register_tokens] if self.register_tokens is not None else [])
        x = torch.cat([*prefix, slide_embeddings.unsqueeze(0)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[0, 0]
