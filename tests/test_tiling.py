"""Tiling: level choice, tissue masks with known answers, the grid, filters, previews, reuse."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import SYN_RECTS, SYN_SHAPE, SYN_TILES

from slide2vec_dask import PreprocessingConfig, TileGrid, open_slide, testing
from slide2vec_dask.tiling import choose_level, otsu_threshold, plan_slide, segment_tissue, tile_fractions


def plan(slide, spacing=0.5, tile=224, **config):
    return plan_slide(slide, PreprocessingConfig(**config), spacing_um=spacing, tile_size_px=tile, sample_id="s")


# -- level choice ---------------------------------------------------------------------------
SPACINGS, DOWNSAMPLES = [0.5, 2.0, 8.0], [1.0, 4.0, 16.0]


@pytest.mark.parametrize("requested,level,read_tile,lv0", [
    (0.5, 0, 224, 224),      # exact level 0
    (2.0, 1, 224, 896),      # exact level 1
    (2.08, 1, 224, 896),     # within 5 %: read level 1 as is
    (1.0, 0, 448, 448),      # between levels: finer level, larger tile, resized
    (4.0, 1, 448, 1792),
    (0.6, 0, 269, 269),      # 224 * 0.6 / 0.5 = 268.8
])
def test_choose_level(requested, level, read_tile, lv0):
    c = choose_level(SPACINGS, DOWNSAMPLES, requested, 224, 0.05)
    assert (c.level, c.read_tile_size_px, c.tile_size_lv0) == (level, read_tile, lv0)
    assert c.read_spacing_um == SPACINGS[level]


def test_finer_than_level_zero_is_an_error():
    with pytest.raises(ValueError, match="finer than the slide's level 0"):
        choose_level(SPACINGS, DOWNSAMPLES, 0.25, 224, 0.05, sample="s1")


# -- tissue masks ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["hsv", "otsu", "threshold"])
def test_masks_find_the_known_tissue(syn_svs, method):
    slide = open_slide(syn_svs)
    thumb = slide.thumbnail(64)
    truth = testing.tissue_mask(*SYN_SHAPE, SYN_RECTS)[32::64, 32::64]
    exact = segment_tissue(thumb, {**PreprocessingConfig().segmentation, "method": method, "mthresh": 0})
    np.testing.assert_array_equal(exact, truth)
    # The default 7 px median filter only rounds the rectangles' corners off.
    smoothed = segment_tissue(thumb, {**PreprocessingConfig().segmentation, "method": method})
    wrong = np.argwhere(smoothed != truth)
    corners = np.array([(y // 64 + dy, x // 64 + dx) for y0, x0, y1, x1 in SYN_RECTS
                        for y, dy in ((y0, 0), (y1, -1)) for x, dx in ((x0, 0), (x1, -1))])
    assert all(np.abs(corners - w).max(axis=1).min() <= 3 for w in wrong)
    assert not (smoothed & ~truth).any()


def test_otsu_threshold_splits_two_populations():
    values = np.concatenate([np.full(500, 10), np.full(300, 200)]).astype(np.uint8)
    cut = otsu_threshold(values)
    assert 10 <= cut < 200


def test_fractions_are_exact_on_aligned_masks():
    mask = np.zeros((56, 70), bool)
    mask[7:21, 7:28] = True                         # level-0 rows 448..1344, cols 448..1792
    frac = tile_fractions(mask, SYN_SHAPE, (16, 20), 224, 1.0)
    expected = np.zeros((16, 20), np.float32)
    expected[2:6, 2:8] = 1.0
    np.testing.assert_array_equal(frac, expected)
    half = tile_fractions(mask, SYN_SHAPE, (8, 10), 448, 1.0)  # 448 px tiles: still aligned
    assert half[1:3, 1:4].min() == 1.0 and half.sum() == 6


# -- the grid ----------------------------------------------------------------------------------
def test_grid_keeps_exactly_the_tissue_tiles(syn_svs):
    grid = plan(open_slide(syn_svs), tissue_threshold=0.5, segmentation={"mthresh": 0}).grid
    assert grid.shape == (16, 20)
    assert set(zip(*np.nonzero(grid.keep))) == SYN_TILES
    assert grid.num_tiles == len(SYN_TILES)
    # Row-major order, level-0 coordinates on one global grid from the slide's top-left corner.
    rows, cols = zip(*sorted(SYN_TILES))
    np.testing.assert_array_equal(grid.y, np.array(rows) * 224)
    np.testing.assert_array_equal(grid.x, np.array(cols) * 224)


def test_grid_at_a_coarser_level(syn_svs):
    grid = plan(open_slide(syn_svs), spacing=2.0, tissue_threshold=0.5).grid
    assert (grid.level, grid.read_tile_size_px, grid.tile_size_lv0) == (1, 224, 896)
    assert grid.shape == (4, 5)
    assert not grid.resize_needed
    np.testing.assert_array_equal(grid.x % 896, 0)


def test_grid_between_levels_reads_finer_and_resizes(syn_svs):
    grid = plan(open_slide(syn_svs), spacing=1.0).grid
    assert (grid.level, grid.read_tile_size_px, grid.tile_size_lv0) == (0, 448, 448)
    assert grid.resize_needed and grid.shape == (8, 10)


def test_tissue_threshold(syn_svs):
    slide = open_slide(syn_svs)
    loose = plan(slide, spacing=2.0, tissue_threshold=0.01).grid
    strict = plan(slide, spacing=2.0, tissue_threshold=1.0).grid
    assert strict.num_tiles < loose.num_tiles
    assert (strict.tissue_fraction[strict.keep] >= 1.0).all()
    assert (loose.tissue_fraction[~loose.keep] < 0.01).all()


def test_no_tissue_gives_an_empty_grid(tmp_path):
    blank = testing.write_svs(tmp_path / "blank.svs", testing.tissue_image(1024, 1024, []), downsamples=(1,))
    grid = plan(open_slide(blank)).grid
    assert grid.num_tiles == 0 and grid.x.shape == (0,)


def test_white_and_black_filters(tmp_path):
    # Left half tissue, right half a black marker stripe (saturation 0 but very dark).
    image = testing.tissue_image(1792, 1792, [(0, 0, 1792, 896)])
    image[:, 896:] = 5
    path = testing.write_svs(tmp_path / "ink.svs", image, downsamples=(1,))
    slide = open_slide(path)
    seg = {"method": "threshold"}
    kept = plan(slide, segmentation=seg).grid
    filtered = plan(slide, segmentation=seg, filtering={"filter_black": True}).grid
    assert kept.num_tiles == 64
    assert filtered.num_tiles == 32 and (filtered.x < 896).all()
    whites = plan(slide, segmentation={"method": "threshold", "threshold": 256},
                  filtering={"filter_white": True}).grid
    assert whites.num_tiles == 64  # nothing in this image is white glass


def test_small_components_filter(tmp_path):
    rects = [(0, 0, 1344, 1344), (1792, 1792, 1856, 1856)]  # a big piece and a 64 px speck
    path = testing.write_svs(tmp_path / "speck.svs", testing.tissue_image(2240, 2240, rects), downsamples=(1,))
    slide = open_slide(path)
    seg = {"downsample": 16, "mthresh": 0, "close": 0}
    with_speck = plan(slide, tissue_threshold=0.01, segmentation=seg).grid
    without = plan(slide, tissue_threshold=0.01, segmentation=seg, filtering={"a_t": 1}).grid
    assert with_speck.num_tiles == without.num_tiles + 1
    assert with_speck.num_tiles == 37


def test_mask_file(tmp_path, syn_svs):
    labels = np.zeros((112, 140), np.uint8)            # 1/32 of level 0
    labels[14:42, 14:56] = 1                           # level-0 rows 448..1344, cols 448..1792
    mask_path = testing.write_label_mask(tmp_path / "mask.tif", labels)
    grid = plan_slide(open_slide(syn_svs), PreprocessingConfig(tissue_threshold=0.5), spacing_um=0.5,
                      tile_size_px=224, sample_id="s", mask_path=mask_path).grid
    assert set(zip(*np.nonzero(grid.keep))) == {t for t in SYN_TILES if t[0] < 8}


def test_missing_mask_file(tmp_path, syn_svs):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        plan_slide(open_slide(syn_svs), PreprocessingConfig(), spacing_um=0.5, tile_size_px=224,
                   sample_id="s", mask_path=tmp_path / "none.tif")


# -- previews and persistence ------------------------------------------------------------------
def test_previews_are_written_and_cheap(tmp_path, syn_svs):
    from PIL import Image

    slide = open_slide(syn_svs)
    config = PreprocessingConfig(preview={"save_mask_preview": True, "save_tiling_preview": True, "downsample": 16})
    start = time.perf_counter()
    result = plan_slide(slide, config, spacing_um=0.5, tile_size_px=224, sample_id="s1", preview_dir=tmp_path)
    elapsed = time.perf_counter() - start
    mask_png = np.asarray(Image.open(result.mask_preview_path))
    tiles_png = np.asarray(Image.open(result.tiling_preview_path))
    assert mask_png.shape == tiles_png.shape == (224, 280, 3)
    # Tile outlines are drawn where the kept tiles are: (448/16, 448/16) is a corner of the first rectangle.
    assert tuple(tiles_png[28, 28]) == (20, 60, 230)
    assert tuple(tiles_png[5, 5]) != (20, 60, 230)
    assert elapsed < 5  # generous: the benchmark measures the real cost


def test_previews_need_an_output_dir(syn_svs):
    with pytest.raises(ValueError, match="output_dir"):
        plan(open_slide(syn_svs), preview={"save_mask_preview": True})


def test_grid_round_trips(tmp_path, syn_svs):
    grid = plan(open_slide(syn_svs)).grid
    path = grid.save(tmp_path / "s.npz")
    again = TileGrid.load(path)
    np.testing.assert_array_equal(again.keep, grid.keep)
    np.testing.assert_array_equal(again.x, grid.x)
    assert again.tile_size_lv0 == grid.tile_size_lv0 and again.matches(grid)
    with np.load(path) as data:  # other tools can read plain x/y arrays
        np.testing.assert_array_equal(data["x"], grid.x)
