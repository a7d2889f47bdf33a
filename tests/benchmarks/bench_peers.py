#!/usr/bin/env python
"""Benchmark: data-path tiles/s from hs2p's coordinates and tile archive vs our own tiling, in one run.

Not a pytest test.  Run it by hand (hs2p from ``tests/peers/setup-hs2p.sh``)::

    . .venv/bin/activate
    python tests/benchmarks/bench_peers.py --slides-dir bench-out --repeats 3

hs2p itself tiles the 20000 x 16000 Aperio-layout benchmark slide (built by
bench_embed.py) at 0.5 µm/px, 224 px, and writes its coordinates and
``.tiles.tar``.  Then, each in a fresh subprocess with the trivial encoder
(global average pool: the data path's ceiling, not a model benchmark),
``Model.embed_slide`` three ways, interleaved so machine noise hits them alike:

* ``grid``     our own segmentation and one tile grid (what a plain run does);
* ``coords``   ``read_coordinates_from`` hs2p's npz: free positions, lattice-cell
  blocks reading their tiles' bounding box;
* ``archive``  ``read_tiles_from`` hs2p's tar: JPEG members decoded with Pillow,
  the slide not opened.

Tile counts differ (hs2p's segmentation is not ours): tiles/s is the figure.
Medians (min..max) of ``--repeats`` runs.
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

REPO = Path(__file__).resolve().parents[2]
SPACING_UM, TILE_PX = 0.5, 224
SLIDE = "bench_20000x16000_tf0.6_s0_q90.svs"
SAMPLE = "bench"


def child(slide: str, mode: str, artifacts: str) -> dict:
    import torch

    from slide2vec_dask import ExecutionOptions, Model, PreprocessingConfig

    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Model.from_module(pool, name="avgpool", spacing_um=SPACING_UM, tile_size_px=TILE_PX, feature_dim=3)
    extra = {"grid": {}, "coords": {"read_coordinates_from": artifacts}, "archive": {"read_tiles_from": artifacts}}
    pre = PreprocessingConfig(requested_spacing_um=SPACING_UM, requested_tile_size_px=TILE_PX, **extra[mode])
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as out:
        t0 = time.perf_counter()
        result = model.embed_slide({"image_path": slide, "sample_id": SAMPLE}, preprocessing=pre,
                                   execution=ExecutionOptions(output_dir=out))
        seconds = time.perf_counter() - t0
    return {"tiles": int(result.num_tiles), "seconds": seconds, "tps": result.num_tiles / seconds}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def hs2p_artifacts(slide: Path, folder: Path, python: Path) -> Path:
    tiles = folder / "tiles"
    if not (tiles / f"{SAMPLE}.tiles.tar").is_file():
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        t0 = time.perf_counter()
        subprocess.run([str(python), str(REPO / "tests" / "peers" / "make_hs2p.py"), "make", str(slide), SAMPLE,
                        str(folder), "--spacing", str(SPACING_UM), "--tile-size", str(TILE_PX), "--save-tiles"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        print(f"hs2p wrote its coordinates and tar in {time.perf_counter() - t0:.1f} s")
    return tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hs2p-python", type=Path,
                    default=Path(os.environ.get("HS2P_ENV", "/tmp/slide2vec-hs2p")) / "bin" / "python")
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "MODE", "ARTIFACTS"))
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(child(*ns.child)))
        return
    slide = ns.slides_dir / SLIDE
    artifacts = hs2p_artifacts(slide, ns.slides_dir / "hs2p", ns.hs2p_python)
    rows: dict[str, list[dict]] = {}
    for _ in range(ns.repeats):
        for mode in ("grid", "coords", "archive"):
            res = run_child(str(slide), mode, str(artifacts))
            rows.setdefault(mode, []).append(res)
            print(f"  {mode:8s} {res}", flush=True)
    print(f"\n{'input':8s} | tiles | tiles/s median (min..max)")
    medians = {}
    for mode, runs in rows.items():
        ok = [r["tps"] for r in runs if "tps" in r]
        if not ok:
            print(f"{mode:8s} |     - | error: {runs[0]['error']}")
            continue
        medians[mode] = statistics.median(ok)
        print(f"{mode:8s} | {runs[0]['tiles']:5d} | {medians[mode]:7.1f} ({min(ok):.1f}..{max(ok):.1f})")
    for mode in ("coords", "archive"):
        if mode in medians and "grid" in medians:
            print(f"{mode} / grid: {medians[mode] / medians['grid']:.2f}")


if __name__ == "__main__":
    main()
