"""The output folder as a shared resource: checked before use, and held by one run at a time.

Two runs on one ``output_dir`` would each retire the other's staging and
overwrite the other's process list, so a run holds ``<output_dir>/.slide2vec.lock``
from before it touches the store until it has written its process list.
The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks
and on NFSv3+, where ``flock`` often is not), holding the owner's host, pid
and start time, and its mtime is refreshed every ``heartbeat`` seconds while
the run lives.  A lock is *stale* — and taken over, with a warning — when
its process is gone (same host) or it has not been refreshed for
``stale_after`` seconds (another host, whose processes cannot be checked).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from slide2vec_dask.atomic import atomic as atomic, process_alive, sweep as sweep  # (re-exported: their old home)

logger = logging.getLogger("slide2vec_dask")

LOCK_NAME = ".slide2vec.lock"


class RunEnvironmentError(RuntimeError):
    """The run cannot use its output folder (not a slide's fault; no slide was attempted)."""


class OutputDirError(RunEnvironmentError):
    """The output folder cannot be created or written: not a folder, read-only, full."""


class OutputDirLocked(RunEnvironmentError):
    """Another run is using the output folder."""


def describe_os_error(exc: OSError) -> str:
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.EEXIST: "a file of that name exists"}
    return reasons.get(exc.errno, exc.strerror or str(exc))


def check_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` if needed, or say clearly why it cannot hold a run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} is a file, not a folder; choose another output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create output_dir {output_dir}: {describe_os_error(exc)}") from exc
    if not os.access(output_dir, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(output_dir).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise OutputDirError(f"output_dir {output_dir} {why}; choose another output_dir"
                             + ("" if read_only else " or fix its permissions"))


class RunLock:
    """``with RunLock(output_dir):`` — the run's exclusive hold on ``output_dir``."""

    def __init__(self, output_dir: str | Path, heartbeat: float = 30.0, stale_after: float = 300.0):
        self.path = Path(output_dir) / LOCK_NAME
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "token": self.token}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._holder()
                if holder is None:   # vanished between the two calls, or being written right now
                    time.sleep(0.1)
                    continue
                if not self._stale(holder, age):
                    raise OutputDirLocked(
                        f"{self.path.parent} is in use by another run: pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}. Wait for it to finish or use "
                        f"another output_dir; if that run is gone, delete {self.path}") from None
                self._take_over(holder)
                continue
            except OSError as exc:
                raise OutputDirError(f"cannot create the run's lock file in {self.path.parent}: "
                                     f"{describe_os_error(exc)}") from exc
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise OutputDirError(f"cannot write the run's lock file {self.path}: "
                                     f"{describe_os_error(exc)}") from exc
            self._thread = threading.Thread(target=self._beat, name="slide2vec-lock", daemon=True)
            self._thread.start()
            return
        raise OutputDirLocked(f"{self.path.parent}: could not take the lock {self.path} (other runs keep taking it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder, _ = self._holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _holder(self) -> tuple[dict | None, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text() or "null")
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            holder = {}
        if not holder and age < 10:   # created a moment ago and not written yet
            return None, age
        return (holder if isinstance(holder, dict) else {}), age

    def _stale(self, holder: dict, age: float) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not process_alive(holder["pid"])
        return age > self.stale_after

    def _take_over(self, holder: dict) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        logger.warning("%s: took over a stale lock left by pid %s on %s (started %s), whose run is gone",
                       self.path.parent, holder.get("pid"), holder.get("host"), holder.get("started"))
