"""A fake ``pynvml`` (nvidia-ml-py's module) for tests on machines without a GPU.

Put this folder first on ``sys.path`` (or ``PYTHONPATH`` for worker processes).
What it reports is scripted by ``SCRIPT`` (set it in-process) or by the JSON in
``$FAKE_NVML_SCRIPT`` (worker processes):

* ``{"devices": 1, "util": 40}``: every GPU at a constant 40 %;
* ``{"devices": 1, "sequence": [0, 50, 100]}``: the values in turn, one per query;
* ``{"devices": 1, "follow": true}``: 100 % while ``BUSY[0] > 0`` (a test's encoder
  raises it for the length of its forward pass), else 0 % -- a GPU that is busy
  exactly when the encoder runs.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from types import SimpleNamespace

SCRIPT: dict | None = None
BUSY = [0]
CALLS = {"init": 0, "util": 0}
_LOCK = threading.Lock()
_SEQ: dict = {}


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_Unknown(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


def _script() -> dict:
    if SCRIPT is not None:
        return SCRIPT
    raw = os.environ.get("FAKE_NVML_SCRIPT")
    if raw is None:
        raise NVMLError_LibraryNotFound("fake NVML: no script (no driver)")
    return json.loads(raw)


def nvmlInit():
    _script()
    CALLS["init"] += 1


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return int(_script().get("devices", 1))


def nvmlDeviceGetHandleByIndex(i):
    if i >= nvmlDeviceGetCount():
        raise NVMLError("invalid index")
    return SimpleNamespace(index=i)


def nvmlDeviceGetHandleByUUID(uuid):
    return SimpleNamespace(index=int(str(uuid).rsplit("-", 1)[-1]))


def nvmlDeviceGetIndex(h):
    return h.index


def nvmlDeviceGetUUID(h):
    return f"GPU-fake-0000-{h.index}"


def nvmlDeviceGetName(h):
    return "Fake H200"


def nvmlDeviceGetUtilizationRates(h):
    s = _script()
    CALLS["util"] += 1
    if s.get("follow"):
        util = 100 if BUSY[0] > 0 else 0
    elif "sequence" in s:
        with _LOCK:
            it = _SEQ.setdefault(h.index, itertools.cycle(s["sequence"]))
            util = next(it)
    else:
        util = s.get("util", 0)
    return SimpleNamespace(gpu=util, memory=util // 2)


def nvmlDeviceGetMemoryInfo(h):
    return SimpleNamespace(used=int(_script().get("mem_mb", 1024)) * 2**20, total=141 * 2**30)


def nvmlDeviceGetPowerUsage(h):
    if _script().get("no_power"):
        raise NVMLError("not supported")
    return int(_script().get("power_w", 300) * 1000)
