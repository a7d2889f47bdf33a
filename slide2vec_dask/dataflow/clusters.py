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
