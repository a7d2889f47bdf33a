"""QuPath GeoJSON (``format="geojson"``): drag ``<sample_id>.geojson`` onto the slide in QuPath.

::

    <dest>/geojson/<sample_id>.geojson   a FeatureCollection in level-0 pixels (QuPath's own frame):
        tissue  objectType "annotation", classification "Tissue": the outline of the tissue
                mask the plan was made from (redrawn from the slide with the plan's settings,
                at the segmentation resolution; the tile grid's cells when the slide is gone)
        tiles   objectType "tile", one square per embedded tile, in store order;
                properties: tile_id (the row in the store), measurements tissue_fraction

The embeddings themselves stay in the other formats (JSON would multiply their size).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from slide2vec_dask.exporters._base import TileSource, atomic
from slide2vec_dask.exporters._outline import outline
from slide2vec_dask.exporters.registry import ExportFormat
from slide2vec_dask.slide.open import open_slide
from slide2vec_dask.tiling.plan import tissue_mask
from slide2vec_dask.tissue.run import load_mask, mask_file

FORMAT = ExportFormat("geojson", roots=("geojson",), layout=1)
TISSUE_COLOR = [80, 160, 80]
TILE_COLOR = [64, 128, 224]
logger = logging.getLogger(__name__)


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    return [Path(dest) / "geojson" / f"{src.sample_id}.geojson"]


def square(x: int, y: int, s: int) -> list[list[list[int]]]:
    return [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]


def tissue_polygons(src: TileSource) -> tuple[list, str]:
    """Level-0 polygons (rings of [x, y]) of the slide's tissue, and what they were drawn from.

    The mask the saved plan was laid over, redrawn from the slide with the plan's own
    segmentation settings (``"tissue mask"``); when the slide cannot be opened any more,
    the outline of the plan's grid cells holding tissue (``"tile grid"``).
    """
    try:
        grid = src.plan()
    except FileNotFoundError:
        return [], "none"
    if grid.layout == "free" and "config" not in grid.meta:   # peer coordinates: no tissue mask of ours to draw
        return [], "none"
    try:
        store = getattr(src, "store", None)   # a learned mask is saved next to the plan, in the run's output
        saved = None if store is None else mask_file(Path(store.output_dir) / "coordinates" / f"{src.sample_id}.npz")
        mask, (height, width) = _plan_mask(grid, src.sample_id, saved)
        sy, sx = height / mask.shape[0], width / mask.shape[1]
        drawn = "tissue mask"
    except (OSError, ValueError, KeyError) as exc:
        if grid.layout == "free":   # (our per-contour plan keeps no grid of fractions to fall back on)
            logger.warning("%s: no tissue drawn (the slide's mask could not be redrawn: %s)", src.sample_id, exc)
            return [], "none"
        logger.warning("%s: tissue drawn at tile resolution (the slide's mask could not be redrawn: %s)",
                       src.sample_id, exc)
        mask = grid.tissue_fraction > 0
        sy = sx = grid.read_tile_size_px * grid.level_downsample
        drawn = "tile grid"
    return [[[[_num(cx * sx), _num(cy * sy)] for cx, cy in ring] for ring in poly] for poly in outline(mask)], drawn


def _plan_mask(grid, sample_id: str, saved: Path | None = None):
    """The plan's tissue mask (segmentation resolution) and the slide's level-0 (height, width)."""
    config = grid.meta["config"]
    slide = open_slide(grid.meta["image_path"], backend=config.get("backend", "auto"),
                       spacing_at_level_0=grid.slide_spacing_um)
    if saved is not None and saved.is_file():   # a learned mask, saved with the plan: not run again
        return load_mask(saved), slide.level_shapes[0]
    _, mask = tissue_mask(slide, config["segmentation"], config["filtering"], spacing_um=grid.requested_spacing_um,
                          mask_path=grid.meta.get("mask_path"), sample_id=sample_id,
                          tile_size_px=grid.requested_tile_size_px,
                          spacing_tolerance=config.get("spacing_tolerance", 0.05), masks=config.get("masks"))
    return mask, slide.level_shapes[0]


def _num(v: float):
    return int(v) if float(v).is_integer() else round(float(v), 3)


def collection(src: TileSource) -> dict:
    tissue, drawn = tissue_polygons(src)
    features = [{"type": "Feature", "id": f"tissue-{i}",
                 "geometry": {"type": "Polygon", "coordinates": rings},
                 "properties": {"objectType": "annotation", "name": f"tissue {i}",
                                "classification": {"name": "Tissue", "color": TISSUE_COLOR}}}
                for i, rings in enumerate(tissue)]
    s = src.tile_size_lv0
    fraction = src.tissue_fraction()
    for i, (x, y) in enumerate(src.xy().tolist()):
        features.append({"type": "Feature", "id": f"tile-{i}",
                         "geometry": {"type": "Polygon", "coordinates": square(x, y, s)},
                         "properties": {"objectType": "tile", "tile_id": i, "name": f"tile {i}",
                                        "classification": {"name": "Tile", "color": TILE_COLOR},
                                        "measurements": {"tissue_fraction": float(fraction[i])}}})
    return {"type": "FeatureCollection", "features": features,
            "properties": {"sample_id": src.sample_id, "encoder": src.encoder, "units": "px (level 0)",
                           "level0_mpp": src.slide_spacing_um, "tile_size_lv0": s, "tissue_drawn_from": drawn}}


def write_tiles(src: TileSource, files: list[Path]) -> None:
    doc = collection(src)
    atomic(files[0], lambda tmp: tmp.write_text(json.dumps(doc)))


def row_files(src, dest: Path) -> list[Path]:
    return []
