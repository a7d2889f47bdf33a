"""The embedded local cluster behaves like a library: user scripts without a main guard and
notebook-like sessions run, nothing listens beyond 127.0.0.1, and Dask's INFO logs stay quiet.

The scripts run in real subprocesses, the way users run them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from slide2vec_dask import testing
from slide2vec_dask.clusters import local as clusters
from slide2vec_dask.clusters.local import start_local_cluster

# A user's script: everything at top level, no ``if __name__ == "__main__":`` guard.
SCRIPT = textwrap.dedent("""\
    import json, sys
    import torch
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, activate_progress_reporter
    from slide2vec_dask.progress import TextReporter

    activate_progress_reporter(TextReporter())  # what a terminal gets (stderr is a pipe here)
    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                              name="mean-rgb", feature_dim=3)
    {cluster}
    result = Pipeline(model, {client}execution=ExecutionOptions(output_dir=sys.argv[2])).run(manifest_path=sys.argv[1])
    print(json.dumps({{"failed": result.num_failed, "store": str(result.store_path),
                      "groups": [a.group for a in result.tile_artifacts]{extra}}}))
    """)

LOCAL_DEFAULT = SCRIPT.format(cluster="", client="", extra="")
GPU_WORKERS = SCRIPT.format(
    cluster=textwrap.dedent("""\
        import os
        from distributed import Client
        from slide2vec_dask.clusters.local import start_local_cluster
        cluster = start_local_cluster(1, 1)
        client = Client(cluster, set_as_default=False)
        """).strip(),
    client="client=client, ",
    extra=', "devices": sorted(client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"]).values())')


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("local-default")
    testing.write_svs(folder / "small.svs", testing.tissue_image(1344, 1792, [(224, 224, 1120, 1344)], seed=3),
                      downsamples=(1, 4))
    path = folder / "slides.csv"
    path.write_text("sample_id,image_path\nsmall,small.svs\n")
    return path


def run_user_script(script: str, manifest: Path, out: Path, how: str) -> tuple[dict, str]:
    """Run ``script`` as ``python script.py`` (``how="file"``) or fed on stdin (``"stdin"``: ``__main__``
    has no file, like a notebook or an interactive session); return its JSON line and its stderr."""
    args = [str(manifest), str(out)]
    if how == "file":
        path = out.parent / f"{out.name}_user_script.py"
        path.write_text(script)
        cmd, stdin = [sys.executable, str(path), *args], None
    else:
        cmd, stdin = [sys.executable, "-", *args], script
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    # bytes, not text=True: universal newlines would turn the progress line's "\r" into "\n"
    proc = subprocess.run(cmd, input=stdin.encode() if stdin else None, capture_output=True, timeout=240,
                          env=env, cwd=out.parent)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def assert_quiet(stderr: str) -> None:
    """Only the dashboard line, the progress line and warnings: no Dask INFO chatter."""
    assert " - INFO - " not in stderr, stderr
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert lines[0].startswith("slide2vec-dask: local Dask cluster, dashboard at http://127.0.0.1:"), stderr
    assert "tiles/s" in stderr  # the progress line
    assert not any(" - distributed." in line and " - INFO - " in line for line in lines)


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_top_level_script_without_main_guard_runs_on_the_local_default(manifest, tmp_path, how):
    result, stderr = run_user_script(LOCAL_DEFAULT, manifest, tmp_path / "out", how)
    assert result["failed"] == 0 and result["groups"] == ["tiles/small"]
    assert (Path(result["store"]) / "tiles" / "small").is_dir()
    assert_quiet(stderr)
    # dashboard line + progress line (+ its final newline): nothing else on a clean run
    assert len([line for line in stderr.split("\n") if line.strip()]) == 2, stderr


def test_top_level_script_with_gpu_worker_processes(manifest, tmp_path):
    """The subprocess (GPU) path from a script without a main guard: one worker process per GPU,
    pinned; here without a GPU the worker says so and runs the encoder on its CPU."""
    result, stderr = run_user_script(GPU_WORKERS, manifest, tmp_path / "out", "file")
    assert result["failed"] == 0 and result["devices"] == ["0"]
    assert (Path(result["store"]) / "tiles" / "small").is_dir()
    assert_quiet(stderr)


# -- start_local_cluster directly --------------------------------------------------------------
def listening(processes) -> set[tuple[str, int]]:
    found = set()
    for p in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == "LISTEN"}
        except psutil.NoSuchProcess:
            pass
    return found


def tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def assert_loopback(address: str) -> None:
    assert address.startswith("tcp://127.0.0.1:") or address.startswith("http://127.0.0.1:"), address


def test_cpu_cluster_runs_in_this_process_on_loopback():
    """Scheduler and worker talk in memory (inproc://: no socket, unreachable from any other
    process); the only listening sockets, the HTTP servers, are on 127.0.0.1."""
    from distributed import Client

    before, children = listening(tree()), psutil.Process().children()
    cluster = start_local_cluster(2, 0)
    try:
        with Client(cluster, set_as_default=False) as client:
            assert cluster.scheduler_address.startswith("inproc://")
            assert_loopback(cluster.dashboard_link)
            assert list(client.nthreads().values()) == [2]
            for address in client.nthreads():
                assert address.startswith("inproc://")
            assert client.submit(os.getpid).result() == os.getpid()  # nothing spawned
            opened = listening(tree()) - before
            assert opened and {ip for ip, _ in opened} == {"127.0.0.1"}, opened
            assert psutil.Process().children() == children
    finally:
        cluster.close()


def test_embedded_cluster_keeps_no_per_slide_records(tmp_path):
    """Client memory flat in the cohort size (bench_scale.py measures it): the worker's statistical
    profiler (a profile tree a second, in this process) is off, and tasks are grouped by stage,
    whatever the sample ids (string keys like ``embed-case-a-...`` made a Dask prefix per slide)."""
    import torch
    from distributed import Client

    from slide2vec_dask import ExecutionOptions, Model, Pipeline

    image = testing.tissue_image(512, 512, [(0, 0, 512, 512)])
    slide = testing.write_svs(tmp_path / "s.svs", image, downsamples=(1, 4), tile_size=256)
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path\n" + "".join(f"case-{c}-slide,{slide}\n" for c in "abcd"))
    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                              name="mean-rgb", feature_dim=3)
    cluster = start_local_cluster(2, 0)
    try:
        (worker,) = cluster.workers.values()
        assert not any("profile" in name for name in worker.periodic_callbacks)
        with Client(cluster, set_as_default=False) as client:
            result = Pipeline(model, execution=ExecutionOptions(output_dir=tmp_path / "out"), client=client).run(
                manifest_path=manifest)
            assert result.num_failed == 0
            assert set(cluster.scheduler.task_prefixes) <= {"plan", "embed", "finalize", "encoder"}
    finally:
        cluster.close()


def test_gpu_cluster_is_one_pinned_worker_process_per_gpu():
    from distributed import Client

    children = psutil.Process().children(recursive=True)
    cluster = start_local_cluster(1, 1)
    try:
        with Client(cluster, set_as_default=False) as client:
            assert_loopback(cluster.scheduler_address)
            assert_loopback(cluster.dashboard_link)
            info = client.scheduler_info(n_workers=-1)["workers"]
            assert [w["resources"] for w in info.values()] == [{"GPU": 1}]
            assert [w["nthreads"] for w in info.values()] == [1]
            for address in info:
                assert_loopback(address)
            assert list(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values()) == ["0"]
            (pid,) = client.run(os.getpid).values()
            assert pid != os.getpid()
            worker_tree = [p for p in tree() if p.pid != os.getpid() and p not in children]
            assert {ip for ip, _ in listening(worker_tree)} == {"127.0.0.1"}
            assert pid in {p.pid for p in worker_tree}
    finally:
        cluster.close()
    psutil.wait_procs(worker_tree, timeout=10)
    assert not [p for p in worker_tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_gpu_workers_take_the_callers_visible_devices_in_order(monkeypatch):
    from distributed import Client

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cluster = start_local_cluster(None, 2)
    try:
        with Client(cluster, set_as_default=False) as client:
            seen = client.run(lambda: (os.environ["CUDA_VISIBLE_DEVICES"], os.getpid()))
            assert sorted(d for d, _ in seen.values()) == ["3", "5"]
            assert len({pid for _, pid in seen.values()}) == 2
            assert all(n >= 2 for n in client.nthreads().values())
    finally:
        cluster.close()


def test_a_worker_process_that_dies_at_start_is_a_clear_error(monkeypatch):
    children = psutil.Process().children()
    monkeypatch.setattr(clusters, "_LAUNCHER", "import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match="local worker 'gpu-0' exited with code 3"):
        start_local_cluster(1, 1)
    assert psutil.Process().children() == children


# -- logging -----------------------------------------------------------------------------------
@pytest.fixture
def distributed_logger():
    import distributed  # noqa: F401  (sets the logger up the way users get it)

    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.INFO)  # what importing distributed leaves
    yield logger
    logger.setLevel(level)


def test_dask_info_logs_are_raised_to_warning_for_the_run_and_restored(distributed_logger):
    first = start_local_cluster(1, 0)
    second = start_local_cluster(1, 0)
    assert distributed_logger.level == logging.WARNING
    first.close()
    assert distributed_logger.level == logging.WARNING  # the other cluster still runs
    second.close()
    assert distributed_logger.level == logging.INFO


def test_dask_logging_the_user_set_is_left_alone(distributed_logger):
    import dask

    distributed_logger.setLevel(logging.DEBUG)
    start_local_cluster(1, 0).close()
    assert distributed_logger.level == logging.DEBUG

    distributed_logger.setLevel(logging.INFO)
    with dask.config.set({"logging": {"distributed": "info"}}):  # e.g. DASK_LOGGING__DISTRIBUTED=info
        cluster = start_local_cluster(1, 0)
        assert distributed_logger.level == logging.INFO
        assert clusters._worker_env("0", clusters._quieted()).get("DASK_LOGGING__DISTRIBUTED") is None
        cluster.close()

    handler = logging.FileHandler(os.devnull)
    distributed_logger.addHandler(handler)
    try:
        cluster = start_local_cluster(1, 0)
        assert distributed_logger.level == logging.INFO
        cluster.close()
    finally:
        distributed_logger.removeHandler(handler)
        handler.close()
