"""Our tiles are hs2p's: the same positions, tile for tile, and the same tissue fractions.

hs2p 6.1.0 (slide2vec 7.1.4's tiler) runs in its own environment
(``tests/peers/setup-hs2p.sh``) through ``tests/peers/make_hs2p.py tile`` on the same
files; without it these tests skip, naming the script.  Slides: the CMU slide (real
tissue, JPEG, one level), a libvips pyramid and a tifffile pyramid the tests write
(lossless, so every reader decodes the same pixels) with several tissue regions,
tissue running off every edge, a region with holes, a speck under the area filter and
a non-rectangular region.  Settings: slide2vec's defaults, then ``overlap``, ``a_h``,
a higher tissue threshold, otsu, and the white / black / grayspace / blur pixel filters
at ``qc_spacing_um``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from slide2vec_dask import PreprocessingConfig, testing
from slide2vec_dask.slide import open_slide
from slide2vec_dask.tiling.plan import find_tissue, plan_slide

pytestmark = pytest.mark.slow   # (CI runs the slow tests after the default suite: .ci/run)

MAKE_HS2P = REPO / "tests" / "peers" / "make_hs2p.py"
SETUP = "tests/peers/setup-hs2p.sh"
CMU = Path(os.environ.get("CMU_SVS", "/work/shared/data/CMU-1-Small-Region.svs"))
SPACING, TILE = 0.5, 224

# (name, our PreprocessingConfig fields, hs2p's settings for make_hs2p.py tile)
QC = {"filter_white": True, "filter_black": True, "filter_grayspace": True, "filter_blur": True,
      "qc_spacing_um": 2.0}
CASES = [
    ("defaults", {}, {}),
    ("overlap", {"overlap": 0.25}, {"overlap": 0.25}),
    ("a_h", {"filtering": {"a_h": 8, "a_t": 1}}, {"filtering": {"a_h": 8, "a_t": 1}}),
    ("threshold", {"tissue_threshold": 0.5}, {"min_coverage": 0.5}),
    ("otsu", {"segmentation": {"method": "otsu", "close": 2}}, {"segmentation": {"method": "otsu", "close": 2}}),
    ("pixel-qc", {"filtering": QC}, {"filtering": QC}),
    ("grayspace-blur", {"filtering": {"filter_grayspace": True, "grayspace_fraction_threshold": 0.3,
                                      "filter_blur": True, "blur_threshold": 400.0, "qc_spacing_um": 1.0}},
     {"filtering": {"filter_grayspace": True, "grayspace_fraction_threshold": 0.3, "filter_blur": True,
                    "blur_threshold": 400.0, "qc_spacing_um": 1.0}}),
]

# Tissue of the written slides, (y0, x0, y1, x1) level-0 px: off the top-left corner, off the
# bottom-right corner, a ring (holes cut below), a speck under a_t, a block in the middle.
H, W = 3000, 4100
RECTS = [(0, 0, 700, 1100), (2300, 3300, H, W), (900, 1500, 2100, 2900), (2600, 200, 2630, 230),
         (400, 3000, 1000, 3700)]
HOLES = [(1200, 1800, 1500, 2200), (1700, 2400, 1900, 2700)]


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def hs2p_python() -> Path:
    python = Path(os.environ.get("HS2P_PYTHON") or Path(os.environ.get("HS2P_ENV", "/tmp/slide2vec-hs2p")) / "bin"
                  / "python")
    if not python.is_file():
        pytest.skip(f"hs2p not installed ({python} missing): run {SETUP}, or set HS2P_PYTHON")
    return python


def synthetic_image() -> np.ndarray:
    image = testing.tissue_image(H, W, RECTS)
    for y0, x0, y1, x1 in HOLES:
        image[y0:y1, x0:x1] = testing.GLASS
    yy, xx = np.mgrid[0:H, 0:W]
    blob = ((yy - 2620) / 280.0) ** 2 + ((xx - 1700) / 600.0) ** 2 <= 1   # a region no grid line follows
    image[blob] = testing.tissue_image(H, W, [(0, 0, H, W)], seed=1)[blob]
    return image


@pytest.fixture(scope="module")
def vips_slide(tmp_path_factory) -> Path:
    """libvips pyramid (LZW), 0.5 µm/px; its levels halve the size, rounding, so downsamples are not whole."""
    pyvips = pytest.importorskip("pyvips")
    pixels = np.ascontiguousarray(synthetic_image())
    path = tmp_path_factory.mktemp("vips") / "vips.tif"
    pyvips.Image.new_from_memory(pixels.tobytes(), W, H, 3, "uchar").tiffsave(
        str(path), tile=True, pyramid=True, compression="lzw", tile_width=256, tile_height=256,
        xres=2000.0, yres=2000.0)   # pixels per mm
    return path


@pytest.fixture(scope="module")
def tifffile_slide(tmp_path_factory) -> Path:
    """tifffile pyramid (zlib, SubIFDs), 0.5 µm/px, levels 1, 4, 16 (hs2p reads it with its tifffile backend:
    OpenSlide does not see SubIFD levels)."""
    image = synthetic_image()[: H // 16 * 16, : W // 16 * 16]
    return testing.write_tiff(tmp_path_factory.mktemp("tifffile") / "tifffile.tif", image, spacing_um=SPACING,
                              downsamples=(1, 4, 16), compression="zlib")


def hs2p_tiles(python: Path, slide: Path, out: Path, backend: str) -> list[dict]:
    settings = [{"spacing": SPACING, "tile_size": TILE, "backend": backend, **theirs} for _, _, theirs in CASES]
    result = subprocess.run([str(python), str(MAKE_HS2P), "tile", str(slide), "s", str(out), json.dumps(settings)],
                            capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def ours(slide_path: Path, fields: dict):
    config = PreprocessingConfig(requested_spacing_um=SPACING, requested_tile_size_px=TILE, **fields)
    with open_slide(slide_path) as slide:
        return plan_slide(slide, config, spacing_um=SPACING, tile_size_px=TILE, sample_id="s").grid


def check_same(slide_path: Path, theirs: list[dict]) -> dict[str, int]:
    counts = {}
    for (name, fields, _), hs2p in zip(CASES, theirs):
        plan = ours(slide_path, fields)
        got = {(int(x), int(y)): float(f) for x, y, f in zip(plan.x, plan.y, plan.kept_tissue_fraction)}
        want = {(int(x), int(y)): float(f) for x, y, f in zip(hs2p["x"], hs2p["y"], hs2p["tissue_fractions"])}
        assert sorted(got) == sorted(want), (
            f"{slide_path.name} {name}: {len(got)} tiles, hs2p {len(want)}; only ours {sorted(set(got) - set(want))[:5]}, "
            f"only hs2p's {sorted(set(want) - set(got))[:5]}")
        assert got == want, f"{slide_path.name} {name}: tissue fractions differ"
        assert plan.tile_size_lv0 == hs2p["meta"]["tiling"]["tile_size_lv0"]
        counts[name] = len(got)
    return counts


def check_settings_act(counts: dict[str, int]) -> None:
    """Each setting changed the answer where it should (so the comparison tested it)."""
    assert counts["defaults"] > 0
    assert counts["overlap"] > counts["defaults"]
    assert counts["threshold"] < counts["defaults"]
    assert counts["pixel-qc"] < counts["defaults"]
    assert counts["grayspace-blur"] < counts["defaults"]


def test_cmu_tiles_are_hs2ps(hs2p_python, tmp_path):
    if not CMU.is_file():
        pytest.skip(f"{CMU} not present")
    counts = check_same(CMU, hs2p_tiles(hs2p_python, CMU, tmp_path, "openslide"))
    check_settings_act(counts)


def test_vips_pyramid_tiles_are_hs2ps(hs2p_python, vips_slide, tmp_path):
    counts = check_same(vips_slide, hs2p_tiles(hs2p_python, vips_slide, tmp_path, "openslide"))
    check_settings_act(counts)


def test_tifffile_pyramid_tiles_are_hs2ps(hs2p_python, tifffile_slide, tmp_path):
    counts = check_same(tifffile_slide, hs2p_tiles(hs2p_python, tifffile_slide, tmp_path, "tifffile"))
    check_settings_act(counts)


def test_written_slides_have_what_the_comparison_needs(vips_slide, tifffile_slide):
    """Several contours (the speck dropped by a_t), holes, tiles overhanging the right and bottom edges."""
    for path in (vips_slide, tifffile_slide):
        plan = ours(path, {})
        with open_slide(path) as slide:
            width, height = slide.dimensions
            assert slide.level_count >= 3
            tissue = find_tissue(slide, PreprocessingConfig().segmentation,
                                 {**PreprocessingConfig().filtering, "ref_tile_size": TILE}, spacing_um=SPACING,
                                 tile_size_px=TILE, tolerance=0.05)
        assert plan.meta["num_contours"] == len(tissue.contours) == 5   # 4 rectangles, the blob (not the speck)
        assert sorted(len(h) for h in tissue.contours.holes) == [0, 0, 0, 0, 2]
        assert (plan.x + plan.tile_size_lv0 > width).any() and (plan.y + plan.tile_size_lv0 > height).any()
        assert (plan.x == 0).any() and (plan.y == 0).any()
