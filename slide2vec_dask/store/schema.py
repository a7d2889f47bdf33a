"""Names, dimensions and attributes a reader sees, in one place.

The run's store (`EmbeddingStore`) and the in-memory results
(`EmbeddedSlide.to_xarray()`) both build their datasets from these, so a
slide opened from the store and one returned by ``embed_slide`` look alike.
"""

from __future__ import annotations

LEVEL0_PX = "pixels (level 0)"

#: The store's layout, recorded in its root attributes by the run that makes it and checked by
#: every reader (a rerun, `open_embeddings`, `export`): a store of another layout is refused, never
#: half-read.  1 (never recorded): groups built in place, blocks staged inside the store under
#: ``_staging/``, ``complete`` written last, so a crash left groups that looked finished.
#: 2: work outside the store (``.slide2vec-work/``), every group built aside and renamed in.
LAYOUT_ATTR = "layout"
LAYOUT_VERSION = 2

#: What the writer of each kind of group always writes (``complete`` last): a group without all
#: of them (damaged, hand-edited, or of another layout) is not complete, and is made again.
COMPLETE_ATTRS = {
    "tiles": ("complete", "num_tiles", "feature_dim", "tile_size_lv0", "build_id"),
    "regions": ("complete", "num_regions", "region_tile_multiple", "tile_size_lv0"),
    "rows": ("complete", "build_id"),
}

TILE_DIMS = ("tile", "feature")
DENSE_DIMS = ("tile", "token_y", "token_x", "feature")   # dense/<id>: token (i, j) covers tile pixels [i*p, (i+1)*p)
REGION_DIMS = ("region", "tile_in_region", "feature")
REGION_MASK_DIMS = ("region", "tile_in_region")
SUB_TILE_ORDER = "row-major: t -> (row t // R, column t % R)"

TILE_COORDS = {
    "x": {"units": LEVEL0_PX, "long_name": "tile left edge"},
    "y": {"units": LEVEL0_PX, "long_name": "tile top edge"},
}
REGION_COORDS = {
    "region_x": {"units": LEVEL0_PX, "long_name": "region left edge"},
    "region_y": {"units": LEVEL0_PX, "long_name": "region top edge"},
}
TILE_EMBEDDING_ATTRS = {"long_name": "tile embedding"}
DENSE_EMBEDDING_ATTRS = {"long_name": "patch-token embedding (after the final norm)"}
REGION_EMBEDDING_ATTRS = {"long_name": "sub-tile embedding"}
TILE_MASK_ATTRS = {"long_name": "sub-tile is a kept tissue tile"}
TISSUE_FRACTION_ATTRS = {"units": "1", "long_name": "tissue fraction of the tile"}

# Annotation sampling (masks with classes): each sampled class's share of each tile, and which
# tiles each bag (a class, or "merged") holds; the class / bag names are the coordinates.
COVERAGE_DIMS = ("tile", "class")
COVERAGE_ATTRS = {"long_name": "share of the tile's footprint on the mask each annotation class covers",
                  "units": "1"}
BAG_DIMS = ("tile", "bag")
BAG_ATTRS = {"long_name": "whether the tile is in the bag (an annotation class, or 'merged')"}
