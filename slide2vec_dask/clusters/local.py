"""The embedded local cluster: what `Pipeline` starts on this machine when it is given no cluster.

Which cluster runs a call is `clusters.client.resolve_client`'s (``Model.embed_*``
without a cluster run on threads in this process: `dataflow.executors`); this
module only builds the local one.  It behaves like a library, not like a service:

* **Nothing re-imports the user's ``__main__``.**  Dask's default local
  workers are ``Nanny`` processes started with multiprocessing ``spawn``,
  which re-runs the caller's script in the child: a top-level script
  without an ``if __name__ == "__main__":`` guard then fails ("Nanny failed
  to start"), and a notebook or ``python -`` session has no file to re-run.
  So:

  - CPU only: the scheduler and one ``distributed.Worker`` with
    ``num_workers`` threads (default: the CPUs this process may use) run in
    this process, on the cluster's event-loop thread.  Nothing is spawned, it
    starts in a fraction of a second, and the model never has to travel
    between processes.  The encoder runs on one device thread with torch's
    own intra-op threads while the other threads decode (see
    `dataflow.worker`).  The price: a crash in native code (a codec, torch)
    takes the caller's process with it, and no memory limit is enforced by
    killing a worker (Dask only pauses the worker near the machine's RAM).
  - With GPUs: one worker **process per GPU**, each its own encoder, its own
    GIL and its own CUDA context, pinned with ``CUDA_VISIBLE_DEVICES`` (the
    i-th entry of the caller's ``CUDA_VISIBLE_DEVICES`` when that is set)
    and declared with ``resources={"GPU": 1}`` -- the same shape as a SLURM
    or Kubernetes GPU worker, so the local run exercises the code path of
    the clusters.  A single in-process worker declaring ``GPU=num_gpus``
    (`dataflow.worker` can share several GPUs out in one process) would
    also work, but then every GPU's input pipeline and the caller's own
    Python share one GIL, which starves fast GPUs.  Each worker is a
    ``python -c`` subprocess (``distributed.deploy.subprocess``'s
    ``SubprocessWorker`` extended with a per-worker environment) running
    ``dask spec`` with a ``distributed.Nanny``: the subprocess's ``__main__``
    is that one-line launcher, so the nanny's own ``spawn`` re-imports
    nothing of the user's, and the nanny still restarts a worker that dies
    (segfault, OOM kill) -- which a bare subprocess ``Worker`` would not,
    leaving a one-GPU run waiting forever for a GPU.  The launcher gets the
    caller's ``sys.path`` (modules next to the user's script unpickle on the
    worker), the caller's Dask config (``DASK_INTERNAL_INHERIT_CONFIG``) and
    exits when the caller's process dies.  On Windows, where subprocess
    workers are not supported by distributed, the in-process worker declares
    ``GPU=num_gpus`` instead.

* **Loopback only.**  A Dask scheduler runs whatever anyone who can reach it
  submits, so the scheduler, the workers and the dashboard listen on
  ``127.0.0.1`` (TCP).  Distributed's ``inproc://`` transport was tried for
  the CPU case: it still opened the worker's HTTP server on ``0.0.0.0`` and
  its dashboard link named the machine's address, so plain loopback TCP is
  used for both cases.

* **Quiet.**  Importing distributed sets its ``distributed`` logger to INFO
  with its own stderr handler, and a run then printed ~40 INFO lines.  For
  the life of the local cluster that logger is raised to WARNING -- but only
  while it is in the state distributed's import left it: level INFO, no
  handler other than a plain ``StreamHandler``, and no ``logging`` /
  ``distributed.logging`` / ``logging-file-config`` key in the Dask config
  (which is also where ``DASK_LOGGING__DISTRIBUTED=info`` lands).  Any level
  or handler the user set on ``distributed`` is left alone, and so is the
  logger when the user configured Dask's logging; configuring the root
  logger alone does not count (``basicConfig(level=INFO)`` asks for the
  user's INFO lines, not for the internals of an embedded scheduler).  The
  level is put back when the last local cluster closes, unless someone
  changed it meanwhile.  Worker processes get
  ``DASK_LOGGING__DISTRIBUTED=warning`` under the same rule.  What remains on
  stderr is one line with the dashboard link, warnings and errors.

* **Flat memory.**  A distributed worker samples its threads' stacks every
  10 ms and keeps a profile tree per second for the dashboard's profile
  page: the last 1000 of them (``distributed.admin.low-level-log-length``),
  tens of KB each.  In the CPU case that is the caller's own process: on a
  cohort of tiny slides the client grew ~23 KB per finished slide (12
  slides/s on two cores) until the history was full, a quarter of an hour
  in.  The embedded cluster's workers run with that profiler off
  (``distributed.worker.profile.enabled``), which also spares the sampling
  thread's share of the GIL; a user who wants the profile page runs a
  cluster of their own (``client=``).  Tasks are keyed by stage, not by
  sample id, so the scheduler's and workers' per-prefix records do not grow
  with the cohort either (`dataflow.driver`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time

from slide2vec_dask.clusters.client import default_threads

#: Seconds the GPU worker processes have to join the scheduler.
WORKER_START_TIMEOUT = 120.0


# -- logging -----------------------------------------------------------------------------------
_QUIET_LOCK = threading.Lock()
_QUIET_TOKENS: set[object] = set()
_QUIET_SET: list[int] = []  # [level we replaced] while we hold the logger at WARNING


def _dask_logging_configured() -> bool:
    import dask

    return any(dask.config.get(key, None) is not None
               for key in ("logging", "distributed.logging", "distributed.logging-file-config"))


def _distributed_logging_untouched() -> bool:
    """Is the ``distributed`` logger as distributed's import configured it (nobody else did)?"""
    logger = logging.getLogger("distributed")
    return (logger.level == logging.INFO and not _dask_logging_configured()
            and all(type(h) is logging.StreamHandler and h.level == logging.NOTSET for h in logger.handlers))


def _quiet_distributed() -> object:
    """Hold the ``distributed`` logger at WARNING (if untouched); returns a token for `_release_quiet`."""
    token = object()
    with _QUIET_LOCK:
        if not _QUIET_TOKENS and not _QUIET_SET and _distributed_logging_untouched():
            logger = logging.getLogger("distributed")
            _QUIET_SET.append(logger.level)
            logger.setLevel(logging.WARNING)
        _QUIET_TOKENS.add(token)
    return token


def _release_quiet(token: object) -> None:
    """Give ``token`` back; the last one restores the level (unless someone changed it meanwhile)."""
    with _QUIET_LOCK:
        if token not in _QUIET_TOKENS:
            return
        _QUIET_TOKENS.discard(token)
        if not _QUIET_TOKENS and _QUIET_SET:
            level = _QUIET_SET.pop()
            logger = logging.getLogger("distributed")
            if logger.level == logging.WARNING:
                logger.setLevel(level)


def _quieted() -> bool:
    with _QUIET_LOCK:
        return bool(_QUIET_SET)


# -- worker processes --------------------------------------------------------------------------
# The worker subprocess's __main__: the caller's import path, exit with the caller, then `dask spec`.
_LAUNCHER = """\
import json, os, signal, sys, threading, time
sys.path[:] = json.loads(sys.argv[1])
_parent = os.getppid()
def _exit_with_parent():
    while os.getppid() == _parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10.0)
    os._exit(1)
threading.Thread(target=_exit_with_parent, daemon=True, name="slide2vec-parent-watch").start()
from distributed.cli.dask_spec import main
main(sys.argv[2:], prog_name="slide2vec-dask-worker")
"""


def _subprocess_worker_class():
    from distributed.deploy.subprocess import SubprocessWorker

    class LocalWorkerProcess(SubprocessWorker):
        """A ``dask spec`` worker subprocess with its own environment (``SubprocessWorker`` has none)."""

        def __init__(self, scheduler: str, *, env: dict, name=None, worker_kwargs=None):
            super().__init__(scheduler, worker_class="distributed.Nanny", name=name, worker_kwargs=worker_kwargs)
            self.env = env

        async def _start(self) -> None:
            opts = {**self.worker_kwargs, "name": self.name}
            spec = json.dumps({"cls": self.worker_class, "opts": opts})
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _LAUNCHER, json.dumps(sys.path), self.scheduler, "--spec", spec,
                env=self.env, stdin=asyncio.subprocess.DEVNULL)

    return LocalWorkerProcess


def _gpu_ids(num_gpus: int) -> list[str]:
    """What each GPU worker's ``CUDA_VISIBLE_DEVICES`` is: the caller's i-th visible device, else i."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) >= num_gpus:
        return visible[:num_gpus]
    return [str(i) for i in range(num_gpus)]


def _worker_env(gpu: str, quiet: bool) -> dict:
    import dask

    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    try:  # the caller's dask.config.set(...) applies on the workers too, as with a Nanny
        env["DASK_INTERNAL_INHERIT_CONFIG"] = dask.config.serialize(dask.config.global_config)
    except (TypeError, ValueError):
        pass
    if quiet:
        env["DASK_LOGGING__DISTRIBUTED"] = "warning"
    return env


# -- the cluster -------------------------------------------------------------------------------
def _cluster_class():
    from distributed import SpecCluster

    class EmbeddedCluster(SpecCluster):
        """A SpecCluster that gives the logging level back when it closes."""

        def __init__(self, *args, quiet_token=None, **kwargs):
            self._quiet_token = quiet_token
            super().__init__(*args, **kwargs)

        async def _close(self):
            try:
                await super()._close()
            finally:
                _release_quiet(self._quiet_token)

        @property
        def dashboard_link(self) -> str:
            # (distributed builds the link from the scheduler's address, which for inproc:// names
            # the machine's IP although the dashboard listens on loopback only)
            port = self.scheduler_info.get("services", {}).get("dashboard")
            return f"http://127.0.0.1:{port}/status" if port else ""

    return EmbeddedCluster


async def _wait_for_workers(cluster, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(cluster.scheduler.workers) < n:
        for name, worker in cluster.workers.items():
            process = getattr(worker, "process", None)
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"slide2vec-dask: local worker {name!r} exited with code "
                                   f"{process.returncode} before joining the scheduler (its output is above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"slide2vec-dask: only {len(cluster.scheduler.workers)} of {n} local worker "
                               f"processes joined the scheduler within {timeout:.0f} s")
        await asyncio.sleep(0.05)


def start_local_cluster(num_workers: int | None, num_gpus: int):
    """A `distributed` cluster on this machine, sized to it, listening on 127.0.0.1 only.

    CPU only (``num_gpus == 0``): the scheduler and one worker with
    ``num_workers`` threads in this process (nothing spawned).  With GPUs:
    one worker process per GPU, pinned with ``CUDA_VISIBLE_DEVICES`` and
    declared with ``resources={"GPU": 1}``, each with ``num_workers`` threads
    (default: this process's CPUs shared out, at least 2).  The module
    docstring says why.  Hand the result to ``Client(cluster)``; close both.
    """
    import dask

    # (read as each worker starts; the GPU workers' processes inherit it with the caller's config)
    with dask.config.set(EMBEDDED_CONFIG):
        return _start(num_workers, num_gpus)


#: Dask settings of the embedded cluster's workers (the module docstring says why).
EMBEDDED_CONFIG = {"distributed.worker.profile.enabled": False}


def _start(num_workers: int | None, num_gpus: int):
    from distributed import Scheduler, Worker
    from distributed.compatibility import WINDOWS
    from distributed.system import MEMORY_LIMIT

    cpus = default_threads()
    token = _quiet_distributed()
    try:
        host = "127.0.0.1"
        if num_gpus > 0 and not WINDOWS:
            threads = num_workers or max(2, cpus // num_gpus)
            memory = int(MEMORY_LIMIT // num_gpus)
            cls, quiet = _subprocess_worker_class(), _quieted()
            workers = {f"gpu-{i}": {"cls": cls, "options": {
                "env": _worker_env(gpu, quiet),
                "worker_kwargs": {"host": host, "nthreads": threads, "resources": {"GPU": 1},
                                  "memory_limit": memory, "dashboard": False}}}
                for i, gpu in enumerate(_gpu_ids(num_gpus))}
            scheduler = {"cls": Scheduler, "options": {"host": host, "port": 0, "dashboard_address": f"{host}:0"}}
        else:
            # In one process the scheduler and its worker talk over inproc:// (Python objects
            # handed over in memory): ~10 % more cohort tiles/s than loopback TCP here, where every
            # message is serialised.  Nothing listens on the network for it; the HTTP servers are
            # pinned to loopback.
            resources = {"GPU": num_gpus} if num_gpus > 0 else None
            workers = {"local-0": {"cls": Worker, "options": {
                "protocol": "inproc", "nthreads": num_workers or cpus, "resources": resources,
                # The limit covers this whole process (the caller's data too): the machine's RAM.
                "memory_limit": int(MEMORY_LIMIT), "dashboard": False, "dashboard_address": f"{host}:0"}}}
            scheduler = {"cls": Scheduler, "options": {"protocol": "inproc", "dashboard_address": f"{host}:0"}}
        cluster = _cluster_class()(workers=workers, scheduler=scheduler, name="slide2vec-dask",
                                   quiet_token=token)
    except BaseException:
        _release_quiet(token)
        raise
    try:
        cluster.sync(_wait_for_workers, cluster, len(workers), WORKER_START_TIMEOUT)
    except BaseException:
        cluster.close()
        raise
    print(f"slide2vec-dask: local Dask cluster, dashboard at {cluster.dashboard_link}", file=sys.stderr)
    return cluster
