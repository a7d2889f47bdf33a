"""Hostile and careless slide files (issue 26, round 3): each a clear error naming the file.

Every test here was watched failing on the code before its fix (the failure is
in its docstring).  Slides are written by `slide2vec_dask.testing` or by
tifffile directly, then damaged the way a careless copy or a hostile header would.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.slide import base, registry
from slide2vec_dask.slide.base import UnreadableSlideError
from slide2vec_dask.slide.open import open_slide
from slide2vec_dask.tiling import masks
from slide2vec_dask.tiling.plan import tissue_mask

from conftest import CMU_SVS

FRACTIONS = (0.05, 0.3, 0.45, 0.65, 0.9, 0.99)
SEGMENTATION = {"downsample": 64, "sthresh": 20, "sthresh_up": 255, "mthresh": 7, "close": 4, "use_otsu": False,
                "use_hsv": True}


@pytest.fixture(scope="module")
def small_svs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_slides")
    return testing.write_svs(folder / "small.svs", testing.tissue_image(1344, 1344, [(224, 224, 1120, 896)], seed=1),
                             downsamples=(1, 4))


def truncated(source: Path, folder: Path, fraction: float) -> Path:
    """A copy of ``source`` cut at ``fraction`` of its length, as an interrupted download leaves it."""
    data = source.read_bytes()
    path = folder / f"{source.stem}-{int(fraction * 100)}{source.suffix}"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def sources(small: Path) -> list[Path]:
    return [small] + ([CMU_SVS] if CMU_SVS.exists() else [])


# -- 2. a truncated slide is UnreadableSlideError naming the file, whatever the cut --------------
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_a_truncated_slide_is_unreadable_at_any_cut(small_svs, tmp_path, fraction):
    """Before: the real SVS (CMU-1-Small-Region) cut at 5-65 % raised ``IndexError: 0`` from the
    reader registry's unguarded probe (tifffile parsed no page; the claim asked for the first);
    cut at 90 or 99 % (past its last level, before its last image directories) it opened as whole."""
    for source in sources(small_svs):
        path = truncated(source, tmp_path, fraction)
        with pytest.raises(UnreadableSlideError, match=path.name) as info:
            open_slide(path).thumbnail(64)
        assert "truncated" in str(info.value) or "complete" in str(info.value)


def test_a_truncated_slide_fails_alone_in_a_run(tiny, small_svs, tmp_path):
    """Before: the truncated real slide's row said ``IndexError`` / ``0``: nothing a user can act on
    (the synthetic one cut at 50 % was already UnreadableSlideError)."""
    slides = [{"sample_id": "good", "image_path": small_svs}]
    for source in sources(small_svs):
        slides.append({"sample_id": f"cut-{source.stem}", "image_path": truncated(source, tmp_path, 0.5)})
    result = Pipeline(tiny, PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5),
                      ExecutionOptions(output_dir=tmp_path / "out")).run(slides=slides)
    rows = {o.sample_id: o for o in result.outcomes}
    assert rows["good"].status == "success" and rows["good"].num_tiles > 0
    for slide in slides[1:]:
        row = rows[slide["sample_id"]]
        assert (row.status, row.error_type) == ("failed", "UnreadableSlideError"), row
        assert Path(slide["image_path"]).name in row.error


def test_a_reader_that_fails_on_open_says_unreadable_naming_the_file(small_svs, monkeypatch):
    """Any reader's failure on open (here a library's own exception type) becomes
    UnreadableSlideError naming the file and the reader.  Before: the ``KeyError`` went through as it was."""
    spec = registry.get("tifffile")

    def broken(path):
        raise KeyError("0")

    monkeypatch.setattr(registry, "get", lambda name: replace(spec, open=broken))
    with pytest.raises(UnreadableSlideError, match=r"small\.svs.*tifffile.*KeyError"):
        open_slide(small_svs, backend="tifffile")


# -- 3. sizes read from a file are bounded before memory is allocated -----------------------------
def hostile_tiff(path: Path, declared: int = 10**6) -> Path:
    """A 512 x 512 JPEG-tiled TIFF (4 real tiles) whose header then claims ``declared`` px a side."""
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit=3)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for tag in ("ImageWidth", "ImageLength"):
            tif.pages[0].tags[tag].overwrite(declared, dtype="I")
    return path


def test_a_level_whose_tiles_disagree_with_its_size_is_refused(tmp_path):
    """Before: the 10^6 x 10^6 level opened as if real (its thumbnail then asked for 43.7 GiB)."""
    path = hostile_tiff(tmp_path / "hostile.tif")
    with pytest.raises(UnreadableSlideError, match=r"hostile\.tif.*level 0.*4 tiles") as info:
        open_slide(path)
    assert "1000000" in str(info.value)


def test_a_hostile_header_fails_alone_in_a_run(tiny, small_svs, tmp_path):
    """Before: the row said ``MemoryError``: planning asked for a 43.7 GiB array (libjpeg's 1/8
    decode of the declared level 0, for the thumbnail)."""
    slides = [{"sample_id": "good", "image_path": small_svs},
              {"sample_id": "hostile", "image_path": hostile_tiff(tmp_path / "hostile.tif")}]
    result = Pipeline(tiny, PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5),
                      ExecutionOptions(output_dir=tmp_path / "out")).run(slides=slides)
    rows = {o.sample_id: o for o in result.outcomes}
    assert rows["good"].status == "success"
    assert (rows["hostile"].status, rows["hostile"].error_type) == ("failed", "UnreadableSlideError")
    assert "hostile.tif" in rows["hostile"].error


def sparse_tiff(path: Path, side: int) -> Path:
    """A tiled TIFF ``side`` px a side whose tiles were never written (a sparse file: all glass).
    Its tile count is right: only the thumbnail's pixel budget can stop it."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(shape=(side, side, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                  resolution=(2e4, 2e4), resolutionunit=3)
    return path


def test_a_thumbnail_over_the_pixel_budget_is_refused_before_allocating(tmp_path, monkeypatch):
    """Before: the thumbnail was allocated whatever its size (here capped low to keep the test small)."""
    monkeypatch.setattr(base, "THUMBNAIL_MAX_PIXELS", 1 << 11)
    slide = open_slide(sparse_tiff(tmp_path / "sparse.tif", 4096))
    with pytest.raises(UnreadableSlideError, match=r"sparse\.tif.*thumbnail.*64 x 64"):
        slide.thumbnail(64)
    assert slide.thumbnail(256).shape == (16, 16, 3)   # a coarser one fits


def test_a_segmentation_level_over_the_pixel_budget_is_refused_before_allocating(tmp_path, monkeypatch):
    """The tissue mask is made on a whole pyramid level, as hs2p makes it: a level (its size from the
    header) over the budget is refused before its mask is allocated (budget capped low here)."""
    monkeypatch.setattr(masks, "SEG_MAX_PIXELS", 1 << 20)
    slide = open_slide(sparse_tiff(tmp_path / "sparse.tif", 4096))
    config = PreprocessingConfig()
    with pytest.raises(ValueError, match=r"sparse\.tif.*level 0 whole \(4096 x 4096 px\), over the budget"):
        tissue_mask(slide, config.segmentation, config.filtering, spacing_um=0.5, tile_size_px=224)


def test_the_reduced_decode_stays_within_the_budget(small_svs, monkeypatch):
    """libjpeg's 1/8 decode of a whole level is 64x the thumbnail at 64x: it may only be used when
    that fits the budget too (else strips, each bounded)."""
    slide = open_slide(small_svs)
    level = slide.best_level_for_downsample(64)
    h, w = slide.level_shapes[level]
    monkeypatch.setattr(base, "THUMBNAIL_MAX_PIXELS", (h // 8) * (w // 8) - 1)
    calls = []
    real = type(slide._reader).read_reduced
    monkeypatch.setattr(type(slide._reader), "read_reduced", lambda self, *a: calls.append(a) or real(self, *a))
    thumb = slide.thumbnail(64)
    assert calls == [] and thumb.shape == (21, 21, 3)


def test_a_wide_level_is_reduced_in_blocks_to_the_same_thumbnail(small_svs, monkeypatch):
    """A level too wide for full-width strips is read in column blocks: the same pixels."""
    whole = open_slide(small_svs)._reduce_by_blocks(0, 16)
    monkeypatch.setattr(base, "_BLOCK_PIXELS", 48 * 48)   # 1344 px x 16 rows > 48^2: columns of 48 px
    calls = []
    slide = open_slide(small_svs)
    real = slide.read_level
    monkeypatch.setattr(slide, "read_level", lambda *a: calls.append(a) or real(*a))
    np.testing.assert_array_equal(slide._reduce_by_blocks(0, 16), whole)
    assert max(width for *_, width in calls) == 48 and whole.shape == (84, 84, 3)
