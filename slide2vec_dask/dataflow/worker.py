"""Worker-side state: loaded encoders and the devices they run on.

Everything here lives once per process.  A task asks for a device, gets the
encoder already built on it (built the first time, then cached), runs, and
gives the device back, so one worker's threads take turns on each GPU while
its other threads keep decoding blocks.

The encoder always runs on its device's own thread, whichever task thread
asked: torch's CPU kernels then reuse one OpenMP team and one malloc arena
instead of growing a model-sized arena in every decoding thread (measured:
several hundred MB of peak RSS on a 2-core machine).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import queue
import sys
import threading
import warnings

from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.encoders.runtime import LoadedAggregator, LoadedEncoder, resolve_precision
from slide2vec_dask.telemetry import clock

_LOCK = threading.Lock()
_ENCODERS: dict[tuple, object] = {}
_FAILED: dict[tuple, BaseException] = {}    # this run's refused builds (see forget_failures)
_DEVICES: dict[int, queue.Queue] = {}


#: glibc malloc arenas this process may use (``MALLOC_ARENA_MAX``, when not set already).
MALLOC_ARENAS = 2
#: Allocations from this size on are mapped and unmapped on their own (``MALLOC_MMAP_THRESHOLD_``).
MALLOC_MMAP_BYTES = 4 << 20
_MALLOC_BOUND = False


def bound_malloc() -> None:
    """Keep glibc from holding freed block buffers, once per process (Linux; a user's own
    ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` win).

    glibc gives each allocating thread its own arena (up to 8 per core) and raises its mmap
    threshold to the largest buffer freed (up to 32 MiB): the decoding threads' blocks
    (12 MiB each) and the device thread's activations then came from arenas that keep
    their high-water mark.  Measured with a ViT-S/16 on a 493-tile slide, RSS above the
    bare model in the same process: 386 MB as glibc comes, 279 MB with two arenas,
    152 MB with a fixed 4 MiB mmap threshold, 23 MB with both (a block's buffers go back
    to the system when freed; a few page faults per block, nothing next to decoding it).
    """
    global _MALLOC_BOUND
    if _MALLOC_BOUND or not sys.platform.startswith("linux"):
        return
    _MALLOC_BOUND = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(-8, MALLOC_ARENAS)          # M_ARENA_MAX
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, MALLOC_MMAP_BYTES)      # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):   # not glibc (musl, ...): nothing to bound
        pass


def _device_queue(num_gpus: int) -> queue.Queue:
    with _LOCK:
        q = _DEVICES.get(num_gpus)
        if q is None:
            q = queue.Queue()
            for device in _devices(num_gpus):
                q.put((device, cf.ThreadPoolExecutor(1, thread_name_prefix=f"slide2vec-{device}")))
            _DEVICES[num_gpus] = q
        return q


def _devices(num_gpus: int) -> list[str]:
    if num_gpus == 0:
        return ["cpu"]
    import torch

    available = torch.cuda.device_count()
    if available == 0:
        # Only reachable on a cluster (locally the request is refused up front): the worker was
        # declared a GPU worker (--resources GPU=1) but has no CUDA device. Say so, and still work.
        warnings.warn(f"num_gpus={num_gpus}: this worker was given GPU tasks but sees no CUDA device; "
                      "running the encoder on its CPU", RuntimeWarning, stacklevel=2)
        return ["cpu"]
    return [f"cuda:{i}" for i in range(min(num_gpus, available))]


def run_on_device(num_gpus: int, fn):
    """Run ``fn(device)`` on a free device of this process, on that device's own thread
    (a block task's timing follows it there: `telemetry.clock`)."""
    q = _device_queue(num_gpus)
    timing = clock.current()
    with clock.stage("device_wait"):
        device, thread = q.get()
    try:
        return thread.submit(clock.on_device(timing, fn, device)).result()
    finally:
        q.put((device, thread))


def get_encoder(spec: EncoderSpec, device: str, precision: str | None, channels_last: bool):
    """The encoder built on ``device``; built on first use in this process, then reused."""
    precision = resolve_precision(spec, precision, device.split(":")[0])
    key = (spec.key, device, precision, channels_last, _token(spec))
    with _LOCK:
        encoder = _ENCODERS.get(key)
    if encoder is None:
        built = _build_once(key, lambda: LoadedEncoder(spec, device, precision, channels_last))
        with _LOCK:
            encoder = _ENCODERS.setdefault(key, built)
    return encoder


def warm_encoder(spec: EncoderSpec, num_gpus: int, precision: str | None, channels_last: bool) -> None:
    """Start building the encoder on a device's own thread now, and return at once.

    A call's first block would build it; started here, the build runs while the slide
    is planned and its first blocks decoded (a ViT's build is ~0.3-1 s).  The device is
    taken while it builds, as a block's embedding would take it; a failure is left for
    the first block to raise (`_build_once` remembers it).
    """
    q = _device_queue(num_gpus)
    device, thread = q.get()

    def build() -> None:
        try:
            get_encoder(spec, device, precision, channels_last)
        except Exception:   # noqa: BLE001 - raised again, where it belongs, by the first block
            pass
        finally:
            q.put((device, thread))

    thread.submit(build)


def _token(spec) -> str:
    """A registered class's registration (`plugins.PluginBuilder.token`): the spec key names its source only."""
    return getattr(spec.build, "token", "")


def _build_once(key: tuple, build):
    """Build a model; a refusal (bad checkpoint, missing weights) is remembered, not retried per block."""
    with _LOCK:
        failed = _FAILED.get(key)
    if failed is not None:
        raise type(failed)(*failed.args)
    try:
        return build()
    except (OSError, ValueError, NotImplementedError, ImportError) as exc:
        with _LOCK:
            _FAILED[key] = exc
        raise


def get_aggregator(spec, device: str, precision: str | None):
    """The slide/patient-level module built on ``device``, cached like the tile encoders."""
    precision = resolve_precision(spec, precision, device.split(":")[0])
    key = (spec.key, device, precision, False, _token(spec))
    with _LOCK:
        built = _ENCODERS.get(key)
    if built is None:
        built = _build_once(key, lambda: LoadedAggregator(spec, device, precision))
        with _LOCK:
            built = _ENCODERS.setdefault(key, built)
    return built


def forget_failures() -> None:
    """Called on every worker when a run starts: the user may have fixed the weights since."""
    with _LOCK:
        _FAILED.clear()


def loaded_encoder_keys() -> list[tuple]:
    """Which encoders this process holds (for tests and diagnostics)."""
    with _LOCK:
        return list(_ENCODERS)


def release_encoders(spec_key: str | None = None) -> None:
    """Free cached encoders (all, or those of one spec) so their memory can be reclaimed."""
    with _LOCK:
        for key in [k for k in _FAILED if spec_key is None or k[0] == spec_key]:
            del _FAILED[key]
        for key in [k for k in _ENCODERS if spec_key is None or k[0] == spec_key]:
            del _ENCODERS[key]
