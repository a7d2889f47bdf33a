"""From an open slide and a config to a `TileGrid` (and its previews)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slide2vec_dask.config import PreprocessingConfig
from slide2vec_dask.slide import Slide
from slide2vec_dask.tiling.grid import TileGrid, choose_level, tile_fractions
from slide2vec_dask.tiling.masks import drop_small_components, read_mask_file, segment_tissue


@dataclass
class Plan:
    grid: TileGrid
    mask_preview_path: Path | None = None
    tiling_preview_path: Path | None = None


def plan_slide(slide: Slide, config: PreprocessingConfig, *, spacing_um: float, tile_size_px: int,
               sample_id: str, mask_path: str | Path | None = None,
               preview_dir: str | Path | None = None) -> Plan:
    """Segment tissue on a thumbnail and lay the tile grid over it.

    ``spacing_um`` / ``tile_size_px`` are the resolved request (config or model).
    """
    choice = choose_level(slide.level_spacings, slide.level_downsamples, spacing_um, tile_size_px,
                          config.spacing_tolerance, sample=sample_id)
    seg, filt = config.segmentation, config.filtering
    thumb, mask = tissue_mask(slide, seg, filt, spacing_um=spacing_um, mask_path=mask_path, sample_id=sample_id)

    lh, lw = slide.level_shapes[choice.level]
    ds = slide.level_downsamples[choice.level]
    grid_shape = (lh // choice.read_tile_size_px, lw // choice.read_tile_size_px)

    def fractions(m: np.ndarray) -> np.ndarray:
        return tile_fractions(m, slide.level_shapes[0], grid_shape, choice.read_tile_size_px, ds)

    tissue = fractions(mask)
    # A threshold of 0 still asks for *some* tissue: a tile on bare glass is never kept.
    keep = (tissue >= config.tissue_threshold) & (tissue > 0)
    if filt["filter_white"]:
        keep &= fractions(np.all(thumb > filt["white_threshold"], axis=-1)) <= filt["fraction_threshold"]
    if filt["filter_black"]:
        keep &= fractions(np.all(thumb < filt["black_threshold"], axis=-1)) <= filt["fraction_threshold"]

    grid = TileGrid(
        level=choice.level, level_downsample=ds, slide_spacing_um=slide.spacing,
        read_spacing_um=choice.read_spacing_um, requested_spacing_um=spacing_um,
        requested_tile_size_px=tile_size_px, read_tile_size_px=choice.read_tile_size_px,
        tile_size_lv0=choice.tile_size_lv0, tissue_threshold=config.tissue_threshold,
        tissue_fraction=tissue, keep=keep,
        meta={"sample_id": sample_id, "image_path": str(slide.path),
              "mask_path": None if mask_path is None else str(mask_path),
              "config": selection_config(config)},
        region_tile_multiple=config.region_multiple(tile_size_px),
    )
    plan = Plan(grid)
    prev = config.preview
    if prev["save_mask_preview"] or prev["save_tiling_preview"]:
        if preview_dir is None:
            raise ValueError(f"{sample_id}: previews were requested but no output_dir is set; "
                             "pass ExecutionOptions(output_dir=...) to say where they go")
        from slide2vec_dask.tiling.preview import save_mask_preview, save_tiling_preview

        image = slide.thumbnail(prev["downsample"])
        if prev["save_mask_preview"]:
            plan.mask_preview_path = save_mask_preview(image, mask, Path(preview_dir) / "mask" / f"{sample_id}.png")
        if prev["save_tiling_preview"]:
            plan.tiling_preview_path = save_tiling_preview(
                image, grid, slide.level_shapes[0], Path(preview_dir) / "tiling" / f"{sample_id}.png")
    return plan


def tissue_mask(slide: Slide, segmentation: dict, filtering: dict, *, spacing_um: float,
                mask_path: str | Path | None = None, sample_id: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail, tissue mask) at the segmentation downsample: what a plan is laid over.

    One function, so an export can redraw the very mask a saved plan was made from.
    """
    thumb = slide.thumbnail(segmentation["downsample"])
    if mask_path is not None:
        mask = read_mask_file(mask_path, thumb.shape[:2], sample=sample_id)
    else:
        mask = segment_tissue(thumb, segmentation)
    if filtering["a_t"] > 0:
        ref_lv0 = filtering["ref_tile_size"] * spacing_um / slide.spacing   # ref tile side in level-0 px
        px_area_lv0 = (slide.level_shapes[0][0] / mask.shape[0]) * (slide.level_shapes[0][1] / mask.shape[1])
        mask = drop_small_components(mask, filtering["a_t"] * ref_lv0**2 / px_area_lv0)
    return thumb, mask


def selection_config(config: PreprocessingConfig) -> dict:
    """The config fields that decide which tiles are kept (what makes a saved plan reusable)."""
    return {
        "backend": config.backend,
        "tissue_threshold": config.tissue_threshold,
        "segmentation": dict(config.segmentation),
        "filtering": dict(config.filtering),
        "spacing_tolerance": config.spacing_tolerance,
        "region_tile_multiple": config.region_tile_multiple,
        "requested_region_size_px": config.requested_region_size_px,
    }
