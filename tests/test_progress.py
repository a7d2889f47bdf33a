"""Progress reporters: the cohort line (slides, tiles, rate, ETA), throttling, user reporters, Jupyter."""

from __future__ import annotations

import io
import sys
import time
import types

import pytest

from slide2vec_dask import progress
from slide2vec_dask.progress import NullReporter, TextReporter, activate_progress_reporter, get_progress_reporter


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def lines(stream: io.StringIO) -> list[str]:
    return [part.rstrip() for part in stream.getvalue().replace("\n", "\r").split("\r") if part.strip()]


def test_cohort_line_counts_slides_and_tiles_and_extrapolates_the_eta():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=0, clock=clock)
    r.start(0, "4 slides")
    r.cohort(slides_total=4, slides_planned=2, slides_done=0, slides_failed=0, tiles_total=100)
    clock.t = 10.0
    r.advance(50)  # 5 tiles/s; 2 of 4 slides planned with 100 tiles -> ~200 expected, 150 to go
    assert lines(out)[-1] == ("4 slides: slides 0/4 done, 2/4 planned | tiles 50/100 (~200) | 5.0 tiles/s"
                              " | ETA 30s")
    r.cohort(slides_total=4, slides_planned=4, slides_done=2, slides_failed=1, tiles_total=180)
    clock.t = 20.0
    r.advance(50)  # all planned: 180 known, 80 to go at 5 tiles/s
    r.close()
    last = lines(out)[-1]
    assert last == "4 slides: slides 2/4 done, 1 failed | tiles 100/180 | 5.0 tiles/s | ETA 16s"
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1


def test_nothing_planned_yet_has_no_eta_and_long_etas_read_well():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=0, clock=clock)
    r.start(0, "run")
    r.cohort(slides_total=3, slides_planned=0, slides_done=0, slides_failed=0, tiles_total=0)
    assert lines(out)[-1] == "run: slides 0/3 done, 0/3 planned | tiles 0/0 | 0.0 tiles/s | ETA ?"
    r.cohort(slides_total=3, slides_planned=1, slides_done=0, slides_failed=0, tiles_total=10_000)
    clock.t = 5.0
    r.advance(10)  # 2 tiles/s, ~30000 expected -> 14995 s
    assert lines(out)[-1].endswith("tiles 10/10000 (~30000) | 2.0 tiles/s | ETA 4h09m")


def test_rate_is_measured_over_a_recent_window():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=0, clock=clock)
    r.start(10_000, "w")
    clock.t = 100.0  # a slow start (model loading), then 10 tiles/s
    r.advance(1)
    for _ in range(10):
        clock.t += 10.0
        r.advance(100)
    assert "| 10.0 tiles/s |" in lines(out)[-1]


def test_rendering_is_throttled_and_cheap():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=0.2, clock=clock)
    r.start(10**6, "t")
    rendered = len(lines(out))
    began = time.perf_counter()
    for i in range(5000):
        r.advance(1)
        r.cohort(slides_total=10, slides_planned=1 + i // 1000, slides_done=0, slides_failed=0, tiles_total=i)
    assert time.perf_counter() - began < 0.5
    assert len(lines(out)) == rendered + 1  # the first cohort() call draws; the clock never moved
    clock.t = 1.0
    r.advance(1)
    assert len(lines(out)) == rendered + 2 and "tiles 5001/4999 (~9998)" in lines(out)[-1]


def test_plain_reporter_without_cohort_calls_keeps_the_tile_line():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=10, clock=clock)
    r.start(8, "1 slides")
    clock.t = 2.0
    r.advance(4)  # throttled
    clock.t = 4.0
    r.advance(4)  # done == total draws regardless
    r.close()
    assert lines(out)[-1] == "1 slides: tiles 8/8 | 2.0 tiles/s | ETA 0s"
    r.close()  # closing twice, or before start, writes nothing more
    TextReporter(stream=out).close()
    assert out.getvalue().count("\n") == 1


def test_a_shorter_line_wipes_the_longer_one_before_it():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=0, clock=clock)
    r.start(0, "x")
    r.cohort(slides_total=2, slides_planned=1, slides_done=0, slides_failed=1, tiles_total=5)
    long = out.getvalue().split("\r")[-1]
    r.cohort(slides_total=2, slides_planned=2, slides_done=0, slides_failed=0, tiles_total=5)
    short = out.getvalue().split("\r")[-1]
    assert len(short) >= len(long.rstrip()) and short.rstrip() == "x: slides 0/2 done | tiles 0/5 | 0.0 tiles/s | ETA ?"


def test_user_reporter_with_only_three_methods_is_returned_and_kept():
    class Mine:
        def start(self, total, description):
            pass

        def advance(self, n):
            pass

        def close(self):
            pass

    mine = Mine()
    activate_progress_reporter(mine)
    try:
        assert get_progress_reporter() is mine and getattr(mine, "cohort", None) is None
    finally:
        activate_progress_reporter(None)
    NullReporter().cohort(slides_total=1, slides_planned=1, slides_done=1, slides_failed=0, tiles_total=1)


def test_default_is_silent_without_a_terminal_or_a_kernel(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert isinstance(get_progress_reporter(), NullReporter)


def test_in_a_jupyter_kernel_the_line_updates_one_display(monkeypatch):
    shown = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append(("update", obj["text/plain"]))

    def display(obj, raw=False, display_id=False):
        assert raw and display_id
        shown.append(("display", obj["text/plain"]))
        return Handle()

    class Shell:
        kernel = object()

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: Shell()
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.display = display
    ipython.display = ipython_display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython_display)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)

    r = get_progress_reporter()
    assert isinstance(r, progress.NotebookReporter)
    r.min_interval = 0
    r.start(0, "2 slides")
    r.cohort(slides_total=2, slides_planned=2, slides_done=0, slides_failed=0, tiles_total=10)
    r.advance(10)
    r.close()
    assert [kind for kind, _ in shown] == ["display", "update", "update", "update"]
    assert shown[-1][1].startswith("2 slides: slides 0/2 done | tiles 10/10")
    assert stderr.getvalue() == ""


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (59, "59s"), (61, "1m01s"), (3600, "1h00m"), (7322, "2h02m")])
def test_durations(seconds, text):
    assert progress._duration(seconds) == text


def test_a_broken_stream_never_fails_the_run():
    out = io.StringIO()
    r = TextReporter(stream=out, min_interval=0)
    r.start(5, "x")
    out.close()
    r.advance(1)
    r.cohort(slides_total=1, slides_planned=1, slides_done=0, slides_failed=0, tiles_total=5)
    r.close()


def test_failed_slides_are_not_waited_for_in_the_extrapolation():
    clock, out = Clock(), io.StringIO()
    r = TextReporter(stream=out, min_interval=0, clock=clock)
    r.start(0, "3 slides")
    r.cohort(slides_total=3, slides_planned=1, slides_done=0, slides_failed=1, tiles_total=400)
    clock.t = 1.0
    r.advance(100)  # one slide still to plan: 400 known, ~800 expected
    assert lines(out)[-1].endswith("slides 0/3 done, 1 failed, 1/3 planned | tiles 100/400 (~800) | 100.0 tiles/s"
                                   " | ETA 7s")
    r.cohort(slides_total=3, slides_planned=2, slides_done=1, slides_failed=1, tiles_total=425)
    clock.t = 2.0
    r.advance(325)  # everything that can be planned is: no extrapolation, nothing left
    assert lines(out)[-1].endswith("slides 1/3 done, 1 failed | tiles 425/425 | 212.5 tiles/s | ETA 0s")
