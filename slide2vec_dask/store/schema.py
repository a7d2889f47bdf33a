"""Names, dimensions and attributes a reader sees, in one place.

The run's store (`EmbeddingStore`) and the in-memory results
(`EmbeddedSlide.to_xarray()`) both build their datasets from these, so a
slide opened from the store and one returned by ``embed_slide`` look alike.
"""

from __future__ import annotations

LEVEL0_PX = "pixels (level 0)"

TILE_DIMS = ("tile", "feature")
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
REGION_EMBEDDING_ATTRS = {"long_name": "sub-tile embedding"}
TILE_MASK_ATTRS = {"long_name": "sub-tile is a kept tissue tile"}
TISSUE_FRACTION_ATTRS = {"units": "1", "long_name": "tissue fraction of the tile"}
