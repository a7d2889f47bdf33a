"""The cohort stream: stages overlap across slides, and a worker lost mid-stage loses nothing.

Workers are real processes of a real `LocalCluster`; a worker is SIGKILLed
at a chosen moment inside a stage (a one-shot pause patched into the worker
processes tells the test where it is).  Its Nanny restarts it without the
pause, Dask reruns the lost task, and the run must end with every slide
``success`` and a store equal to a clean run's.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.testing import checkpoints as ck
from test_aggregation import stand_in

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}


@pytest.fixture(scope="module")
def titan(tmp_path_factory):
    ckpt = ck.titan_checkpoint(tmp_path_factory.mktemp("titan") / "model.safetensors")
    return Model.from_preset("titan", checkpoint_path=ckpt, tile_encoder=stand_in("titan"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    rects = [[(0, 0, 1344, 1344)], [(448, 0, 1344, 1792)], [(0, 448, 896, 1792)]]
    return [{"sample_id": f"s{i}", "image_path": testing.write_svs(
        folder / f"s{i}.svs", testing.tissue_image(1344, 1792, r, seed=10 + i), downsamples=(1, 4))}
        for i, r in enumerate(rects)]


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            Client(c, set_as_default=False) as client:
        yield client


def _install_pause(method: str, when: str, marker: str, seconds: float = 60.0) -> None:
    """Worker side: the first call of ``EmbeddingStore.<method>`` matching ``when`` in any worker
    creates ``marker`` (holding its pid) and sleeps, so the test can kill it right there."""
    from slide2vec_dask.store.embedding_store import EmbeddingStore

    original = getattr(EmbeddingStore, method)

    def paused(self, *args, **kwargs):
        if when in repr(args):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass                         # one pause per test, whichever worker gets there
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(seconds)
        return original(self, *args, **kwargs)

    setattr(EmbeddingStore, method, paused)


def _kill_when_paused(marker: Path, deadline: float) -> None:
    while not (marker.exists() and marker.read_text()):
        assert time.time() < deadline, "the chosen moment never came"
        time.sleep(0.02)
    os.kill(int(marker.read_text()), signal.SIGKILL)


def _compare(run, clean, ids, tiles: bool) -> None:
    assert {o.sample_id: o.status for o in run.outcomes} == {s: "success" for s in ids}
    a, b = xr.open_zarr(run.store_path, group="slides"), xr.open_zarr(clean.store_path, group="slides")
    assert list(a.sample_id.values) == list(b.sample_id.values) == ids
    np.testing.assert_array_equal(a.embedding.values, b.embedding.values)
    for sid in ids:
        if tiles:
            ta = xr.open_zarr(run.store_path, group=f"tiles/{sid}")
            tb = xr.open_zarr(clean.store_path, group=f"tiles/{sid}")
            np.testing.assert_array_equal(ta.x.values, tb.x.values)
            np.testing.assert_array_equal(ta.embedding.values, tb.embedding.values)
        else:
            assert not (run.store_path / "tiles" / sid).exists()


# (stage, patched method, argument that picks the moment, keep tile embeddings)
MOMENTS = {
    "finalize, before publishing": ("_publish", "tiles/s1", True),
    "finalize, published, staging not yet removed": ("discard_staging", "'s1'", True),
    "slide task, before its row is written": ("write_row", "'s1'", False),
    "slide task, row written, tiles not yet dropped": ("drop_tiles", "'s1'", False),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_worker_killed_mid_stage_loses_nothing(moment, titan, cohort, cluster, tmp_path):
    method, when, keep_tiles = MOMENTS[moment]
    ids = [s["sample_id"] for s in cohort]
    execution = ExecutionOptions(output_dir=tmp_path / "clean", save_tile_embeddings=keep_tiles)
    clean = Pipeline(titan, PreprocessingConfig(**EXACT), execution, client=cluster).run(slides=cohort)

    marker = tmp_path / "paused"
    cluster.run(_install_pause, method, when, str(marker))
    import threading

    killer = threading.Thread(target=_kill_when_paused, args=(marker, time.time() + 120), daemon=True)
    killer.start()
    run = Pipeline(titan, PreprocessingConfig(**EXACT), execution.replace(output_dir=tmp_path / "run"),
                   client=cluster).run(slides=cohort)
    killer.join(5)
    assert marker.exists() and not killer.is_alive(), "no worker was killed"
    cluster.wait_for_workers(2, timeout=60)
    _compare(run, clean, ids, keep_tiles)
    assert not (tmp_path / "run" / ".slide2vec-work").exists()


def test_the_first_slide_embedding_lands_before_the_last_tiles(titan, cohort, tmp_path):
    """No stage barrier: a slide's slide embedding is written while other slides' tiles are still embedding."""
    from slide2vec_dask import activate_progress_reporter

    class Clock:
        last = 0.0

        def start(self, total, description):
            pass

        def advance(self, n):
            Clock.last = time.time()

        def close(self):
            pass

    slides = [{**s, "sample_id": f"{s['sample_id']}-{i}"} for i in range(3) for s in cohort]
    activate_progress_reporter(Clock())
    try:
        run = Pipeline(titan, PreprocessingConfig(**EXACT, use_supertiles=False),   # one tile per block
                       ExecutionOptions(output_dir=tmp_path / "run", save_tile_embeddings=True)).run(slides=slides)
    finally:
        activate_progress_reporter(None)
    assert run.num_failed == 0
    rows = Path(run.store_path) / "_slides"
    first_row = min((rows / s["sample_id"] / "embedding" / "zarr.json").stat().st_mtime for s in slides)
    assert first_row < Clock.last, "every tile was embedded before the first slide embedding was written"
