#!/usr/bin/env python
"""Benchmark: one engine against another checkout (issue 20's "behaviour kept" figures).

Not a pytest test.  Run it by hand, with another checkout of the project to
compare against (e.g. ``git worktree add ../before <commit>``)::

    . .venv/bin/activate
    python tests/benchmarks/bench_engine.py --before ../before --repeats 3 --json bench-out/engine.json

Every measured run is a fresh subprocess whose ``PYTHONPATH`` puts one
checkout's ``slide2vec_dask`` first (``before`` or this one, ``after``); the
two sides alternate in every repeat, so machine noise hits both alike.
Medians (min..max) of ``--repeats``.  Phases:

``datapath``  ``Model.embed_slide`` of the 20000 x 16000 Aperio-layout SVS
              that ``bench_embed.py`` builds (real tissue, 0.5 µm/px,
              downsamples 1/4/16), with a global-average-pool encoder: tiles/s.
``cmu``       ``Model.from_timm("vit_small_patch16_224")`` + ``embed_slide``
              of the real CMU slide, no cluster given, in a cold process; the
              seconds of that call, every module either side imports
              (ours, torch, timm, dask, zarr, PIL, tifffile) imported before
              the clock starts.
``cohort``    ``embed_slides`` of N small slides (symlinks to the CMU slide,
              ``--counts``, default 20 and 200) and ``Pipeline.run`` of the
              same N (the larger N), pool encoder: time to first tile (call ->
              first ``advance``) and tiles/s (tiles / seconds of the call).

Ratios are after / before of the medians.  The issue's bars: datapath
tiles/s >= 0.97; cmu seconds <= 1.1; cohort: time to first tile of N=200
within 2x that of N=20, and ``embed_slides`` tiles/s >= 0.8 x
``Pipeline.run``'s on the same cohort (both measured on ``after``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_cohort import cohort_manifest  # noqa: E402  (the cohort symlinks, shared)
from bench_embed import CMU_SVS, DEFAULT_SHAPE, ensure_slide  # noqa: E402  (the same cached slide)

PRE_IMPORTS = ["torch", "timm", "dask", "dask.array", "zarr", "PIL.Image", "tifffile", "numpy",
               "slide2vec_dask", "slide2vec_dask.model", "slide2vec_dask.pipeline", "slide2vec_dask.slide",
               "slide2vec_dask.tiling", "slide2vec_dask.store", "slide2vec_dask.exporters"]
# either side's engine modules (those missing on a side are skipped)
ENGINE_MODULES = ["slide2vec_dask.dataflow." + m for m in (
    "embed", "graph", "driver", "aggregate", "stages", "tasks", "sinks", "executors", "blocks", "worker")]


# --------------------------------------------------------------------------- child side
class FirstTile:
    def __init__(self):
        self.t_first = None

    def start(self, total, description):
        pass

    def advance(self, n):
        if n and self.t_first is None:
            self.t_first = time.perf_counter()

    def close(self):
        pass


def _pool_model():
    import torch

    from slide2vec_dask import Model

    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                             name="avgpool", spacing_um=0.5, tile_size_px=224, feature_dim=3)


def child(ns) -> dict:
    import importlib

    for name in PRE_IMPORTS + ENGINE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, activate_progress_reporter

    reporter = FirstTile()
    activate_progress_reporter(reporter)
    out: dict = {"engine": sys.modules["slide2vec_dask"].__file__}
    if ns.child == "datapath":
        model = _pool_model()
        t0 = time.perf_counter()
        result = model.embed_slide(ns.slide)
        out["seconds"] = time.perf_counter() - t0
        out["tiles"] = result.num_tiles
    elif ns.child == "cmu":
        t0 = time.perf_counter()
        result = Model.from_timm("vit_small_patch16_224").embed_slide(ns.slide)
        out["seconds"] = time.perf_counter() - t0
        out["tiles"] = result.num_tiles
    elif ns.child == "embed_slides":
        model = _pool_model()
        slides = [{"sample_id": row.split(",")[0], "image_path": row.split(",")[1]}
                  for row in Path(ns.manifest).read_text().splitlines()[1:]]
        t0 = time.perf_counter()
        results = model.embed_slides(slides)
        out["seconds"] = time.perf_counter() - t0
        out["tiles"] = sum(r.num_tiles for r in results)
        out["first_tile_s"] = reporter.t_first - t0
    elif ns.child == "pipeline":
        import tempfile

        model = _pool_model()
        with tempfile.TemporaryDirectory(prefix="bench-engine-", dir=ns.out) as folder:
            t0 = time.perf_counter()
            result = Pipeline(model, execution=ExecutionOptions(output_dir=folder)).run(manifest_path=ns.manifest)
            out["seconds"] = time.perf_counter() - t0
        out["tiles"] = sum(a.num_tiles for a in result.tile_artifacts)
        out["first_tile_s"] = reporter.t_first - t0
        out["failed"] = result.num_failed
    out["tps"] = out["tiles"] / out["seconds"]
    return out


# --------------------------------------------------------------------------- parent side
def run_child(checkout: Path, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"child {args} on {checkout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="the other checkout (its repository root)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--counts", type=int, nargs="+", default=[20, 200])
    p.add_argument("--phases", nargs="+", default=["datapath", "cmu", "cohort"])
    p.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--slide", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        print(json.dumps(child(ns)))
        return 0
    if not CMU_SVS.exists():
        sys.exit(f"the real H&E slide is needed: {CMU_SVS} not found")
    sides = {"after": REPO}
    if ns.before is not None:
        sides = {"before": ns.before.resolve(), **sides}
    big = ensure_slide(ns.slides_dir, DEFAULT_SHAPE, CMU_SVS) if "datapath" in ns.phases else None
    manifests = {n: cohort_manifest("cmu", CMU_SVS, n, ns.slides_dir) for n in ns.counts}
    runs: dict = {}
    load = []
    for rep in range(ns.repeats):
        for side, checkout in sides.items():
            jobs = []
            if "datapath" in ns.phases:
                jobs.append(("datapath", ["--child", "datapath", "--slide", str(big)]))
            if "cmu" in ns.phases:
                jobs.append(("cmu", ["--child", "cmu", "--slide", str(CMU_SVS)]))
            if "cohort" in ns.phases:
                for n in ns.counts:
                    jobs.append((f"embed_slides N={n}", ["--child", "embed_slides", "--manifest", str(manifests[n])]))
                n = max(ns.counts)
                jobs.append((f"Pipeline.run N={n}", ["--child", "pipeline", "--manifest", str(manifests[n]),
                                                     "--out", str(ns.slides_dir)]))
            for name, args in jobs:
                load.append(os.getloadavg()[0])
                res = run_child(checkout, args)
                runs.setdefault(name, {}).setdefault(side, []).append(res)
                print(f"[{rep + 1}/{ns.repeats}] {side:6s} {name:22s} {res['seconds']:7.2f} s  {res['tps']:8.1f} tiles/s"
                      + (f"  first tile {res['first_tile_s']:.2f} s" if "first_tile_s" in res else ""), flush=True)
    print(f"\nload average (1 min) before each run: {summary(load)}")
    print(f"{'phase':24s} " + "  ".join(f"{s + ' tiles/s':>24s}" for s in sides) + "   ratio (after/before)")
    for name, by_side in runs.items():
        cells = [summary([r["tps"] for r in by_side[s]], "{:.1f}") for s in sides]
        ratio = ""
        if len(sides) == 2:
            ratio = f"{statistics.median(r['tps'] for r in by_side['after']) / statistics.median(r['tps'] for r in by_side['before']):.3f}"
        print(f"{name:24s} " + "  ".join(f"{c:>24s}" for c in cells) + f"   {ratio}")
    for name in runs:
        if "first_tile_s" in runs[name]["after"][0]:
            for s in sides:
                if "first_tile_s" in runs[name][s][0]:
                    print(f"time to first tile, {s:6s} {name:22s} {summary([r['first_tile_s'] for r in runs[name][s]])} s")
    if "cmu" in runs:
        for s in sides:
            print(f"cmu end to end, {s:6s}: {summary([r['seconds'] for r in runs['cmu'][s]])} s")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps({"runs": runs, "load": load, "sides": {k: str(v) for k, v in sides.items()}},
                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
