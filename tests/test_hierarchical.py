"""Hierarchical extraction: regions of R x R tiles, each read as one block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SYN_TILES, openslide_tiles, reference_embeddings

from slide2vec_dask import PreprocessingConfig

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}


@pytest.fixture(scope="module")
def flat(tiny, syn_svs):
    """Flat mode on the slide-wide grid, the one hierarchical mode lays its regions on."""
    return tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(grid="slide", **EXACT))


def expected_regions(r: int) -> set[tuple[int, int]]:
    return {(row // r, col // r) for row, col in SYN_TILES}


@pytest.mark.parametrize("r", [2, 4, 6])
def test_shapes_and_sub_tiles_equal_flat_mode(tiny, syn_svs, flat, r):
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(region_tile_multiple=r, **EXACT))
    regions = expected_regions(r)
    assert emb.hierarchical_embeddings.shape == (len(regions), r * r, 192)
    assert emb.tile_mask.shape == (len(regions), r * r) and emb.tile_mask.sum() == len(SYN_TILES)
    # Regions in row-major order on the tile grid coarsened by r, from the slide's origin.
    assert list(zip(emb.region_y // (224 * r), emb.region_x // (224 * r))) == sorted(regions)
    # As slide2vec 7.x: tile_embeddings are the regions' (R, T, D), x / y the regions' corners;
    # the kept sub-tiles are exactly the flat mode's tiles.
    assert emb.tile_embeddings is emb.hierarchical_embeddings
    np.testing.assert_array_equal(emb.x, emb.region_x)
    assert len(emb.x) == len(regions)
    torch.testing.assert_close(emb.hierarchical_embeddings[torch.from_numpy(emb.tile_mask)].sort(dim=0).values,
                               flat.tile_embeddings.sort(dim=0).values, atol=1e-5, rtol=0)
    # Documented sub-tile order: t -> (region_x + (t % r) * size, region_y + (t // r) * size).
    where = {(x, y): i for i, (x, y) in enumerate(zip(flat.x.tolist(), flat.y.tolist()))}
    for region in range(len(regions)):
        for t in range(r * r):
            x = int(emb.region_x[region] + (t % r) * 224)
            y = int(emb.region_y[region] + (t // r) * 224)
            assert emb.tile_mask[region, t] == ((x, y) in where)
            if emb.tile_mask[region, t]:
                torch.testing.assert_close(emb.hierarchical_embeddings[region, t],
                                           flat.tile_embeddings[where[(x, y)]], atol=1e-5, rtol=0)


def test_glass_sub_tiles_are_embedded_too(tiny, syn_svs, vit_tiny_checkpoint):
    """A kept region is embedded whole; tile_mask says which sub-tiles are tissue."""
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(region_tile_multiple=6, **EXACT))
    region, t = map(int, np.argwhere(~emb.tile_mask)[0])
    x, y = emb.region_x[region] + (t % 6) * 224, emb.region_y[region] + (t // 6) * 224
    tile = openslide_tiles(syn_svs, [x], [y], 224)
    expected = reference_embeddings(vit_tiny_checkpoint, tile, tiny.spec.mean, tiny.spec.std)
    torch.testing.assert_close(emb.hierarchical_embeddings[region, t], expected[0], atol=1e-4, rtol=0)


def test_regions_past_the_edge_are_padded_white(tiny, syn_svs):
    # 16 x 20 tiles with R = 6: the last region row and column reach past the slide.
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(region_tile_multiple=6, **EXACT))
    last = int(np.argmax(emb.region_y))
    rows_inside = (3584 - int(emb.region_y[last])) // 224
    assert rows_inside < 6
    assert not emb.tile_mask[last].reshape(6, 6)[rows_inside:].any()
    assert torch.isfinite(emb.hierarchical_embeddings).all()


def test_geometry_between_levels_is_tile_first(tiny, syn_svs, vit_tiny_checkpoint):
    """1.0 µm/px on a 0.5/2.0 pyramid: read level 0, 448 px tiles, regions of 2 x 448 px."""
    config = PreprocessingConfig(requested_spacing_um=1.0, region_tile_multiple=2, **EXACT)
    emb = tiny.embed_slide(syn_svs, preprocessing=config)
    assert emb.tile_size_lv0 == 448 and emb.attrs["read_tile_size_px"] == 448
    np.testing.assert_array_equal(emb.region_x % (2 * 448), 0)
    region, t = map(int, np.argwhere(emb.tile_mask)[0])
    x, y = emb.region_x[region] + (t % 2) * 448, emb.region_y[region] + (t // 2) * 448
    tile = openslide_tiles(syn_svs, [x], [y], 448)
    expected = reference_embeddings(vit_tiny_checkpoint, tile, tiny.spec.mean, tiny.spec.std)
    torch.testing.assert_close(emb.hierarchical_embeddings[region, t], expected[0], atol=1e-4, rtol=0)


def test_to_xarray_gives_regions(tiny, syn_svs):
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(region_tile_multiple=4, **EXACT))
    ds = emb.to_xarray()
    assert ds.embedding.dims == ("region", "tile_in_region", "feature")
    assert ds.tile_mask.dims == ("region", "tile_in_region")
    np.testing.assert_array_equal(ds.region_x.values, emb.region_x)
    assert ds.attrs["region_tile_multiple"] == 4


@pytest.mark.parametrize("kwargs,message", [
    ({"region_tile_multiple": 1}, "region_tile_multiple .*must be an integer in \\[2, 64\\]"),
    ({"region_tile_multiple": 0}, "in \\[2, 64\\]"),
    ({"region_tile_multiple": 2.5}, "must be an integer"),
    ({"requested_tile_size_px": 224, "requested_region_size_px": 500}, "multiple"),
    ({"requested_tile_size_px": 224, "requested_region_size_px": 224}, "multiple \\(>= 2\\)"),
    ({"requested_tile_size_px": 224, "region_tile_multiple": 2, "requested_region_size_px": 896}, "disagrees"),
    ({"requested_region_size_px": -1}, "requested_region_size_px must be an integer in"),
])
def test_bad_region_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessingConfig(**kwargs)


def test_region_size_alone_sets_the_multiple(tiny, syn_svs):
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(requested_region_size_px=896, **EXACT))
    assert emb.region_tile_multiple == 4 and emb.hierarchical_embeddings.shape[1] == 16
