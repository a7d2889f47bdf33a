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


@pytest.mark.slow
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


def _mean_rgb() -> Model:
    import torch

    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                             name="mean-rgb", feature_dim=3)


class _Cohort:
    """A reporter with the cohort line: what was planned when the first tile landed, and every tile."""

    def __init__(self):
        self.planned = self.total = 0
        self.at_first_tile = None
        self.tiles = 0

    def start(self, total, description):
        self.description = description

    def cohort(self, *, slides_total, slides_planned, slides_done, slides_failed, tiles_total):
        self.planned, self.total = slides_planned, slides_total

    def advance(self, n):
        if self.at_first_tile is None:
            self.at_first_tile = self.planned
        self.tiles += n

    def close(self):
        pass


def test_embed_slides_streams_a_cohort_as_the_pipeline_does(cohort, tmp_path):
    """The in-memory API plans just ahead of the blocks: the first tiles land while most of a
    cohort is still unplanned, and the results are those of `Pipeline.run` on the same slides."""
    from slide2vec_dask import activate_progress_reporter, open_embeddings

    slides = [{**s, "sample_id": f"{s['sample_id']}-{i}"} for i in range(4) for s in cohort]   # 12 slides
    model = _mean_rgb()
    config = PreprocessingConfig(**EXACT)
    reporter = _Cohort()
    activate_progress_reporter(reporter)
    try:
        embedded = model.embed_slides(slides, preprocessing=config,
                                      execution=ExecutionOptions(num_workers=1, prefetch_factor=1))
    finally:
        activate_progress_reporter(None)
    assert reporter.description == "12 slides" and reporter.total == 12
    # a window of 2 blocks (1 thread + the encoder's, prefetch 1): planning stays a few slides ahead
    assert reporter.at_first_tile is not None and reporter.at_first_tile <= 4, \
        f"{reporter.at_first_tile} of 12 slides were planned before the first tile landed"
    assert reporter.tiles == sum(e.num_tiles for e in embedded) > 0
    assert [e.sample_id for e in embedded] == [s["sample_id"] for s in slides]
    run = Pipeline(model, config, ExecutionOptions(output_dir=tmp_path / "run")).run(slides=slides)
    assert run.num_failed == 0
    store = open_embeddings(tmp_path / "run")
    for e in embedded:
        stored = store["tiles"][e.sample_id].to_dataset()
        np.testing.assert_array_equal(stored["x"].values, e.x)
        np.testing.assert_allclose(stored["embedding"].values, e.tile_embeddings.numpy(), atol=1e-6)


def test_a_failing_slide_stops_embed_slides_with_its_own_error(cohort, tmp_path):
    """The memory sink raises the first failure, naming the slide; nothing is left running."""
    import threading

    model = _mean_rgb()
    slides = [*cohort, {"sample_id": "gone", "image_path": tmp_path / "gone.svs"}, *cohort[:1]]
    slides[-1] = {**slides[-1], "sample_id": "again"}
    with pytest.raises(FileNotFoundError, match="gone.svs"):
        model.embed_slides(slides, preprocessing=PreprocessingConfig(**EXACT))
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("slide2vec-block")]
