"""The output folder as a shared resource: checked before use, and held by one run at a time.

Two runs on one ``output_dir`` would each retire the other's staging and
overwrite the other's process list, so a run holds ``<output_dir>/.slide2vec.lock``
from before it touches the store until it has written its process list.
The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks
and on NFSv3+, where ``flock`` often is not), holding the owner's host, pid
and start time, and its mtime is refreshed every ``heartbeat`` seconds while
the run lives.  A lock is *stale* — and taken over, with a warning — when
its process is gone or its pid now belongs to a process that started later
(same host: pids are reused, above all after a container restart), or it has
not been refreshed for ``stale_after`` seconds (another host, whose processes
cannot be checked).  Runs restarted together take a stale lock over one at a
time (`RunLock._take_over`); a lock file that is not a run's lock (empty,
not JSON, a folder, an impossible pid) is reported, never waited on.
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

from slide2vec_dask.atomic import (NAME_MAX, atomic, digest, process_alive, sweep,  # noqa: F401
                                   tmp_name)   # (re-exported: their old home)

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
              "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "process_start": process_start_ticks(os.getpid()), "token": self.token}
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = self._look()
                if seen is None:   # vanished between the two calls, or being written right now
                    time.sleep(0.1)
                    continue
                if not self._stale(seen.holder, seen.age):
                    holder = seen.holder
                    raise OutputDirLocked(
                        f"{self.path.parent} is in use by another run: pid {holder['pid']} on "
                        f"{holder['host']}, started {holder.get('started')}. Wait for it to finish or use "
                        f"another output_dir; if that run is gone, delete {self.path}") from None
                self._take_over(seen)
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
        try:
            holder = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    # -- internals ------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _look(self) -> _Seen | None:
        """The lock as it is now; None when gone or still being written; unreadable: said, not waited on."""
        try:
            age = time.time() - self.path.stat().st_mtime
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise self._unreadable("it is a folder, not a file") from None
        except OSError as exc:
            raise self._unreadable(f"it cannot be read: {describe_os_error(exc)}") from None
        holder, why = parse_lock(raw)
        if holder is not None:
            return _Seen(holder, age, raw)
        if age < _BEING_WRITTEN and why in ("it is empty", "it is not JSON"):   # created a moment ago
            return None
        raise self._unreadable(why)

    def _unreadable(self, why: str) -> OutputDirLocked:
        return OutputDirLocked(f"{self.path} cannot be read as a run's lock ({why}). If no run is using "
                               f"{self.path.parent}, remove it and run again")

    def _stale(self, holder: dict, age: float) -> bool:
        if holder["host"] == socket.gethostname():
            return not process_alive(holder["pid"]) or not same_process(holder)
        return age > self.stale_after

    def _take_over(self, seen: _Seen) -> None:
        """Remove the lock judged stale — only if it is still that one, and by one run only.

        Runs restarted together after a crash all judge the same lock stale; each must then
        claim it (a file named after its token, created exclusively) and check, holding the
        claim, that the lock is still the one judged: otherwise the first would take it over
        and the second rename away the first's fresh lock.  A claim lives milliseconds; one
        older than `_CLAIM_ABANDONED` seconds was left by a crash and is removed.
        """
        claim = self.path.with_name(f"{LOCK_NAME}.takeover.{digest(seen.holder['token'])}")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            _remove_if_older(claim, _CLAIM_ABANDONED)
            time.sleep(0.05)
            return
        except OSError as exc:
            raise OutputDirError(f"cannot take over the stale lock {self.path}: {describe_os_error(exc)}") from exc
        try:
            if _read_or_none(self.path) != seen.raw:   # another run took it over first
                return
            aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex[:8]}")
            os.rename(self.path, aside)
            aside.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputDirError(f"cannot take over the stale lock {self.path}: {describe_os_error(exc)}") from exc
        finally:
            claim.unlink(missing_ok=True)
        holder = seen.holder
        logger.warning("%s: took over a stale lock left by pid %s on %s (started %s), whose run is gone",
                       self.path.parent, holder["pid"], holder["host"], holder.get("started"))


_BEING_WRITTEN = 2.0       # seconds an empty or partial lock may be one a run is writing this instant
_CLAIM_ABANDONED = 30.0
_PID_MAX = 1 << 22         # Linux's ceiling for pid_max
_START_SLACK = 5.0         # seconds: "started" is rounded to the second, the boot time too


class _Seen:
    """A lock as read: its holder, its age (since the last heartbeat) and its bytes (to compare)."""

    def __init__(self, holder: dict, age: float, raw: bytes):
        self.holder, self.age, self.raw = holder, age, raw


def parse_lock(raw: bytes) -> tuple[dict | None, str]:
    """A lock's holder, or None and why it is not a run's lock."""
    if not raw.strip():
        return None, "it is empty"
    try:
        holder = json.loads(raw)
    except ValueError:
        return None, "it is not JSON"
    if not isinstance(holder, dict):
        return None, f"it is not a run's lock: a JSON {type(holder).__name__}, not an object"
    pid = holder.get("pid")
    if not isinstance(holder.get("host"), str) or not isinstance(holder.get("token"), str):
        return None, "it is not a run's lock: no host or token"
    if type(pid) is not int or not 0 < pid < _PID_MAX:
        return None, f"it is not a run's lock: pid {str(pid)[:30]!r} is not a process id"
    return holder, ""


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _remove_if_older(path: Path, seconds: float) -> None:
    try:
        if time.time() - path.stat().st_mtime > seconds:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def process_start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (``/proc/<pid>/stat``); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])   # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def same_process(holder: dict) -> bool:
    """Whether the live process with the lock's pid is the run that wrote it, not a later one.

    Pids are reused, most of all after a container restart (pid 1, 7, 12 again): the lock
    records its process's start (ticks since boot; older locks: the wall time it was
    taken), and a process that started after it cannot be its writer.  Unknown: the same.
    """
    now = process_start_ticks(holder["pid"])
    if now is None:
        return True
    if isinstance(holder.get("process_start"), int):
        return holder["process_start"] == now
    try:
        started = _dt.datetime.fromisoformat(str(holder.get("started"))).timestamp()
        return _boot_time() + now / os.sysconf("SC_CLK_TCK") <= started + _START_SLACK
    except (OSError, ValueError, TypeError):
        return True


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")
