"""Fault injection: a run killed at chosen moments reruns to the store a clean run makes.

The run is a plain user script in a subprocess.  A one-shot pause patched into
the library (``module:Class.method``, matching an argument) tells the test it
has reached the moment; the test then SIGKILLs the whole process group (a
crashed node: client, scheduler and workers of the embedded default), or only
the client of an external `LocalCluster` (a closed laptop, a killed job step)
while the cluster carries on.  The rerun must report every slide done, leave
no lock, staging or temp file, and hold tile embeddings equal to a clean run's.
Worker losses inside a stage are in ``test_streaming.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, open_embeddings, testing
from slide2vec_dask.store.output_dir import LOCK_NAME

pytestmark = pytest.mark.slow   # (CI runs the slow tests after the default suite: .ci/run)

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
IDS = ["s0", "s1", "s2"]

RUN = textwrap.dedent("""
    import importlib, os, sys, time
    checkpoint, out, target, when, marker, address = sys.argv[1:7]
    slides = [{"sample_id": s, "image_path": p} for s, p in zip(sys.argv[7::2], sys.argv[8::2])]
    module, _, attr = target.partition(":")
    owner_name, _, method = attr.rpartition(".")
    owner = importlib.import_module(module)
    for part in owner_name.split("."):
        owner = getattr(owner, part)
    original = getattr(owner, method)

    def paused(*args, **kwargs):
        if when in repr(args):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, b"here")
                os.close(fd)
                time.sleep(120)
        return original(*args, **kwargs)

    setattr(owner, method, paused)
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=checkpoint)
    Pipeline(model, PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5,
                                        on_the_fly=os.environ.get("ON_THE_FLY", "1") == "1"),
             ExecutionOptions(output_dir=out, batch_size=4, num_workers=2,
                              scheduler_address=address or None)).run(slides=slides)
""")

# moment -> (patched method, the argument that picks the moment)
MOMENTS = {
    "a block staged": ("slide2vec_dask.store.embedding_store:EmbeddingStore.write_block", "'s1'"),
    "finalize, before publishing": ("slide2vec_dask.store.embedding_store:EmbeddingStore._publish", "tiles/s1"),
    "one slide published, staging not yet removed":
        ("slide2vec_dask.store.embedding_store:EmbeddingStore.discard_staging", "'s1'"),
    "process list being written": ("slide2vec_dask.pipeline:_ProcessList.write", ""),
    "store-wide metadata being consolidated":
        ("slide2vec_dask.store.embedding_store:EmbeddingStore._consolidate_root", ""),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("faults")
    rects = [[(0, 0, 1344, 896)], [(448, 0, 1344, 1792)], [(0, 448, 896, 1792)]]
    return [{"sample_id": s, "image_path": testing.write_svs(
        folder / f"{s}.svs", testing.tissue_image(1344, 1792, r, seed=20 + i), downsamples=(1, 4))}
        for i, (s, r) in enumerate(zip(IDS, rects))]


@pytest.fixture(scope="module")
def clean(tiny, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out, batch_size=4)).run(
        slides=cohort)


def _run_until(moment: str, out: Path, cohort, checkpoint: Path, tmp_path: Path, address: str = "",
               on_the_fly: bool = True):
    target, when = MOMENTS[moment]
    marker = tmp_path / "here"
    script = tmp_path / "run.py"
    script.write_text(RUN)
    args = [str(checkpoint), str(out), target, when, str(marker), address]
    for s in cohort:
        args += [s["sample_id"], str(s["image_path"])]
    proc = subprocess.Popen([sys.executable, str(script), *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ON_THE_FLY": "1" if on_the_fly else "0"})
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before '{moment}': {proc.stderr.read()[-2000:]}"
    assert marker.exists(), f"'{moment}' never came"
    time.sleep(0.05)                      # (the marker is written; the pause has begun)
    return proc


def _rerun_equals_clean(tiny, out: Path, cohort, clean) -> None:
    rerun = Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out, batch_size=4)).run(
        slides=cohort)
    assert {o.sample_id: o.status for o in rerun.outcomes}.keys() == set(IDS)
    assert all(o.status in ("success", "skipped") for o in rerun.outcomes), [o.error for o in rerun.outcomes]
    assert set(open_embeddings(out)["tiles"].children) == set(IDS)
    for sid in IDS:
        a = xr.open_zarr(rerun.store_path, group=f"tiles/{sid}")
        b = xr.open_zarr(clean.store_path, group=f"tiles/{sid}")
        assert a.sizes == b.sizes
        np.testing.assert_array_equal(a.x.values, b.x.values)
        np.testing.assert_array_equal(a.y.values, b.y.values)
        np.testing.assert_allclose(a.embedding.values, b.embedding.values, atol=1e-5)
    assert not (out / ".slide2vec-work").exists() and not (out / LOCK_NAME).exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert open_embeddings(out).attrs["run"]["encoder"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_the_whole_process_group_killed(moment, tiny, cohort, clean, vit_tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    proc = _run_until(moment, out, cohort, vit_tiny_checkpoint, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Mid-run the store already opens, with only finished slides in it.
    if (out / "embeddings.zarr" / "zarr.json").exists():
        assert set(open_embeddings(out)["tiles"].children) <= set(IDS)
    _rerun_equals_clean(tiny, out, cohort, clean)


@pytest.mark.parametrize("moment", ["a block staged", "one slide published, staging not yet removed"])
def test_only_the_client_killed_while_its_cluster_goes_on(moment, tiny, cohort, clean, vit_tiny_checkpoint,
                                                          tmp_path):
    from distributed import LocalCluster

    out = tmp_path / "run"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        # The pause lives in the client process, so patch what runs there: the driver's handlers.
        target = {"a block staged": "slide2vec_dask.dataflow.driver:Driver._on_block",
                  "one slide published, staging not yet removed":
                      "slide2vec_dask.dataflow.driver:Driver._on_finalize"}[moment]
        MOMENTS[f"client: {moment}"] = (target, "'s1'")
        try:
            proc = _run_until(f"client: {moment}", out, cohort, vit_tiny_checkpoint, tmp_path,
                              address=cluster.scheduler_address)
        finally:
            del MOMENTS[f"client: {moment}"]
        proc.send_signal(signal.SIGKILL)    # the client alone; the scheduler drops its tasks
        proc.wait()
        _rerun_equals_clean(tiny, out, cohort, clean)


def test_an_orphaned_task_of_a_killed_run_never_touches_the_next_runs_blocks(tmp_path):
    """What the client-kill tests caught once in CI: the killed run's tasks, still running on its
    cluster, re-planned or finalised a slide and removed the resumed run's staged blocks."""
    from slide2vec_dask.store import EmbeddingStore

    killed, resumed = EmbeddingStore(tmp_path, run="killed"), EmbeddingStore(tmp_path, run="resumed")
    resumed.prepare_slide("s0")
    resumed.write_block("s0", (0, 0), np.ones((2, 2, 3), dtype=np.float32))
    killed.prepare_slide("s0")              # an orphaned plan task
    killed.discard_staging("s0")            # an orphaned finalisation's tidy-up
    assert resumed.write_block("s0", (0, 1), np.ones((2, 2, 3), dtype=np.float32)) == 4
    staged = sorted(p.name for p in (tmp_path / ".slide2vec-work" / "staging" / "resumed" / "s0").iterdir())
    assert staged == ["0-0.npy", "0-1.npy"]


def test_killed_while_writing_a_tile_archive(tiny, cohort, vit_tiny_checkpoint, tmp_path):
    """on_the_fly=False: killed with a slide's archive half written; the rerun writes it whole, and
    every archive and embedding equals a clean run's, with no temporary left."""
    import tarfile

    config = PreprocessingConfig(**EXACT, on_the_fly=False)
    clean = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "clean", batch_size=4)).run(slides=cohort)
    out = tmp_path / "run"
    MOMENTS["archive being written"] = ("slide2vec_dask.store.embedding_store:EmbeddingStore._staged_tiles", "'s1'")
    try:
        proc = _run_until("archive being written", out, cohort, vit_tiny_checkpoint, tmp_path, on_the_fly=False)
    finally:
        del MOMENTS["archive being written"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "tiles" / "s1.tiles.tar").exists(), "a half-written archive is never in place"
    rerun = Pipeline(tiny, config, ExecutionOptions(output_dir=out, batch_size=4)).run(slides=cohort)
    assert all(o.status in ("success", "skipped") for o in rerun.outcomes), [o.error for o in rerun.outcomes]
    for sid in IDS:
        with tarfile.open(out / "tiles" / f"{sid}.tiles.tar") as a, \
                tarfile.open(tmp_path / "clean" / "tiles" / f"{sid}.tiles.tar") as b:
            assert a.getnames() == b.getnames()
            assert all(a.extractfile(n).read() == b.extractfile(n).read() for n in a.getnames())
        x = xr.open_zarr(rerun.store_path, group=f"tiles/{sid}")
        y = xr.open_zarr(clean.store_path, group=f"tiles/{sid}")
        np.testing.assert_allclose(x.embedding.values, y.embedding.values, atol=1e-5)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
