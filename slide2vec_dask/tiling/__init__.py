"""Tiling: where a slide's tiles are (hs2p's tissue contours and grids, or a slide-wide grid)."""

from slide2vec_dask.tiling.grid import TileGrid, choose_level, select_level
from slide2vec_dask.tiling.masks import read_mask_file, segment_tissue
from slide2vec_dask.tiling.plan import Plan, plan_slide
from slide2vec_dask.tiling.tile_list import TileList

__all__ = ["TileGrid", "TileList", "Plan", "plan_slide", "choose_level", "select_level", "segment_tissue",
           "read_mask_file"]
