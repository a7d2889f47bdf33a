"""MOOZY (AtlasAnalyticsLab): ``moozy-slide`` (slide level) and ``moozy`` (patient level).

Both read one file, ``moozy.pt`` of https://huggingface.co/AtlasAnalyticsLab/MOOZY
(the file ``moozy encode`` downloads, ``moozy/hf_hub.py``): a ``torch.save``
dict whose ``teacher_slide_encoder`` and ``case_transformer`` entries are the
two state dicts (no key prefixes inside), with their architectures in
``slide_encoder_config`` and ``case_transformer_config``.  As the official
loader (``moozy/models/factory.py``) does, each module is built from its
config and loads its own state dict strictly.

The official ``encode`` runs lunit ViT-S/8 (CLS, 384-d) on 224 px tiles at
20x (0.5 µm/px, the ``lunit`` preset as is), encodes every slide of a case
with the slide encoder (its CLS output after the final norm: the slide
embedding, 768-d) and feeds the stacked slide embeddings (S, 768), nothing
richer, to the case transformer, whose [CASE] token output is the patient
embedding.  Slides carry no position there, so the patient embedding does
not depend on slide order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.base import load_into_meta, read_state_dict
from slide2vec_dask.encoders.registry import get_preset, register_preset
from slide2vec_dask.encoders.weights import Weights

HUB_ID = "AtlasAnalyticsLab/MOOZY"
HUB_FILES = ("moozy.pt",)
TILE_PRESET = "lunit"  # lunit_vit_small_patch8_dino, 224 px at 20x (moozy/encoding.py)
EMBED_DIM = 768
TILE_DIM = 384
SLIDE_KEY, CASE_KEY = "teacher_slide_encoder", "case_transformer"
SLIDE_CONFIG_KEY, CASE_CONFIG_KEY = "slide_encoder_config", "case_transformer_config"

# The published architectures (MODEL_CARD.md: slide encoder 6 layers, d=768, 12 heads,
# 4 registers, 2-D ALiBi; case transformer 3 layers; moozy/config defaults: no qk-norm,
# fixed ALiBi slopes, LayerScale in the case transformer only), in the checkpoint's config format.
SLIDE_CONFIG = dict(feat_dim=TILE_DIM, d_model=EMBED_DIM, n_layers=6, n_heads=12, dim_feedforward=3072,
                    num_registers=4, learnable_alibi=False, qk_norm=False, layerscale_enabled=False,
                    layerscale_init=0.0, dropout=0.1, attn_dropout=0.0, layer_drop=0.1)
CASE_CONFIG = dict(d_model=EMBED_DIM, num_layers=3, num_heads=12, dim_feedforward=3072, dropout=0.1,
                   layerscale_init=1e-5, layer_drop=0.0, qk_norm=False, num_registers=0)

WEIGHTS = Weights(HUB_ID, HUB_FILES, gated=False, licence="CC-BY-NC-SA-4.0")
CODE = "https://github.com/AtlasAnalyticsLab/MOOZY"


# -- architectures from a checkpoint config ----------------------------------------------
def slide_kwargs(config: dict, state: dict | None = None) -> dict:
    """`SlideTransformer` arguments from a ``slide_encoder_config`` (rules of moozy's serialization.py)."""
    try:
        kwargs = dict(feat_dim=int(config["feat_dim"]), d_model=int(config["d_model"]),
                      n_layers=int(config["n_layers"]), n_heads=int(config["n_heads"]),
                      dim_feedforward=int(config["dim_feedforward"]))
    except KeyError as exc:
        raise ValueError(f"MOOZY {SLIDE_CONFIG_KEY} lacks {exc.args[0]!r}") from exc
    layerscale = config.get("layerscale_enabled")
    if layerscale is None:  # older exports: LayerScale is on when its gammas are stored
        layerscale = any(k.endswith((".ls_attn.gamma", ".ls_mlp.gamma")) for k in (state or {}))
    kwargs.update(num_registers=max(0, int(config.get("num_registers", 0))), qk_norm=bool(config.get("qk_norm", False)),
                  layerscale=bool(layerscale), learnable_alibi=bool(config.get("learnable_alibi", False)))
    return kwargs


def case_kwargs(config: dict) -> dict:
    """`CaseTransformer` arguments from a ``case_transformer_config`` (rules of moozy's factory.py)."""
    try:
        d_model, ffn = int(config["d_model"]), int(config["dim_feedforward"])
        kwargs = dict(d_model=d_model, num_layers=max(1, int(config["num_layers"])),
                      num_heads=max(1, int(config["num_heads"])), dim_feedforward=ffn if ffn > 0 else 4 * d_model,
                      qk_norm=bool(config["qk_norm"]), layerscale=float(config["layerscale_init"]) > 0,
                      num_registers=max(0, int(config["num_registers"])))
    except KeyError as exc:
        raise ValueError(f"MOOZY {CASE_CONFIG_KEY} lacks {exc.args[0]!r}") from exc
    return kwargs


def _check_dims(kwargs: dict, what: str) -> None:
    if kwargs["d_model"] != EMBED_DIM or kwargs.get("feat_dim", TILE_DIM) != TILE_DIM:
        raise ValueError(f"{what}: expected MOOZY's {TILE_DIM}-d lunit input and {EMBED_DIM}-d output, the "
                         f"checkpoint's config has {kwargs.get('feat_dim', TILE_DIM)} -> {kwargs['d_model']}")


def slide_module(config: dict = SLIDE_CONFIG, max_tokens: int | None = None, device=None):
    """A `SlideTransformer` of ``config`` (random init; ``device='meta'`` for a free one)."""
    import torch

    from slide2vec_dask.encoders.aggregators._moozy_nn import SlideTransformer  # torch at its top level

    with torch.device(device or "cpu"):
        return SlideTransformer(**slide_kwargs(config), max_tokens=max_tokens)


def case_module(config: dict = CASE_CONFIG, device=None):
    """A `CaseTransformer` of ``config`` (random init; ``device='meta'`` for a free one)."""
    import torch

    from slide2vec_dask.encoders.aggregators._moozy_nn import CaseTransformer  # torch at its top level

    with torch.device(device or "cpu"):
        return CaseTransformer(**case_kwargs(config))


# -- loading ----------------------------------------------------------------------------
def read_payload(path: str | Path) -> dict:
    """The official ``moozy.pt`` dict (weights-only load), checked for its four entries."""
    what = f"MOOZY checkpoint {path}"
    payload = read_state_dict(path, what)
    entries = (SLIDE_KEY, CASE_KEY, SLIDE_CONFIG_KEY, CASE_CONFIG_KEY)
    missing = [k for k in entries if not isinstance(payload.get(k), dict)]
    if missing:
        raise ValueError(f"{what} is not the official MOOZY file (moozy.pt of https://huggingface.co/{HUB_ID}): "
                         f"it lacks {missing}; found keys {sorted(payload)[:6]}")
    return payload


def _load(module_factory, state: dict, what: str):
    import torch

    module = load_into_meta(module_factory("meta"), state,
                            f"{what} does not fit the architecture its config describes: {{problems}}")
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left unloaded: {left[:5]}")
    return module.to(torch.float32).eval()


def load_slide_encoder(path: str | Path, max_tokens: int | None = None):
    """The slide encoder of ``moozy.pt``, loaded strictly from ``teacher_slide_encoder``."""
    payload = read_payload(path)
    state, config = payload[SLIDE_KEY], payload[SLIDE_CONFIG_KEY]
    copies = [k for k in state if k.endswith("pos_bias.slopes")]
    if any(not state[k].equal(state[copies[0]]) for k in copies):
        raise ValueError(f"MOOZY checkpoint {path}: the ALiBi slopes of one shared module differ between "
                         f"{copies[0]} and the other copies")
    kwargs = slide_kwargs(config, state)
    _check_dims(kwargs, f"MOOZY checkpoint {path}")
    from slide2vec_dask.encoders.aggregators._moozy_nn import SlideTransformer  # torch at its top level
    import torch

    def factory(device):
        with torch.device(device):
            return SlideTransformer(**kwargs, max_tokens=max_tokens)

    return _load(factory, state, f"MOOZY checkpoint {path} [{SLIDE_KEY}]")


def load_case_transformer(path: str | Path):
    """The case transformer of ``moozy.pt``, loaded strictly from ``case_transformer``."""
    payload = read_payload(path)
    kwargs = case_kwargs(payload[CASE_CONFIG_KEY])
    _check_dims(kwargs, f"MOOZY checkpoint {path}")
    from slide2vec_dask.encoders.aggregators._moozy_nn import CaseTransformer  # torch at its top level
    import torch

    def factory(device):
        with torch.device(device):
            return CaseTransformer(**kwargs)

    return _load(factory, payload[CASE_KEY], f"MOOZY checkpoint {path} [{CASE_KEY}]")


@dataclass(frozen=True)
class MoozyBuilder:
    """Builds one MOOZY stage from ``moozy.pt`` on the worker (picklable).

    ``max_tokens``: ``None`` caps tile tokens per slide as the official
    ``encode`` does (by total GPU memory, no cap on CPU); 0 means no cap; a
    positive number is the cap.
    """

    part: str  # "slide" or "patient"
    checkpoint_path: str | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.part not in ("slide", "patient"):
            raise ValueError(f"MOOZY part must be 'slide' or 'patient', got {self.part!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise ValueError(f"max_tokens must be None (official, by GPU memory), 0 (no cap) or a positive int, "
                             f"got {self.max_tokens!r}")
        if self.part == "patient" and self.max_tokens is not None:
            raise ValueError("max_tokens applies to the slide encoder, not to the case transformer")

    def weights_file(self) -> Path:
        return WEIGHTS.resolve("moozy-slide" if self.part == "slide" else "moozy", self.checkpoint_path)

    def __call__(self):
        path = self.weights_file()
        if self.part == "slide":
            return load_slide_encoder(path, self.max_tokens)
        return load_case_transformer(path)

    @property
    def key(self) -> str:
        weights = dataclasses.replace(WEIGHTS, checkpoint_path=self.checkpoint_path)
        return weights.cache_key(f"moozy:{self.part}", "cls", self.max_tokens)


def _no_variant(name: str, output_variant) -> None:
    if output_variant not in (None, "cls"):
        raise ValueError(f"preset {name!r} has one output, the CLS embedding ('cls'); got {output_variant!r}")


def slide_spec(checkpoint_path=None, tile_checkpoint_path=None, max_tokens: int | None = None) -> AggregatorSpec:
    """The ``moozy-slide`` spec; ``max_tokens`` as in `MoozyBuilder`."""
    builder = MoozyBuilder("slide", WEIGHTS.with_checkpoint("moozy-slide", checkpoint_path).checkpoint_path,
                           max_tokens)
    return AggregatorSpec(
        name="moozy-slide", level="slide", build=builder,
        tile_encoder=get_preset(TILE_PRESET)(checkpoint_path=tile_checkpoint_path),
        feature_dim=EMBED_DIM, default_precision="fp32", key=builder.key,
        info={**dataclasses.replace(WEIGHTS, checkpoint_path=builder.checkpoint_path).info(), "code": CODE,
              "entry": SLIDE_KEY, "output": "cls",
              "architecture": "MOOZY slide encoder: ViT, 6 layers, d=768, 12 heads, 4 registers, 2-D ALiBi",
              "max_tokens": "official (by GPU memory)" if max_tokens is None else max_tokens})


@register_preset("moozy-slide", level="slide", architecture="ViT, 6 layers, 768-d, 4 registers, 2-D ALiBi",
                 outputs={"cls": EMBED_DIM}, architecture_module=lambda: slide_module(device="meta"))
def moozy_slide(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None) -> AggregatorSpec:
    _no_variant("moozy-slide", output_variant)
    return slide_spec(checkpoint_path, tile_checkpoint_path)


@register_preset("moozy", level="patient", architecture="case transformer, 3 layers, 768-d, [CASE] token",
                 outputs={"cls": EMBED_DIM}, architecture_module=lambda: case_module(device="meta"))
def moozy(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None) -> AggregatorSpec:
    _no_variant("moozy", output_variant)
    slide = slide_spec(checkpoint_path, tile_checkpoint_path)
    builder = MoozyBuilder("patient", slide.build.checkpoint_path)
    return AggregatorSpec(
        name="moozy", level="patient", build=builder, tile_encoder=slide.tile_encoder, feature_dim=EMBED_DIM,
        slide_encoder=slide, default_precision="fp32", key=builder.key,
        info={**dataclasses.replace(WEIGHTS, checkpoint_path=builder.checkpoint_path).info(), "code": CODE,
              "entry": CASE_KEY, "output": "case token",
              "architecture": "MOOZY case transformer: 3 layers, d=768, 12 heads, LayerScale, [CASE] token"})
