#!/usr/bin/env python
"""Scale benchmark: does the client's memory stay flat as a cohort grows to tens of thousands of slides?

Not a pytest test.  Run it by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_scale.py                        # N = 2000 and 20000
    python tests/benchmarks/bench_scale.py --counts 200 2000 --json bench-out/scale.json
    python tests/benchmarks/bench_scale.py --counts 3000 --trace 1000 3000   # what grows (tracemalloc)

A cohort is N manifest rows, symlinks named by sample id (``tiny-00000``, ...)
to ONE tiny slide: a 512 x 512 px Aperio-style SVS, all tissue (`testing.tissue_image`),
0.5 µm/px, so each slide is planned, read and embedded in milliseconds and what
is measured is the per-slide orchestration (driver, executor, the embedded Dask
scheduler and worker, the store).  Symlinks and manifests are those of
``bench_cohort.cohort_manifest`` (cached in ``bench-out/cohort/tiny/``).
Encoder: the global-average-pool "encoder" (3-d).

Each run is a fresh subprocess: ``Pipeline(model, execution=ExecutionOptions(
output_dir=fresh)).run(manifest_path=...)`` on the local default (CPU: scheduler
and worker in the client's process).  The child samples the summed VmRSS of its
process tree every 0.5 s together with the slides finished so far (the driver's
``cohort`` progress hook); the parent samples the same tree every 50 ms for the
peak.  Per N: peak RSS (the larger of the tree's sampled peak and the client's VmHWM; both
are printed), seconds, slides/s and the *slope*: least-squares RSS vs
slides finished over the rows with 20 %..100 % of the slides done (after the
start-up), in KB per slide.

Target: peak RSS at the largest N <= the smallest N's + 100 MB (exit status 0
when it holds).  ``--trace A B`` (one N): tracemalloc in the child (12 frames),
snapshots when A and when B slides are done, and the top allocations grown in
between (grouped by traceback) are printed -- what grows per slide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cohort import cohort_manifest, git_state, log  # noqa: E402  (the cohort symlinks, shared)
from bench_embed import REPO, TreeRSS, _descendants, _status_kb  # noqa: E402

TINY_SHAPE = (512, 512)
TARGET_GROWTH_MB = 100.0


def tiny_slide(slides_dir: Path) -> Path:
    """The 512 x 512 px all-tissue SVS every row of a cohort points at (built once)."""
    from slide2vec_dask import testing

    path = slides_dir / "tiny_512.svs"
    if not path.exists():
        slides_dir.mkdir(parents=True, exist_ok=True)
        h, w = TINY_SHAPE
        image = testing.tissue_image(h, w, [(0, 0, h, w)], seed=0)
        tmp = path.with_suffix(".tmp.svs")
        testing.write_svs(tmp, image, mpp=0.5, downsamples=(1, 4), tile_size=256)
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- child side
class SlideCounter:
    """A progress reporter (public protocol) that only keeps the driver's slide counts."""

    def __init__(self):
        self.done = self.failed = self.tiles = 0

    def start(self, total, description):
        pass

    def advance(self, n):
        self.tiles += n

    def cohort(self, *, slides_done: int, slides_failed: int, **_):
        self.done, self.failed = slides_done, slides_failed

    def close(self):
        pass


def _tree_rss_kb(pid: int) -> int:
    return sum(_status_kb(p, "VmRSS:") for p in _descendants(pid))


def _top_growth(before, after, limit: int = 25) -> list[str]:
    import tracemalloc

    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib*")]
    stats = after.filter_traces(filters).compare_to(before.filter_traces(filters), "traceback")
    lines = []
    for stat in stats[:limit]:
        lines.append(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks "
                     f"(now {stat.size / 1024:.1f} KiB in {stat.count})")
        for frame in stat.traceback.format(most_recent_first=True)[:24]:
            lines.append("      " + frame.strip())
    return lines


def child(ns) -> None:
    import torch

    from slide2vec_dask import ExecutionOptions, Model, Pipeline, activate_progress_reporter

    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                              name="mean-rgb", feature_dim=3)
    counter = SlideCounter()
    activate_progress_reporter(counter)
    timeline: list[tuple[float, int, int]] = []
    trace: dict = {}
    stop = threading.Event()
    if ns.trace:
        import tracemalloc

        tracemalloc.start(int(os.environ.get("BENCH_SCALE_FRAMES", "12")))
    t0 = time.perf_counter()

    def sample():
        marks = list(ns.trace or [])
        snaps = []
        while not stop.wait(0.5):
            done = counter.done + counter.failed
            timeline.append((round(time.perf_counter() - t0, 2), done, _tree_rss_kb(os.getpid())))
            if marks and done >= marks[0]:
                import gc
                import tracemalloc

                gc.collect()
                snaps.append((done, tracemalloc.take_snapshot()))
                marks.pop(0)
                if len(snaps) == 2:
                    trace["between"] = [snaps[0][0], snaps[1][0]]
                    trace["top"] = _top_growth(snaps[0][1], snaps[1][1])
                    Path(ns.result + ".trace.txt").write_text("\n".join(trace["top"]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = Pipeline(model, execution=ExecutionOptions(output_dir=ns.out)).run(manifest_path=ns.manifest)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    import slide2vec_dask

    out = {"package": str(Path(slide2vec_dask.__file__).parent), "seconds": seconds, "slides_ok": len(result.tile_artifacts), "failed": int(result.num_failed),
           "tiles": counter.tiles, "timeline": timeline, "vmhwm_kb": _status_kb(os.getpid(), "VmHWM:"),
           "trace": trace}
    Path(ns.result).write_text(json.dumps(out))


# --------------------------------------------------------------------------- parent side
def slope_kb_per_slide(timeline: list, n: int) -> float | None:
    """Least-squares RSS (KB) vs slides done, over the samples with 20 %..100 % of the slides done."""
    pts = [(d, r) for _, d, r in timeline if d >= 0.2 * n]
    if len(pts) < 3 or pts[-1][0] == pts[0][0]:
        return None
    mx = sum(d for d, _ in pts) / len(pts)
    my = sum(r for _, r in pts) / len(pts)
    sxx = sum((d - mx) ** 2 for d, _ in pts)
    return sum((d - mx) * (r - my) for d, r in pts) / sxx if sxx else None


def measure(manifest: Path, n: int, trace: list[int] | None, keep_log: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest), "--out", str(Path(d) / "out"),
               "--result", str(result)]
        if trace:
            cmd += ["--trace", *map(str, trace)]
        with open(keep_log, "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
            sampler = TreeRSS(proc.pid, mark_every=1e9)
            rc = proc.wait()
            peak_kb = sampler.stop()
        if rc != 0 or not result.exists():
            raise SystemExit(f"child failed (rc {rc}); see {keep_log}")
        res = json.loads(result.read_text())
        trace_txt = Path(str(result) + ".trace.txt")
        if trace_txt.exists():
            res["trace_text"] = trace_txt.read_text()
    res["n"] = n
    res["peak_kb"] = max(peak_kb, res["vmhwm_kb"])
    res["slope_kb_per_slide"] = slope_kb_per_slide(res["timeline"], n)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--trace", type=int, nargs=2, metavar=("A", "B"), help="tracemalloc growth from A to B slides done")
    p.add_argument("--json", type=Path, help="write every run here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        child(ns)
        return 0
    slides_dir = REPO / "bench-out"
    target = tiny_slide(slides_dir / "cohort")
    log(f"bench_scale on {git_state()}; tiny slide {target}")
    runs = []
    for n in ns.counts:
        manifest = cohort_manifest("tiny", target, n, slides_dir)
        log(f"N={n}: running (load {os.getloadavg()[0]:.2f})")
        res = measure(manifest, n, ns.trace, slides_dir / f"scale_{n}.log")
        runs.append(res)
        slope = res["slope_kb_per_slide"]
        log(f"N={n}: package {res['package']}")
        log(f"N={n}: {res['seconds']:.0f} s, {n / res['seconds']:.1f} slides/s, ok {res['slides_ok']}, "
            f"failed {res['failed']}, peak RSS {res['peak_kb'] / 1024:.0f} MB (client VmHWM "
            f"{res['vmhwm_kb'] / 1024:.0f} MB, last sample {res['timeline'][-1][2] / 1024:.0f} MB), "
            f"slope {'?' if slope is None else f'{slope:.1f}'} KB/slide")
        tl = res["timeline"]
        for i in range(0, len(tl), max(1, len(tl) // 8)):
            log(f"    t={tl[i][0]:7.1f} s  done {tl[i][1]:6d}  RSS {tl[i][2] / 1024:7.1f} MB")
        if res.get("trace_text"):
            print(f"--- tracemalloc: grown between {res['trace']['between']} slides done ---")
            print(res["trace_text"])
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(runs))
    if len(runs) >= 2:
        growth = (runs[-1]["peak_kb"] - runs[0]["peak_kb"]) / 1024
        ok = growth <= TARGET_GROWTH_MB
        log(f"peak RSS N={runs[-1]['n']} - N={runs[0]['n']}: {growth:+.0f} MB (target <= +{TARGET_GROWTH_MB:.0f}): "
            f"{'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
