#!/usr/bin/env python
"""Benchmark: 40x slides read at 20x, ours (exact and reduced-scale decode) vs slide2vec 7.1.4, in one run.

Not a pytest test.  Run it by hand (slide2vec from ``tests/peers/setup-slide2vec.sh``)::

    . .venv/bin/activate
    python tests/benchmarks/bench_40x.py --repeats 3            # everything, medians of 3
    python tests/benchmarks/bench_40x.py --build-only           # just build the slides (minutes)
    python tests/benchmarks/bench_40x.py --only ours            # skip slide2vec

Slides (built once from ``/work/shared/data/CMU-1-Small-Region.svs`` into ``bench-out/``,
Aperio-like JPEG/RGB tiled SVS, 240 px tiles, levels x1 x4 x16, quality 90):

* ``20x``  20000 x 16000 at 0.5 µm/px, dense tissue (60 % of the 512 px cells);
* ``40x``  40000 x 32000 at 0.25 µm/px: *the same tissue* (the 20x slide's pixels upsampled
  2x, bilinear), so both give the same tiles at 0.5 µm/px and their rates compare directly;
* ``small`` 20000 x 16000 at 0.5 µm/px, sparse tissue (about 950 tiles).

Each run is a fresh subprocess calling ``embed_slide`` at 0.5 µm/px, 224 px, with a global
average-pool encoder (the data path's ceiling, as in issue 28's table) or, for ``small`` and the
memory row, ``vit_small_patch16_224`` (random weights).  Phases are interleaved so machine noise
hits every side alike; medians (min..max) of ``--repeats``.

* ``ours-exact``   ``PreprocessingConfig(scaled_decode=False)``: every tile decoded in full and
  resized (antialiased bilinear, uint8, on the decoding threads);
* ``ours-scaled``  ``scaled_decode=True``: the 40x slide's JPEG tiles decoded at 1/2 by libjpeg;
* ``slide2vec``    slide2vec 7.1.4's ``Model.embed_slide`` in its own venv, the same
  average-pool encoder registered through its ``register_encoder``, backend ``auto``.

``--before PATH``: also time another checkout's ``embed_slide`` (``ours-before``, e.g. main
before this change) for the "40x exact >= 1.3x today's" target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_SVS = Path(os.environ.get("CMU_SVS", "/work/shared/data/CMU-1-Small-Region.svs"))
PEER_PYTHON = Path(os.environ.get("SLIDE2VEC_ENV", "/tmp/slide2vec-peer")) / "bin" / "python"
SPACING_UM, TILE_PX = 0.5, 224
SLIDES = {   # name: (shape at its own resolution, mpp, tissue fraction, upsample, AppMag)
    "20x": ((20000, 16000), 0.5, 0.6, 1, 20),
    "40x": ((40000, 32000), 0.25, 0.6, 2, 40),
    "small": ((20000, 16000), 0.5, 0.15, 1, 20),
    "mem": ((10000, 8000), 0.5, 0.3, 1, 20),   # --memory-slide mem: a shorter memory run on a busy machine
}


# --------------------------------------------------------------------------- slides
def slide_file(out: Path, name: str) -> Path:
    (h, w), mpp, tf, up, _ = SLIDES[name]
    return out / f"bench40x_{name}_{h}x{w}_mpp{mpp}_tf{tf}.svs"


def upsampled(source, factor: int, shape: tuple[int, int]):
    """``source`` (at 1/``factor`` of ``shape``) enlarged ``factor`` times, bilinear: the same tissue
    as a slide scanned ``factor`` times finer.  A margin makes any region read the same pixels."""
    import numpy as np
    from PIL import Image

    sh, sw = shape[0] // factor, shape[1] // factor

    def read(y: int, x: int, h: int, w: int):
        m = 2
        y0, x0 = max(0, y // factor - m), max(0, x // factor - m)
        y1, x1 = min(sh, -(-(y + h) // factor) + m), min(sw, -(-(x + w) // factor) + m)
        small = source(y0, x0, y1 - y0, x1 - x0)
        big = np.asarray(Image.fromarray(small).resize(((x1 - x0) * factor, (y1 - y0) * factor), Image.BILINEAR))
        oy, ox = y - y0 * factor, x - x0 * factor
        return big[oy : oy + h, ox : ox + w]

    return read


def ensure_slide(out: Path, name: str) -> Path:
    path = slide_file(out, name)
    if path.exists():
        return path
    from slide2vec_dask import testing

    if not SOURCE_SVS.exists():
        sys.exit(f"the real H&E slide is needed to build benchmark slides: {SOURCE_SVS} not found")
    (h, w), mpp, tf, up, mag = SLIDES[name]
    out.mkdir(parents=True, exist_ok=True)
    print(f"building {path.name} ...", flush=True)
    t0 = time.perf_counter()
    source = testing.real_tissue_source(SOURCE_SVS, shape=(h // up, w // up), tissue_fraction=tf, seed=0)
    if up > 1:
        source = upsampled(source, up, (h, w))
    partial = path.with_suffix(".svs.partial")
    testing.write_svs(partial, source, shape=(h, w), mpp=mpp, downsamples=(1, 4, 16), quality=90, app_mag=mag)
    os.replace(partial, path)
    print(f"  built in {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    return path


# --------------------------------------------------------------------------- children
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_ours(slide: str, mode: str, encoder: str) -> dict:
    import torch

    from slide2vec_dask import ExecutionOptions, Model, PreprocessingConfig

    if encoder == "avgpool":
        pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        model = Model.from_module(pool, name="avgpool", spacing_um=SPACING_UM, tile_size_px=TILE_PX, feature_dim=3)
    else:
        model = Model.from_timm(encoder, pretrained=False, spacing_um=SPACING_UM, tile_size_px=TILE_PX)
    extra = {} if mode == "before" else {"scaled_decode": mode == "scaled"}
    pre = PreprocessingConfig(requested_spacing_um=SPACING_UM, requested_tile_size_px=TILE_PX, **extra)
    with tempfile.TemporaryDirectory(prefix="bench-40x-") as out:
        t0 = time.perf_counter()
        result = model.embed_slide({"image_path": slide, "sample_id": "bench"}, preprocessing=pre,
                                   execution=ExecutionOptions(output_dir=out))
        seconds = time.perf_counter() - t0
    return {"tiles": int(result.num_tiles), "seconds": seconds, "tps": result.num_tiles / seconds,
            "hwm_mb": _rss_mb()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_memory(slide: str) -> dict:
    """RSS of ``embed_slide`` (ViT-S/16) above the bare model running the same number of tiles, in
    one process: the bare model first (its peak is VmHWM then), then the call (VmHWM again, and
    the largest VmRSS sampled every 20 ms during the call)."""
    import threading

    import numpy as np
    import timm
    import torch

    from slide2vec_dask import Model, PreprocessingConfig
    from slide2vec_dask.slide import open_slide
    from slide2vec_dask.tiling import plan_slide

    pre = PreprocessingConfig(requested_spacing_um=SPACING_UM, requested_tile_size_px=TILE_PX)
    with open_slide(slide) as s:
        tiles = plan_slide(s, pre, spacing_um=SPACING_UM, tile_size_px=TILE_PX, sample_id="n").grid.num_tiles
    base = _status_mb("VmRSS")
    bare = timm.create_model("vit_small_patch16_224", pretrained=False).eval().to(memory_format=torch.channels_last)
    pool = torch.from_numpy(np.random.default_rng(0).normal(size=(64, 3, TILE_PX, TILE_PX)).astype(np.float32))
    pool = pool.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, tiles, 32):
            bare(pool[start % 64 : start % 64 + min(32, tiles - start)])
    bare_s = time.perf_counter() - t0
    bare_hwm, bare_rss = _status_mb("VmHWM"), _status_mb("VmRSS")
    del bare
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _status_mb("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = Model.from_timm("vit_small_patch16_224", pretrained=False, spacing_um=SPACING_UM, tile_size_px=TILE_PX)
    t0 = time.perf_counter()
    result = model.embed_slide(slide, preprocessing=pre)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    hwm = _status_mb("VmHWM")
    return {"tiles": int(result.num_tiles), "seconds": seconds, "tps": result.num_tiles / seconds,
            "bare_tps": tiles / bare_s, "rss_before_mb": base, "bare_hwm_mb": bare_hwm, "bare_rss_mb": bare_rss,
            "call_hwm_mb": hwm, "call_peak_rss_mb": peak[0], "over_bare_mb": max(hwm, peak[0]) - bare_hwm}


PEER_CHILD = r'''
import json, sys, tempfile, time
import torch
from slide2vec.encoders.base import TileEncoder
from slide2vec.encoders.registry import register_encoder
import slide2vec

@register_encoder("bench-avgpool", encode_dim=3, input_size=224, supports_variable_input_size=False,
                  supported_spacing_um=None, default_spacing_um=0.5, precision="fp32", source="bench")
class AvgPool(TileEncoder):
    def __init__(self, output_variant=None):
        self._device = torch.device("cpu")
    def get_transform(self):
        from torchvision.transforms import v2
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])
    def get_normalization_transform(self):
        return self.get_transform()
    def encode_tiles(self, batch):
        return batch.float().mean(dim=(2, 3))
    @property
    def encode_dim(self):
        return 3
    @property
    def device(self):
        return self._device
    def to(self, device):
        return self

slide, = sys.argv[1:]
model = slide2vec.Model.from_preset("bench-avgpool", device="cpu")
from hs2p.configs.models import TilingConfig
pre = slide2vec.PreprocessingConfig(tiling=TilingConfig(requested_spacing_um=0.5, requested_tile_size_px=224,
                                                        tolerance=0.05, overlap=0.0))
with tempfile.TemporaryDirectory(prefix="bench-40x-s2v-") as out:
    t0 = time.perf_counter()
    result = model.embed_slide(slide, preprocessing=pre,
                               execution=slide2vec.ExecutionOptions(output_dir=out, precision="fp32"))
    seconds = time.perf_counter() - t0
n = int(len(result.tile_embeddings)) if hasattr(result, "tile_embeddings") else int(result.num_tiles)
from pathlib import Path
from hs2p.wsi.reader import resolve_backend
backend = resolve_backend("auto", wsi_path=Path(slide)).backend
print(json.dumps({"tiles": n, "seconds": seconds, "tps": n / seconds, "backend": str(backend)}))
'''


def run_child(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:] if out.stderr.strip() else [f"exit {out.returncode}"]
        return {"error": " | ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(slide: Path, mode: str, encoder: str, checkout: Path = REPO) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return run_child([sys.executable, __file__, "--child", str(slide), mode, encoder], env)


def peer(slide: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return run_child([str(PEER_PYTHON), "-c", PEER_CHILD, str(slide)], env)


# --------------------------------------------------------------------------- embedding differences
def tissue_tiles(slide_path: Path, spacing: float, count: int, seed: int = 0):
    """``count`` tissue tiles of the slide's plan at ``spacing``: (exact float-path input, reduced decode)."""
    import numpy as np

    from slide2vec_dask import PreprocessingConfig
    from slide2vec_dask.slide import open_slide
    from slide2vec_dask.tiling import plan_slide

    slide = open_slide(slide_path)
    grid = plan_slide(slide, PreprocessingConfig(requested_spacing_um=spacing, requested_tile_size_px=TILE_PX),
                      spacing_um=spacing, tile_size_px=TILE_PX, sample_id="diff").grid
    read = grid.read_tile_size_px
    scale = max(s for s in (1, 2, 4, 8) if read % s == 0 and read / s >= TILE_PX * 0.95)
    rows, cols = np.nonzero(grid.keep)
    pick = np.random.default_rng(seed).choice(len(rows), min(count, len(rows)), replace=False)
    full = np.stack([slide.read_level(grid.level, r * read, c * read, read, read) for r, c in zip(rows[pick], cols[pick])])
    scaled = np.stack([slide.read_level_scaled(grid.level, r * read, c * read, read, read, scale)
                       for r, c in zip(rows[pick], cols[pick])])
    return full, scaled, scale


def embedding_diff(count: int, which: str = "both") -> None:
    """Embeddings of the same tissue tiles, each variant against today's exact path (full decode, float
    antialiased bilinear resize on the encoder's device): cosine (min / mean) and max |difference|,
    and the same for JPEG re-encoding of the exact tiles at quality 90 (a tile archive's, hs2p's)."""
    import tempfile as tf

    import numpy as np
    import torch

    from slide2vec_dask import Model
    from slide2vec_dask.dataflow.blocks import resize_tiles
    from slide2vec_dask.encoders.runtime import LoadedEncoder
    from slide2vec_dask.testing import checkpoints as ck
    from slide2vec_dask.tiling.archive import decode_jpeg_tiles, encode_jpeg_tiles

    torch.manual_seed(0)
    tmp = Path(tf.mkdtemp(prefix="bench-40x-diff-"))
    weights, _ = ck.tile_checkpoint("h0-mini", tmp / "h0-mini.safetensors", seed=1)
    models = {"vit_small_patch16_224 (timm, random)": Model.from_timm("vit_small_patch16_224", pretrained=False,
                                                                       spacing_um=SPACING_UM, tile_size_px=TILE_PX),
              "h0-mini preset (ViT-B/14 reg4, random, Bioptimus layout)": Model.from_preset("h0-mini",
                                                                                          checkpoint_path=weights)}
    cases = {"40x bench slide at 0.5 µm/px": (ensure_slide(REPO / "bench-out", "40x"), 0.5),
             "CMU-1 (real 20x Aperio, 0.499 µm/px) at 0.998 µm/px": (SOURCE_SVS, 0.998)}
    if which != "both":
        cases = {k: v for k, v in cases.items() if k.startswith(which)}
    print("\n| tiles | model | variant vs exact (float resize) | cosine min | cosine mean | max abs | max abs / max |exact| |")
    print("|---|---|---|---|---|---|---|")
    for where, (path, spacing) in cases.items():
        full, scaled, scale = tissue_tiles(path, spacing, count)
        pixels = {"exact, uint8 resize": resize_tiles(full, TILE_PX), f"scaled decode 1/{scale}": scaled,
                  "JPEG q90 re-encode of exact": decode_jpeg_tiles(encode_jpeg_tiles(resize_tiles(full, TILE_PX), TILE_PX))}
        for label, model in models.items():
            enc = LoadedEncoder(model.spec, "cpu", "fp32")
            ref = enc.embed(full, 16)
            for name, tiles in pixels.items():
                got = enc.embed(tiles, 16)
                cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
                diff = np.abs(ref - got).max()
                print(f"| {where}, {len(full)} | {label} | {name} | {cos.min():.5f} | {cos.mean():.5f} | "
                      f"{diff:.4f} | {diff / np.abs(ref).max():.4f} |", flush=True)
        exact = resize_tiles(full, TILE_PX).astype(int)
        px = {name: np.abs(resize_tiles(t, TILE_PX).astype(int) - exact) for name, t in pixels.items()}
        for name, d in px.items():
            print(f"pixels, {where}: {name} vs exact uint8: mean |d| {d.mean():.3f}, max {d.max()}")


# --------------------------------------------------------------------------- report
def summary(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "MODE", "ENCODER"))
    ap.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--only", choices=("ours", "all"), default="all")
    ap.add_argument("--before", type=Path, help="another checkout to time as ours-before (today's exact path)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--embedding-diff", type=int, metavar="N", help="only: embedding differences on N tissue tiles")
    ap.add_argument("--diff-slides", choices=("both", "40x", "CMU"), default="both")
    ns = ap.parse_args(argv)
    if ns.child:
        slide, mode, encoder = ns.child
        print(json.dumps(child_memory(slide) if mode == "memory" else child_ours(slide, mode, encoder)))
        return 0
    if ns.embedding_diff:
        embedding_diff(ns.embedding_diff, ns.diff_slides)
        return 0
    slides = {name: ensure_slide(ns.slides_dir, name) for name in ("20x", "40x", "small")}
    if ns.build_only:
        return 0
    with_peer = ns.only == "all" and PEER_PYTHON.exists()
    if ns.only == "all" and not with_peer:
        print(f"slide2vec not found at {PEER_PYTHON}: run tests/peers/setup-slide2vec.sh", file=sys.stderr)
    # (label, slide, thunk)
    cases = [
        ("20x ours", "20x", lambda: ours(slides["20x"], "exact", "avgpool")),
        ("40x ours-exact", "40x", lambda: ours(slides["40x"], "exact", "avgpool")),
        ("40x ours-scaled", "40x", lambda: ours(slides["40x"], "scaled", "avgpool")),
        ("small ours", "small", lambda: ours(slides["small"], "exact", "avgpool")),
    ]
    if ns.before:
        cases.insert(3, ("40x ours-before", "40x", lambda: ours(slides["40x"], "before", "avgpool", ns.before)))
    if with_peer:
        cases += [("20x slide2vec", "20x", lambda: peer(slides["20x"])),
                  ("40x slide2vec", "40x", lambda: peer(slides["40x"])),
                  ("small slide2vec", "small", lambda: peer(slides["small"]))]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in cases}
    for r in range(ns.repeats):
        for label, _, thunk in cases:
            res = thunk()
            res["load"] = os.getloadavg()[0]
            runs[label].append(res)
            print(f"[{r + 1}/{ns.repeats}] {label}: {json.dumps(res)}", flush=True)

    def tps(label: str) -> list[float]:
        return [x["tps"] for x in runs.get(label, []) if "tps" in x]

    def med(label: str) -> float:
        values = tps(label)
        return statistics.median(values) if values else math.nan

    print("\n| case | tiles | tiles/s median (min..max) | seconds median |")
    print("|---|---|---|---|")
    for label, _, _ in cases:
        ok = [x for x in runs[label] if "tps" in x]
        tiles = ok[0]["tiles"] if ok else "-"
        print(f"| {label} | {tiles} | {summary(tps(label))} | {summary([x['seconds'] for x in ok], '{:.2f}')} |")
    print()
    ratios = [("40x scaled / 20x ours", med("40x ours-scaled") / med("20x ours"), 0.8)]
    if ns.before:
        ratios.append(("40x exact / 40x before", med("40x ours-exact") / med("40x ours-before"), 1.3))
    if with_peer:
        ratios += [("40x scaled / 40x slide2vec", med("40x ours-scaled") / med("40x slide2vec"), 4.0),
                   ("20x ours / 20x slide2vec", med("20x ours") / med("20x slide2vec"), None),
                   ("small ours / small slide2vec", med("small ours") / med("small slide2vec"), 1.5)]
    for name, value, target in ratios:
        verdict = "" if target is None else ("PASS" if value >= target else "FAIL") + f" (target >= {target})"
        print(f"{name}: {value:.2f} {verdict}")
    if ns.json:
        ns.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
