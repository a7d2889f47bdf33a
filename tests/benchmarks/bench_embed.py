#!/usr/bin/env python
"""Benchmark: how close does `embed_slide` come to the bare model on CPU?

Not a pytest test (pytest only collects ``test_*.py`` / ``*_test.py``; this
file defines no ``test_`` functions either).  Run it by hand::

    . .venv/bin/activate
    python tests/benchmarks/bench_embed.py                 # 20000 x 16000 slide
    python tests/benchmarks/bench_embed.py --big           # + the 40000 x 40000 slide
    python tests/benchmarks/bench_embed.py --repeats 5 --cold
    # the big slide alone, its pipeline run stopped after 8 minutes, compared with
    # the default-slide results (bare model included) saved earlier by --json:
    python tests/benchmarks/bench_embed.py --big --from-json bench-out/default.json --big-max-seconds 480

What it measures (each run in its own fresh subprocess, whose process tree
the parent samples for RSS every ~50 ms; the child's own VmHWM is read at
exit too, and the larger of the two is reported):

1. ``bare``      the encoder alone: ``vit_small_patch16_224`` built once
                 (random weights), eval, fp32, ``torch.inference_mode()``,
                 channels_last, batches of ``--batch-size`` already-normalised
                 float tensors held in memory, torch's default intra-op
                 threads (what the runtime gets), one untimed warm-up batch,
                 model build not timed.  As many tiles as the pipeline embeds,
                 but at least ``--bare-min-seconds`` (20) and at most
                 ``--bare-max-seconds`` (90; a rate needs no more).  The input
                 is a pool of ``--bare-pool`` batches re-used round robin.
2. ``pipeline``  ``Model.from_timm(...).embed_slide`` end to end: open,
                 tissue segmentation, mask + tiling previews, read, decode,
                 cut, normalise, embed (model build included: it is lazy).
3. ``datapath``  the same call with a global-average-pool encoder: the data
                 path's own ceiling.
4. ``preview``   ``plan_slide`` with previews on vs off on a freshly opened
                 slide; the difference is the preview cost.

Time cap (``--big-max-seconds T``): one pipeline run on the 40000 x 40000 slide
takes ~30 min on 2 cores.  With a cap its subprocess is killed after ``T`` s;
its peak RSS is what the sampler saw until then (plus the child's VmHWM read
just before the kill), and its tiles/s is tiles done / seconds since the
``embed_slide`` call, both from a progress reporter the child installs
(``activate_progress_reporter``, public API).  Every such line and row is
marked ``CAPPED``.  The running peak RSS every 30 s is printed for pipeline
runs so one can see the plateau.

Runs are interleaved (bare, pipeline, datapath, bare, ...) so machine noise
hits every side alike; medians (min..max) of ``--repeats`` runs are printed.
Page cache: the slide file is warm in the page cache for every run (it was
just written, or read by an earlier run) unless ``--cold`` evicts it with
``posix_fadvise(DONTNEED)`` before each pipeline/datapath/preview run.

Slides are built from the real H&E slide once and cached in ``--slides-dir``
(default ``bench-out/`` at the repo root, git-ignored).  Never commit them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CMU_SVS = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
ENCODER = "vit_small_patch16_224"
SPACING_UM = 0.5
TILE_PX = 224
DEFAULT_SHAPE = (20000, 16000)   # (H, W) level-0 pixels
BIG_SHAPE = (40000, 40000)

TARGETS = {
    "ratio": 0.95,            # pipeline tiles/s / bare tiles/s, default slide
    "datapath_tps": 600.0,    # tiles/s with a pooling encoder, default slide
    "preview_s": 0.5,         # seconds of mask + tiling preview
    "rss_over_bare_mb": 400.0,
    "rss_big_vs_small": 0.10,
}


# --------------------------------------------------------------------------- slides
def slide_path(slides_dir: Path, shape: tuple[int, int], seed: int = 0, quality: int = 90) -> Path:
    return slides_dir / f"bench_{shape[0]}x{shape[1]}_tf0.6_s{seed}_q{quality}.svs"


def ensure_slide(slides_dir: Path, shape: tuple[int, int], source_svs: Path) -> Path:
    """Build (once) an SVS of real tissue; re-used when present."""
    path = slide_path(slides_dir, shape)
    if path.exists():
        return path
    from slide2vec_dask import testing

    if not source_svs.exists():
        sys.exit(f"the real H&E slide is needed to build benchmark slides: {source_svs} not found")
    slides_dir.mkdir(parents=True, exist_ok=True)
    print(f"building {path.name} ({shape[0]}x{shape[1]}) ...", flush=True)
    t0 = time.perf_counter()
    source = testing.real_tissue_source(source_svs, shape=shape, tissue_fraction=0.6, seed=0)
    partial = path.with_suffix(".svs.partial")
    testing.write_svs(partial, source, shape=shape, mpp=SPACING_UM, downsamples=(1, 4, 16), quality=90)
    os.replace(partial, path)
    print(f"  built in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    return path


def evict_page_cache(path: Path) -> None:
    """Drop the file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def preprocessing(previews: bool = True):
    from slide2vec_dask import PreprocessingConfig

    preview = {"save_mask_preview": True, "save_tiling_preview": True} if previews else {}
    return PreprocessingConfig(requested_spacing_um=SPACING_UM, requested_tile_size_px=TILE_PX, preview=preview)


def count_tiles(path: Path) -> int:
    from slide2vec_dask.slide import open_slide
    from slide2vec_dask.tiling import plan_slide

    with open_slide(path) as slide:
        plan = plan_slide(slide, preprocessing(False), spacing_um=SPACING_UM, tile_size_px=TILE_PX, sample_id="count")
    return plan.grid.num_tiles


# --------------------------------------------------------------------------- RSS of a process tree
def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _descendants(root: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = {root}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


class TreeRSS:
    """Samples the summed VmRSS of a process and its descendants every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05, rescan: float = 1.0, mark_every: float = 30.0):
        self.pid, self.interval, self.rescan, self.mark_every = pid, interval, rescan, mark_every
        self.peak_kb = 0
        self.marks_kb: list[int] = []     # running peak at mark_every, 2 * mark_every, ... s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids, last_scan, t0 = {self.pid}, 0.0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                pids, last_scan = _descendants(self.pid), now
            self.peak_kb = max(self.peak_kb, sum(_status_kb(p, "VmRSS:") for p in pids))
            if now - t0 >= self.mark_every * (len(self.marks_kb) + 1):
                self.marks_kb.append(self.peak_kb)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def _cpu_of(pid: int) -> float:
    """user + system CPU seconds of a live process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_phase(phase: str, args: list[str], max_seconds: float | None = None) -> dict:
    """Run ``--phase`` in a fresh interpreter; its JSON result plus the tree's peak RSS.

    With ``max_seconds`` the child (its own session, so its whole process group) is
    killed when that time is up; what it had done by then comes from its progress file.
    """
    with tempfile.TemporaryDirectory(prefix="bench-phase-") as d:
        result, progress = Path(d) / "result.json", Path(d) / "progress.json"
        cmd = [sys.executable, __file__, "--phase", phase, "--result", str(result), "--progress", str(progress), *args]
        proc = subprocess.Popen(cmd, start_new_session=True)
        sampler = TreeRSS(proc.pid)
        capped = False
        try:
            proc.wait(timeout=max_seconds)
        except subprocess.TimeoutExpired:
            capped = True
            hwm_kb, cpu_s = _status_kb(proc.pid, "VmHWM:"), _cpu_of(proc.pid)
            killed_at = time.time()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sampled_kb, marks_kb = sampler.stop(), sampler.marks_kb
        if capped:
            prog = json.loads(progress.read_text()) if progress.exists() else {}
            done, started = prog.get("done", 0), prog.get("started")
            seconds = (prog.get("t", killed_at) - started) if started else float("nan")
            out = {"capped": True, "capped_after_s": max_seconds, "vmhwm_kb": hwm_kb, "cpu_s": cpu_s,
                   "tiles": done, "tiles_total": prog.get("total"), "seconds": seconds,
                   "tps": done / seconds if done and seconds > 0 else float("nan"),
                   "tps_steady": prog.get("steady_tps"), "torch_threads": None}
        else:
            if proc.returncode != 0:
                raise RuntimeError(f"phase {phase} failed with exit code {proc.returncode}: {' '.join(cmd)}")
            out = json.loads(result.read_text())
    out["rss_sampled_mb"] = sampled_kb / 1024
    out["peak_rss_mb"] = max(sampled_kb, out.get("vmhwm_kb", 0)) / 1024
    out["rss_peak_every_30s_mb"] = [round(k / 1024) for k in marks_kb]
    return out


# --------------------------------------------------------------------------- phases (child side)
def _finish(result_path: str, result: dict) -> None:
    result["vmhwm_kb"] = _status_kb(os.getpid(), "VmHWM:")
    Path(result_path).write_text(json.dumps(result))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def phase_bare(ns) -> dict:
    import timm
    import torch

    from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD

    t0 = time.perf_counter()
    # Same construction as Model.from_timm's TimmBuilder: same class, same size, random weights.
    model = timm.create_model(ENCODER, pretrained=False, num_classes=0)
    model.eval().requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)   # what LoadedEncoder does on CPU
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())

    b = ns.batch_size
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # A small pool of distinct batches (2 x 32 x 224^2 x 3 floats = 38.5 MB), re-used round robin,
    # so the bare side's RSS is the model's plus little input, not thousands of tiles.
    pool = []
    for _ in range(ns.bare_pool):
        u8 = torch.randint(0, 256, (b, TILE_PX, TILE_PX, 3), dtype=torch.uint8, generator=gen)
        x = ((u8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
        pool.append(x)
    threads = torch.get_num_threads()

    with torch.inference_mode():
        model(pool[0])                                     # warm-up (oneDNN primitives), not timed
        n_batches = max(1, -(-ns.tiles // b))
        done, i = 0, 0
        t0, c0 = time.perf_counter(), _cpu()
        while True:
            elapsed = time.perf_counter() - t0
            if elapsed >= ns.bare_min_seconds and (i >= n_batches or elapsed >= ns.bare_max_seconds):
                break
            out = model(pool[i % len(pool)])
            done += out.shape[0]
            i += 1
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"tiles": done, "seconds": elapsed, "tps": done / elapsed, "cpu_s": cpu, "build_s": build_s,
            "torch_threads": threads, "params": params, "feature_dim": int(out.shape[1]),
            "input_pool_mb": sum(x.numel() * 4 for x in pool) / 2**20}


class FileProgress:
    """A progress reporter (public API) that keeps tiles done, with wall times, in a JSON file.

    Lets the parent say how far a run it killed had got.  Rewritten at most every 0.5 s.
    """

    def __init__(self, path: str, started: float):
        self.path, self.started = Path(path), started
        self.total = self.done = 0
        self.first_t = self.first_done = None
        self._last = 0.0
        self._lock = threading.Lock()

    def start(self, total: int, description: str) -> None:
        self.total = total
        self._write(force=True)

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.first_t is None:                 # first block out: model built, pipeline filled
                self.first_t, self.first_done = time.time(), self.done
            self._write()

    def close(self) -> None:
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        steady = None
        if self.first_t is not None and now - self.first_t > 1:
            steady = (self.done - self.first_done) / (now - self.first_t)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"started": self.started, "t": now, "done": self.done, "total": self.total,
                                   "first_block_t": self.first_t, "steady_tps": steady}))
        os.replace(tmp, self.path)


def _embed(ns, model) -> dict:
    import torch

    from slide2vec_dask import ExecutionOptions, activate_progress_reporter

    if ns.progress:
        activate_progress_reporter(FileProgress(ns.progress, started=time.time()))

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as out_dir:
        execution = ExecutionOptions(output_dir=out_dir, batch_size=ns.batch_size,
                                     num_workers=ns.num_workers, prefetch_factor=ns.prefetch_factor)
        t0, c0 = time.perf_counter(), _cpu()
        result = model.embed_slide(ns.slide, preprocessing=preprocessing(True), execution=execution)
        elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
        previews_ok = bool(result.mask_preview_path and Path(result.mask_preview_path).exists()
                           and result.tiling_preview_path and Path(result.tiling_preview_path).exists())
    emb = result.tile_embeddings
    return {"tiles": int(result.num_tiles), "seconds": elapsed, "tps": result.num_tiles / elapsed, "cpu_s": cpu,
            "torch_threads": torch.get_num_threads(), "previews_ok": previews_ok,
            "finite": bool(torch.isfinite(emb).all()), "feature_dim": int(emb.shape[1])}


def phase_pipeline(ns) -> dict:
    from slide2vec_dask import Model

    model = Model.from_timm(ENCODER)
    out = _embed(ns, model)
    out["params"] = None
    return out


def phase_datapath(ns) -> dict:
    import torch

    from slide2vec_dask import Model

    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Model.from_module(pool, name="avgpool", spacing_um=SPACING_UM, tile_size_px=TILE_PX, feature_dim=3)
    return _embed(ns, model)


def phase_preview(ns) -> dict:
    """plan_slide with previews on and off (alternating, fresh slide each time: thumbnails are cached per Slide)."""
    from slide2vec_dask.slide import open_slide
    from slide2vec_dask.tiling import plan_slide
    from slide2vec_dask.tiling.preview import save_mask_preview, save_tiling_preview

    on, off, parts = [], [], {"thumbnail_s": [], "mask_png_s": [], "tiling_png_s": []}
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as d:
        for i in range(ns.preview_loops):
            for previews in ((True, False) if i % 2 == 0 else (False, True)):
                slide = open_slide(ns.slide)
                t0 = time.perf_counter()
                plan = plan_slide(slide, preprocessing(previews), spacing_um=SPACING_UM, tile_size_px=TILE_PX,
                                  sample_id=f"p{i}", preview_dir=Path(d) / "preview")
                (on if previews else off).append(time.perf_counter() - t0)
                slide.close()
            # Breakdown of the preview work alone, on a fresh slide.
            slide = open_slide(ns.slide)
            t0 = time.perf_counter()
            image = slide.thumbnail(32)
            t1 = time.perf_counter()
            mask = slide.thumbnail(64).max(axis=-1) > 0   # stand-in mask of the right shape
            t2 = time.perf_counter()
            save_mask_preview(image, mask, Path(d) / f"m{i}.png")
            t3 = time.perf_counter()
            save_tiling_preview(image, plan.grid, slide.level_shapes[0], Path(d) / f"t{i}.png")
            t4 = time.perf_counter()
            parts["thumbnail_s"].append(t1 - t0)
            parts["mask_png_s"].append(t3 - t2)
            parts["tiling_png_s"].append(t4 - t3)
            slide.close()
    med = statistics.median
    return {"plan_on_s": med(on), "plan_off_s": med(off), "preview_s": med(on) - med(off),
            "plan_on_all": on, "plan_off_all": off, "tiles": plan.grid.num_tiles,
            **{k: med(v) for k, v in parts.items()}}


PHASES = {"bare": phase_bare, "pipeline": phase_pipeline, "datapath": phase_datapath, "preview": phase_preview}


# --------------------------------------------------------------------------- report
def summary(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def bench_slide(label: str, path: Path, ns, repeats: int, bare: list[dict] | None, child_args: list[str],
                max_seconds: float | None = None) -> dict:
    tiles = count_tiles(path)
    print(f"\n== {label}: {path.name}, {tiles} tissue tiles of {TILE_PX} px at {SPACING_UM} µm/px, "
          f"{repeats} repeat(s), page cache {'cold' if ns.cold else 'warm'}"
          + (f", pipeline runs CAPPED at {max_seconds:.0f} s" if max_seconds else ""), flush=True)
    runs: dict[str, list[dict]] = {"bare": [], "pipeline": [], "datapath": [], "preview": []}
    base = ["--slide", str(path), *child_args]
    for r in range(repeats):
        order = ["bare", "pipeline", "datapath", "preview"] if bare is None else ["pipeline", "datapath", "preview"]
        for phase in order:
            if phase in ns.skip:
                continue
            if ns.cold and phase != "bare":
                evict_page_cache(path)
            load0 = os.getloadavg()[0]
            res = run_phase(phase, [*base, "--tiles", str(tiles)], max_seconds if phase == "pipeline" else None)
            res["load"] = (load0, os.getloadavg()[0])
            runs[phase].append(res)
            if phase == "preview":
                print(f"  [{r + 1}/{repeats}] preview   plan on {res['plan_on_s']:.3f} s, off {res['plan_off_s']:.3f} s"
                      f" -> previews {res['preview_s']:.3f} s; peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
            else:
                cpu_ms = 1000 * res["cpu_s"] / res["tiles"] if res["tiles"] else float("nan")
                print(f"  [{r + 1}/{repeats}] {phase:9s} {res['tiles']:6d} tiles in {res['seconds']:7.1f} s = "
                      f"{res['tps']:7.1f} tiles/s, {cpu_ms:6.1f} CPU-ms/tile; "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB; torch threads {res.get('torch_threads')}; "
                      f"load {res['load'][0]:.1f}->{res['load'][1]:.1f}", flush=True)
                if res.get("capped"):
                    steady = res.get("tps_steady")
                    print(f"        CAPPED: killed after {res['capped_after_s']:.0f} s with {res['tiles']} of "
                          f"{res.get('tiles_total')} tiles done; tiles/s above is from the capped part "
                          f"(since the embed_slide call; {steady if steady is not None else float('nan'):.1f} "
                          f"since the first block); peak RSS is the peak until the kill", flush=True)
                if phase == "pipeline":
                    print(f"        running peak RSS every 30 s (MB): {res.get('rss_peak_every_30s_mb')}", flush=True)
    if bare is not None:
        runs["bare"] = bare
    return {"label": label, "path": path, "tiles": tiles, "runs": runs}


def report(results: list[dict], ns) -> bool:
    med = statistics.median
    rows = []
    ok_all = True

    def row(name, value, target, ok):
        nonlocal ok_all
        rows.append((name, value, target, mark(ok)))
        ok_all &= ok is not False

    bare = results[0]["runs"]["bare"]
    bare_tps = [r["tps"] for r in bare]
    if bare:
        b = bare[0]
        row("bare model tiles/s", summary(bare_tps), "", None)
        print(f"\nbare model: {ENCODER}, {b['params'] / 1e6:.1f} M params, fp32, channels_last, inference_mode, "
              f"batch {ns.batch_size}, torch threads {b['torch_threads']}, build {med([r['build_s'] for r in bare]):.2f} s "
              f"(not timed), input pool {b['input_pool_mb']:.0f} MB")
    for res in results:
        tag = res["label"]
        runs = res["runs"]
        ptag = tag + (" (CAPPED)" if any(r.get("capped") for r in runs["pipeline"]) else "")
        pipe_tps = [r["tps"] for r in runs["pipeline"]]
        if pipe_tps:
            row(f"{ptag}: pipeline tiles/s", summary(pipe_tps), "", None)
            if bare_tps:
                ratios = [t / med(bare_tps) for t in pipe_tps]
                target = TARGETS["ratio"] if res["label"] == "default" else None
                row(f"{ptag}: pipeline / bare", summary(ratios, "{:.3f}"),
                    f">= {TARGETS['ratio']}" if target else "(info)",
                    med(ratios) >= target if target else None)
                cpu_ratio = med([r["cpu_s"] / r["tiles"] for r in runs["pipeline"]]) / med([r["cpu_s"] / r["tiles"] for r in bare])
                row(f"{ptag}: pipeline / bare CPU-s per tile", f"{cpu_ratio:.3f}", "(info)", None)
            if not all(r["previews_ok"] and r["finite"] for r in runs["pipeline"] if not r.get("capped")):
                row(f"{tag}: previews written, embeddings finite", "no", "yes", False)
        data_tps = [r["tps"] for r in runs["datapath"]]
        if data_tps:
            target = TARGETS["datapath_tps"] if res["label"] == "default" else None
            row(f"{tag}: data path tiles/s (avg-pool)", summary(data_tps),
                f">= {target:.0f}" if target else "(info)", med(data_tps) >= target if target else None)
        prev = [r["preview_s"] for r in runs["preview"]]
        if prev:
            row(f"{tag}: preview cost s", summary(prev, "{:.3f}"), f"< {TARGETS['preview_s']}",
                med(prev) < TARGETS["preview_s"])
        if bare and runs["pipeline"]:
            b_rss = max(r["peak_rss_mb"] for r in bare)
            p_rss = max(r["peak_rss_mb"] for r in runs["pipeline"])
            row(f"{ptag}: peak RSS bare / pipeline MB", f"{b_rss:.0f} / {p_rss:.0f}", "", None)
            row(f"{ptag}: pipeline RSS over bare MB", f"{p_rss - b_rss:+.0f}", f"<= {TARGETS['rss_over_bare_mb']:.0f}",
                p_rss - b_rss <= TARGETS["rss_over_bare_mb"])
        if runs["datapath"]:
            row(f"{tag}: peak RSS data path MB", f"{max(r['peak_rss_mb'] for r in runs['datapath']):.0f}", "", None)
    if len(results) > 1 and all(r["runs"]["pipeline"] for r in results):
        small = max(r["peak_rss_mb"] for r in results[0]["runs"]["pipeline"])
        big = max(r["peak_rss_mb"] for r in results[1]["runs"]["pipeline"])
        rel = big / small - 1
        cap = " (big CAPPED)" if any(r.get("capped") for r in results[1]["runs"]["pipeline"]) else ""
        row("pipeline peak RSS big vs default" + cap, f"{big:.0f} vs {small:.0f} MB = {rel:+.1%}", f"within {TARGETS['rss_big_vs_small']:.0%}",
            abs(rel) <= TARGETS["rss_big_vs_small"])

    w = [max(len(str(r[i])) for r in rows + [("metric", "median (min..max)", "target", "")]) for i in range(4)]
    line = "  ".join("{:<%d}" % n for n in w)
    print("\nSUMMARY (" + ", ".join(f"{r['label']}={r['path'].name}: {r['tiles']} tiles" for r in results)
          + f"; page cache {'cold' if ns.cold else 'warm'}; {os.cpu_count()} CPUs)")
    print(line.format("metric", "median (min..max)", "target", ""))
    for r in rows:
        print(line.format(*r))
    return ok_all


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", action="store_true", help="also benchmark the 40000 x 40000 slide")
    p.add_argument("--repeats", type=int, default=3, help="runs of each timed measurement (median printed)")
    p.add_argument("--big-repeats", type=int, default=1,
                   help="runs on the big slide (each pipeline run takes minutes); the bare rate is the default slide's")
    p.add_argument("--slides-dir", type=Path, default=REPO / "bench-out", help="where built slides are cached")
    p.add_argument("--source-svs", type=Path, default=CMU_SVS, help="the real H&E slide the tissue comes from")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=None, help="ExecutionOptions.num_workers (default: the library's)")
    p.add_argument("--prefetch-factor", type=int, default=4)
    p.add_argument("--bare-min-seconds", type=float, default=20.0, help="the bare model runs at least this long")
    p.add_argument("--bare-max-seconds", type=float, default=90.0,
                   help="... and stops at the pipeline's tile count or after this long, whichever comes first")
    p.add_argument("--bare-pool", type=int, default=2, help="distinct in-memory input batches for the bare model")
    p.add_argument("--preview-loops", type=int, default=3, help="on/off plan pairs per preview run")
    p.add_argument("--cold", action="store_true", help="evict the slide from the page cache before each run")
    p.add_argument("--skip", nargs="*", default=[], choices=sorted(PHASES), help="phases to leave out")
    p.add_argument("--big-max-seconds", type=float, default=None,
                   help="kill each big-slide pipeline run after this many seconds and report what it did so far "
                        "(peak RSS until then; tiles/s of the capped part); marked CAPPED")
    p.add_argument("--from-json", type=Path, default=None,
                   help="take the default slide's results (bare model included) from an earlier --json file "
                        "instead of running them again; with --big only the big slide is run")
    p.add_argument("--json", type=Path, help="also write all raw results here")
    # child side
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--slide", help=argparse.SUPPRESS)
    p.add_argument("--tiles", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_args(ns) -> list[str]:
    out = ["--batch-size", str(ns.batch_size), "--prefetch-factor", str(ns.prefetch_factor),
           "--bare-min-seconds", str(ns.bare_min_seconds), "--bare-max-seconds", str(ns.bare_max_seconds),
           "--bare-pool", str(ns.bare_pool),
           "--preview-loops", str(ns.preview_loops)]
    if ns.num_workers is not None:
        out += ["--num-workers", str(ns.num_workers)]
    return out


def main(argv=None) -> int:
    ns = parse(argv)
    if ns.phase:
        _finish(ns.result, PHASES[ns.phase](ns))
        return 0
    results = []
    slides = []
    if ns.from_json:
        earlier = [r for r in json.loads(ns.from_json.read_text()) if r["label"] == "default"]
        if not earlier or not earlier[0]["runs"]["bare"]:
            sys.exit(f"{ns.from_json} holds no default-slide results with bare-model runs")
        results.append({**earlier[0], "path": Path(earlier[0]["path"])})
        print(f"default slide: {len(earlier[0]['runs']['pipeline'])} pipeline / {len(earlier[0]['runs']['bare'])} "
              f"bare runs taken from {ns.from_json} (not re-run)", flush=True)
    else:
        slides.append(("default", ensure_slide(ns.slides_dir, DEFAULT_SHAPE, ns.source_svs), ns.repeats, None))
    if ns.big:
        slides.append(("big", ensure_slide(ns.slides_dir, BIG_SHAPE, ns.source_svs), ns.big_repeats,
                       ns.big_max_seconds))
    for label, path, repeats, cap in slides:
        bare = results[0]["runs"]["bare"] if results else None
        results.append(bench_slide(label, path, ns, repeats, bare, child_args(ns), cap))
    ok = report(results, ns)
    if ns.json:
        ns.json.write_text(json.dumps([{**r, "path": str(r["path"])} for r in results], indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
