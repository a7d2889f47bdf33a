"""Tiling: level choice, tissue masks with known answers, the grid, filters, previews, reuse."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SYN_RECTS, SYN_SHAPE, SYN_TILES

from slide2vec_dask import PreprocessingConfig, TileGrid, open_slide, testing
from slide2vec_dask.tiling import choose_level, masks, plan_slide, segment_tissue
from slide2vec_dask.tiling.contours import coverage
from slide2vec_dask.tiling.masks import seg_level, segment_level


def lossless(path, image, downsamples=(1, 4, 16)):
    """A pyramid whose pixels every reader decodes alike (zlib): the HSV gate sees the drawn tissue exactly
    (JPEG's colour bleeding gives glass next to tissue the saturation of tissue)."""
    return testing.write_tiff(path, image, spacing_um=0.5, downsamples=downsamples, compression="zlib")


@pytest.fixture(scope="module")
def syn_tif(tmp_path_factory, syn_image):
    return lossless(tmp_path_factory.mktemp("tiling") / "synthetic.tif", syn_image)


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
def test_masks_find_the_known_tissue(syn_tif, method):
    """On the level nearest downsample 64 (here 16): hsv finds the rectangles exactly; the other
    methods' 7 px median blur only rounds their corners off.  (Without the closing: OpenCV's with
    hs2p's even 4 x 4 square moves a rectangle's edges by a pixel.)"""
    slide = open_slide(syn_tif)
    level = seg_level(slide.level_downsamples, 64)
    assert level == 2
    truth = testing.tissue_mask(*SYN_SHAPE, SYN_RECTS)[8::16, 8::16]
    mask = segment_level(slide, level, {**PreprocessingConfig().segmentation, "method": method, "close": 0}) > 0
    closed = segment_level(slide, level, {**PreprocessingConfig().segmentation, "method": method}) > 0
    assert np.abs(closed.astype(int) - mask).sum() <= 4 * sum((y1 - y0 + x1 - x0) // 16 for y0, x0, y1, x1 in SYN_RECTS)
    if method == "hsv":
        np.testing.assert_array_equal(mask, truth)
        return
    wrong = np.argwhere(mask != truth)
    corners = np.array([(y // 16 + dy, x // 16 + dx) for y0, x0, y1, x1 in SYN_RECTS
                        for y, dy in ((y0, 0), (y1, -1)) for x, dx in ((x0, 0), (x1, -1))])
    assert all(np.abs(corners - w).max(axis=1).min() <= 3 for w in wrong)
    assert not (mask & ~truth).any()


def test_segmenting_in_strips_is_segmenting_whole(syn_tif, monkeypatch):
    """The level is read a strip at a time; the median blur's margin makes the strips' seams invisible."""
    slide = open_slide(syn_tif)
    seg = {**PreprocessingConfig().segmentation, "method": "otsu", "mthresh": 9}
    whole = segment_tissue(slide.read_level(1, 0, 0, *slide.level_shapes[1]), seg)
    monkeypatch.setattr(masks, "STRIP_PIXELS", 1120 * 7)   # 7 rows a strip
    np.testing.assert_array_equal(segment_level(slide, 1, seg), whole)


def test_coverage_is_exact_on_aligned_masks():
    mask = np.zeros((56, 70), np.uint8)
    mask[7:21, 7:28] = 1                            # level-0 rows 448..1344, cols 448..1792
    rows, cols = np.mgrid[0:16, 0:20]
    xy = np.stack([cols.ravel() * 224, rows.ravel() * 224], axis=1)
    frac = coverage(xy, mask, 224, (4480, 3584), (70, 56), (0, 0)).reshape(16, 20)
    expected = np.zeros((16, 20), np.float32)
    expected[2:6, 2:8] = 1.0
    np.testing.assert_array_equal(frac, expected)


# -- per-contour grids (hs2p's; the default) ------------------------------------------------
def test_default_is_a_grid_per_contour(syn_tif):
    tiles = plan(open_slide(syn_tif), tissue_threshold=0.5).grid
    assert tiles.layout == "free" and tiles.meta["num_contours"] == 2
    assert set(zip(tiles.y // 224, tiles.x // 224)) == SYN_TILES   # the rectangles start on the 224 lattice
    assert (tiles.kept_tissue_fraction == 1.0).all()


def test_each_contour_grid_starts_at_its_corner(tmp_path):
    rects = [(100, 130, 700, 900), (1000, 1300, 1500, 1900)]   # corners off any 224 lattice
    path = lossless(tmp_path / "off.tif", testing.tissue_image(1792, 2240, rects))
    tiles = plan(open_slide(path)).grid
    first = tiles.y < 1000
    corners = [(int(tiles.x[part].min()), int(tiles.y[part].min())) for part in (first, ~first)]
    for (x0, y0), (rx, ry) in zip(corners, [(130, 100), (1300, 1000)]):   # each grid from its contour's box
        assert abs(x0 - rx) <= 32 and abs(y0 - ry) <= 32
    for part, (x0, y0) in zip((first, ~first), corners):
        assert set((tiles.x[part] - x0) % 224) == {0} and set((tiles.y[part] - y0) % 224) == {0}
    assert corners[0][0] % 224 != corners[1][0] % 224   # two grids, neither the slide's
    overlapped = plan(open_slide(path), overlap=0.5).grid
    assert set(np.diff(np.unique(overlapped.x[overlapped.y < 1000]))) == {112}


def test_tiles_overhang_the_slide_edge(tmp_path):
    """hs2p's grids run to the contour's far edge: the last tile may reach past the slide (read white)."""
    path = lossless(tmp_path / "edge.tif", testing.tissue_image(1000, 1100, [(0, 0, 1000, 1100)]))
    tiles = plan(open_slide(path)).grid
    assert sorted(set(tiles.x.tolist())) == [0, 224, 448, 672, 896]
    assert (tiles.x + 224 > 1100).any() and (tiles.y + 224 > 1000).any()


# -- the slide-wide grid ----------------------------------------------------------------------
def test_slide_grid_keeps_exactly_the_tissue_tiles(syn_tif):
    grid = plan(open_slide(syn_tif), tissue_threshold=0.5, grid="slide").grid
    assert grid.layout == "grid" and grid.shape == (16, 20)
    assert set(zip(*np.nonzero(grid.keep))) == SYN_TILES
    assert grid.num_tiles == len(SYN_TILES)
    # Row-major order, level-0 coordinates on one global grid from the slide's top-left corner.
    rows, cols = zip(*sorted(SYN_TILES))
    np.testing.assert_array_equal(grid.y, np.array(rows) * 224)
    np.testing.assert_array_equal(grid.x, np.array(cols) * 224)


def test_hierarchical_mode_takes_the_slide_grid():
    config = PreprocessingConfig(region_tile_multiple=4)
    assert config.grid_for(224) == "slide" and PreprocessingConfig().grid_for(224) == "contours"
    with pytest.raises(ValueError, match="one grid"):
        PreprocessingConfig(region_tile_multiple=4, grid="contours")
    with pytest.raises(ValueError, match="overlap"):
        PreprocessingConfig(grid="slide", overlap=0.5)


def test_grid_at_a_coarser_level(syn_tif):
    grid = plan(open_slide(syn_tif), spacing=2.0, tissue_threshold=0.5, grid="slide").grid
    assert (grid.level, grid.read_tile_size_px, grid.tile_size_lv0) == (1, 224, 896)
    assert grid.shape == (4, 5)
    assert not grid.resize_needed
    np.testing.assert_array_equal(grid.x % 896, 0)


def test_grid_between_levels_reads_finer_and_resizes(syn_tif):
    grid = plan(open_slide(syn_tif), spacing=1.0, grid="slide").grid
    assert (grid.level, grid.read_tile_size_px, grid.tile_size_lv0) == (0, 448, 448)
    assert grid.resize_needed and grid.shape == (8, 10)


@pytest.mark.parametrize("layout", ["contours", "slide"])
def test_tissue_threshold(syn_tif, layout):
    slide = open_slide(syn_tif)
    loose = plan(slide, spacing=2.0, tissue_threshold=0.01, grid=layout, filtering={"a_t": 0}).grid
    strict = plan(slide, spacing=2.0, tissue_threshold=1.0, grid=layout, filtering={"a_t": 0}).grid
    assert strict.num_tiles < loose.num_tiles
    assert (strict.kept_tissue_fraction >= 1.0).all() and (loose.kept_tissue_fraction >= 0.01).all()


@pytest.mark.parametrize("layout", ["contours", "slide"])
def test_no_tissue_gives_an_empty_plan(tmp_path, layout):
    blank = testing.write_svs(tmp_path / "blank.svs", testing.tissue_image(1024, 1024, []), downsamples=(1,))
    grid = plan(open_slide(blank), grid=layout).grid
    assert grid.num_tiles == 0 and grid.x.shape == (0,)


# -- the border: tissue whose edge lies inside a tile ----------------------------------------
@pytest.mark.parametrize("layout", ["contours", "slide"])
def test_a_tile_holding_only_the_tissue_edge_is_kept(tmp_path, layout):
    """A block of tissue whose ragged lower edge (40 px fingers, 444 px long) runs through the next two rows
    of tiles: each tile of the second row holds 18 % tissue (a finger passing through it), over slide2vec's
    1 % threshold, and is kept, whatever the grid, as hs2p keeps it (the mask is made on the pyramid level
    nearest the downsample, here 16, with no median).

    Before (seen failing on main at 6c9af73): the mask was a 7 px median on a 1/64 thumbnail, where a finger
    is under one pixel wide; the median erased it and that row got a tissue fraction of exactly 0."""
    image = testing.tissue_image(2048, 2240, [(0, 0, 896, 2240)])
    fingers = [(896, x + 92, 1340, x + 132) for x in range(0, 2240, 224)]
    image = np.where(testing.tissue_mask(2048, 2240, fingers)[..., None],
                     testing.tissue_image(2048, 2240, [(0, 0, 2048, 2240)], seed=3), image)
    path = lossless(tmp_path / "ragged.tif", image)
    tiles = plan(open_slide(path), grid=layout).grid
    assert tiles.x.tolist().count(0) > 0 and {0, 1, 2, 3, 4, 5} <= set((tiles.y // 224).tolist())
    edge = tiles.y == 1120
    assert edge.sum() == 10   # (18 % of each at level 0; on the 1/16 mask a finger is 4 px of the tile's 14)
    assert ((tiles.kept_tissue_fraction[edge] > 0.1) & (tiles.kept_tissue_fraction[edge] < 0.4)).all()


# -- pixel filters ----------------------------------------------------------------------------
def test_white_and_black_filters(tmp_path):
    # Left half tissue, right half a black marker stripe (saturation 0 but very dark).
    image = testing.tissue_image(1792, 1792, [(0, 0, 1792, 896)])
    image[:, 896:] = 5
    path = testing.write_svs(tmp_path / "ink.svs", image, downsamples=(1,))
    slide = open_slide(path)
    seg = {"method": "threshold", "sthresh": 0}   # saturation >= 1 or any ... everything but pure grey
    every = {"method": "threshold", "sthresh": 0, "close": 0}
    kept = plan(slide, segmentation=seg, grid="slide").grid
    assert kept.num_tiles == 32   # the stripe has no saturation: not tissue
    # Made tissue by a mask file, the stripe's tiles are dropped by the black filter, and only it.
    mask_path = testing.write_label_mask(tmp_path / "all.tif", np.ones((112, 112), np.uint8))
    for layout in ("contours", "slide"):
        config = PreprocessingConfig(grid=layout, segmentation=every)
        everything = plan_slide(slide, config, spacing_um=0.5, tile_size_px=224, sample_id="s",
                                mask_path=mask_path).grid
        filtered = plan_slide(slide, config.replace(filtering={"filter_black": True}), spacing_um=0.5,
                              tile_size_px=224, sample_id="s", mask_path=mask_path).grid
        whites = plan_slide(slide, config.replace(filtering={"filter_white": True}), spacing_um=0.5,
                            tile_size_px=224, sample_id="s", mask_path=mask_path).grid
        assert everything.num_tiles == 64 and whites.num_tiles == 64   # nothing here is white glass
        assert filtered.num_tiles == 32 and (filtered.x < 896).all()


def test_small_contours_filter(tmp_path):
    rects = [(0, 0, 1344, 1344), (1792, 1792, 1856, 1856)]  # a big piece and a 64 px speck
    path = testing.write_svs(tmp_path / "speck.svs", testing.tissue_image(2240, 2240, rects), downsamples=(1,))
    slide = open_slide(path)
    seg = {"downsample": 16, "close": 0}
    with_speck = plan(slide, segmentation=seg, filtering={"a_t": 0}).grid
    without = plan(slide, segmentation=seg).grid   # a_t = 4 tiles of 224 px: the speck goes
    assert with_speck.num_tiles == without.num_tiles + 1 == 37
    assert with_speck.meta["num_contours"] == 2 and without.meta["num_contours"] == 1


def test_mask_file(tmp_path, syn_tif):
    labels = np.zeros((112, 140), np.uint8)            # 1/32 of level 0
    labels[14:42, 14:56] = 1                           # level-0 rows 448..1344, cols 448..1792
    mask_path = testing.write_label_mask(tmp_path / "mask.tif", labels)
    grid = plan_slide(open_slide(syn_tif), PreprocessingConfig(tissue_threshold=0.5), spacing_um=0.5,
                      tile_size_px=224, sample_id="s", mask_path=mask_path).grid
    assert set(zip(grid.y // 224, grid.x // 224)) == {t for t in SYN_TILES if t[0] < 8}


def test_missing_mask_file(tmp_path, syn_svs):
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        plan_slide(open_slide(syn_svs), PreprocessingConfig(), spacing_um=0.5, tile_size_px=224,
                   sample_id="s", mask_path=tmp_path / "none.tif")


# -- previews and persistence ------------------------------------------------------------------
def test_previews_are_written_and_cheap(tmp_path, syn_tif):
    from PIL import Image

    slide = open_slide(syn_tif)
    config = PreprocessingConfig(preview={"save_mask_preview": True, "save_tiling_preview": True, "downsample": 16},
                                 tissue_threshold=0.5)
    start = time.perf_counter()
    result = plan_slide(slide, config, spacing_um=0.5, tile_size_px=224, sample_id="s1", preview_dir=tmp_path)
    elapsed = time.perf_counter() - start
    mask_png = np.asarray(Image.open(result.mask_preview_path))
    tiles_png = np.asarray(Image.open(result.tiling_preview_path))
    assert mask_png.shape == tiles_png.shape == (224, 280, 3)
    # Tile outlines are drawn where the kept tiles are: at the first tile's corner.
    corner = int(result.grid.y.min()) // 16, int(result.grid.x[result.grid.y == result.grid.y.min()].min()) // 16
    assert tuple(tiles_png[corner]) == (20, 60, 230)
    assert tuple(tiles_png[5, 5]) != (20, 60, 230)
    assert elapsed < 5  # generous: the benchmark measures the real cost


def test_previews_need_an_output_dir(syn_svs):
    with pytest.raises(ValueError, match="output_dir"):
        plan(open_slide(syn_svs), preview={"save_mask_preview": True})


def test_grid_round_trips(tmp_path, syn_tif):
    grid = plan(open_slide(syn_tif), grid="slide").grid
    path = grid.save(tmp_path / "s.npz")
    again = TileGrid.load(path)
    np.testing.assert_array_equal(again.keep, grid.keep)
    np.testing.assert_array_equal(again.x, grid.x)
    assert again.tile_size_lv0 == grid.tile_size_lv0 and again.matches(grid)
    with np.load(path) as data:  # other tools can read plain x/y arrays
        np.testing.assert_array_equal(data["x"], grid.x)


# -- settings: hs2p's keys, slide2vec's defaults ------------------------------------------------
SLIDE2VEC_DEFAULTS = Path("/tmp/s2v/slide2vec-7.1.4/slide2vec/configs/default.yaml")


def test_segmentation_and_filtering_keys_and_defaults_are_slide2vecs():
    """The keys are hs2p's (so slide2vec's YAML maps onto them one to one) and the defaults slide2vec's
    (SAM2's device aside: None follows ``segmentation.device``, the worker's GPU when it has one; the
    learned methods' own keys come on top); ``ref_tile_size`` None is slide2vec's
    ``${requested_tile_size_px}``."""
    if not SLIDE2VEC_DEFAULTS.is_file():
        pytest.skip(f"slide2vec 7.1.4's sdist is not unpacked at {SLIDE2VEC_DEFAULTS}")
    import yaml

    tiling = yaml.safe_load(SLIDE2VEC_DEFAULTS.read_text())["tiling"]
    config = PreprocessingConfig()
    theirs = tiling["seg_params"]
    assert set(theirs) <= set(config.segmentation)
    assert {k: config.segmentation[k] for k in theirs if k != "sam2_device"} == {
        k: v for k, v in theirs.items() if k != "sam2_device"}
    assert theirs["sam2_device"] == "cpu" and config.segmentation["sam2_device"] is None
    filt = dict(tiling["filter_params"], ref_tile_size=None)
    assert config.filtering == filt
    assert config.tissue_threshold == tiling["masks"]["min_coverage"]["tissue"]
    assert config.overlap == tiling["params"]["overlap"] and config.spacing_tolerance == tiling["params"]["tolerance"]


@pytest.mark.parametrize("field,value,message", [
    ("segmentation", {"mthresh": 4}, "odd"),
    ("segmentation", {"threshold": 220}, "unknown key"),
    ("segmentation", {"method": "sam3"}, "sam2"),
    ("filtering", {"max_n_holes": 8}, "unknown key"),
    ("filtering", {"qc_spacing_um": 0}, "qc_spacing_um"),
    ("filtering", {"filter_blur": "yes"}, "true or false"),
    ("overlap", 0.8, "overlap"),
    ("grid", "per_slide", "contours"),
])
def test_tiling_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        PreprocessingConfig(**{field: value})


def test_geojson_export_draws_the_tissue_of_a_per_contour_plan(syn_tif):
    """The GeoJSON export redraws the mask a plan was laid over: for hs2p's per-contour plans too."""
    from types import SimpleNamespace

    from slide2vec_dask.exporters.geojson import tissue_polygons

    grid = plan(open_slide(syn_tif), tissue_threshold=0.5).grid
    polygons, drawn = tissue_polygons(SimpleNamespace(plan=lambda: grid, sample_id="s"))
    assert grid.layout == "free" and drawn == "tissue mask" and len(polygons) == len(SYN_RECTS)
    for ring, (y0, x0, y1, x1) in zip(sorted(p[0] for p in polygons), sorted(SYN_RECTS, key=lambda r: r[1])):
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert abs(min(xs) - x0) <= 32 and abs(max(ys) - y1) <= 32   # the rectangle, to a mask pixel or two
