"""The tile-encoder model zoo: one `TilePreset` (pure data) per published model.

Adding a model is one entry in `TILE_PRESETS`; it registers itself with
`register_preset`.  A preset's factory returns an `EncoderSpec` without
touching torch or the network: its feature dimension comes from the table,
and the weights are loaded by `PresetBuilder` (`preset_builder`) in
``build()``, on the worker.

Architectures are the published ones, built with timm from the kwargs of
each model card / hub config (same parameter count, embed dim, token
layout).  Each declares its weights as a `Weights` record
(`slide2vec_dask.encoders.weights`: hub repo, file names, gated, licence,
revision), resolved on the worker from ``checkpoint_path`` (``.safetensors``,
or a weights-only ``.bin/.pt/.pth``) or the Hugging Face cache / hub.
Checkpoints published in another key layout name it (``layout``, one of
`key_layouts.LAYOUTS`) and are mapped onto the timm modules key by key there:
the ``transformers`` layouts (Phikon, Phikon-v2, Hibou, Midnight),
transformers' CLIP inside iSight's training checkpoint, timm 0.5's Swin
(CTransPath); Mettle adds its refine head and CLAM's ResNet-50 its pooling
as small native wrappers (`pooling`).

This module declares; `preset_builder` builds (architecture, then weights)
and `key_layouts` re-keys checkpoints.  Imports point that way only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slide2vec_dask.encoders import preset_builder
from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from slide2vec_dask.encoders.key_layouts import LAYOUTS, POS_EMBED_INTERP
from slide2vec_dask.encoders.preset_builder import CONCH_INSTALL, PresetBuilder
from slide2vec_dask.encoders.registry import canonical_name, get_preset, register_preset
from slide2vec_dask.encoders.weights import Weights

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
HALF = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Ref:
    """A class (or a partial of one) named in the table, imported only when a model is built."""

    module: str
    attr: str
    kwargs: tuple = ()

    def resolve(self):
        obj = getattr(importlib.import_module(self.module), self.attr)
        if self.kwargs:
            return functools.partial(obj, **dict(self.kwargs))
        return obj


SWIGLU_PACKED = Ref("timm.layers", "SwiGLUPacked")
SILU = Ref("torch.nn", "SiLU")
LAYERNORM_EPS_1E12 = Ref("torch.nn", "LayerNorm", (("eps", 1e-12),))


def _kw(**kwargs) -> tuple:
    return tuple(sorted(kwargs.items()))


@dataclass(frozen=True)
class TilePreset:
    """A published tile encoder, as data.

    ``kwargs`` are the timm constructor arguments of the *published*
    architecture; ``weights`` is where its checkpoint is published;
    ``outputs`` maps each output variant to its feature dimension, the
    first being the default.  ``layout`` names the key layout of the
    published checkpoint (and, for ``mettle`` / ``timm_features``, the small
    native wrapper around the timm trunk).  ``ignore_keys`` are prefixes of
    tensors the official file holds that the published *use* of the model
    never reads (ResNet-50's ``layer4`` and ``fc`` for CLAM's truncated
    network); every other key must fit exactly.  ``pos_embed_interp`` (a key of
    `POS_EMBED_INTERP`) lets a checkpoint whose position embedding was
    published for another grid run at ``tile_size_px``: it is resampled once
    at load time with the algorithm the official code applies at run time.
    """

    name: str
    arch: str | None
    kwargs: tuple
    weights: Weights
    outputs: tuple[tuple[str, int], ...]
    spacing_um: float | None
    tile_size_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_precision: str
    architecture: str
    layout: str = "timm"
    pos_embed_interp: str | None = None
    ignore_keys: tuple[str, ...] = ()
    level: str = "tile"
    note: str = ""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"preset {self.name!r}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.pos_embed_interp is not None and self.pos_embed_interp not in POS_EMBED_INTERP:
            raise ValueError(f"preset {self.name!r}: unknown pos_embed_interp {self.pos_embed_interp!r}")

    # -- data -------------------------------------------------------------
    @property
    def output_variants(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.outputs)

    @property
    def default_variant(self) -> str:
        return self.outputs[0][0]

    hub_id = property(lambda self: self.weights.hub_id)
    hub_files = property(lambda self: self.weights.files)
    gated = property(lambda self: self.weights.gated)
    licence = property(lambda self: self.weights.licence)
    url = property(lambda self: self.weights.url)

    def feature_dim(self, output_variant: str | None = None) -> int:
        return dict(self.outputs)[self._variant(output_variant)]

    def _variant(self, output_variant: str | None) -> str:
        variant = self.default_variant if output_variant is None else output_variant
        if variant not in self.output_variants:
            raise ValueError(f"preset {self.name!r} has no output_variant {variant!r}; "
                             f"choose one of {list(self.output_variants)} (default {self.default_variant!r})")
        return variant

    def replace(self, **changes: Any) -> "TilePreset":
        return dataclasses.replace(self, **changes)

    def with_kwargs(self, **overrides: Any) -> "TilePreset":
        """A copy whose architecture kwargs are updated (e.g. a shallow twin for tests)."""
        return self.replace(kwargs=_kw(**{**dict(self.kwargs), **overrides}))

    # -- architecture ----------------------------------------------------
    def timm_kwargs(self, runtime: bool = False) -> dict:
        """Constructor kwargs, layer references resolved; ``runtime`` sizes the grid to the tile."""
        kwargs = {k: v.resolve() if isinstance(v, Ref) else v for k, v in self.kwargs}
        if runtime and self.pos_embed_interp is not None:
            kwargs["img_size"] = self.tile_size_px
        return kwargs

    def create_architecture(self, runtime: bool = False):
        """The bare model whose state dict is the published file's, randomly initialised.

        Build it under ``torch.device('meta')`` for a free one (parameter counts, shapes).
        """
        return preset_builder.create_architecture(self, runtime)

    def create_module(self, output_variant: str | None = None, runtime: bool = True):
        """The architecture wrapped to return this variant's ``(B, feature_dim)`` (keys unchanged)."""
        return preset_builder.create_module(self, self._variant(output_variant), runtime)

    # -- spec --------------------------------------------------------------
    def spec(self, checkpoint_path: str | Path | None = None, output_variant: str | None = None) -> EncoderSpec:
        """The `EncoderSpec` of this preset: cheap, no torch, no weights."""
        variant = self._variant(output_variant)
        weights = self.weights.with_checkpoint(self.name, checkpoint_path)
        return EncoderSpec(
            name=self.name,
            build=PresetBuilder(self, variant, weights.checkpoint_path),
            spacing_um=self.spacing_um,
            tile_size_px=self.tile_size_px,
            mean=tuple(self.mean),
            std=tuple(self.std),
            feature_dim=self.feature_dim(variant),
            level=self.level,
            default_precision=self.default_precision,
            key=weights.cache_key(f"preset:{self.name}", variant, self.arch, self.kwargs, self.layout,
                                  self.pos_embed_interp, self.ignore_keys, self.tile_size_px),
            info={**weights.info(), "architecture": self.architecture, "output_variant": variant,
                  # what its publisher recommends: the guard of `Model` refuses anything else unless
                  # allow_non_recommended_settings=True (slide2vec 7.x's rule)
                  "recommended": {"spacing_um": None if self.spacing_um is None else [self.spacing_um],
                                  "tile_size_px": self.tile_size_px, "precision": self.default_precision}},
        )


# -- the table ----------------------------------------------------------------
_VIT_G_DINOV2 = dict(embed_dim=1536, depth=40, num_heads=24)

TILE_PRESETS: tuple[TilePreset, ...] = (
    TilePreset(
        name="lunit", arch="vit_small_patch8_224", kwargs=_kw(num_classes=0),
        weights=Weights("1aurent/vit_small_patch8_224.lunit_dino", ("model.safetensors", "pytorch_model.bin"), gated=False, licence="Lunit non-commercial"),
        outputs=(("cls", 384),), spacing_um=0.5, tile_size_px=224, mean=LUNIT_MEAN, std=LUNIT_STD,
        default_precision="fp32", architecture="ViT-S/8 (DINO)"),
    TilePreset(
        name="uni", arch="vit_large_patch16_224",
        kwargs=_kw(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        weights=Weights("MahmoodLab/UNI", ("pytorch_model.bin",), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("cls", 1024),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp16", architecture="ViT-L/16"),
    TilePreset(
        name="uni2", arch="vit_giant_patch14_224",
        kwargs=_kw(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                   mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SWIGLU_PACKED,
                   act_layer=SILU, reg_tokens=8, dynamic_img_size=True),
        weights=Weights("MahmoodLab/UNI2-h", ("pytorch_model.bin",), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("cls", 1536),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="bf16", architecture="ViT-H/14 (UNI2-h: 24 blocks, 1536-d, SwiGLU, 8 registers)"),
    TilePreset(
        name="virchow", arch="vit_huge_patch14_224",
        kwargs=_kw(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                   dynamic_img_size=True, mlp_layer=SWIGLU_PACKED, act_layer=SILU),
        weights=Weights("paige-ai/Virchow", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="Apache-2.0 (with Paige's additional terms)"),
        outputs=(("cls_mean", 2560), ("cls", 1280)), spacing_um=0.5, tile_size_px=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, default_precision="fp16", architecture="ViT-H/14 (SwiGLU)"),
    TilePreset(
        name="virchow2", arch="vit_huge_patch14_224",
        kwargs=_kw(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                   global_pool="", dynamic_img_size=True, mlp_layer=SWIGLU_PACKED, act_layer=SILU),
        weights=Weights("paige-ai/Virchow2", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("cls_mean", 2560), ("cls", 1280)), spacing_um=0.5, tile_size_px=224,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, default_precision="fp16", architecture="ViT-H/14 (SwiGLU, 4 registers)"),
    TilePreset(
        name="h-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_kw(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        weights=Weights("bioptimus/H-optimus-0", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="Apache-2.0"),
        outputs=(("cls", 1536),), spacing_um=0.5, tile_size_px=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        default_precision="fp16", architecture="ViT-g/14 (4 registers)", note="gated with automatic approval"),
    TilePreset(
        name="h-optimus-1", arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_kw(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        weights=Weights("bioptimus/H-optimus-1", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("cls", 1536),), spacing_um=0.5, tile_size_px=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        default_precision="fp16", architecture="ViT-g/14 (4 registers)"),
    TilePreset(
        name="h0-mini", arch="vit_base_patch14_reg4_dinov2",
        kwargs=_kw(img_size=224, num_classes=0, global_pool="", mlp_ratio=5.33334, mlp_layer=SWIGLU_PACKED,
                   act_layer=SILU),
        weights=Weights("bioptimus/H0-mini", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("cls_mean", 1536), ("cls", 768)), spacing_um=0.5, tile_size_px=224,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, default_precision="fp16", architecture="ViT-B/14 (SwiGLU, 4 registers; distilled from H-optimus-0)"),
    TilePreset(
        name="gigapath", arch="vit_giant_patch14_dinov2",
        kwargs=_kw(img_size=224, in_chans=3, patch_size=16, init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
                   **_VIT_G_DINOV2),
        weights=Weights("prov-gigapath/prov-gigapath", ("pytorch_model.bin",), gated=True, licence="Apache-2.0 (with Prov-GigaPath's conditions)"),
        outputs=(("cls", 1536),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp16", architecture="ViT-g (DINOv2 giant, 16 px patches)", note="the tile encoder of Prov-GigaPath"),
    TilePreset(
        name="phikon", arch="vit_base_patch16_224", kwargs=_kw(num_classes=0, norm_layer=LAYERNORM_EPS_1E12),
        weights=Weights("owkin/phikon", ("model.safetensors", "pytorch_model.bin"), gated=False, licence="Owkin non-commercial"),
        outputs=(("cls", 768),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="ViT-B/16 (iBOT)",
        layout="hf_vit", note="published as a transformers ViTModel; mapped onto timm (LayerNorm eps 1e-12)"),
    TilePreset(
        name="phikonv2", arch="vit_large_patch16_224", kwargs=_kw(img_size=224, init_values=1e-5, num_classes=0),
        weights=Weights("owkin/phikon-v2", ("model.safetensors", "pytorch_model.bin"), gated=False, licence="Owkin non-commercial"),
        outputs=(("cls", 1024),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="ViT-L/16 (DINOv2)", layout="hf_dinov2", pos_embed_interp="bicubic",
        note="published as a transformers Dinov2Model; mapped onto timm"),
    TilePreset(
        name="hibou-b", arch="vit_base_patch14_reg4_dinov2",
        kwargs=_kw(img_size=224, num_classes=0, mlp_ratio=5.33334, mlp_layer=SWIGLU_PACKED, act_layer=SILU),
        weights=Weights("histai/hibou-b", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="Apache-2.0"),
        outputs=(("cls", 768),), spacing_um=0.5, tile_size_px=224, mean=HIBOU_MEAN, std=HIBOU_STD,
        default_precision="fp32", architecture="ViT-B/14 (DINOv2, SwiGLU, 4 registers)", layout="hf_dinov2", pos_embed_interp="bicubic",
        note="published as transformers remote code (Dinov2 with registers); mapped onto timm"),
    TilePreset(
        name="hibou-l", arch="vit_large_patch14_reg4_dinov2",
        # DINOv2's SwiGLU hidden width: (int(1024 * 4 * 2 / 3) + 7) // 8 * 8 = 2736, packed 5472 = 5.34375 x 1024
        kwargs=_kw(img_size=224, num_classes=0, mlp_ratio=5.34375, mlp_layer=SWIGLU_PACKED, act_layer=SILU),
        weights=Weights("histai/hibou-L", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="Apache-2.0"),
        outputs=(("cls", 1024),), spacing_um=0.5, tile_size_px=224, mean=HIBOU_MEAN, std=HIBOU_STD,
        default_precision="fp32", architecture="ViT-L/14 (DINOv2, SwiGLU, 4 registers)", layout="hf_dinov2", pos_embed_interp="bicubic",
        note="published as transformers remote code (Dinov2 with registers); mapped onto timm"),
    TilePreset(
        name="midnight", arch="vit_giant_patch14_dinov2",
        kwargs=_kw(img_size=518, num_classes=0, init_values=1e-5),
        weights=Weights("kaiko-ai/midnight", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="MIT"),
        outputs=(("cls_mean", 3072), ("cls", 1536)), spacing_um=0.5, tile_size_px=224,
        mean=HALF, std=HALF, default_precision="fp16", architecture="ViT-g/14 (DINOv2, SwiGLU)", layout="hf_dinov2", pos_embed_interp="bicubic",
        note="Midnight-12k; published as a transformers Dinov2Model (518 px grid, run at 224 px as its card does)"),
    TilePreset(
        name="conch", arch=None, kwargs=(), weights=Weights("MahmoodLab/CONCH", ("pytorch_model.bin",), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("default", 512),), spacing_um=0.5, tile_size_px=448,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, default_precision="fp32", architecture="ViT-B/16 + attentional pooler (CoCa)", layout="conch",
        note=f"needs the `conch` package: {CONCH_INSTALL}"),
    TilePreset(
        # CONCH v1.5 as TITAN's return_conch() builds it (conch_config of MahmoodLab/TITAN's config.json):
        # ViT-L/16 (1024-d, 24 x 16 heads, LayerScale) published on a 224 px grid and run at 448 px with
        # DINO-style bicubic position interpolation, CoCa attentional pooler (1 query, 8 heads) -> 768,
        # LayerNorm.  Weights: conch_v1_5_pytorch_model.bin of MahmoodLab/TITAN (what return_conch()
        # downloads); MahmoodLab/conchv1_5's pytorch_model_vision.bin has the same keys.
        name="conchv15", arch=None, kwargs=_kw(img_size=224, patch_size=16, init_values=1e-6, num_classes=0),
        weights=Weights("MahmoodLab/TITAN", ("conch_v1_5_pytorch_model.bin",), gated=True, licence="CC-BY-NC-ND-4.0"),
        outputs=(("default", 768),), spacing_um=0.5, tile_size_px=448, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp16", architecture="ViT-L/16 + attentional pooler (CONCH v1.5)", layout="conch_v15", pos_embed_interp="bicubic_dino",
        note="the tile encoder of TITAN; native PyTorch + timm, no `conch` package needed"),
    TilePreset(
        name="dinov2-vitb14", arch="vit_base_patch14_dinov2", kwargs=_kw(num_classes=0),
        weights=Weights("timm/vit_base_patch14_dinov2.lvd142m", ("model.safetensors", "pytorch_model.bin"), gated=False, licence="Apache-2.0"),
        outputs=(("cls", 768),), spacing_um=None, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="ViT-B/14 (DINOv2, natural images)",
        pos_embed_interp="bicubic_aa",
        note="natural-image control: no native spacing, set PreprocessingConfig(requested_spacing_um=...)"),
    # -- slide2vec 7.1.4's further tile presets, by its names ---------------------------------------
    TilePreset(
        # timm's DINOv3 ViT-B/16 (an Eva model: RoPE, 4 registers, LayerScale); its pretrained
        # global_pool is "avg": the mean of the patch tokens after the final norm (slide2vec's default).
        name="dinov3-vitb16", arch="vit_base_patch16_dinov3", kwargs=_kw(num_classes=0, dynamic_img_size=True),
        weights=Weights("timm/vit_base_patch16_dinov3.lvd1689m", ("model.safetensors", "pytorch_model.bin"),
                        gated=False, licence="DINOv3 License"),
        outputs=(("patch_mean", 768), ("cls", 768)), spacing_um=None, tile_size_px=256,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, default_precision="fp16",
        architecture="ViT-B/16 (DINOv3, RoPE, 4 registers; natural images)",
        note="natural-image control: no native spacing, set PreprocessingConfig(requested_spacing_um=...)"),
    TilePreset(
        # GPFM.pth is a bare DINOv2 ViT-L/14 state dict on a 224 px grid (timm keys).
        name="gpfm", arch="vit_large_patch14_dinov2", kwargs=_kw(img_size=224, init_values=1e-5, num_classes=0),
        weights=Weights("majiabo/GPFM", ("GPFM.pth",), gated=False, licence="MIT"),
        outputs=(("cls", 1024),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="ViT-L/14 (DINOv2)"),
    TilePreset(
        # mSTAR's hub repo is a timm ViT-L/16 (vit_large_patch16_224 with LayerScale init 1e-5).
        name="mstar", arch="vit_large_patch16_224",
        kwargs=_kw(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        weights=Weights("Wangyh/mSTAR", ("model.safetensors", "pytorch_model.bin"), gated=True),
        outputs=(("cls", 1024),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="ViT-L/16"),
    TilePreset(
        # H-optimus-0's trunk fine-tuned, plus MettleRefineHead on the CLS token (model.safetensors:
        # backbone.* and head.*).
        name="mettle", arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_kw(img_size=224, num_classes=0, init_values=1e-5, dynamic_img_size=False),
        weights=Weights("slideflow-labs/Mettle", ("model.safetensors",), gated=False, licence="CC-BY-NC-ND-4.0"),
        outputs=(("cls_patch_mean", 3072), ("cls", 1536)), spacing_um=0.5, tile_size_px=224,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, default_precision="fp16",
        architecture="ViT-g/14 (4 registers) + Mettle refine head", layout="mettle",
        note="spacing not stated on the card: H-optimus-0's (its parent model)"),
    # -- TRIDENT's baselines -------------------------------------------------------------------------
    TilePreset(
        # CLAM's truncated ImageNet ResNet-50: stages 1-3 (out_indices=[3]) + global average pooling.
        name="resnet50", arch="resnet50", kwargs=_kw(features_only=True, out_indices=(3,)),
        weights=Weights("timm/resnet50.tv_in1k", ("model.safetensors", "pytorch_model.bin"), gated=False,
                        licence="BSD-3-Clause (torchvision weights)"),
        outputs=(("mean", 1024),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="ResNet-50, stages 1-3 + average pool (CLAM)",
        layout="timm_features", ignore_keys=("layer4.", "fc."),
        note="ImageNet weights; the published file's layer4.* and fc.* are not used by the truncated network"),
    TilePreset(
        # iSight (nirschl-lab/iSight; slide2vec isight.py): openai/clip-vit-large-patch14-336 fine-tuned on
        # HPA10M; tile features = visual_token_projection(hidden_states[-1]), mean over all 577 tokens.
        name="isight", arch="vit_large_patch14_clip_quickgelu_336", kwargs=_kw(num_classes=0, final_norm=False),
        weights=Weights("nirschl-lab/iSight", ("checkpoints/iSight_model_checkpoint.pth",), gated=False),
        outputs=(("token_mean", 1024), ("cls", 1024)), spacing_um=0.5, tile_size_px=336,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, default_precision="fp16",
        architecture="CLIP ViT-L/14-336 + token projection (iSight, IHC)", layout="isight",
        note="IHC model (Human Protein Atlas); the checkpoint's CLAM pooler and task heads are not used"),
    TilePreset(
        # TRIDENT's ctranspath: Swin-T/4 (window 7) with CTransPath's convolutional stem, CHIEF's weights
        # (CHIEF_CTransPath.pth of the MahmoodLab/hest-bench dataset, {"model": ...}, timm 0.5 keys).
        name="ctranspath", arch="swin_tiny_patch4_window7_224",
        kwargs=_kw(num_classes=0, embed_layer=Ref("slide2vec_dask.encoders.ctranspath", "ConvStem")),
        weights=Weights("MahmoodLab/hest-bench", ("fm_v1/ctranspath/CHIEF_CTransPath.pth",), gated=True,
                        repo_type="dataset"),
        outputs=(("mean", 768),), spacing_um=0.5, tile_size_px=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        default_precision="fp32", architecture="Swin-T/4 + convolutional stem (CTransPath; CHIEF's tile encoder)",
        layout="ctranspath",
        note="the CHIEF-trained CTransPath TRIDENT loads; 0.5 µm/px is TRIDENT's default 20x"),
)
_KAIKO = (  # (name, timm architecture, published grid, dim, label): TRIDENT's kaiko-* encoders
    ("kaiko-vits16", "vit_small_patch16_224", 224, 384, "ViT-S/16"),
    ("kaiko-vits8", "vit_small_patch8_224", 224, 384, "ViT-S/8"),
    ("kaiko-vitb16", "vit_base_patch16_224", 224, 768, "ViT-B/16"),
    ("kaiko-vitb8", "vit_base_patch8_224", 224, 768, "ViT-B/8"),
    ("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 518, 1024, "ViT-L/14 (4 registers)"),
)
TILE_PRESETS += tuple(
    TilePreset(
        name=name, arch=arch, kwargs=_kw(img_size=grid, num_classes=0, dynamic_img_size=True),
        weights=Weights(f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms", ("model.safetensors",),
                        gated=False),
        outputs=(("cls", dim),), spacing_um=0.5, tile_size_px=224, mean=HALF, std=HALF, default_precision="fp32",
        architecture=f"{label} (kaiko.ai)", pos_embed_interp="bicubic_aa" if grid != 224 else None,
        note="published on a 518 px grid, run at 224 px as TRIDENT does" if grid != 224 else "")
    for name, arch, grid, dim, label in _KAIKO)

_BY_NAME = {p.name: p for p in TILE_PRESETS}


def get_tile_preset(name: str) -> TilePreset:
    """The `TilePreset` data of a registered tile preset."""
    get_preset(name)  # unknown names fail there, with close matches
    return _BY_NAME[canonical_name(name)]


def _register(preset: TilePreset) -> None:
    def factory(checkpoint_path=None, output_variant=None) -> EncoderSpec:
        return preset.spec(checkpoint_path=checkpoint_path, output_variant=output_variant)

    factory.__name__ = f"preset_{preset.name.replace('-', '_')}"
    factory.__doc__ = f"{preset.name}: {preset.architecture}, {preset.url}"
    factory.preset = preset
    register_preset(preset.name, preset.level, architecture=preset.architecture, outputs=preset.outputs,
                    architecture_module=preset.create_architecture)(factory)


for _preset in TILE_PRESETS:
    _register(_preset)
del _preset
