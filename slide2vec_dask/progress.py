"""Progress reporting: live by default where a person watches, silent elsewhere.

A reporter gets ``start(total, description)``, ``advance(n)`` (``n`` more
tiles embedded) and ``close()``.  `activate_progress_reporter` installs one
for the whole process; the API never replaces an installed reporter.

A reporter may also define ``cohort(*, slides_total, slides_planned,
slides_done, slides_failed, tiles_total)``; the driver calls it (when it
exists: ``getattr(reporter, "cohort", None)``) right after ``start`` and
whenever one of those counts changes.  Planning streams, so ``tiles_total``
-- the kept tiles of the slides planned so far -- grows during a run.
Reporters that define only the three methods keep working.

A reporter may also define ``gpu(busy_percent)``: the driver calls it as
blocks land on a run with GPUs, with the mean NVML utilisation of the last
few seconds (None while there is no sample); `TextReporter` then ends its
line with ``| GPU 87%``.  The Dask dashboard stays the place for detail.

`TextReporter` draws one self-overwriting line::

    12 slides: slides 3/12 done, 1 failed, 9/12 planned | tiles 1200/3400 (~4533) | 345.0 tiles/s | ETA 9s

While not every slide is planned, the total is extrapolated as
``tiles_total * expected_slides / slides_planned`` (the ``~`` figure) and
the ETA uses it, where ``expected_slides = slides_total - slides_failed``
(at least ``slides_planned``): a slide that failed is taken as one that will
never be planned -- unreadable and missing files, the usual failures, fail
at planning -- so a cohort with failures does not wait on tiles that never
come.  The rate is measured over the last `RATE_WINDOW_S` seconds,
so model loading and planning at the start do not drag it down for the
whole run.  In a Jupyter kernel the same line goes to an updating
``IPython.display`` handle instead of stderr (no ``\\r`` tricks, no red
stderr box); IPython is only imported there.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Protocol

#: Seconds of history the tiles/s rate (and so the ETA) is measured over.
RATE_WINDOW_S = 30.0


class ProgressReporter(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...

    # Optional, see the module docstring:
    # def cohort(self, *, slides_total: int, slides_planned: int, slides_done: int,
    #            slides_failed: int, tiles_total: int) -> None: ...


class NullReporter:
    """Says nothing (batch jobs, CI, logs)."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def cohort(self, *, slides_total: int, slides_planned: int, slides_done: int, slides_failed: int,
               tiles_total: int) -> None:
        pass

    def gpu(self, busy_percent: float | None) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TextReporter:
    """One self-overwriting line: slides done / failed / total, tiles done / known, rate, ETA.

    Renders at most every ``min_interval`` seconds (and on `start` and
    `close`), so `advance` and `cohort` are cheap to call thousands of times.
    ``clock`` (default ``time.perf_counter``) is there for tests.
    """

    def __init__(self, stream=None, min_interval: float = 0.2, clock=None):
        self.stream = stream
        self.min_interval = min_interval
        self._clock = clock or time.perf_counter
        self._lock = threading.Lock()
        self._started = False
        self._width = 0

    # -- the reporter protocol -----------------------------------------------------------------
    def start(self, total: int, description: str) -> None:
        with self._lock:
            self.total, self.description, self.done = int(total), description, 0
            self.slides = None  # (total, planned, done, failed) once cohort() is called
            self.gpu_busy = None  # mean GPU utilisation of the last seconds, once gpu() is called
            self.tiles_total = None
            self.t0 = self._last = self._clock()
            self._samples = collections.deque([(self.t0, 0)])
            self._started, self._width = True, 0
            self._render(self.t0)

    def advance(self, n: int) -> None:
        with self._lock:
            if not self._started:
                return
            self.done += n
            now = self._clock()
            if now - self._last >= self.min_interval or (self.slides is None and self.done >= self.total):
                self._render(now)

    def cohort(self, *, slides_total: int, slides_planned: int, slides_done: int, slides_failed: int,
               tiles_total: int) -> None:
        with self._lock:
            if not self._started:
                return
            first = self.slides is None
            self.slides = (int(slides_total), int(slides_planned), int(slides_done), int(slides_failed))
            self.tiles_total = int(tiles_total)
            now = self._clock()
            if first or now - self._last >= self.min_interval:
                self._render(now)

    def gpu(self, busy_percent: float | None) -> None:
        with self._lock:
            if self._started:
                self.gpu_busy = busy_percent

    def close(self) -> None:
        with self._lock:
            if not self._started:
                return
            self._render(self._clock())
            if self._started:
                self._started = False
                try:
                    self._finish()
                except (OSError, ValueError):
                    pass

    # -- drawing -------------------------------------------------------------------------------
    def _line(self, now: float) -> str:
        """The progress line for the counts so far."""
        rate = self._rate(now)
        known = self.tiles_total if self.tiles_total is not None else self.total
        expected, parts = known, []
        if self.slides is not None:
            total, planned, done, failed = self.slides
            text = f"slides {done}/{total} done"
            if failed:
                text += f", {failed} failed"
            # Slides still to plan; a failed slide is taken as one that never will be.
            pending = max(total - planned - failed, 0)
            if pending:
                text += f", {planned}/{total} planned"
                expected = known * (planned + pending) / planned if planned else None
            parts.append(text)
        tiles = f"tiles {self.done}/{known}"
        if expected is not None and expected != known:
            tiles += f" (~{expected:.0f})"
        parts.append(tiles)
        parts.append(f"{rate:.1f} tiles/s")
        if expected is None or rate <= 0:
            eta = "?"
        else:
            eta = _duration(max(expected - self.done, 0) / rate)
        parts.append(f"ETA {eta}")
        if self.gpu_busy is not None:
            parts.append(f"GPU {self.gpu_busy:.0f}%")
        return f"{self.description}: " + " | ".join(parts)

    def _rate(self, now: float) -> float:
        """Tiles/s over the last RATE_WINDOW_S seconds (since start when the run is younger)."""
        samples = self._samples
        samples.append((now, self.done))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        t, done = samples[0]
        return (self.done - done) / (now - t) if now > t else 0.0

    def _render(self, now: float) -> None:
        self._last = now
        try:
            self._show(self._line(now))
        except (OSError, ValueError):  # a closed or broken stream never fails the run
            self._started = False

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def _show(self, text: str) -> None:
        stream = self._out()
        width = _terminal_columns(stream)
        if width:
            text = text[:width - 1]
        padded = text.ljust(self._width)  # wipe what a longer previous line left behind
        self._width = len(text)
        stream.write("\r" + padded)
        stream.flush()

    def _finish(self) -> None:
        stream = self._out()
        stream.write("\n")
        stream.flush()


class NotebookReporter(TextReporter):
    """`TextReporter`'s line in a Jupyter output that updates in place (an ``IPython.display`` handle)."""

    def __init__(self, min_interval: float = 0.5, clock=None):
        super().__init__(None, min_interval, clock)
        self._handle = None

    def _show(self, text: str) -> None:
        from IPython.display import display

        bundle = {"text/plain": text}
        if self._handle is False:  # no display hook after all: the plain text line
            super()._show(text)
        elif self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True) or False
        else:
            self._handle.update(bundle, raw=True)

    def _finish(self) -> None:
        if self._handle is False:
            super()._finish()
        self._handle = None  # the next run gets its own output


def _terminal_columns(stream) -> int | None:
    try:
        if not stream.isatty():
            return None
        import os

        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return None


_ACTIVE: ProgressReporter | None = None


def activate_progress_reporter(reporter: ProgressReporter | None) -> None:
    """Install ``reporter`` for every later call (``None`` restores the default)."""
    global _ACTIVE
    _ACTIVE = reporter


def get_progress_reporter() -> ProgressReporter:
    """The installed reporter, else a live one in a terminal or notebook, else a silent one."""
    if _ACTIVE is not None:
        return _ACTIVE
    if _in_kernel():
        try:
            import IPython.display  # noqa: F401
        except ImportError:  # pragma: no cover - ipykernel always brings IPython
            return TextReporter()
        return NotebookReporter()
    return TextReporter() if _interactive() else NullReporter()


def _in_kernel() -> bool:
    """Running in a Jupyter kernel (not merely with ipykernel importable or imported by a script)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover
        return False
    return shell is not None and hasattr(shell, "kernel")


def _interactive() -> bool:
    if _in_kernel():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
