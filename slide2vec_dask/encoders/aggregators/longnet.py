"""Prov-GigaPath's slide model: LongNet's dilated self-attention, encoder, and ``LongNetViT``.

Module and parameter names follow torchscale's ``Encoder`` (the ``encoder.*``
keys of Prov-GigaPath's ``slide_encoder.pth``): pre-LayerNorm layers with the
extra "sub-LayerNorms" of torchscale's ``subln`` default (one after attention,
one inside the feed-forward network) and a final LayerNorm.

Dilated attention (LongNet, Ding et al. 2023) mixes several branches.  Branch
``i`` cuts the sequence into segments of ``segment_lengths[i]`` tokens (the
whole sequence when it is shorter) and, inside each segment, lets head group
``r`` of ``dilations[i]`` groups attend among the tokens whose offset is ``r``
modulo the dilation.  Branches are merged with weights from each branch's
softmax normaliser (its log-sum-exp), which is attention over the union of
their key sets.  The official code takes outputs and log-sum-exps from
flash-attn (CUDA only); `softmax_attention` computes both exactly, in float32
and in bounded memory, on any device.

`LongNetViT` is the official slide model around the encoder (parameter names
as in ``gigapath/slide_encoder.py``); `slide2vec_dask.encoders.aggregators.gigapath`
configures it as published and loads the weights.

Quirks of the official code kept on purpose (they change the numbers):
the zero tokens that pad the sequence to whole segments, and each segment to
whole dilation groups, are attended to as keys (logit 0, value 0); a branch's
log-sum-exp equal to exactly 0 is treated as "not selected" (-1e8); and a
branch with several segments whose length is not a multiple of its dilation
(with the published lengths: 185,363 and dilation 8, past 185,363 tiles) has
its outputs shifted as the official flatten-then-truncate does.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slide2vec_dask.encoders.aggregators.base import SlideEncoding

# Score elements per chunk of `softmax_attention` (float32): bounds its working memory
# (~2 x 256 MiB) whatever the number of tiles.
MAX_SCORES = 1 << 26
NOT_SELECTED = -1e8  # the official log-sum-exp of positions a branch does not cover


def softmax_attention(q, k, v, scale: float, max_scores: int = MAX_SCORES):
    """Exact attention of ``(G, Lq, d)`` queries on ``(G, Lk, d)`` keys/values.

    Returns the output ``(G, Lq, d)`` and the log-sum-exp of the scaled logits
    ``(G, Lq)``, both float32 (what flash-attn returns, which the merge of
    dilated branches needs and ``scaled_dot_product_attention`` does not give).
    """
    groups, lq, _ = q.shape
    lk = max(k.shape[1], 1)
    out = torch.empty(groups, lq, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(groups, lq, dtype=torch.float32, device=q.device)
    q_step = max(1, min(lq, max_scores // lk))
    g_step = max(1, max_scores // (q_step * lk))
    with torch.autocast(q.device.type, enabled=False):
        kf, vf = k.float(), v.float()
        for g0 in range(0, groups, g_step):
            g1 = g0 + g_step
            for q0 in range(0, lq, q_step):
                q1 = q0 + q_step
                scores = torch.matmul(q[g0:g1, q0:q1].float(), kf[g0:g1].transpose(1, 2)).mul_(scale)
                norm = torch.logsumexp(scores, dim=-1)
                lse[g0:g1, q0:q1] = norm
                out[g0:g1, q0:q1] = torch.matmul(scores.sub_(norm.unsqueeze(-1)).exp_(), vf[g0:g1])
    return out, lse


def _dilated_branch(q, k, v, segment: int, dilation: int, scale: float):
    """One branch: ``(B, L, H, d)`` in, dense ``(B, L, H, d)`` output and ``(B, L, H)`` log-sum-exp out."""
    b, length, heads, d = q.shape
    if segment < 1 or dilation < 1:
        raise ValueError(f"segment length and dilation must be >= 1, got {segment} and {dilation}")
    if heads % dilation:
        raise ValueError(f"dilation {dilation} must divide the number of heads ({heads})")
    seg = min(segment, length)
    n = -(-length // seg)                   # segments
    slots = -(-seg // dilation) * dilation  # a segment padded to whole dilation groups
    m = slots // dilation                   # tokens per (segment, head group)
    hg = heads // dilation                  # heads per group

    def gather(x):
        x = F.pad(x, (0, 0, 0, 0, 0, n * seg - length)).view(b, n, seg, heads, d)
        x = F.pad(x, (0, 0, 0, 0, 0, slots - seg)).view(b, n, m, dilation, dilation, hg, d)
        # token offset r1 (dim 3) meets head group r2 (dim 4): keep r1 == r2
        x = torch.diagonal(x, dim1=3, dim2=4)                      # (b, n, m, hg, d, r)
        return x.permute(0, 1, 5, 3, 2, 4).reshape(b * n * heads, m, d)  # head = r * hg + h

    out, lse = softmax_attention(gather(q), gather(k), gather(v), scale)
    out = out.view(b, n, dilation, hg, m, d).permute(0, 1, 4, 2, 3, 5)  # (b, n, m, r, hg, d)
    lse = lse.view(b, n, dilation, hg, m).permute(0, 1, 4, 2, 3)
    r = torch.arange(dilation, device=q.device)
    dense = out.new_zeros(b, n, m, dilation, dilation, hg, d)
    dense[:, :, :, r, r] = out
    dense_lse = lse.new_zeros(b, n, m, dilation, dilation, hg)
    dense_lse[:, :, :, r, r] = lse
    dense_lse.masked_fill_(dense_lse == 0, NOT_SELECTED)
    # positions l * dilation + r1 over the n * slots padded positions, then the first `length`
    return (dense.reshape(b, n * slots, heads, d)[:, :length],
            dense_lse.reshape(b, n * slots, heads)[:, :length])


def dilated_attention(q, k, v, segment_lengths: Sequence[int], dilations: Sequence[int]):
    """LongNet attention of ``(B, L, H, d)`` queries, keys, values -> ``(B, L, H, d)`` float32."""
    if len(segment_lengths) != len(dilations) or not segment_lengths:
        raise ValueError(f"need one dilation per segment length, got {segment_lengths} and {dilations}")
    scale = q.shape[-1] ** -0.5  # flash-attn's default softmax scale
    # out = sum_i exp(lse_i) out_i / sum_i exp(lse_i), accumulated branch by branch (one output in memory)
    acc = top = total = None
    for segment, dilation in zip(segment_lengths, dilations):
        out, lse = _dilated_branch(q, k, v, segment, dilation, scale)
        if acc is None:
            acc, top, total = out, lse, torch.ones_like(lse)
            continue
        new_top = torch.maximum(top, lse)
        old, this = torch.exp(top - new_top), torch.exp(lse - new_top)
        acc = acc * old.unsqueeze(-1) + out * this.unsqueeze(-1)
        total = total * old + this
        top = new_top
    return acc / total.unsqueeze(-1)


class DilatedSelfAttention(nn.Module):
    """torchscale's ``DilatedAttention`` (self-attention, ``subln``): q/k/v, sub-LayerNorm, output."""

    def __init__(self, dim: int, heads: int, segment_lengths: Sequence[int], dilations: Sequence[int],
                 eps: float = 1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        for dilation in dilations:
            if heads % dilation:
                raise ValueError(f"dilation {dilation} must divide the number of heads ({heads})")
        self.heads = heads
        self.segment_lengths = tuple(int(s) for s in segment_lengths)
        self.dilations = tuple(int(r) for r in dilations)
        # registration order = torchscale's, so state dicts list keys in the official order
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        b, length, dim = x.shape
        shape = (b, length, self.heads, dim // self.heads)
        q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        attn = dilated_attention(q, k, v, self.segment_lengths, self.dilations).to(q.dtype)
        return self.out_proj(self.inner_attn_ln(attn.reshape(b, length, dim)))


class FeedForward(nn.Module):
    """torchscale's ``FeedForwardNetwork`` with ``subln``: fc1, GELU (in float32), LayerNorm, fc2."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        x = self.fc1(x)
        x = F.gelu(x.float()).type_as(x)
        return self.fc2(self.ffn_layernorm(x))


class LongNetLayer(nn.Module):
    """A pre-LayerNorm encoder layer (torchscale ``EncoderLayer`` in eval mode)."""

    def __init__(self, dim: int, heads: int, hidden: int, segment_lengths, dilations, eps: float = 1e-5):
        super().__init__()
        self.self_attn = DilatedSelfAttention(dim, heads, segment_lengths, dilations, eps)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FeedForward(dim, hidden, eps)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class LongNetEncoder(nn.Module):
    """torchscale's ``LongNetEncoder`` for token embeddings (no vocabulary, no positions of its own)."""

    def __init__(self, dim: int, depth: int, heads: int, hidden: int, segment_lengths, dilations,
                 eps: float = 1e-5):
        super().__init__()
        self.layers = nn.ModuleList(
            LongNetLayer(dim, heads, hidden, segment_lengths, dilations, eps) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, num_layers: int | None = None, final_norm: bool = True):
        """The hidden states after ``num_layers`` layers (all by default).

        ``final_norm`` applies the encoder's last LayerNorm: torchscale's
        ``encoder_out`` has it, its ``encoder_states`` (``all_layer_embed``) do not.
        """
        depth = len(self.layers)
        num_layers = depth if num_layers is None else num_layers
        if not 0 <= num_layers <= depth:
            raise ValueError(f"num_layers must be in [0, {depth}], got {num_layers}")
        if final_norm and num_layers != depth:
            raise ValueError("the final LayerNorm follows the last layer only")
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return self.layer_norm(x) if final_norm else x


def sincos_position_embedding(grid, dim: int):
    """The fixed 2-D sin-cos embedding of tile grid positions ``(N, 2)`` = ``(col, row)``, float32.

    The official table (MAE's ``get_2d_sincos_pos_embed`` over the
    ``slide_ngrids``-square grid, float64 then float32) at the flat index
    ``col * slide_ngrids + row`` that ``coords_to_pos`` computes holds
    ``[1-D(row), 1-D(col)]``; computed here per tile instead of as a
    ``slide_ngrids ** 2`` x ``dim`` buffer (3 GB for the published model).
    """
    half = dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64, device=grid.device) / (half / 2))

    def one_d(pos):
        angles = pos.to(torch.float64)[:, None] * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one_d(grid[:, 1]), one_d(grid[:, 0])], dim=1).float()


class Readout(NamedTuple):
    """Which hidden state becomes the slide embedding, and how it is pooled."""

    num_layers: int | None = None  # layers run; None: all
    final_norm: bool = True        # the encoder's final LayerNorm (``encoder_out``) or not (``encoder_states``)
    pool: str = "cls"              # "cls" token or "mean" of the tile tokens (``global_pool``)


class PatchEmbed(nn.Module):
    """The official slide ``PatchEmbed``: a linear map of tile features (``proj``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x):
        return self.proj(x)


class LongNetViT(nn.Module):
    """The official ``LongNetViT`` for one slide at a time, in eval mode, with one `Readout`."""

    def __init__(self, *, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: int, slide_ngrids: int,
                 segment_lengths: Sequence[int], dilations: Sequence[int], readout: Readout = Readout()):
        super().__init__()
        readout = Readout(*readout)
        if readout.pool not in ("cls", "mean"):
            raise ValueError(f"readout pool must be 'cls' or 'mean', got {readout.pool!r}")
        if readout.num_layers is not None and not 0 <= readout.num_layers <= depth:
            raise ValueError(f"readout needs {readout.num_layers} layers, the model has {depth}")
        self.readout = readout
        self.slide_ngrids = slide_ngrids
        # registration order = the official one (state dict key order)
        self.patch_embed = PatchEmbed(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = LongNetEncoder(dim, depth, heads, dim * mlp_ratio, segment_lengths, dilations)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, features, grid):
        """``(N, in_dim)`` tile features, ``(N, 2)`` grid ``(col, row)`` -> ``(dim,)`` embedding."""
        x = self.patch_embed(features.unsqueeze(0))
        x = x + sincos_position_embedding(grid, x.shape[-1])  # float32, like the official buffer
        cls = self.cls_token.expand(1, -1, -1)  # its position embedding is the table's zero row
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        depth = len(self.encoder.layers)
        num_layers = depth if self.readout.num_layers is None else self.readout.num_layers
        x = self.encoder(x, num_layers=num_layers, final_norm=self.readout.final_norm)
        pooled = x[0, 0] if self.readout.pool == "cls" else x[0, 1:].mean(dim=0)
        return self.norm(pooled)

    def tile_grid(self, coords, tile_size_lv0: int):
        """Level-0 tile origins ``(N, 2)`` -> grid ``(col, row)`` = ``round(coords / tile_size_lv0)``, checked."""
        t = int(tile_size_lv0)
        if t <= 0:
            raise ValueError(f"tile_size_lv0 must be positive, got {tile_size_lv0}")
        coords = coords.to(torch.int64)
        if bool((coords < 0).any()):
            raise ValueError("tile coordinates must be non-negative level-0 pixels")
        grid = torch.div(2 * coords + t, 2 * t, rounding_mode="floor")
        if bool((grid >= self.slide_ngrids).any()):
            raise ValueError(f"the slide spans {int(grid.max()) + 1} tiles along an axis; the model's positions "
                             f"cover {self.slide_ngrids}")
        return grid

    def encode_slide(self, features, coords, tile_size_lv0: int) -> SlideEncoding:
        """The slide-level contract: ``(N, in_dim)`` features, ``(N, 2)`` level-0 origins -> ``(dim,)``."""
        in_dim = self.patch_embed.proj.in_features
        if features.ndim != 2 or coords.ndim != 2 or tuple(coords.shape) != (features.shape[0], 2):
            raise ValueError(f"expected (N, {in_dim}) features and (N, 2) coords, got "
                             f"{tuple(features.shape)} and {tuple(coords.shape)}")
        if features.shape[0] == 0:
            raise ValueError("a slide needs at least one tile")
        if features.shape[1] != in_dim:
            raise ValueError(f"tile features must be {in_dim}-d, got {features.shape[1]}")
        embedding = self(features, self.tile_grid(coords, tile_size_lv0))
        return SlideEncoding(embedding.float(), None)


class CenterCropped(nn.Module):
    """A tile encoder fed the centre ``crop_px`` square of its tiles (torchvision ``CenterCrop``'s offsets).

    Prov-GigaPath's pipeline encodes the centre 224 px of 256-px tiles.
    """

    def __init__(self, encoder: nn.Module, crop_px: int):
        super().__init__()
        self.encoder = encoder
        self.crop_px = crop_px

    def forward(self, x):
        h, w = x.shape[-2:]
        c = self.crop_px
        if h < c or w < c:
            raise ValueError(f"tiles of {h}x{w} px are smaller than the {c}-px centre crop")
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        return self.encoder(x[..., top:top + c, left:left + c])
