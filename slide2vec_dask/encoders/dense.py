"""Dense outputs of a ViT tile encoder: its patch-token grid, or its CLS attention, as ``(K, gh, gw)``.

A dense request is a `DensePlan` (small, picklable data: geometry, padding, sliding
windows, feature kind); `encode_dense` turns ``(B, H, W, 3)`` uint8 pixels into
``(B, K, gh, gw)`` on a worker's already-loaded encoder (`runtime.LoadedEncoder`),
so dense and pooled work share one model per worker.

* ``patch_features``: the patch tokens after the trunk's final norm (the tokens the
  pooled output is made from), CLS and registers removed, ``K = embed_dim``.
* ``patch_features_prenorm``: the same tokens *before* the final norm (the last block's
  output, timm's ``features_only`` tap).
* ``cls_attention``: for each chosen block, the softmax attention of the CLS query (and
  of each register query when asked) over the patch keys, per head:
  ``K = blocks x queries x heads`` in that order.  timm runs fused attention, which
  never forms the matrix; the block's input is captured by a hook and the probabilities
  are recomputed from the block's own q/k projections (q/k norms and RoPE included).

Inputs are normalised with the encoder's mean/std (no resize, no crop: a dense grid
registers to its pixels), padded bottom/right up to a patch multiple (``reflect``,
``replicate``, ``constant``/``zero`` with ``image_pad_value``), and either encoded
whole or by patch-aligned sliding windows whose token grids are blended with a
separable raised-cosine weight.  Which encoders have a token grid is decided by
`token_layout`, from the architecture alone (built on the meta device, no weights).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from slide2vec_dask.encoders.base import EncoderSpec, ModuleBuilder, TimmBuilder
from slide2vec_dask.encoders.plugins import DENSE_METHODS, PluginBuilder, TileEncoder, implements
from slide2vec_dask.encoders.runtime import LoadedEncoder

FEATURE_KINDS = ("patch_features", "patch_features_prenorm", "cls_attention")
PAD_MODES = ("reflect", "replicate", "constant", "zero")
OUTPUT_DTYPES = ("fp16", "fp32")


class NoTokenGridError(ValueError):
    """The encoder has no patch-token grid (a CNN, a Swin): it has no dense outputs."""


# -- which encoders have a token grid ------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """What a dense request needs to know about a ViT trunk, read without its weights."""

    patch_size: tuple[int, int]
    num_prefix_tokens: int       # CLS + registers
    embed_dim: int
    num_heads: int
    depth: int


def find_trunk(module):
    """The timm ViT inside a built encoder (itself, or the trunk its wrapper holds), else None."""
    seen = [module]
    for path in ("model", "backbone", "trunk", "visual.trunk"):
        inner = module
        for part in path.split("."):
            inner = getattr(inner, part, None)
        if inner is not None:
            seen.append(inner)
    for candidate in seen:
        if _is_vit(candidate):
            return candidate
    return None


def _is_vit(module) -> bool:
    return all(hasattr(module, a) for a in ("blocks", "patch_embed", "forward_features", "norm")) and \
        hasattr(getattr(module, "patch_embed"), "patch_size") and hasattr(module, "num_prefix_tokens") and \
        all(hasattr(b, "attn") for b in module.blocks)


def layout_of(trunk) -> TokenLayout:
    patch = trunk.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    attn = trunk.blocks[0].attn
    return TokenLayout((ph, pw), int(trunk.num_prefix_tokens), int(getattr(trunk, "embed_dim", trunk.num_features)),
                       int(attn.num_heads), len(trunk.blocks))


def token_layout(spec: EncoderSpec) -> TokenLayout:
    """The encoder's `TokenLayout`, probed on the meta device; `NoTokenGridError` naming it when it has none."""
    import torch

    build = spec.build
    if isinstance(build, PluginBuilder):
        return _plugin_layout(spec)
    preset = getattr(build, "preset", None)
    if preset is not None and preset.layout == "conch":
        raise NoTokenGridError(
            f"{spec.name!r}: dense outputs need the timm ViT trunk of the encoder, and CONCH v1's image tower "
            "comes from the `conch` package's own open_clip; use 'conchv15' (a timm ViT-L/16) for dense features")
    with torch.device("meta"):
        if preset is not None:
            module = preset.create_module(build.output_variant, runtime=True)
        elif isinstance(build, TimmBuilder):
            import timm

            module = timm.create_model(build.arch, pretrained=False, **dict(build.kwargs))
        elif isinstance(build, ModuleBuilder):
            module = build.module
        else:
            raise NoTokenGridError(f"{spec.name!r}: cannot tell whether this encoder has a token grid "
                                   f"(built by {type(build).__name__}); dense outputs need a timm ViT")
    trunk = find_trunk(module)
    if trunk is None:
        architecture = (spec.info or {}).get("architecture") or type(module).__name__
        raise NoTokenGridError(
            f"{spec.name!r} ({architecture}) has no patch-token grid, so it has no dense outputs "
            "(patch_features, patch_features_prenorm, cls_attention): those need a ViT tile encoder "
            "(CNNs such as resnet50 and the Swin of ctranspath are refused). Use a ViT preset, e.g. "
            "'uni', 'virchow2', 'h-optimus-0', 'phikon' or 'dinov3-vitb16'.")
    return layout_of(trunk)


def _plugin_layout(spec: EncoderSpec) -> TokenLayout:
    """A registered class's grid, from what it declared (``patch_size``): nothing is instantiated."""
    patch = (spec.info or {}).get("patch_size")
    if patch is None or not implements(spec.build.cls, "encode_tiles_dense"):
        raise NoTokenGridError(f"{spec.name!r} has no dense outputs: a registered encoder needs to declare "
                               "patch_size in register_encoder(...) and implement encode_tiles_dense")
    return TokenLayout((int(patch[0]), int(patch[1])), 0, int(spec.feature_dim or 0), 0, 0)


def _check_plugin(spec: EncoderSpec, plan: "DensePlan") -> None:
    """A registered class must implement the feature kind asked, and take the inputs the plan encodes."""
    method = DENSE_METHODS[plan.feature_kind]
    if not implements(spec.build.cls, method):
        raise ValueError(f"{spec.name!r} does not implement {method}, so it has no "
                         f"feature_kind={plan.feature_kind!r} outputs; choose another feature_kind")
    if not (spec.info or {}).get("supports_variable_input_size", True):
        (wh, ww), _, _ = plan.windows()
        side = int(spec.tile_size_px)
        if (wh, ww) != (side, side):
            raise ValueError(f"{spec.name!r} takes only {side} x {side} px inputs (registered with "
                             f"supports_variable_input_size=False), but this request encodes {wh} x {ww} px "
                             f"(target_size {plan.geometry.target_size}, window_size {plan.window_size}); "
                             f"ask for target_size {side} without window_size")


# -- what a request asks for --------------------------------------------------------------------
def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        h = w = int(value)
    else:
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an int or an (height, width) pair, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class DenseGeometry:
    """Where a grid sits on its pixels: ``target_size`` padded bottom/right to ``encoded_size``.

    ``grid_shape = encoded_size / patch_size``; token ``(i, j)`` covers pixels
    ``[i * ph, (i + 1) * ph) x [j * pw, (j + 1) * pw)`` of the (padded) input.
    """

    target_size: tuple[int, int]
    patch_size: tuple[int, int]
    encoded_size: tuple[int, int]
    grid_shape: tuple[int, int]
    pad: tuple[int, int]          # (bottom, right)

    @classmethod
    def of(cls, target_size, patch_size) -> "DenseGeometry":
        th, tw = _pair(target_size, "target_size")
        ph, pw = _pair(patch_size, "patch_size")
        eh, ew = _round_up(th, ph), _round_up(tw, pw)
        return cls((th, tw), (ph, pw), (eh, ew), (eh // ph, ew // pw), (eh - th, ew - tw))

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the image inside the padded input."""
        return 0, 0, self.target_size[1], self.target_size[0]

    def as_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("target_size", "patch_size", "encoded_size", "grid_shape", "pad")}


@dataclass(frozen=True)
class DensePlan:
    """One dense request, resolved against the encoder: everything a worker needs besides pixels."""

    geometry: DenseGeometry
    layout: TokenLayout
    feature_kind: str = "patch_features"
    pad_mode: str = "reflect"
    image_pad_value: float | None = None
    window_size: int | None = None
    overlap: float = 0.0
    attention_blocks: tuple[int, ...] = (-1,)
    attention_include_registers: bool = False
    output_dtype: str = "fp32"

    @classmethod
    def resolve(cls, spec: EncoderSpec, options, target_size, output_dtype: str = "fp32") -> "DensePlan":
        """Check ``options`` (`DenseOptions` / `DenseImageOptions` fields) against ``spec``; errors name the field."""
        kind = options.feature_kind
        if kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature_kind {kind!r}: choose one of {list(FEATURE_KINDS)}")
        if options.pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad_mode {options.pad_mode!r}: choose one of {list(PAD_MODES)}")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {list(OUTPUT_DTYPES)}, got {output_dtype!r}")
        layout = token_layout(spec)
        geometry = DenseGeometry.of(target_size, layout.patch_size)
        if options.pad_mode == "reflect" and (geometry.pad[0] >= geometry.target_size[0]
                                             or geometry.pad[1] >= geometry.target_size[1]):
            raise ValueError(f"pad_mode='reflect' needs a padding smaller than the image: target_size "
                             f"{geometry.target_size} pads by {geometry.pad}; choose another pad_mode")
        window = options.window_size
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window <= 0:
                raise ValueError(f"window_size must be a positive int or None, got {window!r}")
            if not 0.0 <= float(options.overlap) < 1.0:
                raise ValueError(f"overlap must be in [0, 1), got {options.overlap!r}")
        blocks = tuple(options.attention_blocks)
        if kind == "cls_attention" and layout.depth:
            if not blocks or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in blocks):
                raise ValueError(f"attention_blocks must be a non-empty tuple of ints, got {options.attention_blocks!r}")
            for b in blocks:
                if not -layout.depth <= b < layout.depth:
                    raise ValueError(f"attention_blocks: block {b} is out of range for {spec.name!r}, which has "
                                     f"{layout.depth} blocks (use 0..{layout.depth - 1} or -1 for the last)")
        if not isinstance(options.attention_include_registers, bool):
            raise ValueError("attention_include_registers must be True or False")
        plan = cls(geometry, layout, kind, options.pad_mode,
                   None if options.image_pad_value is None else float(options.image_pad_value),
                   None if window is None else int(window), float(options.overlap),
                   tuple(int(b) for b in blocks), bool(options.attention_include_registers), output_dtype)
        if isinstance(spec.build, PluginBuilder):
            _check_plugin(spec, plan)
        return plan

    @property
    def channels(self) -> int:
        """``K``: the grid's feature dimension."""
        if self.feature_kind != "cls_attention":
            return self.layout.embed_dim
        queries = self.layout.num_prefix_tokens if self.attention_include_registers else 1
        return len(self.attention_blocks) * queries * self.layout.num_heads

    def windows(self) -> tuple[tuple[int, int], list[int], list[int]]:
        """``((win_h, win_w), row starts, column starts)`` in encoded pixels, all patch-aligned."""
        eh, ew = self.geometry.encoded_size
        if self.window_size is None:
            return (eh, ew), [0], [0]
        sizes, starts = [], []
        for extent, patch in zip(self.geometry.encoded_size, self.geometry.patch_size):
            win = min(_round_up(self.window_size, patch), extent)
            stride = min(win, max(patch, round(win * (1.0 - self.overlap) / patch) * patch))
            sizes.append(win)
            starts.append(_covering(extent, win, stride))
        return (sizes[0], sizes[1]), starts[0], starts[1]

    def record(self) -> dict:
        """The request as a sidecar states it (slide2vec's field names)."""
        return {**self.geometry.as_dict(), "pad_mode": self.pad_mode, "image_pad_value": self.image_pad_value,
                "window_size": self.window_size, "overlap": self.overlap, "feature_kind": self.feature_kind,
                "attention_blocks": list(self.attention_blocks),
                "attention_include_registers": self.attention_include_registers, "dtype": _NP_DTYPES[self.output_dtype]}


_NP_DTYPES = {"fp16": "float16", "fp32": "float32"}


def _covering(extent: int, size: int, stride: int) -> list[int]:
    """Window starts covering ``[0, extent)``: every ``stride``, plus one flush with the far edge if needed."""
    if size >= extent:
        return [0]
    starts = list(range(0, extent - size + 1, stride))
    if starts[-1] + size < extent:
        starts.append(extent - size)
    return starts


def _raised_cosine(n: int, tiled: bool, device):
    """Blending weight along one axis: strictly positive raised cosine when windows overlap there, else flat."""
    import torch

    if not tiled or n <= 1:
        return torch.ones(n, device=device)
    i = torch.arange(1, n + 1, device=device, dtype=torch.float32)
    return 0.5 - 0.5 * torch.cos(2.0 * math.pi * i / (n + 1))


# -- the forward ---------------------------------------------------------------------------------
def _attention_probs(attn, x, rope=None):
    """``(B, heads, N, N)`` softmax attention of a timm ``Attention`` / ``EvaAttention`` for its input ``x``.

    The module's own projections, q/k norms, RoPE (patch tokens only) and scale: what its
    unfused branch computes, in float32.
    """
    import torch
    import torch.nn.functional as F

    b, n, _ = x.shape
    heads = int(attn.num_heads)
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if getattr(attn, "qkv_bias_separate", False) else \
                F.linear(x, attn.qkv.weight, bias)
        q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    elif getattr(attn, "q_proj", None) is not None:
        q = attn.q_proj(x).reshape(b, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, heads, -1).transpose(1, 2)
    else:
        raise NotImplementedError(f"{type(attn).__name__}: no q/k projections to recompute attention from")
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        npt, half = int(attn.num_prefix_tokens), bool(getattr(attn, "rotate_half", False))
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    q, k = q.float(), k.float()
    return ((q * float(attn.scale)) @ k.transpose(-2, -1)).softmax(dim=-1)


@contextlib.contextmanager
def _any_input_size(trunk, size: tuple[int, int]):
    """Let a trunk built for one input size take ``size``: timm's dynamic mode (position embeddings
    resampled per forward), switched on for the call when the trunk was not built with it."""
    native = getattr(trunk.patch_embed, "img_size", None)
    if getattr(trunk, "dynamic_img_size", True) or native is None or tuple(native) == tuple(size):
        yield
        return
    from timm.layers import Format

    pe = trunk.patch_embed
    saved = (trunk.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
    trunk.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = True, False, False, Format.NHWC
    try:
        yield
    finally:
        trunk.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = saved


def grid_forward(trunk, x, plan: DensePlan):
    """One forward of ``x`` (normalised ``(B, 3, h, w)``, a patch multiple) -> ``(B, K, h/ph, w/pw)`` float32."""
    import torch

    if isinstance(trunk, TileEncoder):   # a registered class computes its own grid
        return _plugin_forward(trunk, x, plan)
    layout = plan.layout
    gh, gw = x.shape[-2] // layout.patch_size[0], x.shape[-1] // layout.patch_size[1]
    npt = layout.num_prefix_tokens
    caught: dict = {}
    hooks = []
    if plan.feature_kind == "patch_features_prenorm":
        hooks.append(trunk.norm.register_forward_pre_hook(lambda m, args: caught.__setitem__("pre", args[0])))
    elif plan.feature_kind == "cls_attention":
        depth = len(trunk.blocks)
        for index in sorted({b % depth for b in plan.attention_blocks}):
            def hook(module, args, kwargs, index=index):
                caught[index] = (args[0], kwargs.get("rope", args[1] if len(args) > 1 else None))
            hooks.append(trunk.blocks[index].attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with _any_input_size(trunk, tuple(x.shape[-2:])):
            tokens = trunk.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    if plan.feature_kind == "patch_features":
        return _fold(tokens[:, npt:], gh, gw)
    if plan.feature_kind == "patch_features_prenorm":
        return _fold(caught["pre"][:, npt:], gh, gw)
    queries = npt if plan.attention_include_registers else 1
    maps = []
    depth = len(trunk.blocks)
    for b in plan.attention_blocks:
        inputs, rope = caught[b % depth]
        probs = _attention_probs(trunk.blocks[b % depth].attn, inputs, rope)   # (B, heads, N, N)
        rows = probs[:, :, :queries, npt:]                                    # (B, heads, q, patches)
        maps.append(rows.permute(0, 2, 1, 3).reshape(x.shape[0], -1, gh, gw))  # channel = q * heads + head
    return torch.cat(maps, dim=1)


def _plugin_forward(encoder: TileEncoder, x, plan: DensePlan):
    if plan.feature_kind == "cls_attention":
        out = encoder.encode_tiles_attention(x, blocks=plan.attention_blocks,
                                             include_registers=plan.attention_include_registers)
    else:
        out = getattr(encoder, DENSE_METHODS[plan.feature_kind])(x)
    grid = (x.shape[-2] // plan.geometry.patch_size[0], x.shape[-1] // plan.geometry.patch_size[1])
    if out.ndim != 4 or out.shape[0] != x.shape[0] or tuple(out.shape[-2:]) != grid:
        raise ValueError(f"{type(encoder).__name__}.{DENSE_METHODS[plan.feature_kind]} returned shape "
                         f"{tuple(out.shape)} for a {tuple(x.shape)} batch; a ({x.shape[0]}, K, {grid[0]}, "
                         f"{grid[1]}) grid was expected (patch_size {plan.geometry.patch_size})")
    return out.float()


def dense_trunk(module):
    """What computes a built encoder's grid: a registered class's instance, or the timm ViT inside it."""
    inner = getattr(module, "inner", None)
    return inner if isinstance(inner, TileEncoder) else find_trunk(module)


def _fold(patch_tokens, gh: int, gw: int):
    b, n, d = patch_tokens.shape
    if n != gh * gw:
        raise ValueError(f"the trunk returned {n} patch tokens for a {gh}x{gw} grid")
    return patch_tokens.float().transpose(1, 2).reshape(b, d, gh, gw)


def encode_normalized(trunk, x, plan: DensePlan):
    """Padded, normalised ``(B, 3, eh, ew)`` -> ``(B, K, gh, gw)`` float32: whole, or by blended windows."""
    import torch

    (wh, ww), rows, cols = plan.windows()
    if len(rows) == 1 and len(cols) == 1:
        return grid_forward(trunk, x, plan)
    ph, pw = plan.geometry.patch_size
    gh, gw = plan.geometry.grid_shape
    th, tw = wh // ph, ww // pw
    weight = torch.outer(_raised_cosine(th, len(rows) > 1, x.device), _raised_cosine(tw, len(cols) > 1, x.device))
    total = torch.zeros(gh, gw, device=x.device)
    out = None
    for r in rows:
        for c in cols:
            grid = grid_forward(trunk, x[:, :, r : r + wh, c : c + ww], plan)
            if out is None:
                out = torch.zeros(x.shape[0], grid.shape[1], gh, gw, device=x.device)
            out[:, :, r // ph : r // ph + th, c // pw : c // pw + tw] += grid * weight
            total[r // ph : r // ph + th, c // pw : c // pw + tw] += weight
    return out / total


def normalize_and_pad(x, mean, std, plan: DensePlan):
    """``(B, 3, h, w)`` float in [0, 255] -> normalised and padded bottom/right to the encoded size."""
    import torch

    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return pad_to_encoded((x / 255.0 - mean) / std, plan)


def pad_to_encoded(x, plan: DensePlan):
    """Pad a normalised ``(B, 3, h, w)`` batch bottom/right to ``encoded_size`` with ``plan.pad_mode``."""
    import torch.nn.functional as F

    bottom, right = plan.geometry.pad
    if not bottom and not right:
        return x
    if plan.pad_mode in ("constant", "zero"):
        value = 0.0 if plan.pad_mode == "zero" or plan.image_pad_value is None else plan.image_pad_value
        return F.pad(x, (0, right, 0, bottom), mode="constant", value=value)
    return F.pad(x, (0, right, 0, bottom), mode=plan.pad_mode)


def encode_dense(encoder, pixels: np.ndarray, plan: DensePlan, batch_size: int) -> np.ndarray:
    """``(B, h, w, 3)`` uint8 at ``target_size`` -> ``(B, K, gh, gw)`` in ``plan.output_dtype``, on
    ``encoder``'s device (a `runtime.LoadedEncoder`; its module holds the trunk)."""
    import torch

    trunk = dense_trunk(encoder.module)
    if trunk is None:
        raise NoTokenGridError(f"{encoder.spec.name!r} has no patch-token grid")
    if pixels.shape[1:3] != plan.geometry.target_size:
        raise ValueError(f"dense input is {pixels.shape[1:3]}, the plan's target_size is {plan.geometry.target_size}")
    out = []
    with torch.inference_mode(), encoder._autocast():
        for start in range(0, len(pixels), max(1, batch_size)):
            batch = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size])).to(encoder.device)
            x = normalize_and_pad(batch.permute(0, 3, 1, 2).float(), encoder.spec.mean, encoder.spec.std, plan)
            out.append(encode_normalized(trunk, x, plan).cpu().numpy().astype(_NP_DTYPES[plan.output_dtype]))
    channels = plan.channels
    return np.concatenate(out) if out else np.zeros((0, channels, *plan.geometry.grid_shape), _NP_DTYPES[plan.output_dtype])


def embed_with_grids(encoder, tiles: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled embeddings and token grids of the same forward: ``((N, D), (N, gh, gw, D_tokens))`` float32.

    The grids are the trunk's patch tokens after its final norm, caught by a hook while
    the encoder computes its pooled output, so keeping them costs no second forward.
    """
    import torch

    trunk = find_trunk(encoder.module)
    if trunk is None:
        raise NoTokenGridError(f"{encoder.spec.name!r} has no patch-token grid, so save_dense cannot keep one")
    npt = int(trunk.num_prefix_tokens)
    ph, pw = layout_of(trunk).patch_size
    size = encoder.spec.tile_size_px
    pooled, grids, caught = [], [], {}
    hook = trunk.norm.register_forward_hook(lambda m, args, out: caught.__setitem__("tokens", out))
    try:
        with torch.inference_mode(), encoder._autocast():
            for start in range(0, len(tiles), max(1, batch_size)):
                pooled.append(encoder._forward(torch.from_numpy(tiles[start : start + batch_size])).float().cpu())
                tokens = caught.pop("tokens")[:, npt:].float()
                grids.append(tokens.reshape(len(tokens), size // ph, size // pw, -1).cpu())
    finally:
        hook.remove()
    if not pooled:
        dim = layout_of(trunk).embed_dim
        return np.zeros((0, encoder.spec.feature_dim or 0), np.float32), np.zeros((0, size // ph, size // pw, dim),
                                                                                  np.float32)
    return torch.cat(pooled).numpy(), torch.cat(grids).numpy()


# -- a live encoder for training loops ---------------------------------------------------------------
@dataclass(frozen=True)
class DensePreprocessor:
    """One ``(3, H, W)`` uint8 tensor at ``target_size`` -> normalised, padded float ``(3, eh, ew)`` (picklable:
    safe in DataLoader workers).  No resize and no crop: augment before, at the declared geometry."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    plan: DensePlan

    def __call__(self, item):
        import torch

        if not torch.is_tensor(item) or item.ndim != 3 or item.shape[0] != 3 or item.dtype != torch.uint8:
            raise ValueError("the dense preprocessor takes one (3, H, W) uint8 CPU tensor, got "
                             f"{getattr(item, 'dtype', type(item).__name__)} {tuple(getattr(item, 'shape', ()))}")
        if tuple(item.shape[-2:]) != self.plan.geometry.target_size:
            raise ValueError(f"the dense preprocessor got {tuple(item.shape[-2:])} pixels; the declared target_size "
                             f"is {self.plan.geometry.target_size} (it neither resizes nor crops)")
        return normalize_and_pad(item[None].float(), self.mean, self.std, self.plan)[0]


class DenseEncodeKit:
    """``prepare_dense_encoder``'s result: the frozen encoder and its geometry, for augmented tensors.

    ``kit.preprocessor()`` per item, collate, ``kit.encode(batch)`` -> ``(B, K, gh, gw)`` on
    the encoder's device, without gradients.  Not a ``torch.nn.Module``: assigning it to a
    trainable decoder does not register the foundation model's weights.
    """

    __slots__ = ("_encoder", "_trunk", "_plan")

    def __init__(self, spec: EncoderSpec, plan: DensePlan, device: str, precision: str):
        encoder = LoadedEncoder(spec, device, precision, channels_last=False)
        trunk = dense_trunk(encoder.module)
        if trunk is None:
            raise NoTokenGridError(f"{spec.name!r} has no patch-token grid")
        self._encoder, self._trunk, self._plan = encoder, trunk, plan

    @property
    def geometry(self) -> DenseGeometry:
        return self._plan.geometry

    @property
    def plan(self) -> DensePlan:
        return self._plan

    @property
    def device(self):
        return self._encoder.device

    def preprocessor(self) -> DensePreprocessor:
        return DensePreprocessor(tuple(self._encoder.spec.mean), tuple(self._encoder.spec.std), self._plan)

    def encode(self, batch):
        """A collated, preprocessed ``(B, 3, eh, ew)`` float CPU batch -> its grids, on the device."""
        import torch

        if not torch.is_tensor(batch) or batch.ndim != 4 or batch.shape[1] != 3 or not batch.is_floating_point():
            raise ValueError("encode takes a preprocessed (B, 3, H, W) float tensor from kit.preprocessor(), got "
                             f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}")
        if tuple(batch.shape[-2:]) != self.geometry.encoded_size:
            raise ValueError(f"encode expected encoded_size {self.geometry.encoded_size}, got {tuple(batch.shape[-2:])}")
        with torch.no_grad(), self._encoder._autocast():
            out = encode_normalized(self._trunk, batch.to(self._encoder.device), self._plan)
        return out.to(torch.float16 if self._plan.output_dtype == "fp16" else torch.float32)
