"""AnnData (``format="anndata"``): one ``.h5ad`` per slide, tiles as observations.

::

    <dest>/anndata/<encoder>/<sample_id>.h5ad
        X                    (N, D) float32 tile embeddings, store order
        obs                  index "0".."N-1"; tile_id, x, y (level-0 px, top-left), tissue_fraction,
                             library_id ("tiles": the shapes element the rows describe, as wsidata names it)
        obsm["spatial"]      (N, 2) int64 level-0 px (x, y), where scverse tools look for positions
        uns["tile_spec"]     wsidata's TileSpec of the tiles; uns["spatialdata_attrs"]: the
                             region / region_key / instance_key linkage; uns["slide2vec_dask"]: the
                             store's attrs of the slide (spacing, encoder, ...)

This is the features table LazySlide keeps in its SpatialData, standalone (see `spatialdata_`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slide2vec_dask.exporters._base import TileSource, atomic, safe_name
from slide2vec_dask.exporters.registry import ExportFormat

FORMAT = ExportFormat("anndata", roots=("anndata",), extra="anndata", requires=("anndata",), layout=1)
TILES_KEY = "tiles"


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    return [Path(dest) / "anndata" / safe_name(src.encoder) / f"{src.sample_id}.h5ad"]


def tile_spec(src: TileSource) -> dict:
    """wsidata's TileSpec: size at the requested mpp, the read level, and the level-0 size."""
    px = src.tile_size_px
    read_px = int(src.attrs.get("read_tile_size_px", px))
    return {"height": px, "width": px, "stride_height": px, "stride_width": px, "mpp": src.requested_spacing_um,
            "ops_level": int(src.attrs.get("read_level", 0)), "ops_downsample": read_px / px,
            "base_level": 0, "base_downsample": src.tile_size_lv0 / px, "tissue_name": None}


def table(src: TileSource, fmt: ExportFormat = FORMAT):
    """The features table as an `AnnData` (what this format and the SpatialData one both write)."""
    ad = fmt.need("anndata")
    import pandas as pd

    xy = src.xy()
    n = len(xy)
    ids = np.arange(n, dtype=np.int64)
    obs = pd.DataFrame({"tile_id": ids, "x": xy[:, 0], "y": xy[:, 1], "tissue_fraction": src.tissue_fraction(),
                        "library_id": pd.Categorical([TILES_KEY] * n, categories=[TILES_KEY])},
                       index=pd.Index(ids.astype(str)))
    var = pd.DataFrame(index=pd.Index(np.arange(src.feature_dim).astype(str)))
    meta = {k: v for k, v in src.attrs.items() if k != "complete"}
    uns = {"tile_spec": {k: v for k, v in tile_spec(src).items() if v is not None},
           "spatialdata_attrs": {"region": TILES_KEY, "region_key": "library_id", "instance_key": "tile_id"},
           "slide2vec_dask": json.dumps(meta)}
    return ad.AnnData(X=src.features(), obs=obs, var=var, obsm={"spatial": xy}, uns=uns)


def write_tiles(src: TileSource, files: list[Path]) -> None:
    adata = table(src)
    atomic(files[0], lambda tmp: adata.write_h5ad(tmp))


def row_files(src, dest: Path) -> list[Path]:
    return []
