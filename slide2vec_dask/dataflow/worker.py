"""Worker-side state: loaded encoders and the devices they run on.

Everything here lives once per process.  A task asks for a device, gets the
encoder already built on it (built the first time, then cached), runs, and
gives the device back, so one worker's threads take turns on each GPU while
its other threads keep decoding blocks.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings

from slide2vec_dask.encoders.base import EncoderSpec

_LOCK = threading.Lock()
_ENCODERS: dict[tuple, object] = {}
_DEVICES: dict[int, queue.Queue] = {}


def _device_queue(num_gpus: int) -> queue.Queue:
    with _LOCK:
        q = _DEVICES.get(num_gpus)
        if q is None:
            q = queue.Queue()
            for device in _devices(num_gpus):
                q.put(device)
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


@contextlib.contextmanager
def acquire_device(num_gpus: int):
    """Hold one device of this process exclusively for the duration of the block."""
    q = _device_queue(num_gpus)
    device = q.get()
    try:
        yield device
    finally:
        q.put(device)


def get_encoder(spec: EncoderSpec, device: str, precision: str | None, channels_last: bool):
    """The encoder built on ``device``; built on first use in this process, then reused."""
    from slide2vec_dask.encoders.runtime import LoadedEncoder, resolve_precision

    precision = resolve_precision(spec, precision, device.split(":")[0])
    key = (spec.key, device, precision, channels_last)
    with _LOCK:
        encoder = _ENCODERS.get(key)
    if encoder is None:
        built = LoadedEncoder(spec, device, precision, channels_last)
        with _LOCK:
            encoder = _ENCODERS.setdefault(key, built)
    return encoder


def loaded_encoder_keys() -> list[tuple]:
    """Which encoders this process holds (for tests and diagnostics)."""
    with _LOCK:
        return list(_ENCODERS)


def release_encoders(spec_key: str | None = None) -> None:
    """Free cached encoders (all, or those of one spec) so their memory can be reclaimed."""
    with _LOCK:
        for key in [k for k in _ENCODERS if spec_key is None or k[0] == spec_key]:
            del _ENCODERS[key]
