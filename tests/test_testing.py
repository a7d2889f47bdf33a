"""Tests for slide2vec_dask.testing, checked against independent readers.

The synthetic slides stand in for real ones in every other test, so here
they are read back with OpenSlide, tifffile and PIL rather than trusted.
"""

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from slide2vec_dask.testing import (
    real_tissue_source,
    tissue_image,
    tissue_mask,
    write_label_mask,
    write_svs,
    write_tiff,
)

CMU_SMALL = Path(__file__).resolve().parents[2] / "shared/data/CMU-1-Small-Region.svs"

# Sizes that no tile or downsample divides, so edges and floors are exercised.
H, W = 1000, 1300
RECTS = [(100, 100, 600, 700), (650, 800, 990, 1290), (0, 0, 5, 5), (995, 1295, 1000, 1300)]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return tissue_image(H, W, RECTS)


def block_mean(image: np.ndarray, d: int) -> np.ndarray:
    h, w = image.shape[0] // d, image.shape[1] // d
    return image[: h * d, : w * d].reshape(h, d, w, d, -1).mean(axis=(1, 3))


def saturation(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("HSV"))[..., 1]


def test_write_svs_is_read_as_aperio_by_openslide_and_tifffile(tmp_path, image):
    path = write_svs(tmp_path / "slide.svs", image, mpp=0.25, downsamples=(1, 4, 16), quality=95)

    slide = openslide.OpenSlide(path)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == 0.25
    assert slide.properties["openslide.objective-power"] == "20"
    sizes = [(W // d, H // d) for d in (1, 4, 16)]
    assert slide.level_dimensions == tuple(sizes)
    # OpenSlide derives downsamples from the floored sizes.
    assert slide.level_downsamples == pytest.approx([(W / w + H / h) / 2 for w, h in sizes])

    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].is_svs
        levels = tif.series[0].levels
        assert [level.shape[-3:] for level in levels] == [(h, w, 3) for w, h in sizes]
        level0 = tif.pages[0].asarray()
        level1 = levels[1].asarray().reshape(H // 4, W // 4, 3)

    for x, y, w, h in [(0, 0, W, H), (17, 33, 250, 190), (1100, 900, 200, 100)]:
        region = np.asarray(slide.read_region((x, y), 0, (w, h)))[..., :3]
        assert np.array_equal(region, level0[y : y + h, x : x + w])
    assert np.abs(level0.astype(int) - image).mean() < 3

    assert np.array_equal(np.asarray(slide.read_region((0, 0), 1, sizes[1]))[..., :3], level1)
    assert np.abs(level1 - block_mean(image, 4)).mean() < 3


def test_write_svs_from_callable_matches_array(tmp_path):
    image = tissue_image(3000, 2500, [(200, 300, 2900, 2000)], seed=1)
    calls = []

    def source(y, x, h, w):
        calls.append((y, x, h, w))
        return image[y : y + h, x : x + w].copy()

    from_array = write_svs(tmp_path / "array.svs", image)
    from_source = write_svs(tmp_path / "source.svs", source, shape=image.shape[:2])

    assert max(h for _, _, h, _ in calls) <= 240  # streamed, never whole
    with tifffile.TiffFile(from_array) as a, tifffile.TiffFile(from_source) as b:
        assert len(a.pages) == len(b.pages) == 4  # level 0, thumbnail, 2 levels
        for page_a, page_b in zip(a.pages, b.pages):
            assert np.array_equal(page_a.asarray(), page_b.asarray())


def test_write_svs_rejects_downsamples_it_cannot_chain(tmp_path, image):
    with pytest.raises(ValueError, match="downsamples"):
        write_svs(tmp_path / "slide.svs", image, downsamples=(1, 3, 4))


def test_write_tiff_with_spacing(tmp_path, image):
    path = write_tiff(tmp_path / "slide.tif", image, spacing_um=0.25)

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e4 * den / num == pytest.approx(0.25)
        assert [level.shape for level in tif.series[0].levels] == [
            (H // d, W // d, 3) for d in (1, 2, 4)
        ]
        level0 = page.asarray()
    assert np.abs(level0.astype(int) - image).mean() < 5

    slide = openslide.OpenSlide(path)  # as documented: SubIFD levels unseen
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == 1
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_write_tiff_without_spacing_has_no_resolution_unit(tmp_path, image):
    path = write_tiff(tmp_path / "slide.tif", image)

    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE
    assert "openslide.mpp-x" not in openslide.OpenSlide(path).properties


def test_write_tiff_ome_has_physical_size(tmp_path, image):
    path = write_tiff(tmp_path / "slide.ome.tif", image, spacing_um=0.5, ome=True)

    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        assert len(tif.series[0].levels) == 3


def test_write_label_mask_round_trips(tmp_path):
    mask = tissue_mask(300, 400, [(10, 20, 150, 390)])

    with tifffile.TiffFile(write_label_mask(tmp_path / "mask.tif", mask, tile_size=128)) as tif:
        page = tif.pages[0]
        assert page.is_tiled
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert np.array_equal(page.asarray(), mask.astype(np.uint8))


def test_tissue_image_saturation_separates_exactly_the_rects(image):
    mask = tissue_mask(H, W, RECTS)
    s = saturation(image)

    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert s[mask].min() > 30
    assert s[~mask].max() < 5
    assert np.array_equal(s > 20, mask)
    assert np.array_equal(tissue_image(H, W, RECTS), image)  # deterministic


@pytest.fixture(scope="module")
def real_source():
    if not CMU_SMALL.exists():
        pytest.skip(f"{CMU_SMALL} not available")
    return real_tissue_source(CMU_SMALL, shape=(4000, 4000), tissue_fraction=0.6, seed=3)


def test_real_tissue_source_is_consistent_across_calls(real_source):
    whole = real_source(0, 0, 4000, 4000)
    region = real_source(123, 3001, 777, 999)

    assert whole.dtype == np.uint8 and whole.shape == (4000, 4000, 3)
    assert np.array_equal(region, whole[123:900, 3001:4000])
    again = real_tissue_source(CMU_SMALL, shape=(4000, 4000), tissue_fraction=0.6, seed=3)
    assert np.array_equal(again(0, 0, 4000, 4000), whole)
    with pytest.raises(ValueError, match="outside"):
        real_source(3900, 0, 200, 10)


def test_real_tissue_source_has_tissue_and_glass_where_it_says(real_source):
    cells = real_source.tissue_cells
    assert cells.shape == (8, 8)
    assert real_source.tissue_fraction == cells.mean() == pytest.approx(0.6, abs=1 / 64)

    s = saturation(real_source(0, 0, 4000, 4000))
    for (cy, cx), is_tissue in np.ndenumerate(cells):
        cell = s[cy * 512 : (cy + 1) * 512, cx * 512 : (cx + 1) * 512]
        if is_tissue:
            assert (cell > 40).mean() > 0.5
        else:
            assert cell.max() < 5


def test_real_tissue_source_feeds_write_svs(tmp_path, real_source):
    path = write_svs(tmp_path / "real.svs", real_source, shape=(4000, 4000))

    slide = openslide.OpenSlide(path)
    assert slide.level_dimensions == ((4000, 4000), (1000, 1000), (250, 250))
    region = np.asarray(slide.read_region((1500, 2100), 0, (300, 200)))[..., :3]
    assert np.abs(region.astype(int) - real_source(2100, 1500, 200, 300)).mean() < 3
