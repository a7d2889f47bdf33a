"""``tiling_only``: plans, previews and hs2p's coordinate files, no model loaded, nothing embedded.

The model's weights here are a file of garbage bytes: any attempt to load them fails, so a
run that succeeds never loaded them.  hs2p's own loader (``hs2p.load_tiling_result``, in its
environment) reads the coordinate files back, and they hold exactly the tiles hs2p itself
writes for the same slide and settings.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_hs2p_tiling import CMU, MAKE_HS2P, _clean_env, hs2p_python  # noqa: F401  (a fixture)

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "garbage.safetensors"
    path.write_bytes(b"not a checkpoint" * 64)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("tiling_only")
    a = testing.write_tiff(folder / "a.tif", testing.tissue_image(1500, 1800, [(100, 150, 1200, 1500)]),
                           spacing_um=0.5, downsamples=(1, 4, 16), compression="zlib")
    blank = testing.write_tiff(folder / "blank.tif", testing.tissue_image(600, 600, []), spacing_um=0.5,
                               downsamples=(1,), compression="zlib")
    broken = folder / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    return [{"sample_id": "a", "image_path": str(a)}, {"sample_id": "blank", "image_path": str(blank)},
            {"sample_id": "broken", "image_path": str(broken)}]


def model(weights: Path) -> Model:
    return Model.from_timm("vit_tiny_patch16_224", checkpoint_path=weights, spacing_um=0.5, tile_size_px=224)


def test_tiling_only_plans_and_writes_hs2p_files_without_the_model(unloadable, slides, tmp_path):
    out = tmp_path / "run"
    config = PreprocessingConfig(preview={"save_mask_preview": True, "save_tiling_preview": True})
    result = Pipeline(model(unloadable), config, ExecutionOptions(output_dir=out, num_workers=2)).run(
        slides=slides, tiling_only=True)
    rows = {o.sample_id: o for o in result.outcomes}
    assert rows["a"].status == rows["blank"].status == "success" and rows["broken"].status == "failed"
    assert result.num_failed == 1 and result.tile_artifacts == []
    assert rows["a"].num_tiles > 0 and rows["blank"].num_tiles == 0 and "no tissue" in rows["blank"].note
    assert not (out / "embeddings.zarr").exists()   # nothing embedded
    with open(result.process_list_path) as f:
        listed = {r["sample_id"]: r for r in csv.DictReader(f)}
    assert listed["a"]["status"] == "success" and int(listed["a"]["num_tiles"]) == rows["a"].num_tiles
    assert "broken" in listed["broken"]["error"] or listed["broken"]["error_type"]
    # our plan, previews, hs2p's files
    assert (out / "coordinates" / "a.npz").is_file()
    assert (out / "preview" / "mask" / "a.png").is_file() and (out / "preview" / "tiling" / "a.png").is_file()
    with np.load(out / "tiles" / "a.coordinates.npz") as data:
        xy = np.stack([data["x"], data["y"]], axis=1)
        assert data["tile_index"].tolist() == list(range(rows["a"].num_tiles))
    assert (np.lexsort((xy[:, 1], xy[:, 0])) == np.arange(len(xy))).all()   # hs2p's order: x, then y
    meta = json.loads((out / "tiles" / "a.coordinates.meta.json").read_text())
    assert meta["tiling"]["n_tiles"] == rows["a"].num_tiles and meta["artifact"]["tile_order"] == "x_then_y"
    assert not (out / "tiles" / "blank.coordinates.npz").exists()   # hs2p writes only the meta for 0 tiles
    assert json.loads((out / "tiles" / "blank.coordinates.meta.json").read_text())["tiling"]["n_tiles"] == 0


def test_without_tiling_only_the_garbage_weights_fail(unloadable, slides, tmp_path):
    """The control: the same model embedding does try to load its weights (so the test above means something)."""
    result = Pipeline(model(unloadable), PreprocessingConfig(),
                      ExecutionOptions(output_dir=tmp_path / "run", num_workers=1)).run(slides=slides[:1])
    assert result.num_failed == 1


def test_hs2p_reads_our_files_and_they_hold_its_tiles(hs2p_python, unloadable, tmp_path):
    if not CMU.is_file():
        pytest.skip(f"{CMU} not present")
    out = tmp_path / "ours"
    Pipeline(model(unloadable), PreprocessingConfig(), ExecutionOptions(output_dir=out)).run(
        slides=[{"sample_id": "cmu", "image_path": str(CMU)}], tiling_only=True)

    def hs2p(*args):
        done = subprocess.run([str(hs2p_python), str(MAKE_HS2P), *map(str, args)], capture_output=True, text=True,
                              env=_clean_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    loaded = hs2p("load", out / "tiles" / "cmu.coordinates.npz", out / "tiles" / "cmu.coordinates.meta.json")
    theirs = hs2p("tile", CMU, "cmu", tmp_path / "hs2p", json.dumps({"backend": "openslide"}))
    assert (loaded["x"], loaded["y"]) == (theirs["x"], theirs["y"])   # same tiles, same order
    assert loaded["tissue_fractions"] == theirs["tissue_fractions"]
    assert loaded["tile_size_lv0"] == theirs["meta"]["tiling"]["tile_size_lv0"]


def test_cli_tiling_only(unloadable, slides, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path\n" + f"a,{slides[0]['image_path']}\n")
    done = subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", "embed", "--manifest", str(manifest),
                           "--timm", "vit_tiny_patch16_224", "--checkpoint", str(unloadable), "--spacing", "0.5",
                           "--tile-size", "224", "--output", str(tmp_path / "out"), "--tiling-only"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 succeeded" in done.stdout
    assert (tmp_path / "out" / "tiles" / "a.coordinates.npz").is_file()
    assert not (tmp_path / "out" / "embeddings.zarr").exists()
