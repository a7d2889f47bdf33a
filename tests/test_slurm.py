"""The pipeline on a real SLURM through dask-jobqueue (tests/slurm/start-slurm.sh starts one).

Two worker jobs: a fake-GPU job (``--gres=gpu:1``, worker ``--resources
GPU=1``) and a CPU-only job.  Embedding must run only on the GPU worker; the
store must equal a run on a LocalCluster; a worker job cancelled with
``scancel`` mid-run must not lose the run, and a new job replaces it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, testing

pytestmark = pytest.mark.slurm

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A started SLURMCluster (1 fake-GPU job + 1 CPU job) and its client."""
    if not _slurm_up():
        pytest.skip("no SLURM running here (tests/slurm/start-slurm.sh starts one)")
    pytest.importorskip("dask_jobqueue")
    from distributed import Client

    from slide2vec_dask.clusters import slurm_cluster

    logs = tmp_path_factory.mktemp("slurm-logs")
    # A lost job is forgotten (then replaced) after 3 s instead of 15: the kill tests wait less.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "3s"}):
        cluster = slurm_cluster(gpu_jobs=1, cpu_jobs=1, cores=1, memory="3GB", walltime="00:30:00",
                                local_directory=str(logs), log_directory=str(logs),
                                scheduler_options={"dashboard_address": ":0"})
        client = Client(cluster, set_as_default=False)
        try:
            client.wait_for_workers(2, timeout=120)
            yield cluster, client
        finally:
            client.close()
            cluster.close()


@pytest.fixture(scope="module")
def local():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as c:
        with Client(c, set_as_default=False) as client:
            yield client


def _workers(client) -> dict[str, dict]:
    return client.scheduler_info(n_workers=-1)["workers"]


def _embedding(run, sample_id) -> np.ndarray:
    return xr.open_zarr(run.store_path, group=f"tiles/{sample_id}")["embedding"].values


@pytest.mark.parametrize("options, message", [
    ({"adapt": (3, 1)}, "adapt must be"),
    ({"gpu_jobs": -1}, "must be >= 0"),
    ({"processes": 2}, "one worker process per job"),
    ({"walltime": "00:00:00"}, "too short"),
])
def test_bad_cluster_options_are_refused_before_any_job(options, message):
    pytest.importorskip("dask_jobqueue")
    from slide2vec_dask.clusters import slurm_cluster

    with pytest.raises(ValueError, match=message):
        slurm_cluster(**options)


def test_lifetime_leaves_a_margin_before_the_walltime():
    from slide2vec_dask.clusters.slurm import lifetime_for, walltime_seconds

    assert walltime_seconds("1-02:03:04") == 93784 and walltime_seconds("30:00") == 1800
    assert lifetime_for("04:00:00") == ("12960s", "300s")   # 10 % margin; stagger capped at 5 min
    assert lifetime_for("00:10:00") == ("480s", "48s")      # margin at least 2 min
    with pytest.raises(ValueError, match="HH:MM:SS"):
        walltime_seconds("1:2:3:4")


def test_cli_runs_on_slurm(tmp_path, syn_svs, vit_tiny_checkpoint):
    """`slide2vec-dask run CONFIG --cluster slurm`: the cluster section's options start the jobs.

    First in this module: the one-node SLURM has room for these jobs only before the
    module's own cluster takes its CPUs.
    """
    import subprocess
    import sys

    import yaml

    if not _slurm_up():
        pytest.skip("no SLURM running here (tests/slurm/start-slurm.sh starts one)")
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"sample_id,image_path\nsyn,{syn_svs}\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "manifest": str(manifest),
        "model": {"timm": "vit_tiny_patch16_224", "checkpoint_path": str(vit_tiny_checkpoint)},
        "preprocessing": EXACT, "execution": {"output_dir": str(tmp_path / "out")},
        "cluster": {"wait_for_workers": 1, "slurm": {"gpu_jobs": 1, "cores": 1, "memory": "3GB",
                                                       "walltime": "00:20:00", "log_directory": str(tmp_path)}}}))
    result = subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", "run", str(config), "--cluster", "slurm"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 succeeded, 0 skipped, 0 failed" in result.stdout
    # The worker ran as a SLURM job: its log is in the log directory.
    assert list(tmp_path.glob("*.err")) or list(tmp_path.glob("*.out"))
    embedding = xr.open_zarr(tmp_path / "out" / "embeddings.zarr", group="tiles/syn")["embedding"]
    assert embedding.shape == (40, 192)


def test_slurm_example_runs_as_written(tmp_path, vit_tiny_checkpoint):
    """examples/slurm_hpc.py on the local SLURM (lunit with random weights in its official layout)."""
    import subprocess
    import sys

    import timm
    import torch
    from safetensors.torch import save_file

    if not _slurm_up():
        pytest.skip("no SLURM running here (tests/slurm/start-slurm.sh starts one)")
    torch.manual_seed(0)
    lunit = timm.create_model("vit_small_patch8_224", num_classes=0)
    weights = tmp_path / "lunit.safetensors"
    save_file({k: v.contiguous() for k, v in lunit.state_dict().items()}, str(weights))
    small = testing.write_svs(tmp_path / "small.svs",
                              testing.tissue_image(896, 1120, [(224, 224, 672, 896)], seed=3), downsamples=(1, 4))
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"sample_id,image_path\nsmall,{small}\n")
    example = Path(__file__).resolve().parents[1] / "examples" / "slurm_hpc.py"
    result = subprocess.run([sys.executable, str(example), "--manifest", str(manifest), "--output-dir",
                             str(tmp_path / "out"), "--checkpoint", str(weights), "--gpu-jobs", "1", "--cores", "1",
                             "--memory", "3GB", "--walltime", "00:20:00", "--log-directory", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "#SBATCH --gres=gpu:1" in result.stdout and "0 failed" in result.stdout
    embedding = xr.open_zarr(tmp_path / "out" / "embeddings.zarr", group="tiles/small")["embedding"]
    assert embedding.shape[0] >= 6 and embedding.shape[1] == 384 and np.isfinite(embedding.values).all()


def test_job_script_asks_slurm_for_gpus_and_declares_them(slurm):
    cluster, _ = slurm
    script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    # 30 min walltime: retire after 27 min (10 % margin), staggered by at most half the margin.
    assert "--lifetime 1620s --lifetime-stagger 90s" in script


def test_pipeline_on_slurm_embeds_only_on_the_gpu_worker(slurm, local, tiny, syn_svs, tmp_path):
    from distributed import get_task_stream

    cluster, client = slurm
    small = testing.write_svs(tmp_path / "small.svs",
                              testing.tissue_image(1344, 1792, [(224, 224, 1120, 1344)], seed=3), downsamples=(1, 4))
    slides = [{"sample_id": "syn", "image_path": str(syn_svs)}, {"sample_id": "small", "image_path": str(small)}]
    config = PreprocessingConfig(**EXACT)

    with get_task_stream(client) as stream:
        run = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "slurm"), client=client).run(slides=slides)
    reference = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "local"), client=local).run(slides=slides)

    assert run.num_failed == 0 and len(run.tile_artifacts) == 2
    workers = _workers(client)
    gpu = {a for a, w in workers.items() if w["resources"].get("GPU")}
    cpu = set(workers) - gpu
    assert len(gpu) == 1 and len(cpu) == 1
    embeds = [t for t in stream.data if "embed-" in str(t["key"])]
    assert len(embeds) >= 2  # at least one block per slide
    assert {t["worker"] for t in embeds} == gpu
    for sample_id in ("syn", "small"):
        np.testing.assert_allclose(_embedding(run, sample_id), _embedding(reference, sample_id), atol=1e-5, rtol=0)


def _job_and_address(cluster, client, gpu: bool):
    """(SLURM job id, worker address) of the GPU (or the CPU-only) worker.

    Only the id: a test-held Job object would outlive a cancelled job and trip
    SpecCluster.close()'s check that every job it created has closed.
    """
    job_id = next(job.job_id for name, job in cluster.workers.items() if ("-cpu-" in str(name)) != gpu)
    addr = next(a for a, w in _workers(client).items() if bool(w["resources"].get("GPU")) == gpu)
    return job_id, addr


def _scancel_when_busy(client, job_id, addr, prefix: str) -> threading.Event:
    """``scancel`` the job as soon as its worker is processing a task whose key starts with ``prefix``."""
    killed = threading.Event()

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            keys = client.processing(workers=[addr]).get(addr, ())
            if any(str(k[0] if isinstance(k, tuple) else k).startswith(prefix) for k in keys):
                subprocess.run(["scancel", str(job_id)], check=True)
                killed.set()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def _replaced(cluster, client, old_id, gpu: bool):
    """The cluster is back to its size, with a new job in place of ``old_id``."""
    client.wait_for_workers(2, timeout=120)
    new_id, _ = _job_and_address(cluster, client, gpu)
    assert new_id != old_id
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True).stdout
    assert f"{new_id} RUNNING" in queue and str(old_id) not in queue


def test_a_cancelled_worker_job_does_not_lose_the_run(slurm, local, tiny, tmp_path):
    cluster, client = slurm
    big = testing.write_svs(tmp_path / "big.svs",
                            testing.tissue_image(4480, 4480, [(0, 0, 4480, 4480)], seed=5), downsamples=(1, 4, 16))
    slides = [{"sample_id": "big", "image_path": str(big)}]
    config = PreprocessingConfig(**EXACT)
    cpu_job_id, cpu_addr = _job_and_address(cluster, client, gpu=False)
    killed = _scancel_when_busy(client, cpu_job_id, cpu_addr, prefix="")
    run = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "slurm"), client=client).run(slides=slides)
    assert killed.wait(5), "the CPU worker never had work to lose"
    reference = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "local"), client=local).run(slides=slides)

    assert run.num_failed == 0
    assert run.tile_artifacts[0].num_tiles == 400
    assert cpu_addr not in _workers(client)
    np.testing.assert_allclose(_embedding(run, "big"), _embedding(reference, "big"), atol=1e-5, rtol=0)
    # The cancelled job is replaced by a new one: the cluster keeps the size it was given.
    _replaced(cluster, client, cpu_job_id, gpu=False)


def test_losing_the_only_gpu_job_waits_for_its_replacement(slurm, local, tiny, tmp_path):
    """Embedding tasks wait (no worker declares a GPU) until the new GPU job joins; none runs on CPU."""
    from distributed import get_task_stream

    cluster, client = slurm
    client.wait_for_workers(2, timeout=120)
    slide = testing.write_svs(tmp_path / "s.svs",
                              testing.tissue_image(3360, 3360, [(0, 0, 3360, 3360)], seed=6), downsamples=(1, 4))
    slides = [{"sample_id": "s", "image_path": str(slide)}]
    config = PreprocessingConfig(**EXACT)
    gpu_job_id, gpu_addr = _job_and_address(cluster, client, gpu=True)
    killed = _scancel_when_busy(client, gpu_job_id, gpu_addr, prefix="embed-")
    with get_task_stream(client) as stream:
        run = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "slurm"), client=client).run(slides=slides)
    assert killed.wait(5), "the GPU worker never had an embedding task to lose"
    reference = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "local"), client=local).run(slides=slides)

    assert run.num_failed == 0 and run.tile_artifacts[0].num_tiles == 225
    np.testing.assert_allclose(_embedding(run, "s"), _embedding(reference, "s"), atol=1e-5, rtol=0)
    gpu_workers = {a for a, w in _workers(client).items() if w["resources"].get("GPU")}
    embedded_on = {t["worker"] for t in stream.data if "embed-" in str(t["key"])}
    assert embedded_on and gpu_addr not in gpu_workers and embedded_on <= gpu_workers | {gpu_addr}
    _replaced(cluster, client, gpu_job_id, gpu=True)
