"""Which compute runs a call: an existing Dask cluster, or this process.

A ``scheduler_address`` connects to an existing cluster; an active
``distributed.Client`` (``with Client(...):`` or the last one created) is
used as everywhere in Dask; otherwise nothing: `Model.embed_*` then run on
threads in this process and `Pipeline.run` starts the embedded local cluster
(`clusters.local`).  Also here: how many threads and GPUs that compute has.
"""

from __future__ import annotations

import os
import sys
import threading

_CLIENTS: dict[str, object] = {}
_LOCK = threading.Lock()


def resolve_client(scheduler_address: str | None):
    """The distributed client to use, or None for this process."""
    if scheduler_address is not None:
        from distributed import Client   # (distributed costs ~0.5 s to import: only when asked for)

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


def default_threads() -> int:
    """The CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def cluster_threads(client) -> int:
    """Total worker threads of a cluster (the natural number of blocks in flight)."""
    return max(1, sum(client.nthreads().values()))


def resolve_num_gpus(num_gpus: int | None, client) -> int:
    """GPUs per worker: ``num_gpus`` when given (checked against this machine without a cluster);
    else what the cluster's workers declare (``--resources GPU=N``), or this machine's."""
    if num_gpus is not None:
        if num_gpus > 0 and client is None:
            import torch

            if torch.cuda.device_count() == 0:
                raise ValueError(f"num_gpus={num_gpus} but no CUDA device is visible here; "
                                 "use Model(..., device='cpu') (command line: --num-gpus 0) or run on a GPU machine or cluster")
        return num_gpus
    if client is not None:
        # Use a cluster's GPUs when any worker declares some, as many per worker process as the
        # best-equipped one declares.
        declared = [info.get("resources", {}).get("GPU", 0)
                    for info in client.scheduler_info(n_workers=-1)["workers"].values()]
        return int(max(declared, default=0))
    import torch

    return torch.cuda.device_count()
