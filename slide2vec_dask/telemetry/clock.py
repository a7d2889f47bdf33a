"""Per-block timings, taken where the block runs and carried back with its result.

The driver submits a block as ``timed_block(embed_block, ...)``: the wrapper
opens a `BlockTiming` for the task's thread, the block's stages add to it
(``with stage("read")``, the device thread's transfer and forward), and the
result comes back as ``Timed(value, timing)`` with the NVML samples this
process took meanwhile.  A read that runs as its own task (GPU clusters) is
``timed_read(read_task, ...)``: its timing rides with its pixels into the
embedding task.  All of it is a few ``perf_counter`` calls per block.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from slide2vec_dask.telemetry import nvml

#: The stages a block's time is split into (seconds each), in the order the report shows them.
STAGES = ("read", "decode", "cut", "device_wait", "transfer", "forward", "write")

_HOST = socket.gethostname()
_local = threading.local()
_ENABLED = [True]


def set_enabled(on: bool) -> None:
    """Turn block timing and sampling off in this process (the overhead benchmark's switch)."""
    _ENABLED[0] = bool(on)


def enabled() -> bool:
    return _ENABLED[0]


@dataclass
class BlockTiming:
    """One block: where its seconds went, when it ran, on what."""

    host: str = _HOST
    pid: int = 0
    start: float = 0.0              # wall clock (time.time()) when the embedding task started
    end: float = 0.0
    read_start: float = 0.0         # a read task of its own: when it started (0: read inside the task)
    read_end: float = 0.0
    device: str = ""                # "cpu", "cuda:0"
    gpu_uuid: str = ""              # the CUDA device's UUID, as NVML names it ("GPU-...")
    device_start: float = 0.0       # wall clock of the device thread's run
    device_end: float = 0.0
    tiles: int = 0
    seconds: dict = field(default_factory=dict)   # stage -> seconds
    samples: list = field(default_factory=list)   # NVML samples drained by this task

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


@dataclass
class Timed:
    """A task's result with its timing."""

    value: Any
    timing: BlockTiming | None


def current() -> BlockTiming | None:
    """The timing of the block this thread works on (None outside block tasks, or when off)."""
    return getattr(_local, "timing", None)


@contextlib.contextmanager
def stage(name: str):
    """Add the block's time in ``name`` (nothing outside a block task)."""
    timing = current()
    if timing is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timing.add(name, time.perf_counter() - t0)


def _open() -> BlockTiming | None:
    if not _ENABLED[0]:
        return None
    timing = BlockTiming(pid=os.getpid(), start=time.time())
    _local.timing = timing
    return timing


def _close(timing: BlockTiming | None) -> None:
    _local.timing = None
    if timing is not None:
        timing.end = time.time()
        timing.samples = nvml.drain()


def timed_block(fn: Callable, pixels, *args, **kwargs) -> Timed:
    """``fn(pixels, *args, **kwargs)`` (a block task) timed; a `Timed` read's timing is folded in."""
    timing = _open()
    if isinstance(pixels, Timed):
        if timing is not None and pixels.timing is not None:
            read = pixels.timing
            timing.read_start, timing.read_end = read.start, read.end
            for name, seconds in read.seconds.items():
                timing.add(name, seconds)
            timing.samples = read.samples
        pixels = pixels.value
    try:
        value = fn(pixels, *args, **kwargs)
    finally:
        samples = timing.samples if timing is not None else []
        _close(timing)
        if timing is not None and samples:
            timing.samples = samples + timing.samples
    if timing is not None:
        timing.tiles = _tiles(value)
    return Timed(value, timing)


def timed_read(fn: Callable, *args) -> Timed:
    """A block's read as a task of its own, timed (its result goes to `timed_block`)."""
    timing = _open()
    try:
        value = fn(*args)
    finally:
        _close(timing)
    return Timed(value, timing)


def _tiles(value) -> int:
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return int(value)
    tiles = getattr(value, "tiles", None)
    return int(len(tiles)) if tiles is not None else 0


def on_device(timing: BlockTiming | None, fn: Callable, device: str):
    """``fn(device)`` on the device's thread, adding to the block's timing there."""
    def run():
        if timing is None:
            return fn(device)
        _local.timing = timing
        timing.device, timing.gpu_uuid = device, _uuid(device)
        timing.device_start = time.time()
        try:
            return fn(device)
        finally:
            timing.device_end = time.time()
            _local.timing = None
    return run


_UUIDS: dict[str, str] = {}


def _uuid(device: str) -> str:
    """``GPU-<uuid>`` of a CUDA device, as NVML names it (how the report pairs blocks with samples)."""
    if not device.startswith("cuda"):
        return ""
    if device not in _UUIDS:
        try:
            import torch

            index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
            _UUIDS[device] = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
        except Exception:   # (an older torch without .uuid): blocks pair with their host's GPUs instead
            _UUIDS[device] = ""
    return _UUIDS[device]
