#!/usr/bin/env python
"""Benchmark: planning time per slide, hs2p's tiling (this tree) against an earlier tree's, in one run.

Not a pytest test.  Run it by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_tiling.py --slides-dir bench-out --baseline 6c9af73 --repeats 5

The slide is bench_embed.py's 20000 x 16000 Aperio-layout slide of real CMU tissue (levels 1, 4,
16; built on first use from ``--source``).  Each measurement is a fresh subprocess that imports
one tree's ``slide2vec_dask`` (``--baseline``: a commit, unpacked with ``git archive``; this
tree: the working copy), opens the slide and times ``plan_slide`` with that tree's default
``PreprocessingConfig`` at 0.5 µm/px, 224 px: segmentation, tissue fractions, the tile plan, no
previews.  Modes are interleaved, so machine noise hits them alike; medians (min..max).

Modes: ``baseline`` (the earlier tree), ``contours`` (hs2p's grid per contour, the default now),
``slide`` (this tree's slide-wide grid, ``grid="slide"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(slide: str, mode: str) -> dict:
    from slide2vec_dask import PreprocessingConfig
    from slide2vec_dask.slide import open_slide
    from slide2vec_dask.tiling.plan import plan_slide

    config = PreprocessingConfig() if mode in ("baseline", "contours") else PreprocessingConfig(grid=mode)
    start = time.perf_counter()
    with open_slide(slide) as s:
        plan = plan_slide(s, config, spacing_um=0.5, tile_size_px=224, sample_id="bench")
    return {"seconds": time.perf_counter() - start, "tiles": int(plan.grid.num_tiles)}


def run_child(tree: Path, slide: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, __file__, "--child", str(slide), mode], capture_output=True, text=True,
                         env=env, cwd=tempfile.gettempdir())
    if out.returncode:
        raise RuntimeError(f"{mode}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("SLIDE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--slides-dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--source", type=Path, default=Path("/work/shared/data/CMU-1-Small-Region.svs"))
    parser.add_argument("--baseline", default="6c9af73", help="the commit whose planning is the baseline")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from bench_embed import DEFAULT_SHAPE, ensure_slide

    slide = ensure_slide(args.slides_dir, DEFAULT_SHAPE, args.source)
    with tempfile.TemporaryDirectory() as base:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "slide2vec_dask"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        trees = {"baseline": Path(base), "contours": REPO, "slide": REPO}
        runs: dict[str, list[dict]] = {mode: [] for mode in trees}
        for mode in trees:   # warm the page cache and the imports once
            run_child(trees[mode], slide, mode)
        for _ in range(args.repeats):
            for mode, tree in trees.items():
                runs[mode].append(run_child(tree, slide, mode))
    base_median = statistics.median(r["seconds"] for r in runs["baseline"])
    print(f"slide {slide.name}, {args.repeats} runs each, baseline {args.baseline}")
    for mode, results in runs.items():
        seconds = [r["seconds"] for r in results]
        med = statistics.median(seconds)
        print(f"  {mode:9s} {med:6.2f} s ({min(seconds):.2f}..{max(seconds):.2f})  {results[0]['tiles']:6d} tiles  "
              f"{med / base_median:.2f}x the baseline")


if __name__ == "__main__":
    main()
