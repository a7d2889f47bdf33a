"""Run selected blocks of a graph, a bounded number at a time (the in-memory API's executor).

`window_size` is the one rule for how many blocks are in flight; the cohort
driver (`stages.CohortDriver`) follows it too.

Two executors, one contract: ``run_blocks`` submits block tasks (a block's
read and its embedding), keeps at most ``window`` in flight, and hands each
result to ``on_block`` as it lands.

* local (no cluster): a thread pool in this process runs each block's small
  culled graph with Dask's synchronous scheduler; the encoder runs on its
  device's own thread (see `worker.run_on_device`), so while it works on one
  block the pool threads decode the next ones.
* distributed: the blocks' graphs go to the cluster; with ``num_gpus > 0``
  the embedding tasks ask for ``resources={"GPU": 1}`` and so land only on
  GPU workers, while reads run anywhere.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
import uuid
from typing import Callable, Iterable

from slide2vec_dask.dataflow.graph import SlideGraph


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def run_blocks(jobs: Iterable[tuple[SlideGraph, tuple[int, int]]], on_block: Callable, *, client=None,
               num_workers: int | None, prefetch_factor: int, gpu_resources: bool) -> None:
    """Compute each (graph, block) and call ``on_block(graph, block, result)`` as results arrive.

    ``num_workers=None`` on a cluster: the window follows the cluster's threads as workers
    join or leave (an adaptive SLURM or Kubernetes cluster that starts small).
    """
    if client is not None:
        _run_distributed(jobs, on_block, client, window_size(client, num_workers, prefetch_factor), gpu_resources)
    else:
        _run_local(jobs, on_block, num_workers or default_threads(), prefetch_factor)


def run_cpu_blocks(jobs: Iterable[tuple], on_block: Callable, *, client=None, num_workers: int | None,
                   prefetch_factor: int) -> None:
    """`run_blocks` for graphs whose block tasks need no GPU (writing tile archives): each
    block's culled graph runs as it is, in this process's threads or on the cluster."""
    if client is None:
        _run_local(jobs, on_block, num_workers or default_threads(), prefetch_factor)
        return
    from distributed import as_completed

    window = window_size(client, num_workers, prefetch_factor)
    cache: dict = {}
    results = as_completed(loop=client.loop)
    meta: dict = {}
    jobs = iter(jobs)

    def top_up():
        for _, (graph, block) in zip(range(window() - len(meta)), jobs):
            dsk, key = _subgraph_of(graph.array, graph.key(block), cache)
            future = client.get(dsk, key, sync=False)
            meta[future.key] = (graph, block)
            results.add(future)

    top_up()
    for future in results:
        graph, block = meta.pop(future.key)
        on_block(graph, block, future.result())
        top_up()


def window_size(client, num_workers: int | None, prefetch_factor: int, every: float = 1.0) -> Callable[[], int]:
    """Blocks in flight: fixed for a given ``num_workers``, else the cluster's threads (asked at most every ``every`` s)."""
    if num_workers:
        return lambda: num_workers * prefetch_factor

    from slide2vec_dask.dataflow.clusters import cluster_threads

    last = {"at": -every, "size": 1}

    def size() -> int:
        now = time.monotonic()
        if now - last["at"] >= every:
            last["at"], last["size"] = now, cluster_threads(client) * prefetch_factor
        return last["size"]

    return size


def shared_argument(client, value, name: str, limit: int = 1 << 20):
    """``value`` itself when small; else a future of a task that returns it.

    A recipe (a preset's or timm model's spec, ~1 KB) goes by value in every
    task.  A spec holding a module (`Model.from_module`) can be many MB: that
    one travels once per worker, as the result of a *task*, which Dask
    recomputes if the worker holding it is lost (scattered data would be gone).
    """
    import cloudpickle

    if len(cloudpickle.dumps(value)) <= limit:
        return value
    return client.submit(_identity, value, key=f"{name}-{uuid.uuid4().hex[:8]}", pure=False)


def _identity(value):
    return value


def _subgraph_of(array, key: tuple, cache: dict) -> tuple[dict, tuple]:
    """The tasks ``key`` needs, from the array's graph (materialised once per array)."""
    from dask.optimization import cull

    dsk = cache.get(array.name)
    if dsk is None:
        dsk = cache[array.name] = dict(array.__dask_graph__())
    return cull(dsk, [key])[0], key


def _run_local(jobs, on_block, num_workers: int, prefetch_factor: int) -> None:
    from dask.local import get_sync

    cache: dict = {}
    # One extra thread so the encoder always has a block to chew on while num_workers threads decode.
    threads = num_workers + 1
    window = threads * prefetch_factor
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="slide2vec-block") as pool:
        pending: dict[cf.Future, tuple] = {}
        try:
            for graph, block in jobs:
                dsk, key = _subgraph_of(graph.array, graph.key(block), cache)
                pending[pool.submit(get_sync, dsk, key)] = (graph, block)
                if len(pending) >= window:
                    _drain(pending, on_block)
            while pending:
                _drain(pending, on_block)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _drain(pending: dict, on_block) -> None:
    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
    for future in done:
        graph, block = pending.pop(future)
        on_block(graph, block, future.result())


def _run_distributed(jobs, on_block, client, window: Callable[[], int], gpu_resources: bool) -> None:
    """Reads go in as the graph's own read tasks; embeddings are submitted on their results.

    The split is what lets the embedding tasks alone carry ``resources={"GPU": 1}``.
    """
    from distributed import as_completed

    from slide2vec_dask.dataflow.graph import embed_block

    cache: dict = {}
    results = as_completed(loop=client.loop)
    meta: dict = {}
    specs: dict = {}

    def submit(graph, block):
        dsk, read_key = _subgraph_of(graph.pixels, graph.pixels_key(block), cache)
        pixels = client.get(dsk, read_key, sync=False)
        spec = specs.get(graph.spec.key)
        if spec is None:
            spec = specs[graph.spec.key] = shared_argument(client, graph.spec, f"encoder-{graph.spec.key}")
        future = client.submit(embed_block, pixels, graph.keep_block(block), spec=spec, read_tile=graph.read_tile,
                               settings=graph.settings, key=graph.key(block), pure=False,
                               resources={"GPU": 1} if gpu_resources else None)
        meta[future.key] = (graph, block)
        results.add(future)

    jobs = iter(jobs)

    def top_up():
        for _, job in zip(range(window() - len(meta)), jobs):
            submit(*job)

    top_up()
    for future in results:
        graph, block = meta.pop(future.key)
        on_block(graph, block, future.result())
        top_up()
