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
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

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


def check_output_dir(output_dir: Path, what: str = "output_dir") -> None:
    """Create ``output_dir`` if needed, or say clearly why it cannot hold a run (or, ``what`` says,
    another folder written to: an export's destination)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"{what} {output_dir} is a file, not a folder; choose another {what}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create {what} {output_dir}: {describe_os_error(exc)}") from exc
    if not os.access(output_dir, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(output_dir).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise OutputDirError(f"{what} {output_dir} {why}; choose another {what}"
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


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one we may not signal does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- atomic writes of files that sit beside the store (exports, tile archives) ---------------------------
_HOST = socket.gethostname()


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def sweep(root: Path) -> int:
    """Temporaries left under ``root`` by dead processes of this host (a crash, a kill); how many went.

    Run once per folder tree (at the end of a run, by `export`), never per file: a folder of
    a cohort's exports holds one entry per slide, and a scan per write would be quadratic.
    """
    marker = f".{_HOST}-"
    removed = 0
    for folder, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            if not (name.startswith(".") and name.endswith(".tmp") and marker in name):
                continue
            try:
                pid = int(name.rsplit(marker, 1)[1].split("-")[0])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not process_alive(pid):
                _remove(Path(folder) / name)
                removed += 1
        # never into a store (a .zarr folder) or a temporary: neither holds other exports
        dirs[:] = [d for d in dirs if not d.endswith((".zarr", ".tmp"))]
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a file or a folder next to ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    try:
        write(tmp)
        if tmp.is_dir():
            # A folder cannot be renamed over another: the old one goes aside first (one rename),
            # so the target is, at every instant, absent, the old export or the new one.
            if target.exists():
                old = _tmp_name(target)
                os.rename(target, old)
                _remove(old)
            os.rename(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)
    return target
