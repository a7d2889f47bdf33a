"""NVML sampling on GPU workers: utilisation, memory and power every `INTERVAL_S`.

One sampler per process, started by the worker plugin (`telemetry.plugin`) on
a Dask worker and by the driver itself for in-process runs.  It costs one
NVML query per GPU per half second on a daemon thread: cheap enough to leave
on.  Samples wait in a bounded deque until a block task drains them into its
result (`telemetry.clock`), so they reach the client with the results it gets
anyway; the run's last samples are drained once at its end.

Nothing runs on a CPU-only worker: no ``pynvml`` module (``pip install
nvidia-ml-py``), no NVIDIA driver, or no GPU visible to the process
(``CUDA_VISIBLE_DEVICES``) all mean no sampler, and the report falls back to
the time the encoder's device thread ran (`telemetry.report`).
"""

from __future__ import annotations

import collections
import importlib
import os
import socket
import threading
import time
from dataclasses import dataclass

#: Seconds between two samples of a GPU.
INTERVAL_S = 0.5
#: Samples kept per process while nobody drains them (an hour at the default interval).
MAX_SAMPLES = 7200


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the report names it: ``key`` is ``host/uuid``, unique in a cluster."""

    key: str
    host: str
    index: int
    uuid: str
    name: str


# A sample: (wall time, GPU key, GPU util %, memory util %, memory used MB, power W); None where unsupported.
Sample = tuple


class GpuSampler:
    """A daemon thread reading NVML for the process's visible GPUs."""

    def __init__(self, nvml, handles: list, gpus: list[GpuInfo], interval: float = INTERVAL_S):
        self.nvml, self.handles, self.gpus, self.interval = nvml, handles, gpus, interval
        self._samples: collections.deque = collections.deque(maxlen=MAX_SAMPLES)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slide2vec-nvml", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        now = time.time()
        rows = [(now, gpu.key, *self._read(handle)) for handle, gpu in zip(self.handles, self.gpus)]
        with self._lock:
            self._samples.extend(rows)

    def _read(self, handle) -> tuple:
        nv = self.nvml
        util = mem_util = used = power = None
        try:
            rates = nv.nvmlDeviceGetUtilizationRates(handle)
            util, mem_util = float(rates.gpu), float(rates.memory)
        except Exception:   # (pynvml.NVMLError: not supported on this GPU, or a driver hiccup)
            pass
        try:
            used = nv.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        except Exception:
            pass
        try:
            power = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except Exception:
            pass
        return util, mem_util, used, power

    def drain(self) -> list[Sample]:
        with self._lock:
            out = list(self._samples)
            self._samples.clear()
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_LOCK = threading.Lock()
_SAMPLER: list = []        # [GpuSampler] once started in this process, [None] when this process has no GPU
STATUS = {"nvml": "not tried"}


def start_sampler(interval: float = INTERVAL_S) -> GpuSampler | None:
    """This process's sampler, started on first call; None on a CPU-only process."""
    with _LOCK:
        if not _SAMPLER:
            _SAMPLER.append(_make(interval))
        return _SAMPLER[0]


def _make(interval: float) -> GpuSampler | None:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        STATUS["nvml"] = "missing (pip install nvidia-ml-py)"
        return None
    try:
        nvml.nvmlInit()
        handles, gpus = _visible(nvml)
    except Exception as exc:   # no driver (pynvml.NVMLError_LibraryNotFound), a container without devices
        STATUS["nvml"] = f"unavailable ({type(exc).__name__})"
        return None
    if not handles:
        STATUS["nvml"] = "no GPU visible"
        return None
    STATUS["nvml"] = "sampling"
    return GpuSampler(nvml, handles, gpus, interval)


def _visible(nvml) -> tuple[list, list[GpuInfo]]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) when set, else all."""
    host = socket.gethostname()
    count = nvml.nvmlDeviceGetCount()
    wanted = os.environ.get("CUDA_VISIBLE_DEVICES")
    handles = []
    if wanted is None:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    else:
        for entry in (e.strip() for e in wanted.split(",")):
            if not entry:
                break
            if entry.isdigit():
                if int(entry) >= count:
                    break   # (CUDA stops at the first invalid entry too)
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
            else:
                handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
    gpus = []
    for handle in handles:
        uuid, name = _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))
        gpus.append(GpuInfo(f"{host}/{uuid}", host, int(nvml.nvmlDeviceGetIndex(handle)), uuid, name))
    return handles, gpus


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def drain() -> list[Sample]:
    """The samples taken since the last drain (none on a CPU-only process)."""
    with _LOCK:
        sampler = _SAMPLER[0] if _SAMPLER else None
    return sampler.drain() if sampler is not None else []


def gpus() -> list[dict]:
    """This process's sampled GPUs (as dicts: they travel from workers)."""
    with _LOCK:
        sampler = _SAMPLER[0] if _SAMPLER else None
    return [] if sampler is None else [g.__dict__ for g in sampler.gpus]


def stop_sampler() -> None:
    """Stop and forget this process's sampler (tests; a later `start_sampler` tries again)."""
    with _LOCK:
        sampler = _SAMPLER.pop() if _SAMPLER else None
    if sampler is not None:
        sampler.stop()
