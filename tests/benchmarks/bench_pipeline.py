"""Many-slide benchmark: does the Pipeline's memory stay flat as the slide count grows?

    python tests/benchmarks/bench_pipeline.py [--counts 5 20] [--repeats 3] [--size 3000]

Builds ``max(counts)`` small slides from real tissue (cached in
``bench-out/many/``), then for each count runs `Pipeline.run` in a fresh
subprocess (its own local Dask cluster) and samples the resident memory of
the whole process tree (client, scheduler, nanny, worker) every 50 ms.
Prints slides/s, tiles/s and peak RSS per count (medians over repeats) and
the ratio of peak RSS between the largest and smallest count.
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
CMU = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"


def build_slides(folder: Path, count: int, size: int) -> list[Path]:
    from slide2vec_dask import testing

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"slide_{size}_{i:03d}.svs"
        if not path.exists():
            source = testing.real_tissue_source(CMU, shape=(size, size), tissue_fraction=0.6, seed=i)
            testing.write_svs(path, source, shape=(size, size), mpp=0.5, downsamples=(1, 4))
        paths.append(path)
    return paths


def run_phase(manifest: str, out: str, model: str) -> None:
    """The measured process: one Pipeline run on its own local cluster."""
    from slide2vec_dask import ExecutionOptions, Model, Pipeline

    if model == "pool":
        import torch

        encoder = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                                    name="mean-rgb", feature_dim=3)
    else:
        encoder = Model.from_timm(model)
    start = time.perf_counter()
    result = Pipeline(encoder, execution=ExecutionOptions(output_dir=out)).run(manifest_path=manifest)
    seconds = time.perf_counter() - start
    tiles = sum(a.num_tiles for a in result.tile_artifacts)
    print(json.dumps({"seconds": seconds, "tiles": tiles, "failed": result.num_failed}))


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 2**20


def measure(manifest: Path, model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--phase", str(manifest), out, model],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.05)
        result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    result["peak_rss_mb"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=3000, help="slide side in px (level 0)")
    parser.add_argument("--model", default="pool", help="'pool' (data path only) or a timm name")
    parser.add_argument("--slides-dir", type=Path, default=REPO / "bench-out" / "many")
    parser.add_argument("--phase", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(*args.phase)
        return
    if not CMU.exists():
        sys.exit(f"needs the real H&E slide at {CMU}")
    paths = build_slides(args.slides_dir, max(args.counts), args.size)
    summary = {}
    for count in args.counts:
        manifest = args.slides_dir / f"manifest_{args.size}_{count}.csv"
        manifest.write_text("sample_id,image_path\n" + "".join(f"{p.stem},{p}\n" for p in paths[:count]))
        runs = []
        for r in range(args.repeats):
            runs.append(measure(manifest, args.model))
            print(f"{count:3d} slides  run {r + 1}: {runs[-1]}", flush=True)
        summary[count] = {
            "slides_per_s": statistics.median(count / x["seconds"] for x in runs),
            "tiles_per_s": statistics.median(x["tiles"] / x["seconds"] for x in runs),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in runs),
            "peak_rss_range": (min(x["peak_rss_mb"] for x in runs), max(x["peak_rss_mb"] for x in runs)),
        }
    print(f"\nmodel={args.model}, slides {args.size}x{args.size}, medians of {args.repeats} runs "
          f"(each run starts its own local cluster, included in the time)")
    for count, s in summary.items():
        lo, hi = s["peak_rss_range"]
        print(f"{count:4d} slides: {s['slides_per_s']:.2f} slides/s  {s['tiles_per_s']:.0f} tiles/s  "
              f"peak RSS (process tree) {s['peak_rss_mb']:.0f} MB [{lo:.0f}..{hi:.0f}]")
    small, large = summary[min(summary)], summary[max(summary)]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"peak RSS {max(summary)} vs {min(summary)} slides: x{ratio:.3f} "
          f"({'PASS' if ratio <= 1.10 else 'FAIL'}: must not grow with slide count, within 10%)")


if __name__ == "__main__":
    main()
