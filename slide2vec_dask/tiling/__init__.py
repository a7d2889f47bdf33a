"""Tissue masks, tile grids and previews."""

from slide2vec_dask.tiling.grid import TileGrid, choose_level, tile_fractions
from slide2vec_dask.tiling.masks import otsu_threshold, read_mask_file, segment_tissue
from slide2vec_dask.tiling.plan import Plan, plan_slide

__all__ = ["TileGrid", "Plan", "plan_slide", "choose_level", "tile_fractions", "segment_tissue",
           "otsu_threshold", "read_mask_file"]
