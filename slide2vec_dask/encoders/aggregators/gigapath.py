"""Prov-GigaPath's slide encoder (``gigapath-slide``): LongNet over GigaPath tile features.

Xu et al., "A whole-slide foundation model for digital pathology from
real-world data", Nature 2024; weights ``slide_encoder.pth`` of the gated
Hugging Face repo ``prov-gigapath/prov-gigapath``.  The architecture is the
official ``gigapath_slide_enc12l768d`` (``gigapath/slide_encoder.py``,
``LongNetViT``): a linear projection of the 1536-d tile features to 768-d,
a fixed 2-D sin-cos embedding of each tile's grid position, a CLS token,
12 LongNet layers with dilated attention (`longnet`), a final LayerNorm.
86,330,880 parameters, the count the official demo notebook prints.

Positions.  The official ``coords_to_pos`` takes ``floor(coords / 256)`` of
coordinates that, per the maintainers (prov-gigapath issue #116), are in the
pixels of the 0.5 µm/px level where the 256-px tiles were cut; the grid
position ``(col, row)`` indexes a ``1000 x 1000`` table.  Our level-0 tile
origins over ``tile_size_lv0`` give the same ``(col, row)``: an integer for
tiles on the grid, rounded (not floored) so that the ±1 px of level-0
origins on levels with a non-integer downsample cannot shift a column.

Tile stage.  The official pipeline cuts 256-px tiles at 0.5 µm/px and feeds
the tile encoder their centre 224 px (``Resize(256)`` is then a no-op,
``CenterCrop(224)``).  The chained tile spec therefore asks for 256-px tiles
at 0.5 µm/px and wraps the ``gigapath`` tile encoder with that centre crop:
neighbouring tiles are one grid step (256 px) apart, as the positions assume.

Outputs (``output_variant``), all 768-d, each an official or published use:

* ``cls`` (default): ``create_model(...)(tile_embed, coords)`` as in the README,
  ``global_pool=False``: the CLS token after the encoder's and the model's
  final LayerNorms.
* ``mean``: the same with ``global_pool=True``, the mean of the tile tokens;
  the official ``demo/4_load_slide_encoder.py`` notes the CLS token was not
  trained during pretraining.
* ``last_layer_cls``: ``last_layer_embed`` of the official
  ``gigapath.pipeline.run_inference_with_slide_encoder`` (``all_layer_embed=True``):
  the CLS token of the last layer, without the encoder's final LayerNorm.
* ``layer11_mean``: TRIDENT's GigaPath slide encoder (``global_pool=True``,
  ``all_layer_embed=True``, output 11): mean tile token after 11 of 12 layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.base import EncoderSpec, load_into_meta, read_state_dict
from slide2vec_dask.encoders.registry import get_preset, register_preset
from slide2vec_dask.encoders.weights import Weights

NAME = "gigapath-slide"
HUB_ID = "prov-gigapath/prov-gigapath"
HUB_FILES = ("slide_encoder.pth",)
URL = f"https://huggingface.co/{HUB_ID}"
WEIGHTS = Weights(HUB_ID, HUB_FILES, gated=True, licence="Apache-2.0 (with Prov-GigaPath's conditions)")
TILE_PRESET = "gigapath"
TILE_SIZE_PX = 256   # official tiling: 256-px tiles at 0.5 µm/px ...
CROP_PX = 224        # ... of which the tile encoder sees the centre 224 px
SPACING_UM = 0.5
SLIDE_NGRIDS = 1000  # LongNetViT(slide_ngrids=1000): a 1000 x 1000 grid of tile positions
MAX_WSI_SIZE = 262144
DILATIONS = (1, 2, 4, 8, 16)  # make_longnet_from_name's dilated_ratio


def official_segment_lengths(max_wsi_size: int = MAX_WSI_SIZE, tile_size: int = TILE_SIZE_PX,
                             branches: int = 5) -> tuple[int, ...]:
    """``LongNetViT.get_optimal_segment_length``: ``2 ** linspace(10, log2(max tokens))``, truncated."""
    import numpy as np

    max_tokens = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(np.log2(1024), int(np.log2(max_tokens)), branches)
    return tuple(int(n) for n in np.power(2, exponents).astype(np.int64))


SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)  # == official_segment_lengths(), as the demo prints

# output_variant -> readout (layers run (None: all), encoder's final LayerNorm, pooling)
OUTPUT_VARIANTS: dict[str, tuple[int | None, bool, str]] = {
    "cls": (None, True, "cls"),
    "mean": (None, True, "mean"),
    "last_layer_cls": (None, False, "cls"),
    "layer11_mean": (11, False, "mean"),
}
DEFAULT_VARIANT = "cls"
# gigapath_slide_enc12l768d; LongNet_12_layers_768_dim (16 heads, FFN 3072)
ARCHITECTURE = dict(in_dim=1536, dim=768, depth=12, heads=16, mlp_ratio=4, slide_ngrids=SLIDE_NGRIDS,
                    segment_lengths=SEGMENT_LENGTHS, dilations=DILATIONS)


def _check_variant(output_variant: str | None) -> str:
    variant = DEFAULT_VARIANT if output_variant is None else output_variant
    if variant not in OUTPUT_VARIANTS:
        raise ValueError(f"preset {NAME!r} has no output_variant {variant!r}; choose one of "
                         f"{list(OUTPUT_VARIANTS)} (default {DEFAULT_VARIANT!r})")
    return variant


def create_architecture(output_variant: str | None = None, **overrides):
    """The published model, randomly initialised (under ``torch.device('meta')`` it is free).

    ``overrides`` change architecture arguments (smaller twins for tests).
    """
    from slide2vec_dask.encoders.aggregators.longnet import LongNetViT, Readout  # torch at its top level

    readout = Readout(*OUTPUT_VARIANTS[_check_variant(output_variant)])
    return LongNetViT(**{**ARCHITECTURE, **overrides}, readout=readout)


# -- building, on the worker ---------------------------------------------------
@dataclass(frozen=True)
class GigaPathSlideBuilder:
    """Builds the slide encoder and loads ``slide_encoder.pth`` strictly (picklable)."""

    output_variant: str = DEFAULT_VARIANT
    checkpoint_path: str | None = None

    def _weights_file(self) -> Path:
        return WEIGHTS.resolve(NAME, self.checkpoint_path)

    def __call__(self):
        import torch

        path = self._weights_file()
        what = f"preset {NAME!r} ({HUB_ID})"
        state = read_state_dict(path, what)
        with torch.device("meta"):
            model = create_architecture(self.output_variant)
        return load_into_meta(model, state, f"{what}: checkpoint {path} does not fit the gigapath_slide_enc12l768d "
                                            f"architecture: {{problems}}. Pass the {HUB_FILES[0]} published at "
                                            f"{URL}, or leave checkpoint_path unset to fetch it from the hub.")


@dataclass(frozen=True)
class CenterCropBuilder:
    """Builds a tile encoder that sees the centre ``crop_px`` square of each tile (picklable)."""

    build_encoder: Callable[[], Any]
    crop_px: int

    def __call__(self):
        from slide2vec_dask.encoders.aggregators.longnet import CenterCropped  # torch at its top level

        return CenterCropped(self.build_encoder(), self.crop_px)


def chained_tile_spec(tile_spec: EncoderSpec) -> EncoderSpec:
    """The ``gigapath`` tile spec as the slide encoder needs it: 256-px tiles at 0.5 µm/px, centre 224 encoded.

    Source: ``gigapath/pipeline.py`` (``load_tile_encoder_transforms``: Resize(256),
    CenterCrop(224)) and ``gigapath/preprocessing`` (256-px tiles at 0.5 µm/px); the
    positional grid steps one 256-px tile at a time.
    """
    return dataclasses.replace(
        tile_spec, tile_size_px=TILE_SIZE_PX, spacing_um=SPACING_UM,
        build=CenterCropBuilder(tile_spec.build, CROP_PX),
        key=f"{tile_spec.key}:centre{CROP_PX}of{TILE_SIZE_PX}",
        info={**tile_spec.info, "input": f"{TILE_SIZE_PX}-px tiles at {SPACING_UM} µm/px, centre {CROP_PX} px "
                                         "encoded (Prov-GigaPath's pipeline)"})


@register_preset(NAME, level="slide", architecture="LongNet, 12 layers, 768-d (gigapath_slide_enc12l768d)",
                 outputs={v: 768 for v in OUTPUT_VARIANTS}, architecture_module=lambda: create_architecture())
def preset_gigapath_slide(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None) -> AggregatorSpec:
    """gigapath-slide: Prov-GigaPath's LongNet slide encoder (768-d) over ``gigapath`` tiles.

    https://huggingface.co/prov-gigapath/prov-gigapath
    """
    variant = _check_variant(output_variant)
    weights = WEIGHTS.with_checkpoint(NAME, checkpoint_path)
    tile_spec = chained_tile_spec(get_preset(TILE_PRESET)(checkpoint_path=tile_checkpoint_path))
    return AggregatorSpec(
        name=NAME,
        level="slide",
        build=GigaPathSlideBuilder(variant, weights.checkpoint_path),
        tile_encoder=tile_spec,
        feature_dim=768,
        latent_dim=None,
        default_precision="fp16",  # the official pipeline runs it under fp16 autocast
        key=weights.cache_key(NAME, variant, SEGMENT_LENGTHS, DILATIONS, SLIDE_NGRIDS, OUTPUT_VARIANTS[variant]),
        info={**weights.info(),
              "architecture": "LongNet slide encoder, 12 layers, 768-d (gigapath_slide_enc12l768d)",
              "output_variant": variant, "output_variants": list(OUTPUT_VARIANTS),
              "positions": "round(level-0 origin / tile_size_lv0) on a 1000 x 1000 grid"},
    )
