"""Plans of free tile positions (`TileList`) and tile archives, on our side of the interface.

The peer files themselves (made by hs2p, CLAM / TRIDENT layouts) are in test_peers.py.
"""

from __future__ import annotations

import csv
import io
import tarfile

import numpy as np
import pytest

from conftest import openslide_tiles, reference_embeddings
from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.tiling.tile_list import TileList, load_plan


def _plan(xy, level=0, ds=1.0, read_tile=224, **kw) -> TileList:
    return TileList(level=level, level_downsample=ds, slide_spacing_um=0.5, read_spacing_um=0.5 * ds,
                    requested_spacing_um=0.5, requested_tile_size_px=224, read_tile_size_px=read_tile,
                    tile_size_lv0=round(read_tile * ds), xy=xy, fraction=np.linspace(0, 1, len(xy)), **kw)


def test_blocks_hold_every_tile_once_and_bands_are_contiguous_runs_of_the_row_major_order():
    rng = np.random.default_rng(3)
    xy = np.unique(rng.integers(0, 9000, size=(500, 2)), axis=0)   # (a repeated position is refused where read)
    plan = _plan(xy[rng.permutation(len(xy))])
    assert plan.num_tiles == len(xy)
    order = np.lexsort((plan.x, plan.y))
    assert np.array_equal(order, np.arange(plan.num_tiles)), "tiles are row-major (y, then x)"
    blocks, members = plan.blocks(k=3)
    everything = np.concatenate(members)
    assert np.array_equal(np.sort(everything), np.arange(plan.num_tiles))
    assert blocks == sorted(blocks)
    for band in sorted({b[0] for b in blocks}):
        index = np.sort(np.concatenate([m for b, m in zip(blocks, members) if b[0] == band]))
        assert np.array_equal(index, np.arange(index[0], index[-1] + 1)), f"band {band} is not contiguous"
    for block, index in zip(blocks, members):
        (y, x, h, w), cuts = plan.window(index)
        origin = plan.read_origin()[index]
        assert (origin // (3 * 224) == block).all()
        assert (cuts >= 0).all() and (cuts[:, 0] + 224 <= h).all() and (cuts[:, 1] + 224 <= w).all()
        assert np.array_equal(cuts + (y, x), origin)


def test_a_saved_tile_list_loads_as_itself(tmp_path):
    plan = _plan(np.array([[500, 17], [3, 3], [224, 3]]), archive="a.tar",
                 member_offset=np.array([5, 6, 7]), member_size=np.array([1, 2, 3]))
    back = load_plan(plan.save(tmp_path / "p.npz"))
    assert isinstance(back, TileList) and back.matches(plan)
    assert np.array_equal(back.member_offset, [6, 7, 5]), "members follow their tiles into row-major order"
    assert np.array_equal(back.fraction, plan.fraction)


def _white_composite(path, xs, ys, size):
    """OpenSlide's tiles with what lies past the slide's edge (transparent there) made white."""
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        out = []
        for x, y in zip(xs, ys):
            rgba = np.asarray(osr.read_region((int(x), int(y)), 0, (size, size))).astype(np.float64)
            alpha = rgba[..., 3:] / 255
            out.append(np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8))
        return np.stack(out)


def test_overlapping_grids_and_edge_tiles_are_read_at_their_own_positions(tiny, syn_svs, vit_tiny_checkpoint,
                                                                           tmp_path):
    # Two grids that overlap and share no lattice (as hs2p lays one per tissue region), and
    # tiles reaching past the right and bottom edges of the 4480 x 3584 slide.
    a = [(451 + 224 * i, 450 + 224 * j) for i in range(4) for j in range(3)]
    b = [(563 + 224 * i, 601 + 224 * j) for i in range(3) for j in range(3)]
    edge = [(4480 - 100, 700), (2300, 3584 - 50)]
    plan = _plan(np.array(a + b + edge))
    path = plan.save(tmp_path / "synthetic.npz")
    got = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(read_coordinates_from=path))
    assert sorted(zip(got.x.tolist(), got.y.tolist())) == sorted(a + b + edge)
    tiles = _white_composite(syn_svs, got.x, got.y, 224)
    assert (tiles[np.argmax(got.x)][:, -1] == 255).all(), "past the right edge the tile is white"
    expected = reference_embeddings(vit_tiny_checkpoint, tiles, tiny.spec.mean, tiny.spec.std).numpy()
    assert np.abs(got.tile_embeddings.numpy() - expected).max() <= 1e-5


def _archive(folder, sid):
    rows = list(csv.DictReader(open(folder / f"{sid}.tiles.manifest.csv")))
    with tarfile.open(folder / f"{sid}.tiles.tar") as tf:
        names = tf.getnames()
        from PIL import Image

        tiles = {(int(r["x"]), int(r["y"])): np.asarray(Image.open(io.BytesIO(
            tf.extractfile(f"{int(r['tile_index']):06d}.jpg").read())).convert("RGB")) for r in rows}
    return names, tiles


def test_on_the_fly_false_on_a_grid_plan_writes_the_archive_a_later_run_embeds_the_same(tiny, syn_svs, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    slides = [{"sample_id": "syn", "image_path": str(syn_svs)}]
    Pipeline(tiny, preprocessing=PreprocessingConfig(on_the_fly=False),
             execution=ExecutionOptions(output_dir=first, num_workers=1)).run(slides=slides)
    stored = EmbeddingStore(first).open_tiles("syn")
    x, y, emb = stored["x"][:], stored["y"][:], stored["embedding"][:]
    names, tiles = _archive(first / "tiles", "syn")
    assert len(names) == len(x) == len(tiles) > 0
    from slide2vec_dask.tiling.peers import coordinates_file

    # Pointed at the run's folder, read_coordinates_from takes our own plan (a grid) over its hs2p copy.
    assert coordinates_file(first, "syn") == first / "coordinates" / "syn.npz"
    assert set(tiles) == set(zip(x.tolist(), y.tolist()))
    from PIL import Image

    for tile, a, b in zip(openslide_tiles(syn_svs, x, y, 224), x.tolist(), y.tolist()):
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, format="JPEG", quality=90)   # what hs2p does with each tile
        assert np.array_equal(tiles[(a, b)], np.asarray(Image.open(buf).convert("RGB"))), (a, b)

    # The slide is not read again: it is moved away before the second run.
    moved = syn_svs.with_name("moved-away.svs")
    syn_svs.rename(moved)
    try:
        Pipeline(tiny, preprocessing=PreprocessingConfig(read_tiles_from=first / "tiles"),
                 execution=ExecutionOptions(output_dir=again, num_workers=1)).run(slides=slides)
    finally:
        moved.rename(syn_svs)
    second = EmbeddingStore(again).open_tiles("syn")
    assert np.array_equal(second["x"][:], x) and np.array_equal(second["y"][:], y)
    assert np.abs(second["embedding"][:] - emb).max() <= 1e-5


def test_a_rerun_asking_for_archives_writes_the_missing_one_then_skips(tiny, syn_svs, tmp_path):
    slides = [{"sample_id": "syn", "image_path": str(syn_svs)}]
    ex = ExecutionOptions(output_dir=tmp_path, num_workers=1)
    Pipeline(tiny, execution=ex).run(slides=slides)
    assert not (tmp_path / "tiles").exists()
    result = Pipeline(tiny, preprocessing=PreprocessingConfig(on_the_fly=False), execution=ex).run(slides=slides)
    assert result.outcomes[0].status == "success"
    assert (tmp_path / "tiles" / "syn.tiles.tar").is_file()
    result = Pipeline(tiny, preprocessing=PreprocessingConfig(on_the_fly=False), execution=ex).run(slides=slides)
    assert result.outcomes[0].status == "skipped"


def test_embed_slide_writes_the_same_archive_and_embeddings_as_pipeline_run(tiny, syn_svs, tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(on_the_fly=False))
    config = PreprocessingConfig(on_the_fly=False)
    Pipeline(tiny, preprocessing=config, execution=ExecutionOptions(output_dir=tmp_path / "run", num_workers=1)).run(
        slides=[{"sample_id": "syn", "image_path": str(syn_svs)}])
    got = tiny.embed_slide({"sample_id": "syn", "image_path": str(syn_svs)}, preprocessing=config,
                           execution=ExecutionOptions(output_dir=tmp_path / "mem"))
    run_names, run_tiles = _archive(tmp_path / "run" / "tiles", "syn")
    mem_names, mem_tiles = _archive(tmp_path / "mem" / "tiles", "syn")
    assert mem_names == run_names and mem_tiles.keys() == run_tiles.keys()
    assert all(np.array_equal(mem_tiles[k], run_tiles[k]) for k in run_tiles)
    stored = EmbeddingStore(tmp_path / "run").open_tiles("syn")
    assert np.array_equal(got.x, stored["x"][:]) and np.array_equal(got.y, stored["y"][:])
    assert np.abs(got.tile_embeddings.numpy() - stored["embedding"][:]).max() <= 1e-5


@pytest.mark.parametrize("kwargs, match", [
    ({"read_coordinates_from": "a", "read_tiles_from": "b"}, "not both"),
    ({"on_the_fly": "no"}, "on_the_fly"),
    ({"on_the_fly": False, "region_tile_multiple": 4}, "hierarchical"),
    ({"read_tiles_from": 3}, "read_tiles_from"),
])
def test_archive_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessingConfig(**kwargs)


def test_archives_that_are_missing_or_damaged_fail_their_own_slide_only(tiny, syn_svs, tmp_path):
    made = tmp_path / "made"
    slides = [{"sample_id": s, "image_path": str(syn_svs)} for s in ("good", "damaged")]
    Pipeline(tiny, preprocessing=PreprocessingConfig(on_the_fly=False),
             execution=ExecutionOptions(output_dir=made, num_workers=1)).run(slides=slides)
    archives = made / "tiles"
    tar = archives / "damaged.tiles.tar"
    data = bytearray(tar.read_bytes())
    first = 512                                   # the first member's data follows its 512-byte header
    data[first : first + 64] = b"\0" * 64         # its JPEG header overwritten
    tar.write_bytes(bytes(data))
    result = Pipeline(tiny, preprocessing=PreprocessingConfig(read_tiles_from=archives),
                      execution=ExecutionOptions(output_dir=tmp_path / "again", num_workers=1)).run(
        slides=slides + [{"sample_id": "absent", "image_path": str(syn_svs)}])
    rows = {o.sample_id: o for o in result.outcomes}
    assert rows["good"].status == "success"
    assert rows["damaged"].status == "failed" and "damaged.tiles.tar" in rows["damaged"].error
    assert "not a readable JPEG" in rows["damaged"].error
    assert rows["absent"].status == "failed" and rows["absent"].error_type == "FileNotFoundError"
    assert "absent" in rows["absent"].error and "read_tiles_from" in rows["absent"].error


@pytest.mark.slow
def test_embed_slide_on_a_cluster_writes_the_archive_there_too(tiny, syn_svs, tmp_path):
    """The archive's reads and JPEG encoding run as cluster tasks; the result is the local one's."""
    from distributed import LocalCluster

    config = PreprocessingConfig(on_the_fly=False)
    local = tiny.embed_slide(syn_svs, preprocessing=config, execution=ExecutionOptions(output_dir=tmp_path / "local"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = tiny.embed_slide(syn_svs, preprocessing=config, execution=ExecutionOptions(
            output_dir=tmp_path / "cluster", scheduler_address=cluster.scheduler_address))
    a, b = (_archive(tmp_path / d / "tiles", "synthetic")[1] for d in ("local", "cluster"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.abs(local.tile_embeddings.numpy() - remote.tile_embeddings.numpy()).max() <= 1e-5
