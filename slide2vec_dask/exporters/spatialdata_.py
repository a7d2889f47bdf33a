"""SpatialData (``format="spatialdata"``): one Zarr store per slide, laid out as LazySlide /
wsidata keep a slide's analysis, so ``wsidata.open_wsi(slide, store=<this>)`` finds it.

::

    <dest>/spatialdata/<sample_id>.zarr
        shapes/tiles                  one level-0 square per tile (index = tile_id, store order)
        shapes/tissues                the tissue mask's outline (see `geojson`), when the plan is there
        tables/<encoder>_tiles        the features table of `anndata_`: region "tiles",
                                      region_key "library_id", instance_key "tile_id"
        attrs: tile_spec {"tiles": wsidata TileSpec}, slide2vec_dask (the store's attrs)

Written with zarr and anndata only: shapes in SpatialData's zarr-array encoding (shapes
format 0.1: ``coords`` + ragged ``offset*`` + ``Index``), which every SpatialData release
reads.  SpatialData itself is not needed to write it (it pins an older Dask than ours).
Coordinates are level-0 pixels, an identity transform to the ``global`` system.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from slide2vec_dask.exporters import anndata_
from slide2vec_dask.exporters._base import TileSource, atomic, safe_name
from slide2vec_dask.exporters.geojson import tissue_polygons
from slide2vec_dask.exporters.registry import ExportFormat

FORMAT = ExportFormat("spatialdata", roots=("spatialdata",), extra="spatialdata", requires=("anndata", "zarr"),
                      layout=1)
POLYGON = {"name": "POLYGON", "type": 3}     # shapely's GeometryType.POLYGON
_AXES = [{"name": "x", "type": "space", "unit": "unit"}, {"name": "y", "type": "space", "unit": "unit"}]
IDENTITY = [{"type": "identity", "input": {"name": "xy", "axes": _AXES}, "output": {"name": "global", "axes": _AXES}}]


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    return [Path(dest) / "spatialdata" / f"{src.sample_id}.zarr"]


def table_name(src: TileSource) -> str:
    return f"{safe_name(src.encoder)}_{anndata_.TILES_KEY}"


def tile_rings(xy: np.ndarray, size: int) -> list[list[list[list[float]]]]:
    """Each tile as shapely's ``box(x, y, x + s, y + s)`` ring (counter-clockwise, from the lower-right)."""
    return [[[[x + size, y], [x + size, y + size], [x, y + size], [x, y], [x + size, y]]] for x, y in xy.tolist()]


def _shapes(group, name: str, polygons: list) -> None:
    """Polygons (lists of rings) as SpatialData's zarr-encoded (format 0.1) shapes element."""
    coords, ring_offsets, poly_offsets = [], [0], [0]
    for rings in polygons:
        for ring in rings:
            coords.extend(ring)
            ring_offsets.append(len(coords))
        poly_offsets.append(len(ring_offsets) - 1)
    element = group.create_group(name)
    element.create_array("coords", data=np.asarray(coords, dtype=np.float64).reshape(-1, 2))
    element.create_array("offset0", data=np.asarray(ring_offsets, dtype=np.int64))
    element.create_array("offset1", data=np.asarray(poly_offsets, dtype=np.int64))
    element.create_array("Index", data=np.arange(len(polygons), dtype=np.int64))
    element.attrs.update({"encoding-type": "ngff:shapes", "axes": ["x", "y"], "coordinateTransformations": IDENTITY,
                          "spatialdata_attrs": {"version": "0.1", "geos": POLYGON}})


def write_tiles(src: TileSource, files: list[Path]) -> None:
    ad = FORMAT.need("anndata")
    import zarr

    adata = anndata_.table(src, FORMAT)
    tissues, _ = tissue_polygons(src)
    name = table_name(src)
    meta = {k: v for k, v in src.attrs.items() if k != "complete"}

    def write(tmp: Path) -> None:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs.update({"spatialdata_attrs": {"version": "0.2"},
                           "tile_spec": {anndata_.TILES_KEY: adata.uns["tile_spec"]},
                           "slide2vec_dask": json.dumps(meta)})
        shapes = root.create_group("shapes")
        _shapes(shapes, anndata_.TILES_KEY, tile_rings(src.xy(), src.tile_size_lv0))
        if tissues:
            _shapes(shapes, "tissues", tissues)
        tables = root.create_group("tables")
        with warnings.catch_warnings():   # zarr's notes on its future defaults, once per array
            warnings.simplefilter("ignore", UserWarning)
            ad.io.write_elem(tables, name, adata)
        tables[name].attrs.update({"spatialdata-encoding-type": "ngff:regions_table", "region": anndata_.TILES_KEY,
                                   "region_key": "library_id", "instance_key": "tile_id", "version": "0.2"})
        _consolidate(tmp)

    atomic(files[0], write)


def _consolidate(path: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def row_files(src, dest: Path) -> list[Path]:
    return []
