"""Hierarchical vs flat mode: is the tiles/s ratio to the bare model the same?

    python tests/benchmarks/bench_hierarchical.py [--model vit_small_patch16_224] [--r 6] [--repeats 3]

On the 20000x16000 real-tissue slide that ``bench_embed.py`` builds (reused
from ``bench-out/``, built here if missing), one run measures, interleaved:
the bare model on in-memory batches, ``embed_slide`` in flat mode, and
``embed_slide`` with ``region_tile_multiple=R``.  Hierarchical mode embeds
every sub-tile of a kept region (glass ones too), so its rate counts all
embedded tiles.  Prints medians and the two ratios; the target is that they
agree within 5%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CMU = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
SHAPE = (16000, 20000)


def slide_path(folder: Path) -> Path:
    path = folder / "bench_20000x16000_tf0.6_s0_q90.svs"
    if not path.exists():
        from slide2vec_dask import testing

        folder.mkdir(parents=True, exist_ok=True)
        source = testing.real_tissue_source(CMU, shape=SHAPE, tissue_fraction=0.6, seed=0)
        testing.write_svs(path, source, shape=SHAPE, mpp=0.5, downsamples=(1, 4, 16), quality=90)
    return path


def bare_rate(model_name: str, batch_size: int, seconds: float) -> float:
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=0).eval().to(memory_format=torch.channels_last)
    batch = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8).float()
    batch = ((batch / 255 - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(batch)  # warm-up
        start, tiles = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(batch)
            tiles += batch_size
    return tiles / (time.perf_counter() - start)


def pipeline_rate(model, path: Path, batch_size: int, r: int | None) -> tuple[float, int]:
    from slide2vec_dask import ExecutionOptions, PreprocessingConfig

    config = PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=224, region_tile_multiple=r)
    start = time.perf_counter()
    emb = model.embed_slide(path, preprocessing=config, execution=ExecutionOptions(batch_size=batch_size))
    seconds = time.perf_counter() - start
    tiles = emb.num_tiles if r is None else int(emb.hierarchical_embeddings.shape[0] * r * r)
    return tiles / seconds, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=int, default=6, help="region_tile_multiple")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bare-seconds", type=float, default=30.0)
    parser.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    args = parser.parse_args()

    from slide2vec_dask import Model

    path = slide_path(args.slides_dir)
    model = Model.from_timm(args.model)
    pipeline_rate(model, path, args.batch_size, None)  # builds the model, warms the page cache
    bare, flat, hier = [], [], []
    for i in range(args.repeats):
        bare.append(bare_rate(args.model, args.batch_size, args.bare_seconds))
        flat_rate, flat_tiles = pipeline_rate(model, path, args.batch_size, None)
        hier_rate, hier_tiles = pipeline_rate(model, path, args.batch_size, args.r)
        flat.append(flat_rate)
        hier.append(hier_rate)
        print(f"run {i + 1}: bare {bare[-1]:.1f} tiles/s | flat {flat_rate:.1f} tiles/s ({flat_tiles} tiles) | "
              f"hierarchical R={args.r} {hier_rate:.1f} tiles/s ({hier_tiles} tiles)", flush=True)
    med = statistics.median
    flat_ratio, hier_ratio = med(f / b for f, b in zip(flat, bare)), med(h / b for h, b in zip(hier, bare))
    print(f"\n{args.model}, 20000x16000 slide, medians of {args.repeats} interleaved runs")
    print(f"bare {med(bare):.1f} tiles/s  flat {med(flat):.1f}  hierarchical {med(hier):.1f}")
    print(f"flat / bare {flat_ratio:.3f}   hierarchical / bare {hier_ratio:.3f}   "
          f"difference {abs(hier_ratio / flat_ratio - 1) * 100:.1f}% "
          f"({'PASS' if abs(hier_ratio / flat_ratio - 1) <= 0.05 else 'FAIL'}: within 5%)")


if __name__ == "__main__":
    main()
