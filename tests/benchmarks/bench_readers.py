#!/usr/bin/env python
"""Benchmark: data-path tiles/s per reader backend, on both pyramid layouts, side by side in one run.

Not a pytest test.  Run it by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_readers.py --slides-dir bench-out --repeats 3 --json bench-out/readers.json

What one row is: ``Model.from_module(global average pool).embed_slide`` on a
20000 x 16000 slide at 0.5 µm/px, 224 px tiles, previews off, output to a
temporary directory — open, segment, plan, read, decode, cut, normalise, the
trivial encoder, write — in a fresh subprocess; tiles / wall seconds of that
call.  The trivial encoder makes this the data path's ceiling (what the
reader allows), not a model benchmark.

The two layouts (same pixels, JPEG q90, 240 px tiles):

* ``aperio``  Aperio's: level 0, a stripped thumbnail page, reduced levels
  ×4, ×16 (``bench_20000x16000_tf0.6_s0_q90.svs``, from `testing.write_svs`).
* ``vips``    libvips ``tiffsave`` of the same slide: tiled reduced levels
  ×2 … ×128, no thumbnail page, the Aperio description kept
  (``vips_20000x16000.tif``).

Both are built from the real H&E slide by bench_embed.py (reused when
present in ``--slides-dir``; the vips one is written here from the Aperio one
if missing).  Runs are interleaved (every backend × layout, then again) so
machine noise hits every row alike; medians (min..max) of ``--repeats`` runs.
Backends whose library is not installed are listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPACING_UM, TILE_PX = 0.5, 224
LAYOUTS = {"aperio": "bench_20000x16000_tf0.6_s0_q90.svs", "vips": "vips_20000x16000.tif"}
BACKENDS = ("auto", "tifffile", "openslide", "vips", "cucim")
_LIBRARY = {"openslide": "openslide", "vips": "pyvips", "cucim": "cucim"}


def child(slide: str, backend: str) -> dict:
    import torch

    from slide2vec_dask import ExecutionOptions, Model, PreprocessingConfig

    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Model.from_module(pool, name="avgpool", spacing_um=SPACING_UM, tile_size_px=TILE_PX, feature_dim=3)
    pre = PreprocessingConfig(backend=backend, requested_spacing_um=SPACING_UM, requested_tile_size_px=TILE_PX)
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as out:
        t0 = time.perf_counter()
        result = model.embed_slide(slide, preprocessing=pre, execution=ExecutionOptions(output_dir=out))
        seconds = time.perf_counter() - t0
    return {"tiles": int(result.num_tiles), "seconds": seconds, "tps": result.num_tiles / seconds,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def run_child(slide: Path, backend: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(slide), backend], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_vips_layout(slides_dir: Path) -> None:
    target = slides_dir / LAYOUTS["vips"]
    if target.exists():
        return
    import pyvips

    source = slides_dir / LAYOUTS["aperio"]
    pyvips.Image.new_from_file(str(source)).tiffsave(str(target), tile=True, pyramid=True, compression="jpeg",
                                                     Q=90, tile_width=240, tile_height=240)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, metavar=("SLIDE", "BACKEND"))
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(child(*ns.child)))
        return
    ensure_vips_layout(ns.slides_dir)
    rows: dict[tuple[str, str], list[dict]] = {}
    skipped = [b for b in ns.backends if b in _LIBRARY and importlib.util.find_spec(_LIBRARY[b]) is None]
    for _ in range(ns.repeats):
        for backend in (b for b in ns.backends if b not in skipped):
            for layout, name in LAYOUTS.items():
                res = run_child(ns.slides_dir / name, backend)
                rows.setdefault((backend, layout), []).append(res)
                print(f"  {backend:9s} {layout:6s} {res}", flush=True)
    print(f"\n{'backend':9s} | {'layout':6s} | tiles | tiles/s median (min..max)")
    table = []
    for (backend, layout), runs in rows.items():
        ok = [r for r in runs if "tps" in r]
        if not ok:
            print(f"{backend:9s} | {layout:6s} |     - | error: {runs[0]['error']}")
            table.append({"backend": backend, "layout": layout, "error": runs[0]["error"]})
            continue
        tps = [r["tps"] for r in ok]
        print(f"{backend:9s} | {layout:6s} | {ok[0]['tiles']:5d} | {statistics.median(tps):7.1f} "
              f"({min(tps):.1f}..{max(tps):.1f})")
        table.append({"backend": backend, "layout": layout, "tiles": ok[0]["tiles"], "tps": tps,
                      "median_tps": statistics.median(tps), "threads": ok[0]["threads"]})
    auto = {r["layout"]: r["median_tps"] for r in table if r["backend"] == "auto" and "median_tps" in r}
    if len(auto) == 2:
        gap = abs(auto["aperio"] - auto["vips"]) / max(auto.values())
        print(f"\nauto: layouts within {100 * gap:.1f} % (target 10 %)")
    if skipped:
        print(f"skipped (library not installed): {', '.join(skipped)}")
    if ns.json:
        ns.json.write_text(json.dumps({"rows": table, "skipped": skipped, "repeats": ns.repeats}, indent=2))


if __name__ == "__main__":
    main()
