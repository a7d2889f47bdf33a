"""Files written aside and renamed into place, and the temporaries dead writers left: one rule.

A leaf module (it imports nothing of the package), so both `tiling` (plans) and
`store` / `exporters` (archives, exports, the process list) write through it, and
`sweep` finds every temporary any of them left.  ``store.output_dir`` re-exports the names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable


def digest(text: str, size: int = 8) -> str:
    """A short hex digest of ``text`` (names that must stay short: host tags, cut names, claims)."""
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one we may not signal does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A temporary is ``.<name>.<host tag>-<pid>-<token>.tmp``: the host as 8 hex characters (host
# names run to 253: FQDNs, Kubernetes pod names), a pid of at most 7 digits (Linux's pid_max
# is 2**22), 8 of a token; a name too long for that is cut, with 8 hex of its hash, so that no
# temporary passes a file system's 255 bytes, whatever the id.
NAME_MAX = 255
_TMP_EXTRA = len(".") + len(".") + 8 + len("-") + 7 + len("-") + 8 + len(".tmp")   # 31


def _host_tag() -> str:
    return digest(socket.gethostname(), 4)


def tmp_name(target: Path) -> Path:
    """A hidden temporary beside ``target``, at most `NAME_MAX` bytes, that `sweep` knows by host and pid."""
    name = target.name
    if len(name.encode()) > NAME_MAX - _TMP_EXTRA:
        cut = name.encode()[: NAME_MAX - _TMP_EXTRA - 9].decode(errors="ignore")
        name = f"{cut}~{digest(name, 4)}"
    return target.with_name(f".{name}.{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def sweep(root: Path) -> int:
    """Temporaries left under ``root`` by dead processes of this host (a crash, a kill); how many went.

    Run once per folder tree (at the end of a run, by `export`), never per file: a folder of
    a cohort's exports holds one entry per slide, and a scan per write would be quadratic.
    """
    # This host's tag; and its whole name, as earlier versions wrote it (temporaries left before an upgrade)
    markers = (f".{_host_tag()}-", f".{socket.gethostname()}-")
    removed = 0
    for folder, dirs, files in os.walk(root):
        for name in list(dirs) + files:
            pid = _writer(name, markers)
            if pid is not None and pid != os.getpid() and not process_alive(pid):
                _remove(Path(folder) / name)
                removed += 1
        # never into a store (a .zarr folder) or a temporary: neither holds other exports
        dirs[:] = [d for d in dirs if not d.endswith((".zarr", ".tmp"))]
    return removed


def _writer(name: str, markers: tuple[str, ...]) -> int | None:
    """The pid of this host's process that wrote temporary ``name`` (None: not one of ours)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    for marker in markers:
        if marker in name:
            try:
                return int(name.rsplit(marker, 1)[1].split("-")[0])
            except (IndexError, ValueError):
                continue
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a file or a folder next to ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(target)
    try:
        write(tmp)
        if tmp.is_dir():
            # A folder cannot be renamed over another: the old one goes aside first (one rename),
            # so the target is, at every instant, absent, the old export or the new one.
            if target.exists():
                old = tmp_name(target)
                os.rename(target, old)
                _remove(old)
            os.rename(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)
    return target
