"""Aggregation-stage memory: what does reading a big slide's tile embeddings cost a worker?

    python tests/benchmarks/bench_aggregate.py [--tiles 1000 100000] [--dim 1536] [--repeats 3]

For each tile count, writes a finished ``tiles/<id>`` group (random features,
a real row-major grid of coordinates) into a Zarr store, then runs the
Pipeline's slide task (`dataflow.tasks.slide_task`: store -> slide embedding -> ``_slides/<id>``) in a
fresh subprocess with a mean-pooling slide encoder, so that what is measured
is the data path, not a model's activations.  Prints peak RSS above the
process's baseline (after imports and model build), the feature matrix's own
size, their ratio, and the big/small ratio (medians over repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
import numpy as np
import torch

from slide2vec_dask.dataflow.tasks import slide_task
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.dataflow.blocks import EmbedSettings
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec, SlideEncoding
from slide2vec_dask.encoders.base import EncoderSpec, ModuleBuilder
from slide2vec_dask.dataflow import worker


class MeanPool(torch.nn.Module):
    def encode_slide(self, features, coords, tile_size_lv0):
        return SlideEncoding(features.mean(0))


path, dim = sys.argv[1], int(sys.argv[2])
tile = EncoderSpec("features", build=None, spacing_um=0.5, tile_size_px=224, mean=(0, 0, 0), std=(1, 1, 1),
                   feature_dim=dim)
spec = AggregatorSpec("mean-pool", "slide", ModuleBuilder(MeanPool()), tile, dim, key="mean-pool")
settings = EmbedSettings(32, 0, "fp32", False)
worker.get_aggregator(spec, "cpu", "fp32")          # the model, built before the baseline
worker.run_on_device(0, lambda device: None)        # and its device thread
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = slide_task(EmbeddingStore(path), "big", spec, settings, False, {}, True, None)
assert not isinstance(result, BaseException), result
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024}))
"""


def write_store(folder: Path, tiles: int, dim: int) -> Path:
    import numpy as np
    import zarr

    out = folder / f"run_{tiles}_{dim}"          # an output_dir: the store is out/embeddings.zarr
    path = out / "embeddings.zarr"
    if path.exists():
        return out
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    group = root.create_group("tiles/big")
    chunk = max(1, min(tiles, (8 << 20) // (4 * dim)))
    emb = group.create_array("embedding", shape=(tiles, dim), chunks=(chunk, dim), dtype="float32")
    rng = np.random.default_rng(0)
    for start in range(0, tiles, chunk):
        emb[start : start + chunk] = rng.standard_normal((min(chunk, tiles - start), dim), dtype=np.float32)
    side = int(np.ceil(np.sqrt(tiles)))
    index = np.arange(tiles)
    group.create_array("x", data=(index % side * 224).astype(np.int64))
    group.create_array("y", data=(index // side * 224).astype(np.int64))
    group.attrs.update({"tile_size_lv0": 224, "complete": True, "encoder": "features", "num_tiles": tiles})
    return out


def measure(path: Path, dim: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(dim)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deltas = {}
        for tiles in args.tiles:
            path = write_store(Path(tmp), tiles, args.dim)
            runs = [measure(path, args.dim) for _ in range(args.repeats)]
            delta = statistics.median(r["peak_mb"] - r["base_mb"] for r in runs)
            matrix = tiles * args.dim * 4 / 2**20
            deltas[tiles] = delta
            print(f"{tiles:>7} tiles x {args.dim}: peak RSS above baseline {delta:7.1f} MB "
                  f"(feature matrix {matrix:7.1f} MB, ratio {delta / matrix:5.2f})", flush=True)
        small, big = min(deltas), max(deltas)
        print(f"big/small peak-above-baseline: {deltas[big] / max(deltas[small], 1e-9):.1f} "
              f"for {big / small:.0f}x the tiles")


if __name__ == "__main__":
    main()
