"""Which Dask cluster runs the work.

No set-up by default: the work runs on threads in this process.  A
``scheduler_address`` connects to an existing cluster; an active
``distributed.Client`` (``with Client(...):`` or the last one created) is
used as everywhere in Dask.
"""

from __future__ import annotations

import sys
import threading

_CLIENTS: dict[str, object] = {}
_LOCK = threading.Lock()


def resolve_client(scheduler_address: str | None):
    """The distributed client to use, or None for local threads."""
    if scheduler_address is not None:
        from distributed import Client

        with _LOCK:
            client = _CLIENTS.get(scheduler_address)
            if client is None or client.status not in ("running", "connecting", "newly-created"):
                try:
                    client = Client(scheduler_address, timeout="20s", set_as_default=False)
                except OSError as exc:
                    raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler_address}: {exc}") from exc
                _CLIENTS[scheduler_address] = client
            return client
    if "distributed" in sys.modules:  # only look for a client if the user could have made one
        from distributed import default_client

        try:
            return default_client()
        except ValueError:
            return None
    return None


def cluster_threads(client) -> int:
    """Total worker threads of a cluster (the natural number of blocks in flight)."""
    return max(1, sum(client.nthreads().values()))


def start_local_cluster(num_workers: int | None, num_gpus: int):
    """A `distributed` cluster on this machine, sized to it.

    CPU only: one worker process with ``num_workers`` threads (one model in
    memory, threads decode).  With GPUs: one worker process per GPU, pinned
    with ``CUDA_VISIBLE_DEVICES`` and declared with ``resources={"GPU": 1}``.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    from slide2vec_dask.dataflow.driver import default_threads

    cpus = default_threads()
    if num_gpus > 0:
        threads = num_workers or max(2, cpus // num_gpus)
        workers = {f"gpu-{i}": {"cls": Nanny, "options": {
            "nthreads": threads, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
            for i in range(num_gpus)}
    else:
        workers = {"cpu-0": {"cls": Nanny, "options": {"nthreads": num_workers or cpus}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    cluster = SpecCluster(workers=workers, scheduler=scheduler, name="slide2vec-dask")
    print(f"slide2vec-dask: local Dask cluster, dashboard at {cluster.dashboard_link}", file=sys.stderr)
    return cluster
