"""Progress reporting: live by default where a person watches, silent elsewhere.

A reporter gets ``start(total, description)``, ``advance(n)`` and ``close()``.
`activate_progress_reporter` installs one for the whole process; the API
never replaces an installed reporter.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Protocol


class ProgressReporter(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


class NullReporter:
    """Says nothing (batch jobs, CI, logs)."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class TextReporter:
    """One self-overwriting line: tiles done / total, rate, ETA."""

    def __init__(self, stream=None, min_interval: float = 0.2):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._lock = threading.Lock()

    def start(self, total: int, description: str) -> None:
        self.total, self.description, self.done = total, description, 0
        self.t0 = self._last = time.perf_counter()
        self._render()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if now - self._last >= self.min_interval or self.done >= self.total:
                self._last = now
                self._render()

    def close(self) -> None:
        self._render()
        self.stream.write("\n")
        self.stream.flush()

    def _render(self) -> None:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:5.0f}s" if eta == eta else "    ?"
        self.stream.write(f"\r{self.description}: {self.done}/{self.total} tiles  {rate:7.1f} tiles/s  ETA {eta_text}")
        self.stream.flush()


_ACTIVE: ProgressReporter | None = None


def activate_progress_reporter(reporter: ProgressReporter | None) -> None:
    """Install ``reporter`` for every later call (``None`` restores the default)."""
    global _ACTIVE
    _ACTIVE = reporter


def get_progress_reporter() -> ProgressReporter:
    """The installed reporter, else a live one in a terminal or notebook, else a silent one."""
    if _ACTIVE is not None:
        return _ACTIVE
    return TextReporter() if _interactive() else NullReporter()


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
