"""Peer coordinates and tile archives that are wrong, damaged or hostile (issue 26, round 3).

Each file is written as a peer (TRIDENT / CLAM h5, hs2p npz, hs2p tile archive) would,
then broken the way a careless or hostile one is; a run over it and a good slide must
fail the broken slide with a message naming the file and the problem, and finish the
good one.  Nothing is read at a size the file merely declares.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig

TILE = 224
GOOD_XY = [(448, 448), (672, 448), (448, 672)]


def write_h5(path: Path, coords, **attrs) -> Path:
    """A TRIDENT patch file: ``coords`` as given, with the tile size at level 0."""
    import h5py

    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords))
        for key, value in {"patch_size_level0": TILE, **attrs}.items():
            ds.attrs[key] = value
    return path


def write_hs2p_npz(folder: Path, sid: str, x, y, fractions=None, tile_size_lv0=TILE) -> Path:
    """hs2p's ``<id>.coordinates.npz`` and its ``.meta.json``."""
    arrays = {"x": np.asarray(x), "y": np.asarray(y)}
    if fractions is not None:
        arrays["tissue_fractions"] = np.asarray(fractions)
    np.savez(folder / f"{sid}.coordinates.npz", tile_index=np.arange(len(arrays["x"])), **arrays)
    write_meta(folder, sid, tile_size_lv0=tile_size_lv0)
    return folder / f"{sid}.coordinates.npz"


def write_meta(folder: Path, sid: str, tile_size_lv0=TILE) -> None:
    tiling = {"requested_tile_size_px": TILE, "requested_spacing_um": 0.5, "tile_size_lv0": tile_size_lv0,
              "read_level": 0, "read_spacing_um": 0.5, "read_tile_size_px": TILE}
    slide = {"dimensions": [4480, 3584], "base_spacing_um": 0.5, "level_downsamples": [1.0]}
    (folder / f"{sid}.coordinates.meta.json").write_text(json.dumps({"tiling": tiling, "slide": slide}))


def jpeg(size: int = TILE, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_archive(folder: Path, sid: str, rows, members: dict[str, bytes]) -> Path:
    """hs2p's tile archive: the tar of ``members``, a manifest of ``rows`` (index, x, y), the meta."""
    with tarfile.open(folder / f"{sid}.tiles.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    (folder / f"{sid}.tiles.manifest.csv").write_text(
        "tile_index,x,y\n" + "".join(f"{i},{x},{y}\n" for i, x, y in rows))
    write_meta(folder, sid)
    return folder / f"{sid}.tiles.tar"


def good_archive(folder: Path, sid: str = "good") -> Path:
    rows = [(i, x, y) for i, (x, y) in enumerate(GOOD_XY)]
    return write_archive(folder, sid, rows, {f"{i:06d}.jpg": jpeg(seed=i) for i, _, _ in rows})


def run(tiny, syn_svs, tmp_path, **config) -> dict:
    """A run over the slides ``good`` and ``bad`` (the same image): their outcome rows by id."""
    slides = [{"sample_id": s, "image_path": str(syn_svs)} for s in ("good", "bad")]
    pre = PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=TILE, **config)
    result = Pipeline(tiny, preprocessing=pre, execution=ExecutionOptions(
        output_dir=tmp_path / "out", num_workers=1)).run(slides=slides)
    return {o.sample_id: o for o in result.outcomes}


def assert_bad_refused(rows: dict, *words: str) -> None:
    assert rows["good"].status == "success", rows["good"].error
    bad = rows["bad"]
    assert bad.status == "failed", f"the bad slide was embedded ({bad.num_tiles} tiles)"
    assert bad.error_type == "ValueError", f"{bad.error_type}: {bad.error}"
    for word in words:
        assert word in bad.error, f"{word!r} not in: {bad.error}"


def coordinates_run(tiny, syn_svs, tmp_path, bad_coords, **attrs) -> dict:
    folder = tmp_path / "coords"
    folder.mkdir()
    write_h5(folder / "good.h5", np.array(GOOD_XY, np.int64))
    write_h5(folder / "bad.h5", bad_coords, **attrs)
    return run(tiny, syn_svs, tmp_path, read_coordinates_from=folder)


# -- 1. shape and type ------------------------------------------------------------------------
N = 40
XY = np.stack([np.arange(N) * TILE % 4480, np.arange(N) * TILE // 4480 * TILE], axis=1)


@pytest.mark.parametrize("coords, words", [
    (XY.T.copy(), ["(2, 40)", "(N, 2)"]),                                    # (2, N): transposed
    (np.concatenate([XY, np.ones((N, 1), np.int64)], axis=1), ["(40, 3)"]),   # (N, 3): an extra column
    (XY[:, :1].copy(), ["(40, 1)"]),
    (XY + 0.5, ["not whole numbers", "40 of 40", "(0.5, 0.5)"]),                    # a fraction is never truncated
    (np.array([[b"a", b"b"]] * 3), ["numbers"]),
])
def test_peer_coordinates_of_the_wrong_shape_or_type_are_refused(tiny, syn_svs, tmp_path, coords, words):
    assert_bad_refused(coordinates_run(tiny, syn_svs, tmp_path, coords), "bad.h5", *words)


def test_integral_float_coordinates_are_taken(tiny, syn_svs, tmp_path):
    rows = coordinates_run(tiny, syn_svs, tmp_path, np.array(GOOD_XY, np.float64))
    assert rows["bad"].status == "success" and rows["bad"].num_tiles == 3


# -- 2. outside the slide, not finite -----------------------------------------------------------
@pytest.mark.parametrize("value, words", [
    (-10**6, ["outside the slide", "1 of 3", "(-1000000, 448)"]),
    (10**15, ["outside the slide"]),
    (2**62, ["outside the slide"]),
    (np.nan, ["not finite", "1 of 3"]),
    (np.inf, ["not finite"]),
])
def test_peer_coordinates_outside_the_slide_or_not_finite_are_refused(tiny, syn_svs, tmp_path, value, words):
    coords = np.array(GOOD_XY, dtype=np.float64 if isinstance(value, float) else np.int64)
    coords[0, 0] = value
    assert_bad_refused(coordinates_run(tiny, syn_svs, tmp_path, coords), "bad.h5", *words)


def test_hs2p_npz_positions_outside_the_slide_are_refused(tiny, syn_svs, tmp_path):
    folder = tmp_path / "coords"
    folder.mkdir()
    write_hs2p_npz(folder, "good", *zip(*GOOD_XY))
    write_hs2p_npz(folder, "bad", [448, 4480], [448, 448])   # the second lies wholly right of the slide
    rows = run(tiny, syn_svs, tmp_path, read_coordinates_from=folder)
    assert_bad_refused(rows, "bad.coordinates.npz", "outside the slide", "(4480, 448)")


def test_a_tile_overhanging_the_edge_is_still_taken(tiny, syn_svs, tmp_path):
    rows = coordinates_run(tiny, syn_svs, tmp_path, np.array([(4480 - 1, 3584 - 1), (-TILE + 1, 0)]))
    assert rows["bad"].status == "success" and rows["bad"].num_tiles == 2


# -- 3. duplicated positions ------------------------------------------------------------------
def test_a_manifest_repeating_a_position_is_refused(tiny, syn_svs, tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    good_archive(folder)
    rows = [(i, 0, 0) for i in range(62)]
    write_archive(folder, "bad", rows, {f"{i:06d}.jpg": jpeg(seed=i) for i in range(62)})
    out = run(tiny, syn_svs, tmp_path, read_tiles_from=folder)
    assert_bad_refused(out, "bad.tiles.manifest.csv", "(0, 0)", "62 rows", "1 position")


def test_peer_coordinates_repeating_a_position_are_refused(tiny, syn_svs, tmp_path):
    coords = np.array(GOOD_XY + GOOD_XY[:2])
    assert_bad_refused(coordinates_run(tiny, syn_svs, tmp_path, coords), "bad.h5", "(448, 448)", "(672, 448)")


# -- 4. archive members: declared sizes, dimensions, bombs ---------------------------------------
def sparse_member_archive(folder: Path, declared: int) -> None:
    """An archive whose one member's header declares ``declared`` bytes: a sparse file, not written."""
    write_archive(folder, "bad", [(0, 448, 448)], {"000000.jpg": b""})
    tar = folder / "bad.tiles.tar"
    header = bytearray(tar.read_bytes()[:512])
    header[124:136] = b"%011o\0" % declared
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with open(tar, "wb") as f:
        f.write(header)
        f.truncate(512 + -(-declared // 512) * 512 + 1024)


def test_an_archive_member_declaring_a_huge_size_is_refused_unread(tiny, syn_svs, tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    good_archive(folder)
    sparse_member_archive(folder, 2**28)   # (hostile archives declare 4 GiB: the same check refuses both)
    assert (folder / "bad.tiles.tar").stat().st_blocks * 512 < 2**20, "the test's tar is sparse"
    out = run(tiny, syn_svs, tmp_path, read_tiles_from=folder)
    assert_bad_refused(out, "bad.tiles.tar", "000000.jpg", str(2**28), "at most")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header states ``width`` x ``height``: PIL sees that size before decoding."""
    data = bytearray(jpeg(16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("side, words", [
    (12000, ["12000x12000", "224x224"]),   # decoded whole it would take 432 MB
    (40000, ["decompression bomb"]),       # past Pillow's bomb limit
])
def test_an_archive_tile_of_another_size_is_refused_before_decoding(tiny, syn_svs, tmp_path, side, words):
    folder = tmp_path / "tiles"
    folder.mkdir()
    good_archive(folder)
    write_archive(folder, "bad", [(0, 448, 448), (1, 672, 448)],
                  {"000000.jpg": jpeg(), "000001.jpg": jpeg_declaring(side, side)})
    out = run(tiny, syn_svs, tmp_path, read_tiles_from=folder)
    bad = out["bad"]
    assert out["good"].status == "success" and bad.status == "failed"
    for word in ("bad.tiles.tar", "(672, 448)", *words):
        assert word in bad.error, f"{word!r} not in: {bad.error_type}: {bad.error}"


# -- 5. malformed files name the file and the problem --------------------------------------------
@pytest.mark.parametrize("case, words", [
    ("x and y of different lengths", ["3 x", "2 y"]),
    ("fewer tissue fractions", ["tissue_fractions", "2", "3"]),
    ("x of two dimensions", ["x", "one value per tile"]),
    ("tile size NaN", ["bad.coordinates.meta.json", "tile_size_lv0"]),
])
def test_malformed_hs2p_coordinates_name_the_file_and_the_problem(tiny, syn_svs, tmp_path, case, words):
    folder = tmp_path / "coords"
    folder.mkdir()
    write_hs2p_npz(folder, "good", *zip(*GOOD_XY))
    x, y = [448, 672, 448], [448, 448, 672]
    if case == "x and y of different lengths":
        write_hs2p_npz(folder, "bad", x, y[:2])
    elif case == "fewer tissue fractions":
        write_hs2p_npz(folder, "bad", x, y, fractions=[0.5, 0.5])
    elif case == "x of two dimensions":
        write_hs2p_npz(folder, "bad", [x, x], [y, y])
    else:
        write_hs2p_npz(folder, "bad", x, y, tile_size_lv0=float("nan"))
    rows = run(tiny, syn_svs, tmp_path, read_coordinates_from=folder)
    assert_bad_refused(rows, "bad.coordinates", *words)


def test_an_h5_with_a_nan_tile_size_names_the_file(tiny, syn_svs, tmp_path):
    rows = coordinates_run(tiny, syn_svs, tmp_path, np.array(GOOD_XY), patch_size_level0=float("nan"))
    assert_bad_refused(rows, "bad.h5", "patch_size_level0")


def test_a_block_crowded_with_tiles_is_refused(tiny, syn_svs, tmp_path):
    # 100 distinct tiles whose corners all lie in one 224 px lattice cell (one tile per block asked)
    crowd = np.array([(448 + 20 * i, 448 + 20 * j) for i in range(10) for j in range(10)])
    folder = tmp_path / "coords"
    folder.mkdir()
    write_h5(folder / "good.h5", np.array(GOOD_XY, np.int64))
    write_h5(folder / "bad.h5", crowd)
    rows = run(tiny, syn_svs, tmp_path, read_coordinates_from=folder, use_supertiles=False)
    assert_bad_refused(rows, "bad.h5", "100 tiles", "one block")


# -- 6. temporaries of plans ------------------------------------------------------------------
def test_a_plan_save_failing_on_a_full_disk_leaves_no_temporary(tiny, syn_svs, tmp_path, monkeypatch):
    real = np.savez_compressed

    def full_disk(file, *args, **kwargs):
        real(file, *args, **kwargs)           # the bytes reach the temporary, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    rows = run(tiny, syn_svs, tmp_path)
    assert rows["good"].status == "failed" and "space" in rows["good"].error
    monkeypatch.undo()
    coordinates = tmp_path / "out" / "coordinates"
    left = sorted(p.name for p in coordinates.iterdir() if p.name.startswith("."))
    assert left == [], f"temporaries left by the failed saves: {left}"


def test_a_rerun_sweeps_plan_temporaries_a_dead_process_left(tiny, syn_svs, tmp_path):
    coordinates = tmp_path / "out" / "coordinates"
    coordinates.mkdir(parents=True)
    dead = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10**6   # no such process
    stray = coordinates / f".good.npz.{socket.gethostname()}-{dead}-0badcafe.tmp"
    stray.write_bytes(b"half a plan")
    rows = run(tiny, syn_svs, tmp_path)
    assert rows["good"].status == "success"
    assert not stray.exists(), "the rerun left a dead writer's temporary in coordinates/"
