#!/usr/bin/env python
"""Cohort benchmark: does `Pipeline.run` on a cohort stream at the single-slide data path's speed?

Not a pytest test (no ``test_*.py`` name, no ``test_`` functions).  Run it by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_cohort.py                          # N = 20 200 2000, 3 repeats, both kinds
    python tests/benchmarks/bench_cohort.py --max-seconds 300 --json bench-out/cohort.json
    python tests/benchmarks/bench_cohort.py --kinds cmu --counts 20 200 --repeats 1
    python tests/benchmarks/bench_cohort.py --counts 2 5 --repeats 1  # smoke

A cohort is N manifest rows whose ``image_path`` are symlinks, named by
sample id, to ONE slide (cached in ``bench-out/cohort/<kind>/``), so the
cohort costs no disk and every row reads the same, page-cache-warm pixels.
Two slide kinds:

``pyramidal``  a 6000 x 6000 Aperio-style SVS of real tissue
               (`testing.real_tissue_source` of ``CMU-1-Small-Region.svs``,
               tissue fraction 0.6, seed 0, 0.5 µm/px, downsamples 1/4/16),
               built once into ``bench-out/``;
``cmu``        the single-level CMU slide itself (2220 x 2967 px).

The encoder is the global-average-pool "encoder" (``Model.from_module`` of
``AdaptiveAvgPool2d(1) + Flatten``, 3-d), so what is timed is the data path
and the orchestration: planning, reading, decoding, cutting, normalising,
writing the store.

Each measured run is a fresh subprocess.  A cohort run is
``Pipeline(model, execution=ExecutionOptions(output_dir=fresh)).run(manifest_path=...)``
on the local default (no client given: the Pipeline starts its own local
cluster, included in the time).  The child installs a progress reporter
through the public ``slide2vec_dask.activate_progress_reporter`` and records
the ``perf_counter`` of the ``run()`` call, of the first ``advance(n > 0)``
(time to first tile) and of every later advance.  Per run:

- time to first tile: ``run()`` call -> first embedded tile(s) reported;
- tiles/s: tiles embedded / seconds of the ``run()`` call; also "steady"
  tiles/s, from the first tile to the last (startup and planning excluded);
- slides/s: N / seconds of the run;
- client peak RSS: the parent samples the summed VmRSS of the child's whole
  process tree (client, in-process scheduler, nanny, worker process) every
  50 ms, and reads the child's own VmHWM at its end; the larger is reported.
  The local default may run its worker inside the client's process (threads)
  or as a child process (a nanny's worker); either way it is in the tree, so
  "client" RSS includes the worker's.

The single-slide data path, ``Model.embed_slide`` of the 20000 x 16000
pyramidal SVS that ``bench_embed.py`` builds (same file, same cache), with the
same pool encoder and default options, runs interleaved with the cohort runs
(one before each count's cohort runs, in every repeat) so machine noise hits
both sides.  Medians (min..max) over repeats.

Time cap (``--max-seconds T``): a run still going after ``T`` s is killed
(its whole process group).  Its time to first tile and peak RSS (sampled,
plus VmHWM read just before the kill) still count; tiles/s is tiles done /
seconds from the ``run()`` call to the last progress report; slides/s is
derived from tiles done / tiles per slide.  Such runs and summary rows are
marked ``CAPPED``.  Memory that only peaks at the end of a run (collecting
results, writing the process list) is not seen by a capped run.

The 1-min load average is printed before and after every run (the machine may
be shared).  The page cache is warm for every run.  ``--json PATH`` writes
every raw run.  Exit status 0 when every target passes, 1 otherwise.

Targets (see ``TARGETS``): pyramidal cohort tiles/s at N=200 >= 0.7 x the
single-slide data path's; CMU cohort tiles/s at N=200 >= 600; time to first
tile at the largest N <= 2 x that at the smallest N (per kind); peak RSS at
the largest N <= the smallest N's + 150 MB (per kind).  With ``--counts``
lacking 200 the N=200 targets are checked at the largest N given (the row
says which).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embed import (CMU_SVS, DEFAULT_SHAPE, REPO, TreeRSS, _cpu_of, _status_kb, count_tiles,  # noqa: E402
                         ensure_slide, mark, summary)

COHORT_SHAPE = (6000, 6000)
TIMELINE_S = 20.0          # tiles done is sampled every 20 s, to show whether the rate holds over a run
KINDS = ("pyramidal", "cmu")
TARGET_COUNT = 200
TARGETS = {
    "pyramidal_vs_single": 0.7,   # pyramidal cohort tiles/s at N=200 / single-slide data path tiles/s
    "cmu_tps": 600.0,             # CMU cohort tiles/s at N=200
    "ttft_growth": 2.0,           # time to first tile, largest N / smallest N
    "rss_growth_mb": 150.0,       # peak RSS, largest N - smallest N
}


def _no_nan(x):
    """NaN -> None, so the JSON written is standard."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def git_state() -> str:
    """HEAD and whether the package has uncommitted changes (what was measured)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "slide2vec_dask"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head or '?'}{' + uncommitted changes in slide2vec_dask/' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- cohorts
def cohort_slide(kind: str, slides_dir: Path, source_svs: Path) -> Path:
    if kind == "cmu":
        return source_svs
    return ensure_slide(slides_dir, COHORT_SHAPE, source_svs)


def cohort_manifest(kind: str, target: Path, count: int, slides_dir: Path) -> Path:
    """``count`` rows, each a symlink named by its sample id to ``target`` (cached, re-used)."""
    folder = slides_dir / "cohort" / kind
    folder.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    rows = []
    for i in range(count):
        sid = f"{kind}-{i:05d}"
        link = folder / f"{sid}{target.suffix}"
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        rows.append((sid, str(link)))
    manifest = folder / f"manifest_{count}.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "image_path"])
        w.writerows(rows)
    return manifest


# --------------------------------------------------------------------------- child side
class TimingReporter:
    """A progress reporter (public protocol) keeping perf_counter times in a JSON file.

    The file is rewritten on the first advance and then at most every 0.5 s,
    so a parent that kills the run still knows the time to first tile and how
    far it got.
    """

    def __init__(self, path: str, t_call: float):
        self.path, self.t_call = Path(path), t_call
        self.done = 0
        self.totals: list[int] = []
        self.first_t = self.first_n = self.last_t = None
        self.slides: dict | None = None       # from the optional cohort() hook, when the driver calls it
        self.all_planned_t = None
        self.timeline: list[tuple[float, int]] = []   # (seconds since the call, tiles done) every TIMELINE_S
        self._written = 0.0
        self._lock = threading.Lock()

    def start(self, total: int, description: str) -> None:
        with self._lock:
            self.totals.append(int(total))
            self._write(force=True)

    def advance(self, n: int) -> None:
        now = time.perf_counter()
        with self._lock:
            if n <= 0:
                return
            self.done += n
            self.last_t = now
            if now - self.t_call >= TIMELINE_S * (len(self.timeline) + 1):
                self.timeline.append((round(now - self.t_call, 2), self.done))
            first = self.first_t is None
            if first:
                self.first_t, self.first_n = now, n
            self._write(force=first)

    def cohort(self, *, slides_total: int, slides_planned: int, slides_done: int, slides_failed: int,
               tiles_total: int, **_) -> None:
        """Optional hook (a driver calls it if the reporter has it): slide counts as they change."""
        now = time.perf_counter()
        with self._lock:
            self.slides = {"total": slides_total, "planned": slides_planned, "done": slides_done,
                           "failed": slides_failed, "tiles_total": tiles_total}
            if slides_total and slides_planned >= slides_total and self.all_planned_t is None:
                self.all_planned_t = now
            self._write()

    def close(self) -> None:
        with self._lock:
            self._write(force=True)

    def snapshot(self) -> dict:
        return {"t_call": self.t_call, "first_t": self.first_t, "first_n": self.first_n, "last_t": self.last_t,
                "done": self.done, "totals": list(self.totals), "slides": self.slides,
                "all_planned_t": self.all_planned_t, "timeline": list(self.timeline)}

    def _write(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._written < 0.5:
            return
        self._written = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.path)


def _pool_model():
    import torch

    from slide2vec_dask import Model

    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                             name="mean-rgb", feature_dim=3)


def child(ns) -> None:
    from slide2vec_dask import ExecutionOptions, Pipeline, activate_progress_reporter

    model = _pool_model()
    out: dict = {}
    c0 = os.times()
    t_call = time.perf_counter()
    reporter = TimingReporter(ns.progress, t_call)
    activate_progress_reporter(reporter)
    if ns.child == "cohort":
        reporter.t_call = t_call = time.perf_counter()
        result = Pipeline(model, execution=ExecutionOptions(output_dir=ns.out)).run(manifest_path=ns.manifest)
        t_end = time.perf_counter()
        out["tiles"] = int(sum(a.num_tiles for a in result.tile_artifacts))
        out["slides_ok"] = len(result.tile_artifacts)
        out["failed"] = int(result.num_failed)
        if result.num_failed:
            with open(result.process_list_path, newline="") as f:
                out["errors"] = [f"{r['sample_id']}: {r['error_type']}: {r['error']}"
                                 for r in csv.DictReader(f) if r["status"] == "failed"][:5]
    else:
        reporter.t_call = t_call = time.perf_counter()
        result = model.embed_slide(ns.slide)
        t_end = time.perf_counter()
        out["tiles"] = int(result.num_tiles)
        out["slides_ok"], out["failed"] = 1, 0
    out.update(reporter.snapshot())
    c1 = os.times()
    out["cpu_s"] = sum(c1[:4]) - sum(c0[:4])     # user + system, this process and reaped children
    out["seconds"] = t_end - t_call
    out["vmhwm_kb"] = _status_kb(os.getpid(), "VmHWM:")
    Path(ns.result).write_text(json.dumps(out))


# --------------------------------------------------------------------------- parent side
def measure(kind: str, args: list[str], max_seconds: float | None) -> dict:
    """One child run; its timings plus the process tree's peak RSS (CAPPED if killed)."""
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as d:
        result, progress, out_dir = Path(d) / "result.json", Path(d) / "progress.json", Path(d) / "out"
        cmd = [sys.executable, __file__, "--child", kind, "--result", str(result), "--progress", str(progress),
               "--out", str(out_dir), *args]
        load0 = os.getloadavg()[0]
        with open(Path(d) / "child.log", "w") as logf:
            proc = subprocess.Popen(cmd, start_new_session=True, stdout=logf, stderr=subprocess.STDOUT)
            sampler = TreeRSS(proc.pid, mark_every=1e9)
            capped = False
            try:
                proc.wait(timeout=max_seconds)
            except subprocess.TimeoutExpired:
                capped = True
                hwm_kb, cpu_s = _status_kb(proc.pid, "VmHWM:"), _cpu_of(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            sampled_kb = sampler.stop()
        try:    # a nanny's worker may outlive a killed client in its own group: make sure it is gone
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if capped:
            res = json.loads(progress.read_text()) if progress.exists() else {"done": 0, "totals": []}
            res.update(capped=True, capped_after_s=max_seconds, vmhwm_kb=hwm_kb, tiles=res.get("done", 0),
                       failed=None, cpu_s=cpu_s)
            last, t_call = res.get("last_t"), res.get("t_call")
            res["seconds"] = (last - t_call) if last and t_call else float("nan")
        elif proc.returncode != 0 or not result.exists():
            tail = (Path(d) / "child.log").read_text().splitlines()[-25:]
            res = {"error": f"exit code {proc.returncode}", "log_tail": tail, "tiles": 0, "seconds": float("nan")}
        else:
            res = json.loads(result.read_text())
            res["capped"] = False
    res["load"] = (load0, os.getloadavg()[0])
    res["rss_sampled_mb"] = sampled_kb / 1024
    res["peak_rss_mb"] = max(sampled_kb, res.get("vmhwm_kb") or 0) / 1024
    res["client_vmhwm_mb"] = (res.get("vmhwm_kb") or 0) / 1024
    first, t_call, last = res.get("first_t"), res.get("t_call"), res.get("last_t")
    res["ttft_s"] = (first - t_call) if first is not None and t_call is not None else float("nan")
    planned = res.get("all_planned_t")
    res["all_planned_s"] = (planned - t_call) if planned is not None and t_call is not None else float("nan")
    sec = res.get("seconds", float("nan"))
    res["cpu_ms_per_tile"] = 1000 * res["cpu_s"] / res["tiles"] if res.get("tiles") and "cpu_s" in res else float("nan")
    res["tps"] = res["tiles"] / sec if res.get("tiles") and sec == sec and sec > 0 else float("nan")
    if first is not None and last is not None and last - first > 0.5:
        res["tps_steady"] = (res["done"] - res["first_n"]) / (last - first)
    else:
        res["tps_steady"] = float("nan")
    return res


def fmt_run(res: dict) -> str:
    if res.get("error"):
        return "ERROR " + res["error"] + "\n        " + "\n        ".join(res.get("log_tail", []))
    def f(x, spec):
        return "n/a".rjust(len(format(1.0, spec))) if x is None or x != x else format(x, spec)

    s = (f"{res['tiles']:7d} tiles in {f(res['seconds'], '7.1f')} s = {f(res['tps'], '7.1f')} tiles/s "
         f"(steady {f(res['tps_steady'], '7.1f')}), {f(res.get('slides_per_s'), '6.2f')} slides/s, "
         f"first tile {f(res['ttft_s'], '6.2f')} s, {f(res['cpu_ms_per_tile'], '5.2f')} CPU-ms/tile, "
         f"peak RSS {res['peak_rss_mb']:5.0f} MB "
         f"(client VmHWM {res['client_vmhwm_mb']:.0f}), load {res['load'][0]:.1f}->{res['load'][1]:.1f}")
    tl = res.get("timeline") or []
    if len(tl) >= 2:
        rates, prev = [], (0.0, 0)
        for t, d in tl:
            rates.append(f"{(d - prev[1]) / (t - prev[0]):.0f}")
            prev = (t, d)
        s += f"\n        tiles/s in successive ~{TIMELINE_S:.0f} s windows: {' '.join(rates)}"
    if res.get("all_planned_s") == res.get("all_planned_s"):
        s += f", all slides planned after {res['all_planned_s']:.2f} s"
    if res.get("failed"):
        s += f"\n        {res['failed']} slide(s) FAILED: {res.get('errors')}"
    if res.get("capped"):
        sl = res.get("slides") or {}
        s += (f"\n        CAPPED: killed after {res['capped_after_s']:.0f} s with {res['tiles']} of "
              f"{res.get('expected_tiles')} tiles done"
              + (f"; slides done {sl.get('done')}, planned {sl.get('planned')} of {sl.get('total')}" if sl else ""))
    return s


def run_all(ns) -> dict:
    single = ensure_slide(ns.slides_dir, DEFAULT_SHAPE, ns.source_svs)
    single_tiles = count_tiles(single)
    kinds = {}
    for kind in ns.kinds:
        path = cohort_slide(kind, ns.slides_dir, ns.source_svs)
        kinds[kind] = {"path": str(path), "tiles_per_slide": count_tiles(path)}
    log(f"single slide {single.name}: {single_tiles} tissue tiles; cohort slides: "
        + ", ".join(f"{k} = {Path(v['path']).name} ({v['tiles_per_slide']} tiles per slide)" for k, v in kinds.items()))
    manifests = {(k, n): cohort_manifest(k, Path(kinds[k]["path"]), n, ns.slides_dir)
                 for k in ns.kinds for n in ns.counts}
    runs: dict = {"single": [], "cohort": {f"{k}:{n}": [] for k in ns.kinds for n in ns.counts}}
    for r in range(ns.repeats):
        for n in ns.counts:
            ref = None                   # the single-slide run of this block, for paired ratios
            if not ns.no_single:
                log(f"[{r + 1}/{ns.repeats}] single-slide data path: embed_slide({single.name}), "
                    f"{single_tiles} tiles ...")
                res = measure("single", ["--slide", str(single)], ns.max_seconds)
                res["expected_tiles"] = single_tiles
                res["slides_per_s"] = 1 / res["seconds"] if res["seconds"] == res["seconds"] else float("nan")
                runs["single"].append(res)
                ref = res.get("tps")
                log(f"           single           {fmt_run(res)}")
            for kind in ns.kinds:
                per = kinds[kind]["tiles_per_slide"]
                log(f"[{r + 1}/{ns.repeats}] cohort {kind} N={n} ({n * per} tiles), Pipeline.run on the local default"
                    + (f", cap {ns.max_seconds:.0f} s" if ns.max_seconds else "") + " ...")
                res = measure("cohort", ["--manifest", str(manifests[kind, n])], ns.max_seconds)
                res["expected_tiles"] = n * per
                res["single_ref_tps"] = ref
                if res.get("capped"):    # slides finished (cohort hook) or, without it, tiles done / tiles per slide
                    done = (res.get("slides") or {}).get("done") or (res["tiles"] / per if res["tiles"] else 0)
                    res["slides_per_s"] = done / res["seconds"] if done else float("nan")
                else:
                    res["slides_per_s"] = n / res["seconds"]
                runs["cohort"][f"{kind}:{n}"].append(res)
                log(f"           {kind:9s} N={n:<5d} {fmt_run(res)}")
    return {"single_slide": str(single), "single_tiles": single_tiles, "kinds": kinds, "counts": ns.counts,
            "runs": runs}


def report(data: dict, ns) -> bool:
    med = statistics.median
    rows, ok_all = [], True

    def row(name, value, target="", ok=None):
        nonlocal ok_all
        rows.append((name, value, target, mark(ok)))
        ok_all &= ok is not False

    def good(rs):
        return [r for r in rs if not r.get("error")]

    def vals(rs, key):
        return [r[key] for r in good(rs) if r.get(key) == r.get(key)]   # drop NaN

    single = data["runs"]["single"]
    capped_tag = lambda rs: " CAPPED" if any(r.get("capped") for r in rs) else ""  # noqa: E731
    single_tps = vals(single, "tps")
    if single:
        row(f"single slide data path tiles/s{capped_tag(single)}", summary(single_tps))
        row("single slide data path steady tiles/s", summary(vals(single, "tps_steady")), "(info)")
        row("single slide data path CPU-ms per tile", summary(vals(single, "cpu_ms_per_tile"), "{:.2f}"), "(info)")
        if len(good(single)) < len(single):
            row("single slide runs that failed", str(len(single) - len(good(single))), "0", False)
    counts = data["counts"]
    n_small, n_large = min(counts), max(counts)
    n_target = TARGET_COUNT if TARGET_COUNT in counts else n_large
    for kind in data["kinds"]:
        for n in counts:
            rs = data["runs"]["cohort"][f"{kind}:{n}"]
            tag = f"{kind} N={n}{capped_tag(rs)}"
            tps = vals(rs, "tps")
            target, ok = "", None
            if n == n_target and kind == "cmu":
                target = f">= {TARGETS['cmu_tps']:.0f}" + ("" if n == TARGET_COUNT else f" (at N={n})")
                ok = bool(tps) and med(tps) >= TARGETS["cmu_tps"]
            row(f"{tag}: tiles/s", summary(tps), target, ok)
            if n == n_target and kind == "pyramidal" and single_tps and tps:
                ratios = [t / med(single_tps) for t in tps]
                row(f"{tag}: tiles/s / single-slide data path", summary(ratios, "{:.3f}"),
                    f">= {TARGETS['pyramidal_vs_single']}" + ("" if n == TARGET_COUNT else f" (at N={n})"),
                    med(ratios) >= TARGETS["pyramidal_vs_single"])
                paired = [r["tps"] / r["single_ref_tps"] for r in good(rs)
                          if r.get("single_ref_tps") and r["tps"] == r["tps"]]
                if paired:   # each run over the single-slide run just before it: less hit by load drifts
                    row(f"{tag}: paired ratio (over the single run just before)", summary(paired, "{:.3f}"), "(info)")
            row(f"{tag}: steady tiles/s (first tile on)", summary(vals(rs, "tps_steady")), "(info)")
            row(f"{tag}: slides/s", summary(vals(rs, "slides_per_s"), "{:.2f}"), "(info)")
            row(f"{tag}: CPU-ms per tile", summary(vals(rs, "cpu_ms_per_tile"), "{:.2f}"), "(info)")
            row(f"{tag}: time to first tile s", summary(vals(rs, "ttft_s"), "{:.2f}"), "(info)")
            if vals(rs, "all_planned_s"):
                row(f"{tag}: all slides planned after s", summary(vals(rs, "all_planned_s"), "{:.2f}"), "(info)")
            row(f"{tag}: peak RSS MB (client VmHWM)",
                f"{summary(vals(rs, 'peak_rss_mb'), '{:.0f}')} ({summary(vals(rs, 'client_vmhwm_mb'), '{:.0f}')})",
                "(info)")
            bad = [r for r in rs if r.get("error") or r.get("failed")]
            if bad:
                row(f"{tag}: runs with errors / failed slides", str(len(bad)), "0", False)
        if n_large > n_small:
            small = data["runs"]["cohort"][f"{kind}:{n_small}"]
            large = data["runs"]["cohort"][f"{kind}:{n_large}"]
            tag = f"{kind}{capped_tag(small + large)}"
            ts, tl = vals(small, "ttft_s"), vals(large, "ttft_s")
            if ts and tl:
                g = med(tl) / med(ts)
                row(f"{tag}: time to first tile N={n_large} / N={n_small}", f"{g:.2f} ({med(tl):.2f} / {med(ts):.2f} s)",
                    f"<= {TARGETS['ttft_growth']:.0f}", g <= TARGETS["ttft_growth"])
            else:
                row(f"{tag}: time to first tile N={n_large} / N={n_small}", "n/a (no first tile)",
                    f"<= {TARGETS['ttft_growth']:.0f}", False)
            rs_, rl = vals(small, "peak_rss_mb"), vals(large, "peak_rss_mb")
            if rs_ and rl:
                d = med(rl) - med(rs_)
                row(f"{tag}: peak RSS N={n_large} - N={n_small} MB", f"{d:+.0f} ({med(rl):.0f} vs {med(rs_):.0f})",
                    f"<= +{TARGETS['rss_growth_mb']:.0f}", d <= TARGETS["rss_growth_mb"])
    w = [max(len(str(r[i])) for r in rows + [("metric", "median (min..max)", "target", "")]) for i in range(4)]
    line = "  ".join("{:<%d}" % n for n in w)
    print(f"\nSUMMARY: pool encoder (3-d), local default cluster, page cache warm, {os.cpu_count()} CPUs, "
          f"{ns.repeats} repeat(s); single slide {Path(data['single_slide']).name} ({data['single_tiles']} tiles); "
          + ", ".join(f"{k}: {v['tiles_per_slide']} tiles per slide" for k, v in data["kinds"].items())
          + (f"; runs capped at {ns.max_seconds:.0f} s" if ns.max_seconds else ""), flush=True)
    print(line.format("metric", "median (min..max)", "target", ""))
    for r in rows:
        print(line.format(*r))
    print("RESULT:", "PASS" if ok_all else "FAIL", flush=True)
    return ok_all


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[20, 200, 2000], help="cohort sizes N")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement (medians printed)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="cohort slide kinds")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="kill any run still going after this many seconds; report it CAPPED")
    p.add_argument("--no-single", action="store_true", help="leave out the single-slide data path runs")
    p.add_argument("--json", type=Path, help="also write every raw run here")
    p.add_argument("--slides-dir", type=Path, default=REPO / "bench-out", help="where built slides are cached")
    p.add_argument("--source-svs", type=Path, default=CMU_SVS, help="the real H&E slide")
    # child side
    p.add_argument("--child", choices=("cohort", "single"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--slide", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if not ns.child and (any(n < 1 for n in ns.counts) or ns.repeats < 1):
        p.error("--counts and --repeats must be positive")
    ns.counts = sorted(set(ns.counts))
    return ns


def main(argv=None) -> int:
    ns = parse(argv)
    if ns.child:
        child(ns)
        return 0
    if not ns.source_svs.exists():
        sys.exit(f"needs the real H&E slide at {ns.source_svs}")
    log(f"bench_cohort: kinds {ns.kinds}, counts {ns.counts}, {ns.repeats} repeat(s)"
        + (f", cap {ns.max_seconds:.0f} s a run" if ns.max_seconds else "") + f"; {os.cpu_count()} CPUs; "
        f"code {git_state()}")
    data = run_all(ns)
    data["code"] = git_state()
    ok = report(data, ns)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(_no_nan(data), indent=1, default=str))
        log(f"raw runs written to {ns.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
