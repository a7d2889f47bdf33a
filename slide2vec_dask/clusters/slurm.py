"""SLURM through dask-jobqueue: GPU worker jobs, optionally with CPU-only jobs beside them.

Embedding tasks carry ``resources={"GPU": 1}``, so they land only on workers
started with ``--resources GPU=N`` (the GPU jobs, which ask SLURM for
``--gres=gpu:N``); reading and decoding blocks runs on every worker, so cheap
CPU-only jobs add decoding throughput without holding a GPU.

Walltime never kills a worker mid-task: each worker gets ``--lifetime``
(a margin before the walltime) and ``--lifetime-stagger`` so workers retire
gracefully, one at a time, handing their data over.  A job that ends
(retired by its lifetime, ``scancel``, preemption, a failed node) is
replaced by a new one with the same spec, whether the cluster has a fixed
size or adapts: a long run outlives any one job's walltime.
"""

from __future__ import annotations

import asyncio
import functools
import math

import dask
from dask.utils import parse_timedelta

INSTALL = "pip install 'slide2vec-dask[slurm]'"


def _require_jobqueue():
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"SLURM clusters need dask-jobqueue: {INSTALL}") from exc
    return dask_jobqueue


def walltime_seconds(walltime: str) -> int:
    """SLURM's ``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM`` as seconds."""
    days, _, rest = walltime.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        parts = [0, parts[0], 0]
    elif len(parts) == 2:
        parts = [0, *parts]
    if len(parts) != 3:
        raise ValueError(f"walltime must look like 'HH:MM:SS' or 'D-HH:MM:SS', got {walltime!r}")
    hours, minutes, seconds = parts
    return (int(days or 0) * 24 + hours) * 3600 + minutes * 60 + seconds


def lifetime_for(walltime: str) -> tuple[str, str]:
    """(``--lifetime``, ``--lifetime-stagger``) that retire a worker before its walltime.

    Margin: 10 % of the walltime, at least 2 minutes (never more than half of
    it); stagger: a tenth of the lifetime, at most 5 minutes.  Staggered
    workers retire at lifetime ± stagger, so the margin covers the stagger.
    """
    total = walltime_seconds(walltime)
    margin = min(max(120, total // 10), total // 2)
    stagger = min(300, (total - margin) // 10, margin // 2)
    lifetime = total - margin
    if lifetime <= 0:
        raise ValueError(f"walltime {walltime!r} is too short to run a worker")
    return f"{lifetime}s", f"{max(stagger, 0)}s"


def slurm_cluster(*, gpu_jobs: int = 1, gpus_per_job: int = 1, cores: int = 8, memory: str = "32GB",
                  walltime: str = "04:00:00", queue: str | None = None, account: str | None = None,
                  cpu_jobs: int = 0, cpu_cores: int | None = None, cpu_memory: str | None = None,
                  cpu_queue: str | None = None, adapt: tuple[int, int] | None = None,
                  job_extra_directives: list[str] | None = None, worker_extra_args: list[str] | None = None,
                  **jobqueue_kwargs):
    """A started `SLURMCluster` of GPU worker jobs (plus ``cpu_jobs`` CPU-only jobs).

    GPU jobs ask for ``--gres=gpu:<gpus_per_job>`` and start their worker with
    ``--resources GPU=<gpus_per_job>``; ``gpus_per_job=0`` makes them plain
    CPU jobs that still run the encoder (no resources asked or declared).
    ``adapt=(minimum, maximum)`` bounds the number of GPU jobs adaptively
    instead of starting ``gpu_jobs`` of them.  CPU-only jobs (``cpu_cores``,
    ``cpu_memory``, ``cpu_queue``; default: the GPU jobs' values) are a fixed
    set: they decode but never embed.  Other keyword arguments go to
    `dask_jobqueue.SLURMCluster` unchanged (``python``, ``local_directory``,
    ``scheduler_options``, ``job_script_prologue``...).
    """
    _require_jobqueue()
    if "processes" in jobqueue_kwargs:
        raise ValueError("slurm_cluster starts one worker process per job (one model per GPU); for more "
                         "workers ask for more jobs (gpu_jobs, adapt) instead of passing processes")
    if gpu_jobs < 0 or cpu_jobs < 0 or gpus_per_job < 0:
        raise ValueError("gpu_jobs, cpu_jobs and gpus_per_job must be >= 0")
    if adapt is not None:
        low, high = adapt
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"adapt must be (minimum, maximum) with 0 <= minimum <= maximum >= 1, got {adapt!r}")
    lifetime, stagger = lifetime_for(walltime)
    base_args = list(worker_extra_args or []) + ["--lifetime", lifetime, "--lifetime-stagger", stagger]
    gpu_args = base_args + (["--resources", f"GPU={gpus_per_job}"] if gpus_per_job else [])
    gpu_directives = list(job_extra_directives or []) + ([f"--gres=gpu:{gpus_per_job}"] if gpus_per_job else [])
    common = dict(walltime=walltime, account=account, processes=1, **jobqueue_kwargs)
    # What CPU-only jobs change in the GPU job template (the rest is shared).
    cpu_options = dict(cores=cpu_cores or cores, memory=cpu_memory or memory, queue=cpu_queue or queue,
                       job_extra_directives=list(job_extra_directives or []), worker_extra_args=base_args)
    cluster = _gpu_cluster_class()(cpu_jobs=cpu_jobs, cpu_options=cpu_options, cores=cores, memory=memory, queue=queue,
                              job_extra_directives=gpu_directives, worker_extra_args=gpu_args, **common)
    if adapt is not None:
        cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
    else:
        cluster.scale(jobs=gpu_jobs)
    return cluster


@functools.cache
def _gpu_cluster_class():
    """`SLURMCluster` whose template jobs scale (GPU) while its CPU-only jobs stay fixed.

    A `SpecCluster` counts every worker spec when it scales; here ``scale``,
    ``scale_down`` and ``adapt`` act on the template (GPU) jobs only.  Built
    on first use so that importing this module needs no dask-jobqueue.
    """
    SLURMCluster = _require_jobqueue().SLURMCluster

    class GPUSlurmCluster(SLURMCluster):
        __doc__ = _gpu_cluster_class.__doc__

        def __init__(self, *, cpu_jobs: int = 0, cpu_options: dict | None = None, **kwargs):
            self._fixed: dict = {}
            super().__init__(**kwargs)
            if cpu_jobs:
                options = {**self._job_kwargs, **(cpu_options or {})}
                for i in range(cpu_jobs):
                    self._fixed[f"{self._name}-cpu-{i}"] = {"cls": self.job_cls, "options": options}
                self.worker_spec.update(self._fixed)
                self.sync(self._correct_state)

        def scale(self, n=None, jobs=0, memory=None, cores=None):
            if n is not None:
                jobs = int(math.ceil(n / self._dummy_job.worker_processes))
            if memory is not None:
                jobs = max(jobs, math.ceil(_bytes(memory) / self._memory_per_worker()))
            if cores is not None:
                jobs = max(jobs, math.ceil(cores / self._threads_per_worker()))
            if self.status.name in ("closing", "closed"):  # closing the cluster: the fixed jobs go too
                for name in self._fixed:
                    self.worker_spec.pop(name, None)
            scalable = [name for name in self.worker_spec if name not in self._fixed]
            if len(scalable) > jobs:
                running = {w["name"] for w in self.scheduler_info["workers"].values()}
                # Drop jobs not yet started first, then the newest ones.
                order = [n for n in scalable if n not in running] + [n for n in reversed(scalable) if n in running]
                for name in order[: len(scalable) - jobs]:
                    del self.worker_spec[name]
            if self.status.name not in ("closing", "closed"):
                while len(self.worker_spec) - len(self._fixed) < jobs:
                    self.worker_spec.update(self.new_worker_spec())
            self.loop.add_callback(self._correct_state)
            if self.asynchronous:
                from distributed.utils import NoOpAwaitable

                return NoOpAwaitable()

        def scale_down(self, workers):
            fixed = {w for w in workers if self._job_name_of(w) in self._fixed}
            return super().scale_down([w for w in workers if w not in fixed])

        def _job_name_of(self, worker):
            info = self.scheduler_info["workers"].get(worker)
            return info["name"] if info else worker

        def adapt(self, *args, **kwargs):
            kwargs.setdefault("Adaptive", _keep_fixed_adaptive())
            return super().adapt(*args, **kwargs)

        @property
        def plan(self):  # what Adaptive compares its target against: the scalable jobs only
            return {name for name in super().plan if name not in self._fixed}

        def _update_worker_status(self, op, msg):
            # SpecCluster forgets a lost worker's job after ``lost-worker-timeout`` but starts
            # no new one (dask-jobqueue#122); the jobs still in the spec are started again then.
            info = self.scheduler_info["workers"].get(msg) if op == "remove" else None
            super()._update_worker_status(op, msg)
            if info and info.get("name") in self.worker_spec:
                delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
                asyncio.get_running_loop().call_later(delay + 1, self._replace, info["name"])

        def _replace(self, name):
            if self.status.name == "running" and name in self.worker_spec and name not in self.workers:
                self._correct_state()   # submits a new job under the same name

    return GPUSlurmCluster


@functools.cache
def _keep_fixed_adaptive():
    from distributed.deploy.adaptive import Adaptive

    class KeepFixedAdaptive(Adaptive):
        """Adaptive scaling that never retires the fixed CPU-only jobs."""

        async def workers_to_close(self, target: int):
            names = await super().workers_to_close(target)
            return [n for n in names if n not in getattr(self.cluster, "_fixed", {})]

    return KeepFixedAdaptive


def _bytes(value) -> int:
    from dask.utils import parse_bytes

    return parse_bytes(value)
