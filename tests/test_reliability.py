"""Bad input and faults as users meet them: each a clear error, nothing lost, nothing mixed.

One test per defect of the reliability issue; each was watched failing on the
code before the fix.  Runs use the embedded local default (in-process, no
spawning) or the real CLI in a subprocess, on small slides the tests write.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, read_manifest, testing
from slide2vec_dask.store.output_dir import LOCK_NAME, OutputDirError, OutputDirLocked, RunLock

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
TIMM = "vit_tiny_patch16_224"


def read_rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {r["sample_id"]: r for r in csv.DictReader(f)}


def cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: equal snapshots, untouched folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reliability")
    a = testing.write_svs(folder / "a.svs", testing.tissue_image(1344, 1344, [(224, 224, 1120, 896)], seed=1),
                          downsamples=(1, 4))
    b = testing.write_svs(folder / "b.svs", testing.tissue_image(1344, 1344, [(448, 0, 1344, 1344)], seed=2),
                          downsamples=(1, 4))
    return {"a": a, "b": b}


def run(model, out: Path, slides: list[dict], **options) -> object:
    prep = {**EXACT, **options.pop("preprocessing", {})}
    return Pipeline(model, PreprocessingConfig(**prep), ExecutionOptions(output_dir=out, **options)).run(
        slides=slides)


# -- options: strict types and ranges, before any work -------------------------------------------
@pytest.mark.parametrize("cls, kwargs, message", [
    ("ex", {"overwrite": "flase"}, "overwrite must be true or false, got 'flase'"),
    ("ex", {"overwrite": 1}, "overwrite must be true or false"),
    ("ex", {"save_tile_embeddings": "yes"}, "save_tile_embeddings must be true or false"),
    ("ex", {"batch_size": True}, "batch_size must be an integer"),
    ("ex", {"num_gpus": True}, "num_gpus must be an integer"),
    ("ex", {"batch_size": "64"}, "batch_size must be an integer"),
    ("ex", {"prefetch_factor": 0}, "prefetch_factor must be an integer in \\[1, 1024\\]"),
    ("ex", {"output_dir": 3}, "output_dir must be a path"),
    ("prep", {"use_supertiles": "maybe"}, "use_supertiles must be true or false"),
    ("prep", {"resume": "no"}, "resume must be true or false"),
    ("prep", {"spacing_tolerance": "abc"}, "spacing_tolerance must be a number"),
    ("prep", {"tissue_threshold": "0.5"}, "tissue_threshold must be a number"),
    ("prep", {"filtering": {"a_t": "abc"}}, "filtering.a_t must be a number >= 0"),
    ("prep", {"filtering": {"filter_white": "true"}}, "filtering.filter_white must be true or false"),
    ("prep", {"segmentation": {"sthresh": "abc"}}, "segmentation.sthresh must be an integer in \\[0, 255\\]"),
    ("prep", {"segmentation": {"mthresh": "abc"}}, "segmentation.mthresh must be an integer"),
    ("prep", {"segmentation": {"close": -3}}, "segmentation.close must be an integer in \\[0, 255\\]"),
    ("prep", {"segmentation": "hsv"}, "segmentation must be a mapping"),
    ("prep", {"preview": {"save_mask_preview": "no"}}, "preview.save_mask_preview must be true or false"),
    ("prep", {"requested_tile_size_px": 1}, "requested_tile_size_px must be an integer in \\[16, 4096\\]"),
    ("prep", {"requested_tile_size_px": 100_000}, "in \\[16, 4096\\]"),
    ("prep", {"requested_spacing_um": 1e6}, "requested_spacing_um must be a number in \\[0.01, 100\\]"),
    ("prep", {"requested_spacing_um": float("nan")}, "requested_spacing_um must be a number"),
])
def test_every_option_is_typed_and_ranged(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        (ExecutionOptions if cls == "ex" else PreprocessingConfig)(**kwargs)


def test_numpy_scalars_and_real_booleans_are_accepted():
    prep = PreprocessingConfig(requested_tile_size_px=np.int64(224), tissue_threshold=np.float32(0.25),
                               use_supertiles=np.bool_(False), segmentation={"sthresh": np.int32(20)})
    assert prep.requested_tile_size_px == 224 and prep.use_supertiles == False  # noqa: E712
    assert ExecutionOptions(overwrite=True, num_gpus=1).overwrite is True


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, two_slides):
    """A finished CLI run (timm ViT-Ti, random weights) to try bad reruns on."""
    import yaml

    folder = tmp_path_factory.mktemp("cli_store")
    (folder / "slides.csv").write_text(f"sample_id,image_path\na,{two_slides['a']}\n")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"manifest": "slides.csv", "model": {"timm": TIMM},
                                      "preprocessing": EXACT, "execution": {"output_dir": "out"}}))
    result = cli("run", config)
    assert result.returncode == 0, result.stdout + result.stderr
    return config


@pytest.mark.parametrize("override, named", [
    ("execution.overwrite=flase", "overwrite must be true or false, got 'flase'"),
    ("execution.overwrite=1", "overwrite must be true or false, got 1"),
    ("preprocessing.use_supertiles=maybe", "use_supertiles must be true or false"),
    ("preprocessing.segmentation.sthresh=abc", "segmentation.sthresh must be an integer"),
    ("preprocessing.requested_tile_size_px=1", "requested_tile_size_px must be an integer in [16, 4096]"),
])
def test_cli_typos_exit_2_and_leave_the_store_intact(cli_store, override, named):
    out = cli_store.parent / "out"
    before = snapshot(out)
    start = time.monotonic()
    result = cli("run", cli_store, override)
    assert result.returncode == 2, result.stdout + result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert snapshot(out) == before          # nothing wiped, rewritten or touched
    assert time.monotonic() - start < 30    # refused before a cluster or a model


def test_yaml_typo_in_a_boolean_is_refused(cli_store, tmp_path):
    import yaml

    cfg = yaml.safe_load(cli_store.read_text())
    cfg["manifest"] = str(cli_store.parent / "slides.csv")
    cfg["execution"] = {"output_dir": str(cli_store.parent / "out"), "overwrite": "flase"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    before = snapshot(cli_store.parent / "out")
    result = cli("run", bad)
    assert result.returncode == 2 and "overwrite must be true or false" in result.stderr
    assert snapshot(cli_store.parent / "out") == before


def test_overwrite_says_what_it_removed(tiny, two_slides, tmp_path, caplog):
    out = tmp_path / "run"
    run(tiny, out, [{"sample_id": "a", "image_path": two_slides["a"]}])
    with caplog.at_level(logging.WARNING, logger="slide2vec_dask"):
        run(tiny, out, [{"sample_id": "b", "image_path": two_slides["b"]}], overwrite=True)
    assert any("overwrite=True: replaced the store" in r.getMessage() and "1 slides' tile embeddings" in
               r.getMessage() for r in caplog.records)
    assert set(os.listdir(out / "embeddings.zarr" / "tiles")) - {"zarr.json"} == {"b"}


# -- sample ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_id, message", [
    ("x" * 300, "300 characters long; the limit is 200"),
    ("zarr.json", "a name the store or a file system reserves"),
    ("ZARR.JSON", "reserves"),
    ("CON", "reserves"),
    ("nul.txt", "reserves"),
])
def test_ids_that_cannot_be_stored_are_refused_at_validation(tmp_path, sample_id, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"sample_id,image_path\nok,a.svs\n{sample_id},b.svs\n")
    with pytest.raises(ValueError, match=f"m.csv:3: sample_id .*{message}"):
        read_manifest(manifest)


def test_patient_ids_are_checked_like_sample_ids(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path,patient_id\nok,a.svs,../p\n")
    with pytest.raises(ValueError, match="m.csv:2: patient_id '../p' is not safe"):
        read_manifest(manifest)


def test_the_longest_allowed_id_gets_every_file(tiny, two_slides, tmp_path):
    sid = "s" * 200
    result = run(tiny, tmp_path / "run", [{"sample_id": sid, "image_path": two_slides["a"]}], output_format="pt")
    assert result.num_failed == 0 and result.outcomes[0].status == "success"
    assert (tmp_path / "run" / "tile_embeddings" / f"{sid}.pt").is_file()
    assert (tmp_path / "run" / "tile_embeddings" / f"{sid}.meta.json").is_file()
    assert xr.open_zarr(result.store_path, group=f"tiles/{sid}").sizes["tile"] > 0


# -- provenance: a changed file is never skipped, never mixed ----------------------------------------
def test_a_replaced_slide_file_is_redone(tiny, two_slides, tmp_path):
    path = tmp_path / "slide.svs"
    shutil.copy(two_slides["a"], path)
    out = tmp_path / "run"
    first = run(tiny, out, [{"sample_id": "s", "image_path": path}])
    assert first.outcomes[0].status == "success"
    shutil.copy(two_slides["b"], path)      # another scan under the same name
    again = run(tiny, out, [{"sample_id": "s", "image_path": path}])
    row = again.outcomes[0]
    assert row.status == "success" and "slide file changed" in row.note
    expected = tiny.embed_slide(two_slides["b"], preprocessing=PreprocessingConfig(**EXACT))
    ds = xr.open_zarr(again.store_path, group="tiles/s")
    np.testing.assert_array_equal(ds.x.values, expected.x)
    np.testing.assert_array_equal(ds.y.values, expected.y)
    np.testing.assert_allclose(ds.embedding.values, expected.tile_embeddings.numpy(), atol=1e-5)
    assert "redone" in read_rows(again.process_list_path)["s"]["note"]


def test_a_copied_file_with_a_new_mtime_is_still_complete(tiny, two_slides, tmp_path):
    path = tmp_path / "slide.svs"
    shutil.copy(two_slides["a"], path)
    out = tmp_path / "run"
    run(tiny, out, [{"sample_id": "s", "image_path": path}])
    os.utime(path, (time.time() + 100, time.time() + 100))
    again = run(tiny, out, [{"sample_id": "s", "image_path": path}])
    assert again.outcomes[0].status == "skipped"


def test_a_truncated_file_fails_and_keeps_the_earlier_embeddings(tiny, two_slides, tmp_path):
    path = tmp_path / "slide.svs"
    shutil.copy(two_slides["a"], path)
    out = tmp_path / "run"
    first = run(tiny, out, [{"sample_id": "s", "image_path": path}])
    kept = xr.open_zarr(first.store_path, group="tiles/s").embedding.values
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)
    again = run(tiny, out, [{"sample_id": "s", "image_path": path}])
    row = again.outcomes[0]
    assert row.status == "failed" and "size changed" in row.note
    np.testing.assert_array_equal(xr.open_zarr(again.store_path, group="tiles/s").embedding.values, kept)


def test_resume_never_lays_an_old_plan_over_a_new_file(tiny, two_slides, tmp_path):
    """A run killed mid-slide (its plan saved, its tiles not published), then the file changes."""
    path = tmp_path / "slide.svs"
    shutil.copy(two_slides["a"], path)
    out = tmp_path / "run"
    run(tiny, out, [{"sample_id": "s", "image_path": path}], preprocessing={"resume": True})
    shutil.rmtree(out / "embeddings.zarr" / "tiles" / "s")       # as if killed before finalising
    (out / "embeddings.zarr" / "zarr.json").write_text(json.dumps(
        {k: v for k, v in json.loads((out / "embeddings.zarr" / "zarr.json").read_text()).items()
         if k != "consolidated_metadata"}))
    shutil.copy(two_slides["b"], path)
    resumed = run(tiny, out, [{"sample_id": "s", "image_path": path}], preprocessing={"resume": True})
    assert resumed.outcomes[0].status == "success"
    expected = tiny.embed_slide(two_slides["b"], preprocessing=PreprocessingConfig(**EXACT))
    ds = xr.open_zarr(resumed.store_path, group="tiles/s")
    np.testing.assert_array_equal(ds.x.values, expected.x)
    np.testing.assert_array_equal(ds.y.values, expected.y)


def test_saved_coordinates_of_another_file_are_refused(tiny, two_slides, tmp_path):
    path = tmp_path / "slide.svs"
    shutil.copy(two_slides["a"], path)
    first = run(tiny, tmp_path / "first", [{"sample_id": "s", "image_path": path}])
    shutil.copy(two_slides["b"], path)
    again = run(tiny, tmp_path / "second", [{"sample_id": "s", "image_path": path}],
                preprocessing={"read_coordinates_from": tmp_path / "first" / "coordinates"})
    row = again.outcomes[0]
    assert first.outcomes[0].status == "success"
    assert row.status == "failed" and "saved coordinates" in row.error and "slide file changed" in row.error


# -- one output_dir, one run ------------------------------------------------------------------------
SLOW_RUN = textwrap.dedent("""
    import sys
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=sys.argv[1])
    slides = [{"sample_id": f"s{i}", "image_path": sys.argv[3]} for i in range(int(sys.argv[4]))]
    result = Pipeline(model, PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5),
                      ExecutionOptions(output_dir=sys.argv[2], batch_size=4)).run(slides=slides)
    print("failed", result.num_failed)
""")


def test_a_second_run_on_the_same_output_dir_is_refused(tiny, two_slides, tmp_path, vit_tiny_checkpoint):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RUN)
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(script), str(vit_tiny_checkpoint), str(out),
                              str(two_slides["a"]), "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / LOCK_NAME
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second could start"
    with pytest.raises(OutputDirLocked, match=f"in use by another run: pid {first.pid} on {socket.gethostname()}"):
        run(tiny, out, [{"sample_id": "other", "image_path": two_slides["b"]}])
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0 and "failed 0" in stdout, stderr
    rows = read_rows(out / "process_list.csv")
    assert set(rows) == {f"s{i}" for i in range(8)} and all(r["status"] == "success" for r in rows.values())
    assert not lock.exists() and not (out / "embeddings.zarr" / "tiles" / "other").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tiny, two_slides, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout),
                                             "started": "earlier", "token": "x"}))
    with caplog.at_level(logging.WARNING, logger="slide2vec_dask"):
        result = run(tiny, out, [{"sample_id": "a", "image_path": two_slides["a"]}])
    assert result.outcomes[0].status == "success" and not (out / LOCK_NAME).exists()
    assert any("took over a stale lock" in r.getMessage() and str(int(gone.stdout)) in r.getMessage()
               for r in caplog.records)


def test_a_lock_from_another_host_is_trusted_until_it_stops_beating(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "node-17", "pid": 1, "started": "now", "token": "x"}))
    with pytest.raises(OutputDirLocked, match="pid 1 on node-17"):
        RunLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(lock, (old, old))
    with RunLock(tmp_path, stale_after=60) as held:
        assert json.loads(lock.read_text())["token"] == held.token
    assert not lock.exists()


# -- the output folder itself --------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file(tiny, two_slides, tmp_path, cli_store):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        run(tiny, target, [{"sample_id": "a", "image_path": two_slides["a"]}])
    result = cli("run", cli_store, f"execution.output_dir={target}")
    assert result.returncode == 3 and "is a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr and target.read_text() == "not a folder"


def _mount(kind: str, target: Path, *options: str, source: str = "none") -> bool:
    """Mount as root (CI and this sandbox run as root, where permissions do not stop writes)."""
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", kind, *options, source, str(target)], capture_output=True)
    return done.returncode == 0


def _bind_read_only(source: Path, target: Path) -> bool:
    if os.geteuid() != 0:
        return False
    target.mkdir()
    ok = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(target)], capture_output=True)
    return ok.returncode == 0


def test_read_only_folders(tiny, two_slides, tmp_path, cli_store):
    done = cli_store.parent / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    ro_done, ro_empty = tmp_path / "ro_done", tmp_path / "ro_empty"
    if not (_bind_read_only(done, ro_done) and _bind_read_only(empty, ro_empty)):
        pytest.skip("needs root with mount (to make a folder read-only for root)")
    try:
        before = snapshot(done)
        # A finished store on a read-only mount: the rerun has nothing to do and succeeds.
        manifest = cli_store.parent / "slides.csv"
        result = cli("run", cli_store, f"execution.output_dir={ro_done}", f"manifest={manifest}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 succeeded, 1 skipped, 0 failed" in result.stdout and "could not be updated" in result.stderr
        assert snapshot(done) == before
        # A new run into a read-only folder: a clear environment error.
        result = cli("run", cli_store, f"execution.output_dir={ro_empty}", f"manifest={manifest}")
        assert result.returncode == 3 and "read-only" in result.stderr and "Traceback" not in result.stderr
    finally:
        for target in (ro_done, ro_empty):
            subprocess.run(["umount", str(target)], capture_output=True)


def test_a_full_disk(tiny, two_slides, tmp_path):
    """Full before any slide: a clear run-level error; full mid-run: each slide says so; no temp files."""
    full, nearly = tmp_path / "full", tmp_path / "nearly"
    full.mkdir()
    nearly.mkdir()
    if not (_mount("tmpfs", full, "-o", "size=4k") and _mount("tmpfs", nearly, "-o", "size=48k")):
        pytest.skip("needs root with mount (a tiny tmpfs plays the full disk)")
    try:
        with pytest.raises(OutputDirError, match="no space left on the device"):
            run(tiny, full / "out", [{"sample_id": "a", "image_path": two_slides["a"]}])
        assert not (full / "out" / LOCK_NAME).exists()
        try:
            result = run(tiny, nearly / "out", [{"sample_id": "a", "image_path": two_slides["a"]}])
        except OutputDirError as exc:          # (full by the time the process list is written)
            assert "no space left" in str(exc)
        else:
            assert result.outcomes[0].status == "failed" and "no space left" in result.outcomes[0].error
        for folder in (full, nearly):
            leftovers = [p.name for p in folder.rglob("*") if ".tmp" in p.name or ".npy." in p.name]
            assert not leftovers
    finally:
        for folder in (full, nearly):
            subprocess.run(["umount", str(folder)], capture_output=True)


# -- smaller ------------------------------------------------------------------------------------------
def test_a_slide_smaller_than_one_tile_says_so(tiny, tmp_path):
    small = testing.write_svs(tmp_path / "tiny.svs", testing.tissue_image(160, 200, [(0, 0, 160, 200)]),
                              downsamples=(1,))
    slides = [{"sample_id": "t", "image_path": small}]
    on_one_grid = run(tiny, tmp_path / "grid", slides, preprocessing={"grid": "slide", "filtering": {"a_t": 0}})
    row = on_one_grid.outcomes[0]
    assert row.status == "success" and row.num_tiles == 0 and "smaller than one tile" in row.note
    # hs2p's grids: its tissue is under a_t = 4 reference tiles, and so dropped, which the note says;
    # with a_t = 0 the slide is one tile, overhanging the slide (glass there), as hs2p plans it
    row = run(tiny, tmp_path / "contours", slides).outcomes[0]
    assert row.status == "success" and row.num_tiles == 0 and "a_t" in row.note
    assert run(tiny, tmp_path / "a_t", slides, preprocessing={"filtering": {"a_t": 0}}).outcomes[0].num_tiles == 1


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_refused_checkpoint_is_loaded_once_and_its_message_gives_no_unsafe_advice(two_slides, tmp_path,
                                                                                   monkeypatch):
    import torch

    from slide2vec_dask import Model
    from slide2vec_dask.encoders import base

    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(1), "extra": _Payload()}, bad)
    calls = []
    original = base.read_state_dict
    monkeypatch.setattr(base, "read_state_dict", lambda *a, **k: calls.append(a) or original(*a, **k))
    model = Model.from_timm(TIMM, checkpoint_path=bad)
    slides = [{"sample_id": s, "image_path": two_slides[s]} for s in ("a", "b")]
    result = run(model, tmp_path / "run", slides, num_workers=1)
    assert [o.status for o in result.outcomes] == ["failed", "failed"]
    error = result.outcomes[0].error
    assert "not a weights-only torch checkpoint" in error and "weights_only=False" not in error
    assert "state dict" in error
    assert len(calls) == 1     # refused once, not once per block
