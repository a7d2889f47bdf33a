"""Files written aside and renamed into place, and the temporaries dead writers left: one rule.

A leaf module (it imports nothing of the package), so both `tiling` (plans) and
`store` / `exporters` (archives, exports) write through it, and `sweep` finds
every temporary any of them left.  ``store.output_dir`` re-exports the names.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one we may not signal does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
