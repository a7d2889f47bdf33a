"""Where the driver's tasks run: a Dask cluster, or threads in this process.

The driver (`dataflow.driver`) decides what is submitted and when; an
executor only runs what it is given and hands results back as they land.
Both speak the same small protocol: ``submit(fn, *args, key=, resources=,
**kwargs)``, ``completed()`` (``(key, result)`` pairs as tasks finish, an
exception as the result of a task that raised), ``threads()`` (what the
in-flight window is sized by), ``run_everywhere(fn)`` and ``shared(value)``.

* `DaskExecutor`: a ``distributed.Client``.  Results are fetched by the
  client's event loop as tasks finish; tasks asking for
  ``resources={"GPU": 1}`` land only on GPU workers.
* `LocalExecutor`: ``Model.embed_*`` given no cluster.  A thread pool in
  this process, started in microseconds (a local Dask cluster costs a
  second, and a notebook user's one-slide call should not pay it).  A
  block's read and embedding are one task; the encoder runs on its
  device's own thread (`worker.run_on_device`), so while it works on one
  block the pool's other threads decode the next ones.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import time
import uuid
from typing import Any, Callable, Iterator

from slide2vec_dask.clusters.client import cluster_threads, default_threads, resolve_client
from slide2vec_dask.dataflow.worker import bound_malloc


def executor_for(scheduler_address: str | None, num_workers: int | None):
    """The cluster a call names or the active client's (`DaskExecutor`), else this process's threads."""
    client = resolve_client(scheduler_address)
    return LocalExecutor(num_workers) if client is None else DaskExecutor(client, num_workers)


class LocalExecutor:
    """Threads in this process: ``num_workers`` decoding threads plus one, so the encoder's
    device thread always has a decoded block waiting while the others decode."""

    splits_reads = False   # a block's read and embedding run as one task here
    client = None

    def __init__(self, num_workers: int | None):
        bound_malloc()   # before its threads allocate: freed block buffers go back, arenas are shared
        self._threads = (num_workers or default_threads()) + 1
        self._pool = cf.ThreadPoolExecutor(self._threads, thread_name_prefix="slide2vec-block")
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[cf.Future, str] = {}

    def threads(self) -> int:
        return self._threads

    def submit(self, fn: Callable, *args, key: str, resources: dict | None = None, **kwargs) -> str:
        future = self._pool.submit(fn, *args, **kwargs)
        self._pending[future] = key
        future.add_done_callback(self._done.put)
        return key

    def completed(self) -> Iterator[tuple[str, Any]]:
        while self._pending:
            future = self._done.get()
            key = self._pending.pop(future)
            exc = future.exception()
            yield key, (exc if exc is not None else future.result())

    def run_everywhere(self, fn: Callable) -> None:
        fn()

    def shared(self, value, name: str):
        return value

    def close(self) -> None:
        """Stop: what has not started is dropped, what runs is waited for (a block, not a slide)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class DaskExecutor:
    """A ``distributed.Client``'s cluster."""

    splits_reads = True   # with GPUs, a block's read runs on any worker, its embedding on a GPU worker

    def __init__(self, client, num_workers: int | None = None, every: float = 1.0):
        from distributed import as_completed   # (distributed: imported only when a cluster is used)

        self.client, self.num_workers = client, num_workers
        self._results = as_completed(loop=client.loop, with_results=True, raise_errors=False)
        self._futures: dict[str, Any] = {}
        self._every, self._asked, self._size = every, -every, 1

    def threads(self) -> int:
        """``num_workers`` when given, else the cluster's threads, asked at most every ``every`` s:
        the window follows workers as they join or leave (an adaptive cluster that starts small)."""
        if self.num_workers:
            return self.num_workers
        now = time.monotonic()
        if now - self._asked >= self._every:
            self._asked, self._size = now, cluster_threads(self.client)
        return self._size

    def submit(self, fn: Callable, *args, key: str, resources: dict | None = None, **kwargs):
        future = self.client.submit(fn, *args, key=key, pure=False, resources=resources, **kwargs)
        self._futures[future.key] = future
        self._results.add(future)
        return future

    def submit_input(self, fn: Callable, *args, key: str):
        """A task whose result another task takes as an argument (a block's read): not reported."""
        return self.client.submit(fn, *args, key=key, pure=False)

    def completed(self) -> Iterator[tuple[str, Any]]:
        for future, result in self._results:
            if future.status == "error":   # with_results hands over (type, exception, traceback)
                result = result[1] if isinstance(result, tuple) else future.exception()
            self._futures.pop(future.key, None)
            key = future.key
            del future
            yield key, result

    def run_everywhere(self, fn: Callable) -> None:
        self.client.run(fn)

    def shared(self, value, name: str, limit: int = 1 << 20):
        """``value`` itself when small; else a future of a task that returns it.

        A recipe (a preset's or timm model's spec, ~1 KB) goes by value in every
        task.  A spec holding a module (`Model.from_module`) can be many MB: that
        one travels once per worker, as the result of a *task*, which Dask
        recomputes if the worker holding it is lost (scattered data would be gone).
        """
        import cloudpickle

        if len(cloudpickle.dumps(value)) <= limit:
            return value
        return self.client.submit(_identity, value, key=f"{name}-{uuid.uuid4().hex[:8]}", pure=False)

    def close(self) -> None:
        """Stop: tasks still queued or running are cancelled (a failed in-memory call does not
        leave the cluster busy)."""
        if self._futures:
            self.client.cancel(list(self._futures.values()))
        self._futures.clear()


def _identity(value):
    return value
