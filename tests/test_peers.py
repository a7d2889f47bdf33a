"""Tiles chosen by the peers — hs2p, TRIDENT, CLAM — embedded at exactly those tiles.

hs2p itself writes the artifacts: it runs in its own environment
(``tests/peers/setup-hs2p.sh``, which CI runs) through ``tests/peers/make_hs2p.py``,
and reads back what ``on_the_fly=False`` writes.  Without that environment these
tests skip, naming the script.  Every check compares with computations that do not
go through slide2vec_dask: OpenSlide's own reads of the slide (transparent pixels
beyond the slide's edge composited over white, as glass) or the PIL-decoded members
of hs2p's own tar, through the bare timm model (``conftest.reference_embeddings``).

What hs2p 6.1.0 writes for the CMU slide at 0.5 µm/px, 224 px (77 tiles), which the
tests lean on:

* each tissue region has its own grid (x mod 224 takes several values), so tiles of
  neighbouring regions overlap: no single grid holds them;
* tiles run past the slide's right and bottom edges (hs2p fills that part white);
* the npz is sorted x then y (``tile_order: x_then_y``), and the tar's members (and
  the manifest's rows) follow hs2p's read order, not tile_index.

Output rows are row-major (y then x), so rows are matched by (x, y).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, reference_embeddings

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig
from slide2vec_dask.store import EmbeddingStore

MAKE_HS2P = REPO / "tests" / "peers" / "make_hs2p.py"
SETUP = "tests/peers/setup-hs2p.sh"
SAMPLE = "cmu"      # lower case: the slide's file name is upper case, so a message holding it names the sample
ATOL = 1e-5


# -- hs2p, in its own environment --------------------------------------------------------------
def hs2p_python_path() -> Path:
    if os.environ.get("HS2P_PYTHON"):
        return Path(os.environ["HS2P_PYTHON"])
    return Path(os.environ.get("HS2P_ENV", "/tmp/slide2vec-hs2p")) / "bin" / "python"


def _clean_env() -> dict:
    """Our environment without what would point hs2p's interpreter at the project's packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run_hs2p(python: Path, *args, timeout: int = 300) -> dict:
    result = subprocess.run([str(python), str(MAKE_HS2P), *map(str, args)], capture_output=True, text=True,
                            env=_clean_env(), timeout=timeout)
    assert result.returncode == 0, f"make_hs2p.py {' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def hs2p_python() -> Path:
    python = hs2p_python_path()
    if not python.is_file():
        pytest.skip(f"hs2p not installed ({python} missing): run {SETUP}, or set HS2P_PYTHON")
    check = subprocess.run([str(python), "-c", "import hs2p"], capture_output=True, text=True, env=_clean_env(),
                           timeout=120)
    if check.returncode:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"{python} does not import hs2p ({last}): run {SETUP}")
    return python


pytestmark = pytest.mark.usefixtures("hs2p_python")   # every test here needs hs2p: skip before building anything


@dataclass
class Hs2pRun:
    """One hs2p run's artifacts (``root/tiles/<sample_id>.*``) and what they hold."""

    info: dict
    root: Path

    @property
    def sample_id(self) -> str:
        return self.info["sample_id"]

    @property
    def tiles_dir(self) -> Path:
        return Path(self.info["tiles_dir"])

    @cached_property
    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        data = np.load(self.info["npz"])
        return data["x"], data["y"]

    @property
    def keys(self) -> set[tuple[int, int]]:
        return set(zip(self.xy[0].tolist(), self.xy[1].tolist()))

    @cached_property
    def tiles(self) -> dict[tuple[int, int], np.ndarray]:
        """hs2p's tar members, PIL-decoded, keyed by the manifest's (x, y)."""
        return tar_tiles(Path(self.info["tar"]), Path(self.info["manifest"]))


def read_manifest_csv(path: Path) -> list[tuple[int, int, int]]:
    with open(path, newline="") as f:
        return [(int(r["tile_index"]), int(r["x"]), int(r["y"])) for r in csv.DictReader(f)]


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def tar_tiles(tar_path: Path, manifest_path: Path) -> dict[tuple[int, int], np.ndarray]:
    rows = read_manifest_csv(manifest_path)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        assert sorted(names) == sorted(f"{i:06d}.jpg" for i, _, _ in rows), f"{tar_path}: members != manifest"
        tiles = {(x, y): decode(tar.extractfile(f"{i:06d}.jpg").read()) for i, x, y in rows}
    assert len(tiles) == len(rows), f"{manifest_path}: repeated (x, y)"
    return tiles


def openslide_white(path: Path, xs, ys, size_lv0: int, level: int = 0, read_size: int | None = None) -> np.ndarray:
    """OpenSlide's own reads at level-0 (x, y), its premultiplied RGBA composited over white: what
    lies beyond the slide's edge (transparent) is glass, as hs2p fills it."""
    import openslide

    size = read_size or size_lv0
    out = []
    with openslide.OpenSlide(str(path)) as osr:
        for x, y in zip(xs, ys):
            rgba = np.asarray(osr.read_region((int(x), int(y)), level, (size, size))).astype(np.uint16)
            rgb, alpha = rgba[..., :3], rgba[..., 3:]
            out.append(((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
    return np.stack(out)


def reference_by_xy(checkpoint, keys, tiles: np.ndarray, model) -> dict[tuple[int, int], torch.Tensor]:
    expected = reference_embeddings(checkpoint, tiles, model.spec.mean, model.spec.std)
    return dict(zip(keys, expected))


def assert_rows_match(x, y, embeddings, expected: dict, what: str = "") -> None:
    """Rows matched by (x, y): the same set of tiles, each within ATOL of its reference."""
    x, y = np.asarray(x).astype(int).tolist(), np.asarray(y).astype(int).tolist()
    keys = list(zip(x, y))
    assert len(set(keys)) == len(keys), f"{what}: repeated (x, y) rows"
    assert set(keys) == set(expected), (f"{what}: tiles differ: {len(set(keys) - set(expected))} extra, "
                                        f"{len(set(expected) - set(keys))} missing")
    got = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    want = torch.stack([expected[k] for k in keys])
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what}: max |diff| {diff:.3g} > {ATOL}"


# -- the slide ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cmu_svs(tmp_path_factory) -> Path:
    """The real H&E slide when present; else an Aperio-layout stand-in of its size and spacing, whose
    tissue lies in three regions at unaligned offsets, two touching the right / bottom edge: what makes
    hs2p lay several grids and run tiles past the edges, the facts these tests are about."""
    from conftest import CMU_SVS

    if CMU_SVS.exists():
        return CMU_SVS
    from slide2vec_dask import testing

    rects = [(57, 13, 1100, 900), (1210, 700, 2967, 1500), (300, 1650, 1400, 2220)]
    image = testing.tissue_image(2967, 2220, rects, seed=7)
    return testing.write_svs(tmp_path_factory.mktemp("standin") / "CMU-standin.svs", image, mpp=0.499,
                             downsamples=(1,), quality=90)


# -- the artifacts (fresh each session) -------------------------------------------------------------
@pytest.fixture(scope="session")
def hs2p_cmu(hs2p_python, cmu_svs, tmp_path_factory) -> Hs2pRun:
    """hs2p on the CMU slide, 0.5 µm/px, 224 px, with its tile tar."""
    root = tmp_path_factory.mktemp("hs2p_out")
    run = Hs2pRun(run_hs2p(hs2p_python, "make", cmu_svs, SAMPLE, root, "--save-tiles", "--spacing", 0.5,
                           "--tile-size", 224, "--backend", "openslide"), root)
    assert run.info["num_tiles"] > 30 and run.info["read_level"] == 0 and run.info["tile_size_lv0"] == 224
    return run


@pytest.fixture(scope="session")
def cmu_reference(hs2p_cmu, cmu_svs, vit_tiny_checkpoint, tiny):
    """The bare model on OpenSlide's tiles at hs2p's coordinates, by (x, y)."""
    x, y = hs2p_cmu.xy
    tiles = openslide_white(cmu_svs, x, y, 224)
    return reference_by_xy(vit_tiny_checkpoint, list(zip(x.tolist(), y.tolist())), tiles, tiny)


@pytest.fixture(scope="session")
def hs2p_gone(hs2p_python, cmu_svs, tmp_path_factory) -> tuple[Hs2pRun, Path]:
    """hs2p (with tiles) on a copy of the slide, which is then deleted: the tiles are all that is left."""
    folder = tmp_path_factory.mktemp("slide_then_gone")
    slide = folder / "gone.svs"
    shutil.copyfile(cmu_svs, slide)
    run = Hs2pRun(run_hs2p(hs2p_python, "make", slide, "gone", folder / "hs2p", "--save-tiles"), folder / "hs2p")
    slide.unlink()
    return run, slide


@pytest.fixture(scope="session")
def gone_reference(hs2p_gone, vit_tiny_checkpoint, tiny):
    """The bare model on the PIL-decoded members of hs2p's tar, by (x, y)."""
    run, _ = hs2p_gone
    keys = list(run.tiles)
    return reference_by_xy(vit_tiny_checkpoint, keys, np.stack([run.tiles[k] for k in keys]), tiny)


@pytest.fixture(scope="session")
def pyramid_tif(cmu_svs, tmp_path_factory) -> Path:
    """A pyramid written by libvips from the CMU pixels, labelled 0.25 µm/px (LZW: lossless), so that
    0.5 µm/px is its level 1 (downsample exactly 2: the crop is a multiple of 16)."""
    pyvips = pytest.importorskip("pyvips")
    import openslide

    with openslide.OpenSlide(str(cmu_svs)) as osr:
        w, h = (d // 16 * 16 for d in osr.dimensions)
        pixels = np.ascontiguousarray(np.asarray(osr.read_region((0, 0), 0, (w, h)))[..., :3])
    path = tmp_path_factory.mktemp("pyramid") / "pyramid.tif"
    image = pyvips.Image.new_from_memory(pixels.tobytes(), w, h, 3, "uchar")
    image.tiffsave(str(path), tile=True, pyramid=True, compression="lzw", tile_width=256, tile_height=256,
                   xres=4000.0, yres=4000.0)   # pixels per mm: 0.25 µm/px
    with openslide.OpenSlide(str(path)) as osr:
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert osr.level_downsamples[1] == 2.0
    return path


@pytest.fixture(scope="session")
def hs2p_pyramid(hs2p_python, pyramid_tif, tmp_path_factory) -> Hs2pRun:
    root = tmp_path_factory.mktemp("hs2p_pyramid")
    return Hs2pRun(run_hs2p(hs2p_python, "make", pyramid_tif, "pyr", root, "--spacing", 0.5, "--tile-size", 224), root)


def write_h5(path: Path, x, y, layout: str, sample_id: str, size_lv0: int = 224) -> Path:
    """A patch file as TRIDENT or CLAM write it: ``coords`` (N, 2) int64 level-0 (x, y) and their attrs."""
    import h5py

    coords = np.stack([np.asarray(x), np.asarray(y)], axis=1).astype(np.int64)
    coords = coords[np.random.default_rng(0).permutation(len(coords))]   # no order to lean on
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=coords)
        if layout == "trident":
            ds.attrs.update({"patch_size": size_lv0, "patch_size_level0": size_lv0, "level0_magnification": 20,
                             "target_magnification": 20, "overlap": 0, "name": sample_id})
        else:   # CLAM: the level the patches were cut at and their size there
            ds.attrs.update({"patch_level": 0, "patch_size": size_lv0, "downsample": np.array([1.0, 1.0]),
                             "downsampled_level_dim": np.array([2220, 2967]), "level_dim": np.array([2220, 2967]),
                             "name": sample_id, "save_path": str(path.parent)})
    return path


def cmu_item(cmu_svs) -> dict:
    return {"image_path": cmu_svs, "sample_id": SAMPLE}


# -- a. hs2p's coordinates, in memory ----------------------------------------------------------------
def test_hs2p_artifacts_are_what_these_tests_assume(hs2p_cmu):
    """Not a test of ours: the facts about hs2p's output that make the tests below worth having."""
    x, y = hs2p_cmu.xy
    assert len({(int(a) % 224, int(b) % 224) for a, b in zip(x, y)}) > 1       # several grids
    assert (x + 224 > 2220).any() and (y + 224 > 2967).any()                 # past the slide's edges
    assert list(zip(x, y)) == sorted(zip(x, y))                                # x then y, not row-major
    rows = read_manifest_csv(Path(hs2p_cmu.info["manifest"]))
    assert [i for i, _, _ in rows] != sorted(i for i, _, _ in rows)           # tar order is not tile_index
    assert {(a, b) for _, a, b in rows} == hs2p_cmu.keys


@pytest.mark.parametrize("where", ["tiles folder", "npz file", "hs2p root"])
def test_hs2p_coordinates_are_embedded_exactly(tiny, cmu_svs, hs2p_cmu, cmu_reference, where):
    location = {"tiles folder": hs2p_cmu.tiles_dir, "npz file": Path(hs2p_cmu.info["npz"]),
                "hs2p root": hs2p_cmu.root}[where]
    emb = tiny.embed_slide(cmu_item(cmu_svs), preprocessing=PreprocessingConfig(read_coordinates_from=location))
    assert emb.num_tiles == len(hs2p_cmu.keys) and emb.tile_embeddings.shape == (emb.num_tiles, 192)
    assert emb.tile_size_lv0 == 224
    order = np.lexsort((np.asarray(emb.x), np.asarray(emb.y)))
    np.testing.assert_array_equal(order, np.arange(emb.num_tiles))             # row-major: y, then x
    assert_rows_match(emb.x, emb.y, emb.tile_embeddings, cmu_reference, f"read_coordinates_from={where}")


# -- b. the same through a Pipeline into the store -----------------------------------------------
def test_hs2p_coordinates_through_the_pipeline(tiny, cmu_svs, hs2p_cmu, cmu_reference, tmp_path):
    from slide2vec_dask.store import EmbeddingStore

    out = tmp_path / "run"
    result = Pipeline(tiny, preprocessing=PreprocessingConfig(read_coordinates_from=hs2p_cmu.tiles_dir),
                      execution=ExecutionOptions(output_dir=out, num_workers=1, batch_size=32)).run(
        slides=[cmu_item(cmu_svs)])
    assert [(o.sample_id, o.status) for o in result.outcomes] == [(SAMPLE, "success")]
    group = EmbeddingStore(out).open_tiles(SAMPLE)
    assert_rows_match(group["x"][:], group["y"][:], group["embedding"][:], cmu_reference, "store")


# -- c. a pyramid by another writer: hs2p reads level 1 -----------------------------------------
def test_hs2p_coordinates_on_a_libvips_pyramid_read_level_1(tiny, pyramid_tif, hs2p_pyramid, vit_tiny_checkpoint):
    assert hs2p_pyramid.info["read_level"] == 1 and hs2p_pyramid.info["tile_size_lv0"] == 448
    assert hs2p_pyramid.info["read_tile_size_px"] == 224 and hs2p_pyramid.info["base_spacing_um"] == 0.25
    x, y = hs2p_pyramid.xy
    # Even level-0 coordinates: OpenSlide's level-1 read is then a plain crop (odd ones it interpolates).
    assert (x % 2 == 0).all() and (y % 2 == 0).all()
    tiles = openslide_white(pyramid_tif, x, y, 448, level=1, read_size=224)
    expected = reference_by_xy(vit_tiny_checkpoint, list(zip(x.tolist(), y.tolist())), tiles, tiny)
    emb = tiny.embed_slide({"image_path": pyramid_tif, "sample_id": "pyr"},
                           preprocessing=PreprocessingConfig(read_coordinates_from=hs2p_pyramid.tiles_dir))
    assert emb.tile_size_lv0 == 448 and emb.attrs["read_level"] == 1
    assert_rows_match(emb.x, emb.y, emb.tile_embeddings, expected, "pyramid level 1")


# -- d. hs2p's tile tar, the slide gone ------------------------------------------------------------
@pytest.mark.parametrize("where", ["tiles folder", "hs2p root"])
def test_hs2p_tiles_are_embedded_without_the_slide(tiny, hs2p_gone, gone_reference, where):
    run, slide = hs2p_gone
    assert not slide.exists()
    location = run.tiles_dir if where == "tiles folder" else run.root
    emb = tiny.embed_slide({"image_path": slide, "sample_id": "gone"},
                           preprocessing=PreprocessingConfig(read_tiles_from=location))
    manifest = {(x, y) for _, x, y in read_manifest_csv(Path(run.info["manifest"]))}
    assert set(zip(np.asarray(emb.x).tolist(), np.asarray(emb.y).tolist())) == manifest
    assert_rows_match(emb.x, emb.y, emb.tile_embeddings, gone_reference, f"read_tiles_from={where}")


@pytest.mark.slow
def test_cli_run_with_read_tiles_from(hs2p_gone, gone_reference, vit_tiny_checkpoint, tmp_path):
    """The command line, as users run it: a YAML config whose preprocessing reads hs2p's tiles."""
    import yaml
    import zarr

    run, slide = hs2p_gone
    (tmp_path / "slides.csv").write_text(f"sample_id,image_path\ngone,{slide}\n")
    config = {"manifest": "slides.csv",
              "model": {"timm": "vit_tiny_patch16_224", "checkpoint_path": str(vit_tiny_checkpoint)},
              "preprocessing": {"read_tiles_from": str(run.tiles_dir)},
              "execution": {"output_dir": "out", "batch_size": 32, "num_workers": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", "run", str(tmp_path / "config.yaml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 succeeded, 0 skipped, 0 failed" in result.stdout
    group = zarr.open_group(str(tmp_path / "out" / "embeddings.zarr"), mode="r")["tiles/gone"]
    assert_rows_match(group["x"][:], group["y"][:], group["embedding"][:], gone_reference, "CLI store")


# -- e. on_the_fly=False writes hs2p's layout -----------------------------------------------------
def test_on_the_fly_false_writes_hs2p_tiles(tiny, hs2p_python, cmu_svs, hs2p_cmu, vit_tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    config = PreprocessingConfig(read_coordinates_from=hs2p_cmu.tiles_dir, on_the_fly=False)
    result = Pipeline(tiny, preprocessing=config, execution=ExecutionOptions(output_dir=out, num_workers=1)).run(
        slides=[cmu_item(cmu_svs)])
    assert [(o.sample_id, o.status) for o in result.outcomes] == [(SAMPLE, "success")]
    first = EmbeddingStore(out).open_tiles(SAMPLE)
    first = type("Stored", (), {"x": first["x"][:], "y": first["y"][:],
                                "tile_embeddings": torch.from_numpy(first["embedding"][:])})
    tiles_dir = out / "tiles"
    paths = {suffix: tiles_dir / f"{SAMPLE}.{suffix}" for suffix in
             ("tiles.tar", "tiles.manifest.csv", "coordinates.npz", "coordinates.meta.json")}
    assert all(p.is_file() for p in paths.values()), sorted(p.name for p in tiles_dir.iterdir())
    ours = tar_tiles(paths["tiles.tar"], paths["tiles.manifest.csv"])
    assert set(ours) == hs2p_cmu.keys

    # The same pixels, the same JPEG settings (PIL, quality 90): the same decoded tiles as hs2p's.
    diffs = {k: int(np.abs(ours[k].astype(int) - hs2p_cmu.tiles[k].astype(int)).max()) for k in ours}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0, (f"our JPEG tiles differ from hs2p's: max |diff| {diffs[worst]} at {worst}; "
                               f"{sum(d > 0 for d in diffs.values())} of {len(diffs)} tiles differ "
                               f"(hs2p's Pillow {hs2p_cmu.info['pillow_version']})")

    # The run's embeddings are those of its decoded JPEG tiles.
    keys = list(ours)
    expected = reference_by_xy(vit_tiny_checkpoint, keys, np.stack([ours[k] for k in keys]), tiny)
    assert_rows_match(first.x, first.y, first.tile_embeddings, expected, "on_the_fly=False")

    # ... so reading the tiles back gives them again.
    again = tiny.embed_slide(cmu_item(cmu_svs), preprocessing=PreprocessingConfig(read_tiles_from=tiles_dir))
    assert_rows_match(again.x, again.y, again.tile_embeddings,
                      dict(zip(zip(np.asarray(first.x).tolist(), np.asarray(first.y).tolist()),
                               first.tile_embeddings)), "read_tiles_from our tiles")

    # hs2p's own loader takes our coordinates + meta and finds the same tiles and geometry.
    loaded = run_hs2p(hs2p_python, "load", paths["coordinates.npz"], paths["coordinates.meta.json"])
    assert loaded["sample_id"] == SAMPLE
    assert set(zip(loaded["x"], loaded["y"])) == hs2p_cmu.keys and len(loaded["x"]) == len(hs2p_cmu.keys)
    assert (loaded["read_level"], loaded["read_tile_size_px"], loaded["tile_size_lv0"]) == (0, 224, 224)
    assert (loaded["requested_tile_size_px"], loaded["requested_spacing_um"]) == (224, 0.5)
    by_index = {i: (x, y) for i, x, y in read_manifest_csv(paths["tiles.manifest.csv"])}
    assert by_index == {i: (x, y) for i, x, y in zip(loaded["tile_index"], loaded["x"], loaded["y"])}


# -- f. TRIDENT and CLAM patch files --------------------------------------------------------------
@pytest.mark.parametrize("layout", ["trident", "clam"])
def test_h5_patch_coordinates_are_embedded_exactly(tiny, cmu_svs, hs2p_cmu, cmu_reference, tmp_path, layout):
    x, y = hs2p_cmu.xy
    folder = tmp_path / layout
    write_h5(folder / f"{SAMPLE}.h5", x, y, layout, SAMPLE)
    emb = tiny.embed_slide(cmu_item(cmu_svs), preprocessing=PreprocessingConfig(read_coordinates_from=folder))
    assert emb.tile_size_lv0 == 224
    assert_rows_match(emb.x, emb.y, emb.tile_embeddings, cmu_reference, f"{layout} h5")


# -- g. refusals, each naming the sample --------------------------------------------------------
def _number(value: float) -> str:
    """A regex for ``value`` as a message may print it (1, 1.0, 1.00)."""
    whole = int(value)
    text = re.escape(f"{value:g}") if whole != value else f"{whole}(\\.0+)?"
    return rf"(?<![\d.]){text}(?![\d.])"


def test_a_tile_size_the_artifacts_were_not_made_for_is_refused(tiny, cmu_svs, hs2p_cmu):
    config = PreprocessingConfig(read_coordinates_from=hs2p_cmu.tiles_dir, requested_tile_size_px=256)
    with pytest.raises(ValueError) as info:
        tiny.embed_slide(cmu_item(cmu_svs), preprocessing=config)
    message = str(info.value)
    assert SAMPLE in message and re.search(_number(224), message) and re.search(_number(256), message), message


def test_a_spacing_the_artifacts_were_not_made_for_is_refused(tiny, cmu_svs, hs2p_cmu):
    config = PreprocessingConfig(read_coordinates_from=hs2p_cmu.tiles_dir, requested_spacing_um=1.0)
    with pytest.raises(ValueError) as info:
        tiny.embed_slide(cmu_item(cmu_svs), preprocessing=config)
    message = str(info.value)
    spacings = re.search(_number(0.5), message) and re.search(_number(1.0), message)
    sizes_lv0 = re.search(_number(224), message) and re.search(_number(448), message)
    assert SAMPLE in message and (spacings or sizes_lv0), message


def test_hs2p_tiles_of_another_tile_size_are_refused(tiny, hs2p_gone):
    run, slide = hs2p_gone
    with pytest.raises(ValueError) as info:
        tiny.embed_slide({"image_path": slide, "sample_id": "gone"},
                         preprocessing=PreprocessingConfig(read_tiles_from=run.tiles_dir, requested_tile_size_px=256))
    message = str(info.value)
    assert "gone" in message and re.search(_number(224), message) and re.search(_number(256), message), message


def test_an_h5_of_another_tile_size_is_refused(tiny, cmu_svs, hs2p_cmu, tmp_path):
    x, y = hs2p_cmu.xy
    write_h5(tmp_path / "trident" / f"{SAMPLE}.h5", x, y, "trident", SAMPLE, size_lv0=448)
    with pytest.raises(ValueError) as info:
        tiny.embed_slide(cmu_item(cmu_svs), preprocessing=PreprocessingConfig(read_coordinates_from=tmp_path / "trident"))
    message = str(info.value)
    assert SAMPLE in message and re.search(_number(224), message) and re.search(_number(448), message), message


def test_an_hs2p_npz_without_its_meta_json_is_refused(tiny, cmu_svs, hs2p_cmu, tmp_path):
    folder = tmp_path / "npz_only"
    folder.mkdir()
    shutil.copy(hs2p_cmu.info["npz"], folder)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{SAMPLE}.coordinates.meta.json")):
        tiny.embed_slide(cmu_item(cmu_svs), preprocessing=PreprocessingConfig(read_coordinates_from=folder))


@pytest.mark.parametrize("layout", ["hs2p", "trident"])
def test_hierarchical_mode_refuses_free_coordinates(tiny, cmu_svs, hs2p_cmu, tmp_path, layout):
    if layout == "hs2p":
        folder = hs2p_cmu.tiles_dir
    else:
        folder = tmp_path / "trident"
        write_h5(folder / f"{SAMPLE}.h5", *hs2p_cmu.xy, "trident", SAMPLE)
    with pytest.raises(ValueError) as info:
        config = PreprocessingConfig(read_coordinates_from=folder, region_tile_multiple=2)
        tiny.embed_slide(cmu_item(cmu_svs), preprocessing=config)
    assert SAMPLE in str(info.value), str(info.value)


def test_run_with_coordinates_finds_the_slides_hs2p_tiled(tiny, cmu_svs, hs2p_cmu, cmu_reference, tmp_path):
    """An hs2p tiles folder names its slides (the meta's provenance): no manifest needed."""
    pipeline = Pipeline(tiny, execution=ExecutionOptions(output_dir=tmp_path, num_workers=1))
    result = pipeline.run_with_coordinates(hs2p_cmu.tiles_dir)
    assert [(o.sample_id, o.status, o.image_path) for o in result.outcomes] == [(SAMPLE, "success", str(cmu_svs))]
    group = EmbeddingStore(tmp_path).open_tiles(SAMPLE)
    assert_rows_match(group["x"][:], group["y"][:], group["embedding"][:], cmu_reference, "run_with_coordinates")
