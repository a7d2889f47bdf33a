"""Telemetry and the run report (issue 25), on CPU with a fake NVML module (``tests/fake_nvml``).

The fake GPU is scripted: a constant utilisation, or "busy exactly while the
encoder's forward pass runs" (``follow``), so the report's figures can be
checked against what the script said.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.dataflow import tasks
from slide2vec_dask.progress import TextReporter
from slide2vec_dask.results import SlideOutcome
from slide2vec_dask.telemetry import nvml
from slide2vec_dask.telemetry.clock import BlockTiming
from slide2vec_dask.telemetry.report import RunTelemetry, summary_lines

from conftest import REPO, SYN_RECTS, SYN_SHAPE

FAKE = REPO / "tests" / "fake_nvml"
ONE_TILE_BLOCKS = dict(use_supertiles=False)   # one tile per block: many blocks from a small slide


@pytest.fixture
def fake_nvml(monkeypatch):
    """The fake ``pynvml`` importable in this process (and, through PYTHONPATH, in worker processes)."""
    monkeypatch.syspath_prepend(str(FAKE))
    # worker processes import the fake, and this module (its encoder travels by reference)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE), str(REPO / "tests"), str(REPO),
                                                                   os.environ.get("PYTHONPATH")])))
    # distributed has NVML diagnostics of its own (the dashboard's GPU page): kept off the fake
    monkeypatch.setenv("DASK_DISTRIBUTED__DIAGNOSTICS__NVML", "False")
    sys.modules.pop("pynvml", None)
    import dask
    import pynvml

    nvml.stop_sampler()
    with dask.config.set({"distributed.diagnostics.nvml": False}):
        yield pynvml
    pynvml.SCRIPT = None
    nvml.stop_sampler()
    sys.modules.pop("pynvml", None)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("telemetry-slides")
    image = testing.tissue_image(*SYN_SHAPE, SYN_RECTS, seed=1)
    path = testing.write_svs(folder / "s.svs", image[:1792, :2240], mpp=0.5, downsamples=(1, 4), quality=90)
    return [{"image_path": str(path), "sample_id": f"s{i}"} for i in range(3)]


class Encoder(torch.nn.Module):
    """Mean RGB; raises the fake GPU's busy flag for ``seconds`` per batch (a GPU doing work)."""

    def __init__(self, seconds: float = 0.0):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        busy = sys.modules.get("pynvml")
        flag = getattr(busy, "BUSY", [0])
        flag[0] += 1
        try:
            if self.seconds:
                time.sleep(self.seconds)
            return x.mean(dim=(2, 3))
        finally:
            flag[0] -= 1


def model(seconds: float = 0.0) -> Model:
    return Model.from_module(Encoder(seconds), name=f"mean-rgb-{seconds}", feature_dim=3, spacing_um=0.5,
                             tile_size_px=224)


def outcome(sid: str, tiles: int = 10, plan: float = 0.1, embed: float = 1.0, status: str = "success"):
    o = SlideOutcome(sid, f"/x/{sid}.svs", num_tiles=tiles, plan_seconds=plan, embed_seconds=embed)
    o.status = status
    return o


def timing(start: float, end: float, *, tiles: int = 10, host: str = "h", device: str = "cuda:0",
           uuid: str = "GPU-a", read: float = 0.0, forward: float = 0.0) -> BlockTiming:
    return BlockTiming(host=host, pid=1, start=start, end=end, device=device, gpu_uuid=uuid, device_start=start,
                       device_end=end, tiles=tiles, seconds={"read": read, "forward": forward})


# -- the aggregator, exactly ---------------------------------------------------------------------
def test_the_report_aggregates_samples_and_blocks_exactly():
    tel = RunTelemetry(run_id="r1", entry="test", settings={"batch_size": 32})
    t0 = tel.started
    tel.gpu_info["h/GPU-a"] = {"key": "h/GPU-a", "host": "h", "index": 0, "uuid": "GPU-a", "name": "Fake"}
    # blocks on the GPU from t0+2 to t0+8; samples every 0.5 s from t0+0.5 to t0+10
    tel.block("s0", timing(t0 + 2, t0 + 5, read=1.0, forward=2.0), submitted=t0 + 1.5)
    tel.block("s1", timing(t0 + 5, t0 + 8, read=3.0, forward=2.5))
    times = t0 + 0.25 + 0.5 * np.arange(20)   # mid-bin: t0 + 0.25 ... t0 + 9.75
    utils = np.where(times < t0 + 2, 0, np.where(times <= t0 + 8, 80, 10))
    tel.samples([(t, "h/GPU-a", float(u), 10.0, 2048.0, 250.0) for t, u in zip(times, utils)])
    tel.finished = t0 + 10
    r = tel.report([outcome("s0", 10), outcome("s1", 10, plan=0.2, embed=3.0)])
    g = r["gpu"]
    assert g["source"] == "nvml" and g["count"] == 1
    assert g["busy_pct"] == {"mean": 80.0, "p10": 80.0, "p50": 80.0}   # between the first and last block
    # idle: 4 samples x 0.5 s x 100 % before t0+2; 12 x 0.5 x 20 % inside; 4 x 0.5 x 90 % after
    # ... and the encoder ran all along between them: none of that idle is for want of blocks
    assert g["idle_s"] == {"before_first_block": 2.0, "between_blocks": 1.2, "starved": 0.0, "tail": 1.8}
    assert g["gpus"][0]["memory_used_max_mb"] == 2048.0 and g["gpus"][0]["power_mean_w"] == 250.0
    assert r["tiles"]["embedded_this_run"] == 20 and r["tiles"]["blocks"] == 2
    assert r["time"]["read_s"] == 4.0 and r["time"]["forward_s"] == 4.5 and r["time"]["queue_s"] == 0.5
    assert r["slides"] == {"total": 2, "succeeded": 2, "failed": 0, "skipped": 0, "unfinished": 0}
    assert r["slowest_slides"][0]["sample_id"] == "s1" and "reading" in r["slowest_slides"][0]["why"]
    assert not r["starved"]["starved"] and r["starved"]["starved_pct"] == 0.0
    assert r["per_slide"][1]["read_s"] == 3.0 and r["per_slide"][1]["blocks"] == 1
    lines = summary_lines(r)
    assert lines[0].startswith("run r1 on h, ") and "(1 GPU)" in lines[0] and "GPU busy 80% mean (p10 80%, p50 80%)" in lines[1]


def test_a_gap_between_blocks_is_starved_time_and_names_the_stage():
    tel = RunTelemetry(run_id="r2", entry="test")
    t0 = tel.started
    tel.gpu_info["h/GPU-a"] = {"key": "h/GPU-a", "host": "h", "index": 0, "uuid": "GPU-a", "name": "Fake"}
    tel.block("s0", timing(t0 + 1, t0 + 2, read=4.0, forward=1.0))
    tel.block("s0", timing(t0 + 5, t0 + 6, read=4.0, forward=1.0))   # 3 s with no block between them
    times = t0 + 0.25 + 0.5 * np.arange(13)
    busy = ((times > t0 + 1) & (times <= t0 + 2)) | ((times > t0 + 5) & (times <= t0 + 6))
    tel.samples([(t, "h/GPU-a", 100.0 if b else 0.0, 0.0, None, None) for t, b in zip(times, busy)])
    tel.finished = t0 + 6.5
    r = tel.report([outcome("s0", 20)])
    idle = r["gpu"]["idle_s"]
    assert idle["starved"] == pytest.approx(3.0, abs=0.01) and idle["between_blocks"] == pytest.approx(3.0, abs=0.01)
    s = r["starved"]
    assert s["starved"] and s["stage"] == "read" and s["starved_pct"] == pytest.approx(60.0, abs=0.5)
    assert "gpu_decode" in s["message"] and "num_workers" in s["message"]
    assert any(line.startswith("GPU STARVED") for line in summary_lines(r))


def test_without_nvml_cuda_blocks_give_a_device_thread_estimate():
    tel = RunTelemetry(run_id="r3", entry="test")
    t0 = tel.started
    tel.block("s0", timing(t0 + 1, t0 + 2, uuid=""))
    tel.block("s0", timing(t0 + 3, t0 + 4, uuid=""))
    tel.finished = t0 + 5
    g = tel.report([outcome("s0")])["gpu"]
    assert g["source"].startswith("device thread") and g["count"] == 1
    assert g["busy_pct"]["mean"] == pytest.approx(2 / 3 * 100, abs=12)   # 2 s of 3 (0.5 s bins)
    assert g["idle_s"]["before_first_block"] == pytest.approx(1.0, abs=0.01)
    assert g["idle_s"]["tail"] == pytest.approx(1.0, abs=0.01)


def test_a_cpu_only_run_has_no_gpu_section():
    tel = RunTelemetry(run_id="r4", entry="test")
    tel.block("s0", timing(tel.started, tel.started + 1, device="cpu", uuid=""))
    r = tel.report([outcome("s0")])
    assert r["gpu"] is None and r["starved"] == {"starved": False, "message": "no GPU in this run"}
    assert "no GPU" in summary_lines(r)[0]


def test_the_report_does_not_grow_with_the_cohort_beyond_its_per_slide_table():
    def report(n: int) -> dict:
        tel = RunTelemetry(run_id="r5", entry="test")
        t0 = tel.started
        tel.gpu_info["h/GPU-a"] = {"key": "h/GPU-a", "host": "h", "index": 0, "uuid": "GPU-a", "name": "Fake"}
        for i in range(n):
            tel.block(f"s{i}", timing(t0 + i * 0.01, t0 + i * 0.01 + 0.005, read=0.01, forward=0.005))
        tel.samples([(t0 + 0.5 * k, "h/GPU-a", 50.0, 1.0, 100.0, 100.0) for k in range(1, 2 * int(n * 0.01) + 2)])
        tel.finished = t0 + n * 0.01
        return tel.report([outcome(f"s{i}", 10, embed=0.005 + (i % 7) * 0.001) for i in range(n)])

    small, big = report(100), report(10_000)
    assert len(big["per_slide"]) == 10_000 and len(big["slowest_slides"]) == 5

    def without_table(r):
        return len(json.dumps({k: v for k, v in r.items() if k != "per_slide"}))

    # everything but the per-slide table: the same size, give or take digits and the verdict's words
    # (100x the slides, under 1 KB more: not a byte per slide)
    assert abs(without_table(big) - without_table(small)) < 1000
    per_row = len(json.dumps(big["per_slide"])) / 10_000
    assert per_row < 300


def test_the_progress_line_shows_gpu_utilisation():
    import io

    stream = io.StringIO()
    rep = TextReporter(stream, min_interval=0)
    rep.start(100, "2 slides")
    rep.advance(10)
    assert "GPU" not in stream.getvalue()
    rep.gpu(87.4)
    rep.advance(10)
    assert stream.getvalue().rstrip().endswith("| GPU 87%")
    rep.close()


class Recorder:
    """A progress reporter that keeps what the driver told it about the GPU."""

    def __init__(self):
        self.gpu_values = []

    def start(self, total, description):
        pass

    def advance(self, n):
        pass

    def gpu(self, busy):
        self.gpu_values.append(busy)

    def close(self):
        pass


@pytest.fixture
def recorder():
    from slide2vec_dask import activate_progress_reporter

    rec = Recorder()
    activate_progress_reporter(rec)
    yield rec
    activate_progress_reporter(None)


def _cluster(processes: bool):
    from distributed import Client, LocalCluster

    where = {"host": "127.0.0.1"} if processes else {}   # (in-process: the inproc transport, no socket)
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=processes, dashboard_address="127.0.0.1:0",
                           **where)
    return cluster, Client(cluster, set_as_default=False)


def test_a_cluster_with_a_scripted_gpu_reports_its_utilisation(fake_nvml, slides, tmp_path, monkeypatch, recorder):
    """Worker processes (the plugin starts their samplers) of a real LocalCluster, a GPU at a constant 40 %."""
    monkeypatch.setenv("FAKE_NVML_SCRIPT", json.dumps({"devices": 1, "util": 40, "mem_mb": 3000, "power_w": 200}))
    cluster, client = _cluster(processes=True)
    try:
        result = Pipeline(model(0.01), PreprocessingConfig(**ONE_TILE_BLOCKS),
                          ExecutionOptions(output_dir=tmp_path, save_telemetry=True), client=client).run(slides=slides)
    finally:
        client.close()
        cluster.close()
    r = result.report
    assert r == json.loads((tmp_path / "run_report.json").read_text()) and result.report_path == tmp_path / "run_report.json"
    assert r["status"] == "complete" and r["run_id"] and r["settings_hash"]
    assert r["slides"] == {"total": 3, "succeeded": 3, "failed": 0, "skipped": 0, "unfinished": 0}
    tiles = sum(o.num_tiles for o in result.outcomes)
    assert tiles > 0 and r["tiles"]["total"] == r["tiles"]["embedded_this_run"] == tiles == r["tiles"]["blocks"]
    g = r["gpu"]
    assert g["source"] == "nvml" and g["count"] == 1 and g["gpus"][0]["name"] == "Fake H200"
    assert g["busy_pct"] == {"mean": 40.0, "p10": 40.0, "p50": 40.0}
    assert g["gpus"][0]["memory_used_max_mb"] == 3000.0 and g["gpus"][0]["power_mean_w"] == 200.0
    idle = sum(g["idle_s"][k] for k in ("before_first_block", "between_blocks", "tail"))
    assert idle == pytest.approx(0.6 * g["gpus"][0]["samples"] * g["interval_s"], rel=0.2)   # 60 % idle all along
    assert r["time"]["read_s"] > 0 and r["time"]["forward_s"] > 0 and r["time"]["write_s"] > 0
    assert recorder.gpu_values and set(v for v in recorder.gpu_values if v is not None) == {40.0}
    rows = [json.loads(line) for line in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    blocks, samples = [r for r in rows if r["kind"] == "block"], [r for r in rows if r["kind"] == "gpu"]
    assert len(blocks) == r["tiles"]["blocks"] and {b["sample_id"] for b in blocks} == {"s0", "s1", "s2"}
    assert all(b["seconds"]["read"] > 0 and b["tiles"] == 1 for b in blocks)
    assert len(samples) == g["gpus"][0]["samples"] and {s["util"] for s in samples} == {40}
    md = (tmp_path / "run_report.md").read_text()
    assert "GPU busy 40% mean (p10 40%, p50 40%)" in md and r["run_id"] in md


def _starving_run(fake_nvml, slides, tmp_path, monkeypatch, read_s: float, forward_s: float) -> dict:
    """One-tile blocks on an in-process LocalCluster of 2 threads; the fake GPU busy while the encoder runs."""
    fake_nvml.SCRIPT = {"devices": 1, "follow": True}
    nvml.start_sampler(0.05)   # (in-process worker: this process's sampler, sampling fast for a short run)
    original = tasks.read_block

    def slow_read(*args):
        time.sleep(read_s)
        return original(*args)

    monkeypatch.setattr(tasks, "read_block", slow_read)
    cluster, client = _cluster(processes=False)
    try:
        return Pipeline(model(forward_s), PreprocessingConfig(**ONE_TILE_BLOCKS),
                        ExecutionOptions(output_dir=tmp_path), client=client).run(slides=slides).report
    finally:
        client.close()
        cluster.close()


def test_a_slow_reader_shows_up_as_starved_time_between_blocks(fake_nvml, slides, tmp_path, monkeypatch):
    # 2 threads each reading a block in 0.4 s feed the encoder one block per 0.2 s; it needs 0.01 s
    # (plus its host overhead: tens of ms on a loaded 2-core machine)
    r = _starving_run(fake_nvml, slides[:1], tmp_path, monkeypatch, read_s=0.4, forward_s=0.01)
    g, s = r["gpu"], r["starved"]
    assert g["idle_s"]["starved"] > 0.4 * g["had_work_s"], g
    assert g["idle_s"]["between_blocks"] >= g["idle_s"]["starved"] > g["idle_s"]["tail"]
    assert s["starved"] and s["stage"] == "read" and s["starved_pct"] > 40, s
    assert "read" in s["message"] and "gpu_decode" in s["message"]
    assert any(line.startswith("GPU STARVED") for line in summary_lines(r))


def test_a_fed_gpu_is_not_called_starved(fake_nvml, slides, tmp_path, monkeypatch):
    r = _starving_run(fake_nvml, slides[:2], tmp_path, monkeypatch, read_s=0.0, forward_s=0.08)
    g, s = r["gpu"], r["starved"]
    assert g["busy_pct"]["p50"] == 100.0, g
    assert not s["starved"] and s["starved_pct"] < 10, (s, g)


RUN_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(float(sys.argv[3]))
            return x.mean(dim=(2, 3))

    model = Model.from_module(Slow(), name="slow-mean", feature_dim=3, spacing_um=0.5, tile_size_px=224)
    slides = json.loads(sys.argv[2])
    result = Pipeline(model, PreprocessingConfig(), ExecutionOptions(output_dir=sys.argv[1], num_workers=1)).run(
        slides=slides)
    print(result.report["run_id"])
""")


@pytest.mark.slow   # (a process killed mid-run, then rerun)
def test_a_killed_run_rerun_reports_the_rerun(slides, tmp_path):
    """A run killed mid-way leaves a report saying it was running; the rerun's report is its own."""
    import csv

    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    out = tmp_path / "out"
    cohort = [{"image_path": s["image_path"], "sample_id": f"k{i}"} for i, s in enumerate(slides * 2)]   # 6 slides
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(out), json.dumps(cohort), "1.0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with (out / "process_list.csv").open() as f:
                    done = [r["sample_id"] for r in csv.DictReader(f) if r["status"] == "success"]
            except (OSError, KeyError):
                done = []
            if len(done) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(done) >= 2, "the first run finished or stalled before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # (the process list and report are rewritten at most every few seconds: the store says what landed)
    landed = {p.name for p in (out / "embeddings.zarr" / "tiles").iterdir() if (p / "zarr.json").exists()}
    assert len(landed) < 6, "the first run finished before it was killed"
    killed = json.loads((out / "run_report.json").read_text())
    assert killed["status"] == "running" and killed["slides"]["total"] == 6
    assert killed["slides"]["unfinished"] >= 1

    rerun = subprocess.run([sys.executable, str(script), str(out), json.dumps(cohort), "0"], env=env,
                           capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["status"] == "complete" and report["run_id"] == rerun.stdout.split()[-1] != killed["run_id"]
    s = report["slides"]
    assert s["total"] == 6 and s["failed"] == 0 and s["skipped"] == len(landed) >= len(done)
    assert s["succeeded"] == 6 - len(landed)
    ran = {r["sample_id"] for r in report["per_slide"] if r["status"] == "success"}
    assert report["tiles"]["embedded_this_run"] == sum(r["tiles"] for r in report["per_slide"] if r["sample_id"] in ran)
    assert f"# Run {report['run_id']} (complete)" in (out / "run_report.md").read_text()


def test_embed_slide_keeps_its_report_and_writes_it_into_output_dir(slides, tmp_path):
    m = model()
    result = m.embed_slide(slides[0]["image_path"], execution=ExecutionOptions(output_dir=tmp_path))
    r = m.last_run_report
    assert r == json.loads((tmp_path / "run_report.json").read_text())
    assert r["entry"] == "tile-level embed_*" and r["status"] == "complete" and r["gpu"] is None
    assert r["slides"]["succeeded"] == 1 and r["tiles"]["total"] == r["tiles"]["embedded_this_run"] == result.num_tiles
    assert r["time"]["read_s"] > 0 and r["time"]["forward_s"] > 0 and r["per_slide"][0]["blocks"] >= 1
