"""Slides: metadata, pixels identical to OpenSlide, the lazy dask view, and bad input."""

from __future__ import annotations

import pickle

import numpy as np
import openslide
import pytest

from slide2vec_dask import MissingSpacingError, UnreadableSlideError, open_slide
from slide2vec_dask import testing

BACKENDS = ["tifffile", "openslide"]
REGIONS = [(0, 0, 300, 200), (517, 233, 224, 224), (1000, 1700, 480, 513)]  # y, x, h, w (level 0), inside


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_synthetic(syn_svs, backend):
    slide = open_slide(syn_svs, backend=backend)
    assert slide.backend == backend
    assert slide.vendor == "aperio"
    assert slide.spacing == pytest.approx(0.5)
    assert slide.level_shapes == [(3584, 4480), (896, 1120), (224, 280)]
    assert slide.level_downsamples == pytest.approx([1, 4, 16])
    assert slide.level_spacings == pytest.approx([0.5, 2.0, 8.0])
    assert slide.dimensions == (4480, 3584)


def test_auto_picks_tifffile_for_svs_and_tiff(syn_svs, cmu_svs):
    assert open_slide(syn_svs).backend == "tifffile"
    assert open_slide(cmu_svs).backend == "tifffile"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_pixels_match_openslide_read_region(syn_svs, backend, level):
    slide = open_slide(syn_svs, backend=backend)
    ds = int(slide.level_downsamples[level])
    lh, lw = slide.level_shapes[level]
    with openslide.OpenSlide(str(syn_svs)) as osr:
        for y, x, h, w in REGIONS:
            y, x = min(y, lh - 50), min(x, lw - 50)
            h, w = min(h, lh - y), min(w, lw - x)
            expected = np.asarray(osr.read_region((x * ds, y * ds), level, (w, h)))[..., :3]
            np.testing.assert_array_equal(slide.read_level(level, y, x, h, w), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_slide_pixels_and_spacing(cmu_svs, backend):
    slide = open_slide(cmu_svs, backend=backend)
    assert slide.spacing == pytest.approx(0.499)
    assert slide.level_shapes[0] == (2967, 2220)
    with openslide.OpenSlide(str(cmu_svs)) as osr:
        for y, x, h, w in REGIONS:
            expected = np.asarray(osr.read_region((x, y), 0, (w, h)))[..., :3]
            np.testing.assert_array_equal(slide.read_level(0, y, x, h, w), expected)


def test_to_dask_is_lazy_and_block_sized(syn_svs):
    slide = open_slide(syn_svs)
    arr = slide.to_dask(0, chunks=1792)
    assert arr.shape == (3584, 4480, 3) and arr.dtype == np.uint8
    assert arr.chunks[:2] == ((1792, 1792), (1792, 1792, 896))
    # One read task per block plus the slide itself: no per-native-tile tasks, no rechunk layer.
    assert len(dict(arr.__dask_graph__())) == 2 * 3 + 1
    with openslide.OpenSlide(str(syn_svs)) as osr:
        expected = np.asarray(osr.read_region((1700, 1750), 0, (300, 200)))[..., :3]
    np.testing.assert_array_equal(arr[1750:1950, 1700:2000].compute(), expected)


def test_reading_outside_the_level_gives_white(syn_svs):
    slide = open_slide(syn_svs)
    edge = slide.read_level(2, 200, 260, 40, 40)
    assert (edge[24:, :] == 255).all() and (edge[:, 20:] == 255).all()


def test_slide_pickles_without_file_handles(syn_svs):
    slide = open_slide(syn_svs, spacing_at_level_0=0.25)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.spacing == 0.25 and clone.backend == slide.backend
    np.testing.assert_array_equal(clone.read_level(1, 10, 10, 64, 64), slide.read_level(1, 10, 10, 64, 64))


def test_thumbnail_matches_area_average(syn_svs, syn_image):
    slide = open_slide(syn_svs)
    thumb = slide.thumbnail(64)
    assert thumb.shape == (56, 70, 3)
    expected = syn_image.reshape(56, 64, 70, 64, 3).mean(axis=(1, 3))
    assert np.abs(thumb.astype(float) - expected).mean() < 4  # JPEG + pyramid averaging


# -- spacing -------------------------------------------------------------------------------
def test_spacing_override(syn_svs):
    assert open_slide(syn_svs, spacing_at_level_0=0.25).spacing == 0.25


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_spacing_is_a_clear_error(syn_tiff_nospacing, backend):
    with pytest.raises(MissingSpacingError, match="spacing_at_level_0") as info:
        open_slide(syn_tiff_nospacing, backend=backend)
    assert "nospacing.tif" in str(info.value)
    assert open_slide(syn_tiff_nospacing, backend=backend, spacing_at_level_0=0.5).spacing == 0.5


def test_tiff_resolution_and_ome_spacing(tmp_path, syn_image):
    plain = testing.write_tiff(tmp_path / "res.tif", syn_image[:1024, :1024], spacing_um=0.25)
    ome = testing.write_tiff(tmp_path / "x.ome.tif", syn_image[:1024, :1024], spacing_um=0.75, ome=True)
    s = open_slide(plain)
    assert (s.backend, s.vendor) == ("tifffile", "generic-tiff")
    assert s.spacing == pytest.approx(0.25, rel=1e-4)
    assert s.level_count == 3
    o = open_slide(ome)
    assert (o.vendor, o.spacing) == ("ome-tiff", pytest.approx(0.75))
    assert open_slide(plain, backend="openslide").spacing == pytest.approx(0.25, rel=1e-4)


# -- bad input --------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="slide not found"):
        open_slide(tmp_path / "nope.svs")


@pytest.mark.parametrize("backend", ["auto", "tifffile", "openslide"])
def test_corrupt_and_non_slide_files(tmp_path, backend):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"\x00garbage" * 1000)
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    for path in (junk, text):
        with pytest.raises(UnreadableSlideError) as info:
            open_slide(path, backend=backend)
        assert path.name in str(info.value)
        assert not isinstance(info.value, FileNotFoundError)


def test_truncated_slide(tmp_path, syn_svs):
    cut = tmp_path / "cut.svs"
    cut.write_bytes(syn_svs.read_bytes()[:4000])
    with pytest.raises(UnreadableSlideError, match="cut.svs"):
        open_slide(cut)


@pytest.mark.parametrize("backend,package,extra", [("cucim", "cucim", "slide2vec-dask[cucim]"),
                                                   ("vips", "pyvips", "slide2vec-dask[vips]"),
                                                   ("asap", "multiresolutionimageinterface", "ASAP")])
def test_a_backend_whose_library_is_missing_says_what_to_install(syn_svs, monkeypatch, backend, package, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ImportError, match=package) as info:
        open_slide(syn_svs, backend=backend)
    assert extra in str(info.value)


def test_asap_is_refused_even_when_installed(syn_svs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "multiresolutionimageinterface" else real(name, *a))
    with pytest.raises(NotImplementedError, match="asap.*openslide"):
        open_slide(syn_svs, backend="asap")


def test_unknown_backend(syn_svs):
    with pytest.raises(ValueError, match="unknown backend"):
        open_slide(syn_svs, backend="bioformats")
