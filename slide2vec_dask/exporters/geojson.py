"""QuPath GeoJSON (``format="geojson"``): drag ``<sample_id>.geojson`` onto the slide in QuPath.

::

    <dest>/geojson/<sample_id>.geojson   a FeatureCollection in level-0 pixels (QuPath's own frame):
        tissue  objectType "annotation", classification "Tissue": the outline of the grid
                cells holding tissue (the store keeps each cell's tissue fraction, not the
                finer mask, so this is the mask at tile resolution)
        tiles   objectType "tile", one square per embedded tile, in store order;
                properties: tile_id (the row in the store), measurements tissue_fraction

The embeddings themselves stay in the other formats (JSON would multiply their size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slide2vec_dask.exporters._base import TileSource, atomic
from slide2vec_dask.exporters._outline import outline

NAME = "geojson"
EXTRA = None
LAYOUT = 1
TISSUE_COLOR = [80, 160, 80]
TILE_COLOR = [64, 128, 224]


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    return [Path(dest) / "geojson" / f"{src.sample_id}.geojson"]


def square(x: int, y: int, s: int) -> list[list[list[int]]]:
    return [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]


def tissue_polygons(src: TileSource) -> list[list[list[list[int]]]]:
    """Level-0 polygons (rings of [x, y]) of the grid cells with tissue, from the saved plan."""
    try:
        grid = src.plan()
    except FileNotFoundError:
        return []
    step = grid.read_tile_size_px * grid.level_downsample

    def lv0(v: int) -> int:
        return int(np.round(v * step))

    return [[[[lv0(cx), lv0(cy)] for cx, cy in ring] for ring in poly] for poly in outline(grid.tissue_fraction > 0)]


def collection(src: TileSource) -> dict:
    features = [{"type": "Feature", "id": f"tissue-{i}",
                 "geometry": {"type": "Polygon", "coordinates": rings},
                 "properties": {"objectType": "annotation", "name": f"tissue {i}",
                                "classification": {"name": "Tissue", "color": TISSUE_COLOR}}}
                for i, rings in enumerate(tissue_polygons(src))]
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
                           "level0_mpp": src.slide_spacing_um, "tile_size_lv0": s}}


def write_tiles(src: TileSource, files: list[Path]) -> None:
    doc = collection(src)
    atomic(files[0], lambda tmp: tmp.write_text(json.dumps(doc)))


def row_files(src, dest: Path) -> list[Path]:
    return []
