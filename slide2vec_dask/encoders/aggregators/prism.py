"""PRISM (Paige, https://huggingface.co/paige-ai/Prism): its text-free slide path.

PRISM's slide encoder is a Perceiver "resampler" over Virchow v1 tile
embeddings (CLS ++ mean of patch tokens, 2560-d: the ``virchow`` preset's
``cls_mean``).  513 learned latent queries cross-attend to the tiles and are
refined by self-attention; latent 0, layer-normed, is the slide embedding
(1280-d, ``image_embedding``), latents 1..512, layer-normed, are the
``image_latents`` (512 x 1280) that PRISM's BioGPT decoder cross-attends to.
``slide_representations`` in the official remote code (``modeling_prism.py``)
returns exactly these, with no text-side projection, so this path is
reproduced faithfully without the text model, which is not built here.

Architecture (official ``perceiver.py`` / ``configuring_prism.py``): 8 Perceiver
layers, each one cross-attention block (1 head of 1280, no context norm,
GEGLU feed-forward) then 6 self-attention blocks (8 heads, no biases, GEGLU
feed-forward).  Weights are shared across layers: layers 2..7 reuse layer
1's cross-attention block, layers 1..7 reuse layer 0's self-attention stack.
The published ``model.safetensors`` holds the slide encoder under
``image_resampler.`` next to the text side (``text_decoder.``, ``img_to_latents.``,
``text_to_latents.``, ``temperature``), which is ignored.  Safetensors cannot store
aliases, so a shared tensor is there once (the card's 558 M parameters also rule out
stored copies); the loader accepts any one key of each shared group, or several
equal ones, and rejects anything else under the prefix.

The tiles carry no positions: PRISM's Perceiver sees the slide as a set, so
``coords`` and ``tile_size_lv0`` are accepted (contract) but do not matter.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from slide2vec_dask.encoders.aggregators.base import AggregatorSpec, SlideEncoding
from slide2vec_dask.encoders.base import load_into_meta, read_state_dict
from slide2vec_dask.encoders.registry import get_preset, register_preset
from slide2vec_dask.encoders.weights import Weights

PRISM_HUB_ID = "paige-ai/Prism"
PRISM_HUB_FILES = ("model.safetensors",)
PRISM_URL = f"https://huggingface.co/{PRISM_HUB_ID}"
WEIGHTS = Weights(PRISM_HUB_ID, PRISM_HUB_FILES, gated=True, licence="CC-BY-NC-ND-4.0")
CHECKPOINT_PREFIX = "image_resampler."
TILE_PRESET = "virchow"
TILE_OUTPUT_VARIANT = "cls_mean"  # Virchow v1 CLS ++ mean of patch tokens, 2560-d (PRISM model card)
# The text side of the official file, with the shapes of its contrastive heads
# (PrismConfig.dim_latents = 5120; BioGPT hidden size 1024): written by
# `slide2vec_dask.testing.checkpoints.prism_checkpoint` so loaders see the real file's extra keys.
TEXT_HEADS = {"img_to_latents.to_latents.weight": (5120, 1280),
              "text_to_latents.to_latents.weight": (5120, 1024),
              "temperature": ()}


@dataclass(frozen=True)
class PrismConfig:
    """The published ``perceiver_config`` of paige-ai/Prism (official defaults)."""

    latent_seq: int = 512
    latent_dim: int = 1280
    context_dim: int = 2560
    mhsa_heads: int = 8
    perceiver_depth: int = 8
    transformer_depth: int = 6
    share_xattn_start_layer: int = 1
    share_tf_start_layer: int = 0
    xattn_heads: int = 1
    mlp_mult: int = 1
    mlp_activation: str = "geglu"

    def __post_init__(self) -> None:
        if self.mlp_activation not in ("geglu", "gelu"):
            raise ValueError(f"mlp_activation must be 'geglu' or 'gelu', got {self.mlp_activation!r}")
        if self.latent_dim % self.xattn_heads or self.latent_dim % self.mhsa_heads:
            raise ValueError("latent_dim must be divisible by xattn_heads and mhsa_heads")


PRISM_CONFIG = PrismConfig()


# -- the module ---------------------------------------------------------------
_MODULE_NAMES = ("PrismSlideEncoder", "Perceiver", "LatentCrossAttention", "LatentSelfAttention",
                 "FeedForward", "GEGLU")
_MODULES = None


def _torch_modules() -> dict:
    """The nn.Module classes, defined on first use so that importing the preset needs no torch."""
    global _MODULES
    if _MODULES is None:
        _MODULES = _define_modules()
        for name, cls in _MODULES.items():  # importable by name (pickle), via __getattr__ below
            cls.__qualname__, cls.__module__ = name, __name__
    return _MODULES


def __getattr__(name: str):
    if name in _MODULE_NAMES:
        return _torch_modules()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GEGLU(nn.Module):
        """Half the features gate the other half through GELU (exact erf form)."""

        def forward(self, x):
            value, gate = x.chunk(2, dim=-1)
            return value * F.gelu(gate)

    class FeedForward(nn.Module):
        """Pre-norm MLP; ``net`` indices 0 and 2 are the official Linear layers."""

        def __init__(self, dim: int, mult: int, activation: str):
            super().__init__()
            widen = 2 if activation == "geglu" else 1
            self.norm = nn.LayerNorm(dim)
            self.net = nn.Sequential(nn.Linear(dim, dim * mult * widen),
                                     GEGLU() if activation == "geglu" else nn.GELU(),
                                     nn.Linear(dim * mult, dim), nn.Dropout(0.0))

        def forward(self, x):
            return self.net(self.norm(x))

    class LatentCrossAttention(nn.Module):
        """Latents (normed) attend to the raw tile embeddings; K/V can be handed on to a sharing layer."""

        def __init__(self, dim: int, context_dim: int, heads: int):
            super().__init__()
            self.heads, self.head_dim = heads, dim // heads
            self.x_norm = nn.LayerNorm(dim)
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)  # [K | V], each heads x head_dim
            self.to_out = nn.Linear(dim, dim, bias=False)

        def keys_values(self, context):
            b, n, _ = context.shape
            k, v = self.to_kv(context).reshape(b, n, 2, self.heads, self.head_dim).unbind(2)
            return k.transpose(1, 2), v.transpose(1, 2)

        def forward(self, x, kv):
            b, n, _ = x.shape
            q = self.to_q(self.x_norm(x)).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, *kv)  # scale 1/sqrt(head_dim), as the official
            return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))

    class LatentSelfAttention(nn.Module):
        """Pre-norm multi-head self-attention over the latents, without biases."""

        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

        def forward(self, x):
            x = self.norm(x)
            return self.mha(x, x, x, need_weights=False)[0]

    class Perceiver(nn.Module):
        """Latent queries, then ``perceiver_depth`` layers of cross-attention + a self-attention stack.

        Layer ``i`` owns its blocks only up to the share start; later layers hold
        the same module objects, so their keys alias the owner's tensors.
        """

        def __init__(self, cfg: PrismConfig):
            super().__init__()
            dim = cfg.latent_dim
            self.cfg = cfg
            self.latents = nn.Parameter(torch.randn(cfg.latent_seq + 1, dim))  # +1: the slide-embedding query

            def cross():
                return nn.ModuleDict({"xattn": LatentCrossAttention(dim, cfg.context_dim, cfg.xattn_heads),
                                      "ff": FeedForward(dim, cfg.mlp_mult, cfg.mlp_activation)})

            def stack():
                return nn.ModuleList([nn.ModuleDict({"mhsa": LatentSelfAttention(dim, cfg.mhsa_heads),
                                                     "ff": FeedForward(dim, cfg.mlp_mult, cfg.mlp_activation)})
                                      for _ in range(cfg.transformer_depth)])

            layers: list = []
            for i in range(cfg.perceiver_depth):
                layers.append(nn.ModuleDict({
                    "xattn": cross() if i <= cfg.share_xattn_start_layer else layers[-1]["xattn"],
                    "tf": stack() if i <= cfg.share_tf_start_layer else layers[-1]["tf"],
                }))
            self.layers = nn.ModuleList(layers)

        def forward(self, context):
            x = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
            kv = None
            for i, layer in enumerate(self.layers):
                cross = layer["xattn"]
                if kv is None or i <= self.cfg.share_xattn_start_layer:
                    kv = cross["xattn"].keys_values(context)  # a sharing layer reuses the same K/V
                x = x + cross["xattn"](x, kv)
                x = x + cross["ff"](x)
                for block in layer["tf"]:
                    x = x + block["mhsa"](x)
                    x = x + block["ff"](x)
            return x

    class PrismSlideEncoder(nn.Module):
        """PRISM's ``image_resampler``: tile embeddings -> slide embedding and image latents."""

        def __init__(self, cfg: PrismConfig = PRISM_CONFIG):
            super().__init__()
            self.cfg = cfg
            self.cls_norm = nn.LayerNorm(cfg.latent_dim)
            self.img_norm = nn.LayerNorm(cfg.latent_dim)
            self.perceiver = Perceiver(cfg)

        def forward(self, tile_embeddings):
            """``(B, N, context_dim)`` -> ``(B, latent_dim)``, ``(B, latent_seq, latent_dim)``."""
            x = self.perceiver(tile_embeddings)
            return self.cls_norm(x[:, 0]), self.img_norm(x[:, 1:])

        def encode_slide(self, features, coords, tile_size_lv0: int) -> SlideEncoding:
            """One slide (the contract); ``coords`` are checked but unused: PRISM has no positions."""
            if features.ndim != 2 or features.shape[1] != self.cfg.context_dim:
                raise ValueError(f"PRISM expects (N, {self.cfg.context_dim}) Virchow cls_mean tile features, "
                                 f"got {tuple(features.shape)}")
            if features.shape[0] == 0:
                raise ValueError("PRISM cannot encode a slide with no tiles")
            if coords is not None and tuple(coords.shape) != (features.shape[0], 2):
                raise ValueError(f"coords must be (N, 2) = ({features.shape[0]}, 2), got {tuple(coords.shape)}")
            embedding, latents = self(features.unsqueeze(0))
            return SlideEncoding(embedding[0], latents[0])

    found = locals()
    return {name: found[name] for name in _MODULE_NAMES}


def create_prism(cfg: PrismConfig = PRISM_CONFIG):
    """The bare slide encoder, randomly initialised (build it under ``torch.device('meta')`` for free)."""
    return _torch_modules()["PrismSlideEncoder"](cfg)


# -- weights --------------------------------------------------------------------
def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def shared_groups(module) -> list[list[str]]:
    """State-dict keys that name one tensor, owner (lowest layer) first; singletons included."""
    by_tensor: dict[int, list[str]] = defaultdict(list)
    for key, tensor in module.state_dict(keep_vars=True).items():
        by_tensor[id(tensor)].append(key)
    return [sorted(keys, key=_natural) for keys in by_tensor.values()]


def resampler_state(state: dict) -> dict:
    """The ``image_resampler.*`` tensors of the official file, prefix stripped (a bare resampler dict as is)."""
    if any(k.startswith(CHECKPOINT_PREFIX) for k in state):
        return {k[len(CHECKPOINT_PREFIX):]: v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}
    return dict(state)


def tie_shared(state: dict, module, what: str) -> dict:
    """Give every alias of a shared tensor the one copy the file holds; differing copies are an error."""
    import torch

    out = dict(state)
    for keys in shared_groups(module):
        present = [k for k in keys if k in state]
        if not present:
            continue  # reported as missing by the fit check
        first = state[present[0]]
        for key in present[1:]:
            if tuple(state[key].shape) != tuple(first.shape) or not torch.equal(state[key], first):
                raise ValueError(f"{what}: {key} and {present[0]} are one shared tensor in PRISM "
                                 "but differ in the checkpoint")
        out.update({k: first for k in keys})
    return out


def load_prism(path: str | Path, cfg: PrismConfig = PRISM_CONFIG):
    """The slide encoder holding the ``image_resampler`` weights of ``path``, strictly, in float32, eval mode."""
    import torch

    what = f"preset 'prism' ({PRISM_HUB_ID})"
    state = read_state_dict(path, what)
    resampler = {k: v.float() if v.is_floating_point() else v for k, v in resampler_state(state).items()}
    with torch.device("meta"):
        module = create_prism(cfg)
    resampler = tie_shared(resampler, module, what)
    module = load_into_meta(module, resampler, (
        f"{what}: checkpoint {path} does not fit PRISM's slide encoder (keys under {CHECKPOINT_PREFIX!r} of the "
        f"official file): {{problems}}. Pass the file published at {PRISM_URL} ({' or '.join(PRISM_HUB_FILES)}), "
        "or leave checkpoint_path unset to fetch it."))
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left unloaded after loading {path}: {left[:5]}")
    return module.eval()


@dataclass(frozen=True)
class PrismBuilder:
    """Loads PRISM's slide encoder on the worker (picklable): ``checkpoint_path``, else the hub file."""

    checkpoint_path: str | None = None
    cfg: PrismConfig = PRISM_CONFIG

    def weights_file(self) -> Path:
        return WEIGHTS.resolve("prism", self.checkpoint_path)

    def __call__(self):
        return load_prism(self.weights_file(), self.cfg)


# -- the preset -------------------------------------------------------------------
def prism_spec(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None,
               cfg: PrismConfig = PRISM_CONFIG) -> AggregatorSpec:
    """PRISM over the ``virchow`` tile preset (``cls_mean``): 224 px tiles at 0.5 µm/px, as its card says."""
    if output_variant not in (None, "default"):
        raise ValueError(f"preset 'prism' has one output (slide embedding + latents); "
                         f"output_variant must be None or 'default', got {output_variant!r}")
    weights = WEIGHTS.with_checkpoint("prism", checkpoint_path)
    # Virchow's own preset is PRISM's tile stage unchanged (224 px at 0.5 µm/px, 20x).
    tile_spec = get_preset(TILE_PRESET)(checkpoint_path=tile_checkpoint_path, output_variant=TILE_OUTPUT_VARIANT)
    if tile_spec.feature_dim != cfg.context_dim:
        raise RuntimeError(f"preset 'prism' needs {cfg.context_dim}-d tile features, "
                           f"{TILE_PRESET}/{TILE_OUTPUT_VARIANT} gives {tile_spec.feature_dim}")
    return AggregatorSpec(
        name="prism", level="slide", build=PrismBuilder(weights.checkpoint_path, cfg), tile_encoder=tile_spec,
        feature_dim=cfg.latent_dim, latent_dim=cfg.latent_dim,
        default_precision="fp16",  # trained and run with fp16 autocast (model card)
        key=weights.cache_key("prism", None, cfg, CHECKPOINT_PREFIX),
        info={**weights.info(),
              "architecture": "Perceiver resampler (8 layers, shared weights) over Virchow v1 cls_mean tiles",
              "checkpoint_prefix": CHECKPOINT_PREFIX, "num_latents": cfg.latent_seq,
              "uses_coords": False},
    )


@register_preset("prism", level="slide", architecture="Perceiver resampler (8 layers, shared weights)",
                 outputs={"default": PRISM_CONFIG.latent_dim}, architecture_module=lambda: create_prism())
def prism(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None) -> AggregatorSpec:
    """prism: PRISM slide encoder (Perceiver), https://huggingface.co/paige-ai/Prism"""
    return prism_spec(checkpoint_path, output_variant, tile_checkpoint_path)
