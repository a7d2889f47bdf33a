#!/usr/bin/env python
"""Benchmark: dense grids on CPU with a ViT-S/16 (random weights), against the bare model.

Not a test.  Run by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_dense.py                # CMU-1-Small-Region.svs, 3 repeats
    python tests/benchmarks/bench_dense.py --regions 96 --repeats 5 --json bench-out/dense.json

Phases, interleaved per repeat (bare, regions, pipeline, pipeline + save_dense, ...) so
machine noise hits each alike; medians (min..max) printed:

1. ``bare``      ``forward_features`` of the bare timm model on as many 224 px inputs as
                 there are regions, already normalised in memory, batches of ``--batch-size``,
                 ``torch.inference_mode()``: the ceiling.
2. ``regions``   ``Model.embed_regions_dense`` of ``--regions`` ROIs (224 px at 0.5 µm/px,
                 a grid over the slide's tissue-ish middle) into a fresh output dir:
                 regions/s and MB/s of ``.pt`` payloads written (float32 ``(384, 14, 14)``).
3. ``pipeline``  ``Pipeline.run`` of the slide, then the same with
                 ``ExecutionOptions(save_dense=True)`` (fp16 grids in ``dense/<id>``):
                 tiles/s of both, and the dense group's bytes over the dense run's time
                 (the store's write rate), with what keeping the grids costs in time.
4. ``shallow``   phases 2 and 3 again with a one-block ViT-S/16 (same width, same grids,
                 ~1/12 of the compute) and every tile kept (``tissue_threshold=0``): on a
                 2-core CPU the full model bounds every rate above, this shows what the read
                 and write path itself does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
CMU = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def bare(n: int, batch: int) -> float:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model.forward_features(x[:2])
        start = time.perf_counter()
        done = 0
        while done < n:
            take = min(batch, n - done)
            model.forward_features(x[:take])
            done += take
    return n / (time.perf_counter() - start)


def regions(model, slide: Path, coords, out: Path, batch: int) -> dict:
    from slide2vec_dask import DenseOptions, ExecutionOptions, SlideRegions

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    arts = model.embed_regions_dense([SlideRegions(sample_id="cmu", image_path=slide, coordinates=coords)],
                                     dense=DenseOptions(spacing_um=0.5, target_size=224),
                                     execution=ExecutionOptions(output_dir=out, batch_size=batch))
    seconds = time.perf_counter() - start
    written = folder_bytes(out, "*.pt")
    assert len(arts) == len(coords)
    return {"seconds": seconds, "regions_per_s": len(coords) / seconds, "mb_per_s": written / seconds / 1e6,
            "mb": written / 1e6}


def pipeline(model, slide: Path, out: Path, dense: bool, batch: int, every_tile: bool = False) -> dict:
    from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    config = PreprocessingConfig(tissue_threshold=0.0) if every_tile else PreprocessingConfig()
    result = Pipeline(model, config, ExecutionOptions(output_dir=out, save_dense=dense,
                                                                    batch_size=batch)).run(slides=[slide])
    seconds = time.perf_counter() - start
    assert result.num_failed == 0
    tiles = sum(o.num_tiles for o in result.outcomes) if hasattr(result, "outcomes") else \
        sum(a.num_tiles for a in result.tile_artifacts)
    row = {"seconds": seconds, "tiles": tiles, "tiles_per_s": tiles / seconds}
    if dense:
        group = out / "embeddings.zarr" / "dense"
        row["dense_mb"] = folder_bytes(group) / 1e6
        row["dense_mb_per_s"] = row["dense_mb"] / seconds
    return row


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=CMU)
    parser.add_argument("--regions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.slide.exists():
        print(f"slide not found: {args.slide}")
        return 2
    from slide2vec_dask import Model, open_slide

    model = Model.from_timm("vit_small_patch16_224", dynamic_img_size=True)
    slide = open_slide(args.slide)
    w, h = slide.dimensions
    lv0 = round(224 * 0.5 / slide.spacing)
    side = int(np.ceil(np.sqrt(args.regions)))
    xs = np.linspace(0, w - lv0, side).astype(int)
    ys = np.linspace(0, h - lv0, side).astype(int)
    coords = [(int(x), int(y)) for y in ys for x in xs][: args.regions]
    work = Path(tempfile.mkdtemp(prefix="bench_dense_"))
    shallow = Model.from_timm("vit_small_patch16_224", dynamic_img_size=True, depth=1)
    runs: dict[str, list[dict]] = {"bare": [], "regions": [], "pipeline": [], "pipeline_dense": [],
                                   "shallow_regions": [], "shallow_pipeline": [], "shallow_pipeline_dense": []}
    try:
        for r in range(args.repeats):
            runs["bare"].append({"regions_per_s": bare(len(coords), args.batch_size)})
            runs["regions"].append(regions(model, args.slide, coords, work / "regions", args.batch_size))
            runs["pipeline"].append(pipeline(model, args.slide, work / "pipe", False, args.batch_size))
            runs["pipeline_dense"].append(pipeline(model, args.slide, work / "pipe_dense", True, args.batch_size))
            runs["shallow_regions"].append(regions(shallow, args.slide, coords, work / "regions", args.batch_size))
            runs["shallow_pipeline"].append(pipeline(shallow, args.slide, work / "pipe", False, args.batch_size, True))
            runs["shallow_pipeline_dense"].append(pipeline(shallow, args.slide, work / "pipe_dense", True,
                                                           args.batch_size, True))
            print(f"repeat {r + 1}/{args.repeats} done, load average {os.getloadavg()}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    col = lambda phase, key: [row[key] for row in runs[phase]]   # noqa: E731
    print(f"\nViT-S/16, CPU, {os.cpu_count()} cores, {len(coords)} regions of 224 px, median (min..max) "
          f"of {args.repeats}; load average at the end {os.getloadavg()}")
    print(f"bare forward_features            regions/s {summary(col('bare', 'regions_per_s'))}")
    print(f"embed_regions_dense              regions/s {summary(col('regions', 'regions_per_s'))}"
          f"   MB/s written {summary(col('regions', 'mb_per_s'))}   ({runs['regions'][0]['mb']:.1f} MB)")
    ratio = [a / b for a, b in zip(col("regions", "regions_per_s"), col("bare", "regions_per_s"))]
    print(f"  / bare                                   {summary(ratio)}")
    print(f"Pipeline.run ({runs['pipeline'][0]['tiles']} tiles)      tiles/s   {summary(col('pipeline', 'tiles_per_s'))}")
    print(f"Pipeline.run save_dense (fp16)   tiles/s   {summary(col('pipeline_dense', 'tiles_per_s'))}"
          f"   dense store MB/s {summary(col('pipeline_dense', 'dense_mb_per_s'))}"
          f"   ({runs['pipeline_dense'][0]['dense_mb']:.1f} MB)")
    cost = [d / p for d, p in zip(col("pipeline_dense", "seconds"), col("pipeline", "seconds"))]
    print(f"  time with save_dense / without           {summary(cost)}")
    print("one-block ViT-S/16 (the read and write path), every tile kept:")
    print(f"embed_regions_dense              regions/s {summary(col('shallow_regions', 'regions_per_s'))}"
          f"   MB/s written {summary(col('shallow_regions', 'mb_per_s'))}")
    print(f"Pipeline.run ({runs['shallow_pipeline'][0]['tiles']} tiles)     tiles/s   "
          f"{summary(col('shallow_pipeline', 'tiles_per_s'))}")
    print(f"Pipeline.run save_dense (fp16)   tiles/s   {summary(col('shallow_pipeline_dense', 'tiles_per_s'))}"
          f"   dense store MB/s {summary(col('shallow_pipeline_dense', 'dense_mb_per_s'))}"
          f"   ({runs['shallow_pipeline_dense'][0]['dense_mb']:.1f} MB)")
    cost = [d / p for d, p in zip(col("shallow_pipeline_dense", "seconds"), col("shallow_pipeline", "seconds"))]
    print(f"  time with save_dense / without           {summary(cost)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
