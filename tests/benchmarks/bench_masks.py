#!/usr/bin/env python
"""Benchmark: seconds per slide of each tissue-mask method on this machine's CPU (or GPU).

Not a pytest test.  Run it by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_masks.py --slides-dir bench-out --repeats 3 --json bench-out/masks.json

What one row is: `tiling.plan.tissue_mask` (what planning runs: read the slide at
the model's µm/px, patch, batch, infer, stitch, map back to the mask grid) on the
20000 x 16000 real-tissue slide at 0.5 µm/px (levels x1, x4, x16, built from
``CMU-1-Small-Region.svs`` by bench_embed.py's recipe and reused), in a fresh
subprocess, the model already built (its build is timed apart: ``build_s``).
Learned models carry random weights in their publishers' layouts
(`slide2vec_dask.testing.masks`): the cost of a model does not depend on its
weights.  ``hsv`` is the threshold baseline.  ``--device cuda`` times the GPU.
Medians (min..max) of ``--repeats`` runs, interleaved across methods; ``CPU s`` is the
child's CPU time over the timed call (all threads), steadier than wall time on a shared
machine.  ``--shape H W`` times another slide size (the slow models on a busy machine).
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
CMU = Path("/work/shared/data/CMU-1-Small-Region.svs")
SHAPE = (16000, 20000)
METHODS = ("hsv", "grandqc", "sam2", "grandqc-artifacts", "hest")


def ensure_slide(slides_dir: Path, shape: tuple[int, int] = SHAPE) -> Path:
    path = slides_dir / f"bench_{shape[1]}x{shape[0]}_tf0.6_s0_q90.svs"
    if path.exists():
        return path
    sys.path.insert(0, str(REPO))
    from slide2vec_dask import testing

    if not CMU.exists():
        sys.exit(f"the real H&E slide is needed to build the benchmark slide: {CMU} not found")
    slides_dir.mkdir(parents=True, exist_ok=True)
    source = testing.real_tissue_source(CMU, shape=shape, tissue_fraction=0.6, seed=0)
    partial = path.with_suffix(".svs.partial")
    testing.write_svs(partial, source, shape=shape, mpp=0.5, downsamples=(1, 4, 16), quality=90)
    os.replace(partial, path)
    return path


def child(slide_path: str, method: str, device: str) -> dict:
    import torch

    from slide2vec_dask.config import PreprocessingConfig
    from slide2vec_dask.slide import open_slide
    from slide2vec_dask.testing import masks
    from slide2vec_dask.tiling.plan import tissue_mask

    with tempfile.TemporaryDirectory(prefix="bench-masks-") as tmp:
        seg = {"method": method, "device": device}
        if method == "hest":
            seg["checkpoint_path"] = str(masks.hest_checkpoint(Path(tmp) / "deeplabv3_seg_v4.ckpt"))
        elif method == "grandqc":
            seg["checkpoint_path"] = str(masks.grandqc_checkpoint(Path(tmp) / "Tissue_Detection_MPP10.pth"))
        elif method == "sam2":
            seg.update(sam2_checkpoint_path=str(masks.sam2_checkpoint(Path(tmp) / "model.pth")),
                       sam2_config_path=str(masks.sam2_config()))
        elif method == "grandqc-artifacts":   # the artefact pass (1 µm/px, all classes) after hsv
            seg = {"method": "hsv", "device": device, "artifacts": "all", "artifacts_checkpoint_path":
                   str(masks.grandqc_artifact_checkpoint(Path(tmp) / "GrandQC_MPP1_state_dict.pth"))}
        config = PreprocessingConfig(segmentation=seg)
        slide = open_slide(slide_path)
        small = open_slide(slide_path)   # a warm-up on the thumbnail-sized problem builds the model
        t0 = time.perf_counter()
        if method != "hsv":
            _warm(small, config)
        build = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        _, mask = tissue_mask(slide, config.segmentation, config.filtering, spacing_um=0.5, tile_size_px=224)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "build_s": build, "tissue": float(mask.mean()),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]}


def _warm(slide, config) -> None:
    """Build the model (and load its weights) once, outside the timed call."""
    from slide2vec_dask.tissue import models
    from slide2vec_dask.tissue.catalog import ARTIFACTS, TISSUE
    from slide2vec_dask.tissue.run import _sam2_config, _weights

    s = config.segmentation
    device = models.resolve_device(s["device"])
    if s["artifacts"]:
        seg = ARTIFACTS[s["artifacts_spacing_um"]]
        models.get_model(seg, device, _weights(seg, s["artifacts_checkpoint_path"], ""),
                         removed=models.removed_classes(s["artifacts"]))
    elif s["method"] == "sam2":
        seg = TISSUE["sam2"]
        models.get_model(seg, device, _weights(seg, s["sam2_checkpoint_path"], ""),
                         _sam2_config(seg, s["sam2_config_path"], ""))
    else:
        seg = TISSUE[s["method"]]
        models.get_model(seg, device, _weights(seg, s["checkpoint_path"], ""))


def run_child(slide: Path, method: str, device: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--child", str(slide), method, device], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:5])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides-dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=2, default=list(SHAPE), metavar=("HEIGHT", "WIDTH"),
                        help="another slide size (a smaller one to time the slow models on a busy machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    slide = ensure_slide(args.slides_dir, tuple(args.shape))
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for r in range(args.repeats):
        for method in args.methods:
            result = run_child(slide, method, args.device)
            runs[method].append(result)
            print(f"run {r + 1}: {method:18s} {result}", flush=True)
    print(f"\n{args.shape[1]} x {args.shape[0]} px at 0.5 µm/px, device {args.device}, {os.cpu_count()} CPUs")
    print(f"{'method':18s} {'s/slide (median, min..max)':>30s} {'CPU s':>8s} {'model build s':>14s} {'tissue':>7s}")
    table = {}
    for method, results in runs.items():
        ok = [x for x in results if "error" not in x]
        if not ok:
            print(f"{method:18s} failed: {results[0]['error']}")
            continue
        s = [x["seconds"] for x in ok]
        cpu = statistics.median(x["cpu_s"] for x in ok)
        table[method] = {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "cpu_s": cpu,
                         "build_s": statistics.median(x["build_s"] for x in ok), "runs": results}
        print(f"{method:18s} {statistics.median(s):12.1f} ({min(s):.1f}..{max(s):.1f}) {cpu:8.1f} "
              f"{table[method]['build_s']:14.1f} {ok[0]['tissue']:7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
