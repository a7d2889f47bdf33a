#!/usr/bin/env python
"""GPU benchmark: how close do `Pipeline.run` and `embed_slide` come to the bare model on one GPU?

Not a pytest test (no ``test_*.py`` name, no ``test_`` functions).  One
command, under 8 minutes on one H200 (``--max-seconds``, default 450, caps
every phase so the whole command ends in time)::

    . .venv/bin/activate
    python tests/benchmarks/bench_gpu.py                      # full mode (a GPU machine)
    python tests/benchmarks/bench_gpu.py --plan               # parse the options, print the plan, run nothing
    python tests/benchmarks/bench_gpu.py --cpu-smoke          # tiny model + small slide on CPU: checks it runs

The model is Virchow2's architecture with random weights: the ``virchow2``
preset (timm ``vit_huge_patch14_224``: embed_dim 1280, depth 32, 16 heads,
mlp_ratio 5.3375, ``SwiGLUPacked`` MLP with ``SiLU``, 4 register tokens,
``init_values=1e-5``, ``num_classes=0``; 631 M parameters; its pooled output
is CLS ++ mean of the patch tokens, 2560-d).  A random checkpoint in the
official key layout (timm's) is written once as ``.safetensors`` (fp32,
2.5 GB, like the published file) under ``bench-out/gpu/`` and loaded with
``Model.from_preset("virchow2", checkpoint_path=...)``: no download.

The slide is a real-tissue SVS (``testing.real_tissue_source`` of
``CMU-1-Small-Region.svs``, tissue 0.6, seed 0, 0.5 µm/px, downsamples
1/4/16; default 40000 x 40000, 19 127 tissue tiles, ~15 s to build on one
core) built once into ``bench-out/`` (the same file as ``bench_embed.py
--big``); the build time is printed.  The Pipeline runs on a manifest of
``--copies`` symlinks to it (one slide's tiles are only seconds of GPU work).

Phases, each in a fresh subprocess, in this order:

``bare``         the same network (``spec.build()`` of the preset: the
                 module the runtime builds, same weights) on the GPU, eval,
                 channels_last, ``inference_mode``, batches of
                 ``--batch-size`` already-normalised float tensors held on
                 the GPU (2 distinct batches, round robin), warm-up untimed,
                 timed ``--bare-seconds`` between ``cuda.synchronize()``.
                 Three variants: bf16 ``autocast`` at ``--batch-size`` (what
                 the runtime does: the reference of the ratios), autocast at
                 the Pipeline's full-block batch (blocks are ~2048 px, 9 x 9
                 tiles, split into balanced batches), and weights cast to
                 bf16 (info);
``datapath``     ``Model.embed_slide`` of the slide with a global-average-pool
                 "encoder", default options (all CPU threads decode; the pool
                 runs on the GPU when there is one): the data path's ceiling;
``embed_slide``  ``Model.from_preset(...).embed_slide(slide)`` with
                 ``ExecutionOptions(precision="bf16", batch_size=...)``, twice
                 in one process: cold (model load included) and warm;
``pipeline``     ``Pipeline(model, execution=ExecutionOptions(output_dir=...,
                 precision="bf16", batch_size=...)).run(manifest_path=...)`` on
                 the local default (the local cluster gives each GPU its own
                 worker process; cluster start and model load included).

Each of ``datapath``, ``embed_slide`` (warm) and ``pipeline`` is also run with
``ExecutionOptions(gpu_decode=True)`` (JPEG tiles decoded on the GPU), and every
run's GPU busy % (mean, p10, p50), idle split and starvation verdict are taken
from its run report (``Model.last_run_report`` / ``RunResult.report``: NVML
through ``nvidia-ml-py``), next to ``nvidia-smi``'s figure below.

To run it on the GPU machine (no network there), ``tests/benchmarks/gpu_wheels.sh``
prepares ``bench-out/gpu-carry/`` (the wheels it lacks, the slide, ``run.sh``).

For embed_slide and the Pipeline the child installs a progress reporter
(public ``activate_progress_reporter``): tiles/s end to end (tiles / seconds
of the call) and steady (first tile to last tile), and the time to the first
tile.  Ratios printed: end-to-end and steady tiles/s over the bare autocast
tiles/s.  With ``nvidia-smi`` on the PATH the GPU utilisation is sampled
every 250 ms during each phase (mean while the phase ran).  The summed RSS
of each phase's process tree is sampled too (info).

Budget: a phase still running at its cap is killed and reported ``CAPPED``
(its rates are those of the part done, from the progress reporter); a phase
with too little time left is skipped.  The JSON summary is printed at the
end and written to ``$OUT/bench_gpu.json`` when ``$OUT`` is set (and to
``--json PATH``).  Exit status 0 when every phase ran (capped or not), 1 if
one failed or was skipped.

``--cpu-smoke`` runs every phase on the CPU with a 2-block, 48-d twin of the
same architecture (same preset code path, same key layout), a 3000 x 3000
slide and 2 copies, in about a minute on 2 cores: it checks the script, not
speed.  Full mode also runs on a CPU-only machine (very slowly; shrink it
with ``--slide-shape``, ``--copies``, ``--bare-seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cohort import TimingReporter, _no_nan, cohort_manifest  # noqa: E402
from bench_embed import CMU_SVS, REPO, TreeRSS, _status_kb, count_tiles, ensure_slide, slide_path  # noqa: E402

PRESET = "virchow2"
TINY = dict(embed_dim=48, depth=2, num_heads=2)          # --cpu-smoke twin of the architecture
PHASES = ("bare", "datapath", "embed_slide", "pipeline")
# Seconds each phase may take at most (caps), and the least each later phase is left.
FULL_CAPS = {"ckpt": 150, "build": 200, "bare": 110, "datapath": 60, "embed_slide": 150, "pipeline": 200}
RESERVE = {"bare": 45, "datapath": 20, "embed_slide": 45, "pipeline": 60}
T0 = float(os.environ.setdefault("BENCH_GPU_T0", repr(time.time())))   # the parent's start; children inherit it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- model
def tile_preset(smoke: bool):
    from slide2vec_dask.encoders.presets import get_tile_preset

    preset = get_tile_preset(PRESET)
    if smoke:
        preset = preset.with_kwargs(**TINY)
        preset = preset.replace(outputs=tuple((v, TINY["embed_dim"] * (2 if v == "cls_mean" else 1))
                                              for v, _ in preset.outputs))
    return preset


def make_model(ns):
    """The benchmarked model: ``Model.from_preset`` (full) or the same preset code on the tiny twin."""
    from slide2vec_dask import Model

    if ns.cpu_smoke:
        return Model(tile_preset(True).spec(checkpoint_path=ns.checkpoint))
    return Model.from_preset(PRESET, checkpoint_path=ns.checkpoint)


def checkpoint_path(ns) -> Path:
    return ns.slides_dir / "gpu" / f"{PRESET}{'-tiny' if ns.cpu_smoke else ''}-random-fp32.safetensors"


def write_random_checkpoint(path: Path, smoke: bool) -> dict:
    """Random fp32 weights in the official (timm) key layout, as ``.safetensors``."""
    import torch
    from safetensors.torch import save_file

    preset = tile_preset(smoke)
    with torch.device("meta"):
        arch = preset.create_architecture()
    shapes = {k: tuple(v.shape) for k, v in arch.state_dict().items()}
    init = dict(preset.kwargs).get("init_values", 1e-5)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith(".gamma"):                                   # LayerScale
            state[k] = torch.full(shape, float(init))
        elif "norm" in k and k.endswith(".weight"):
            state[k] = torch.ones(shape)
        elif k.endswith(".bias"):
            state[k] = torch.zeros(shape)
        else:
            state[k] = torch.empty(shape).normal_(0.0, 0.02, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial))
    os.replace(partial, path)
    return {"params": sum(math.prod(s) for s in shapes.values()), "tensors": len(shapes),
            "embed_dim": arch.embed_dim, "depth": len(arch.blocks), "num_heads": arch.blocks[0].attn.num_heads,
            "reg_tokens": arch.num_reg_tokens, "mlp": type(arch.blocks[0].mlp).__name__,
            "size_mb": path.stat().st_size / 2**20}


def full_block_batch(batch_size: int, tile_px: int = 224) -> int:
    """The batch the Pipeline really runs: a ~2048 px block of k x k tiles split into balanced batches."""
    try:
        from slide2vec_dask.dataflow.blocks import DEFAULT_BLOCK_PX
    except ImportError:      # internals moved: the value when this script was written
        DEFAULT_BLOCK_PX = 2048
    n = max(1, round(DEFAULT_BLOCK_PX / tile_px)) ** 2
    return -(-n // -(-n // batch_size))


# --------------------------------------------------------------------------- phases (child side)
class Partial:
    """Results written as they come (atomically), so a killed phase keeps what it finished."""

    def __init__(self, path: str):
        self.path, self.data = Path(path), {}

    def put(self, **kw) -> None:
        self.data.update(kw)
        self.data["vmhwm_kb"] = _status_kb(os.getpid(), "VmHWM:")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_mem(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    return {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def phase_ckpt(ns, out: Partial) -> None:
    t0 = time.perf_counter()
    info = write_random_checkpoint(Path(ns.checkpoint), ns.cpu_smoke)
    out.put(seconds=time.perf_counter() - t0, **info)


def phase_build(ns, out: Partial) -> None:
    t0 = time.perf_counter()
    path = ensure_slide(ns.slides_dir, tuple(ns.slide_shape), ns.source_svs)
    built_s = time.perf_counter() - t0
    out.put(build_s=built_s, path=str(path), size_mb=path.stat().st_size / 2**20, tiles=count_tiles(path))


def phase_bare(ns, out: Partial) -> None:
    import torch

    device = _device()
    t0 = time.perf_counter()
    model = make_model(ns)
    spec = model.tile_spec
    module = spec.build().eval().requires_grad_(False)             # what the runtime builds
    module = module.to(device, memory_format=torch.channels_last)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in module.parameters())
    out.put(load_s=load_s, params=params, device=str(device),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(batch: int, dtype) -> list:
        pool = []
        for _ in range(2):
            u8 = torch.randint(0, 256, (batch, 3, spec.tile_size_px, spec.tile_size_px), dtype=torch.uint8,
                               generator=gen).to(device)
            x = ((u8.float() / 255.0 - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)
            pool.append(x)
        return pool

    def timed(name: str, mod, batch: int, dtype, autocast: bool) -> None:
        pool = inputs(batch, dtype)
        ctx = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if autocast \
            else (lambda: torch.autocast(device_type=device.type, enabled=False))
        with torch.inference_mode(), ctx():
            i, t0 = 0, time.perf_counter()                         # warm-up (kernels, allocator), untimed:
            while i < ns.bare_warmup or time.perf_counter() - t0 < ns.bare_warmup_seconds:   # batches and seconds
                mod(pool[i % 2])
                i += 1
                if i % 4 == 0:
                    _sync(device)
            _sync(device)
            done, i = 0, 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < ns.bare_seconds:
                y = mod(pool[i % 2])
                done += batch
                i += 1
            _sync(device)
            seconds = time.perf_counter() - t0
        out.put(**{name: {"tiles": done, "seconds": seconds, "tps": done / seconds, "batch": batch,
                          "feature_dim": int(y.shape[1]), "finite": bool(torch.isfinite(y.float()).all())}},
                **_gpu_mem(device))
        log(f"  bare {name:24s} batch {batch:4d}: {done} tiles in {seconds:.1f} s = {done / seconds:8.1f} tiles/s")

    bs, eff = ns.batch_size, full_block_batch(ns.batch_size, spec.tile_size_px)
    timed("autocast_bf16", module, bs, torch.float32, True)
    if eff != bs:
        timed("autocast_bf16_block_batch", module, eff, torch.float32, True)
    timed("cast_bf16", module.to(torch.bfloat16), bs, torch.bfloat16, False)


def phase_datapath(ns, out: Partial) -> None:
    import torch

    from slide2vec_dask import ExecutionOptions, Model, activate_progress_reporter
    from slide2vec_dask.clusters.client import default_threads

    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Model.from_module(pool, name="mean-rgb", feature_dim=3)
    model.embed_slide(ns.slide, execution=ExecutionOptions(batch_size=ns.batch_size))   # warm-up, untimed:
    for name, gpu_decode in (("datapath", False), ("datapath_gpu_decode", True)):      # both measured warm
        rep = TimingReporter(f"{ns.progress}.{name}", time.perf_counter())
        activate_progress_reporter(rep)
        rep.t_call = t0 = time.perf_counter()
        res = model.embed_slide(ns.slide, execution=ExecutionOptions(batch_size=ns.batch_size, gpu_decode=gpu_decode))
        seconds = time.perf_counter() - t0
        out.put(**{name: {"tiles": int(res.num_tiles), "seconds": seconds,
                          **_rates(rep.snapshot(), res.num_tiles, seconds), **_telemetry(model.last_run_report),
                          "cpu_threads": default_threads(), "torch_threads": torch.get_num_threads()}})


def _telemetry(report: dict | None) -> dict:
    """The run report's GPU figures (issue 25's telemetry): busy %, idle split, the starvation verdict."""
    if not report:
        return {}
    gpu = report.get("gpu") or {}
    return {"report_gpu_source": (gpu.get("source") or "")[:40] or None, "report_busy_pct": gpu.get("busy_pct"),
            "report_idle_s": gpu.get("idle_s"), "report_starved": report.get("starved"),
            "report_time_s": report.get("time")}


def _rates(snap: dict, tiles: int, seconds: float) -> dict:
    first, last, t_call = snap.get("first_t"), snap.get("last_t"), snap.get("t_call")
    steady = float("nan")
    if first is not None and last is not None and last - first > 0.2:
        steady = (snap["done"] - snap["first_n"]) / (last - first)
    return {"tps": tiles / seconds if seconds > 0 else float("nan"), "tps_steady": steady,
            "ttft_s": first - t_call if first is not None else float("nan"), "done": snap.get("done")}


def phase_embed_slide(ns, out: Partial) -> None:
    import torch

    from slide2vec_dask import ExecutionOptions, activate_progress_reporter

    model = make_model(ns)
    execution = ExecutionOptions(precision="bf16", batch_size=ns.batch_size)
    for name in ("cold", "warm", "warm_gpu_decode"):
        rep = TimingReporter(f"{ns.progress}.{name}", time.perf_counter())
        activate_progress_reporter(rep)
        rep.t_call = t0 = time.perf_counter()
        res = model.embed_slide(ns.slide, execution=execution.replace(gpu_decode=name.endswith("gpu_decode")))
        seconds = time.perf_counter() - t0
        emb = res.tile_embeddings
        out.put(**{name: {"tiles": int(res.num_tiles), "seconds": seconds,
                          **_rates(rep.snapshot(), res.num_tiles, seconds), **_telemetry(model.last_run_report),
                          "feature_dim": int(emb.shape[1]), "finite": bool(torch.isfinite(emb).all())}},
                **_gpu_mem(_device()))
        log(f"  embed_slide {name}: {res.num_tiles} tiles in {seconds:.1f} s")


def phase_pipeline(ns, out: Partial) -> None:
    from slide2vec_dask import ExecutionOptions, Pipeline, activate_progress_reporter

    model = make_model(ns)
    # Each run on the local default (its own cluster: start and model load included), then the same
    # with gpu_decode; each run's report is kept ($OUT/run_report-<name>.json when $OUT is set).
    for name, gpu_decode in (("pipeline", False), ("pipeline_gpu_decode", True)):
        rep = TimingReporter(f"{ns.progress}.{name}", time.perf_counter())
        activate_progress_reporter(rep)
        with tempfile.TemporaryDirectory(prefix="bench-gpu-pipeline-", dir=ns.work_dir) as d:
            execution = ExecutionOptions(output_dir=d, precision="bf16", batch_size=ns.batch_size,
                                         gpu_decode=gpu_decode)
            rep.t_call = t0 = time.perf_counter()
            result = Pipeline(model, execution=execution).run(manifest_path=ns.manifest)
            seconds = time.perf_counter() - t0
            if os.environ.get("OUT") and result.report_path is not None:
                Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(result.report_path, Path(os.environ["OUT"]) / f"run_report-{name}.json")
        tiles = int(sum(a.num_tiles for a in result.tile_artifacts))
        out.put(**{name: {"tiles": tiles, "seconds": seconds, "slides": len(result.tile_artifacts),
                          "failed": int(result.num_failed), **_rates(rep.snapshot(), tiles, seconds),
                          **_telemetry(result.report)}})


CHILD_PHASES = {"ckpt": phase_ckpt, "build": phase_build, "bare": phase_bare, "datapath": phase_datapath,
                "embed_slide": phase_embed_slide, "pipeline": phase_pipeline}


# --------------------------------------------------------------------------- parent side
class GpuSampler:
    """``nvidia-smi`` utilisation / memory every 250 ms while a phase runs (nothing without nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu,memory.used",
                                              "--format=csv,noheader,nounits", "-lms", "250"],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                threading.Thread(target=self._read, daemon=True).start()
            except OSError:
                self.proc = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
                self.samples.append((util, mem))
            except ValueError:
                continue

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.samples:
            return {}
        util = [u for u, _ in self.samples]
        busy = [i for i, u in enumerate(util) if u > 0]
        active = util[busy[0]: busy[-1] + 1] if busy else []
        return {"gpu_util_mean": sum(util) / len(util),
                "gpu_util_mean_active": sum(active) / len(active) if active else 0.0,
                "gpu_mem_max_mb": max(m for _, m in self.samples), "gpu_samples": len(util)}


def run_child(phase: str, ns, cap: float, extra: list[str] = ()) -> dict:
    """One phase in a fresh interpreter (its own process group), killed at ``cap`` seconds."""
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{phase}-", dir=ns.work_dir) as d:
        result, progress = Path(d) / "result.json", Path(d) / "progress.json"
        cmd = [sys.executable, __file__, "--phase", phase, "--result", str(result), "--progress", str(progress),
               *child_argv(ns), *extra]
        gpu = GpuSampler() if phase in PHASES else None
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        rss = TreeRSS(proc.pid, mark_every=1e9)
        capped = False
        try:
            proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            capped = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall = time.perf_counter() - t0
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # stragglers (a nanny's worker)
        except (ProcessLookupError, PermissionError):
            pass
        out = json.loads(result.read_text()) if result.exists() else {}
        out.update(wall_s=wall, capped=capped, cap_s=cap, rss_peak_mb=rss.stop() / 1024,
                   returncode=None if capped else proc.returncode)
        if gpu is not None:
            out.update(gpu.stop())
        if capped:     # what the running call had done when it was killed
            for name in sorted(n for n in Path(d).glob("progress.json*") if n.suffix != ".tmp"):
                snap = json.loads(name.read_text())
                last, t_call = snap.get("last_t"), snap.get("t_call")
                seconds = (last - t_call) if last and t_call else float("nan")
                key = name.name.replace("progress.json", "").lstrip(".") or phase
                if key not in out:
                    out[key] = {"tiles": snap.get("done", 0), "seconds": seconds, "capped": True,
                                **_rates(snap, snap.get("done", 0), seconds)}
        elif proc.returncode != 0:
            out["error"] = f"exit code {proc.returncode}"
    return out


def child_argv(ns) -> list[str]:
    argv = ["--batch-size", str(ns.batch_size), "--bare-seconds", str(ns.bare_seconds),
            "--bare-warmup", str(ns.bare_warmup), "--bare-warmup-seconds", str(ns.bare_warmup_seconds),
            "--slides-dir", str(ns.slides_dir),
            "--source-svs", str(ns.source_svs), "--slide-shape", *map(str, ns.slide_shape),
            "--checkpoint", str(ns.checkpoint), "--work-dir", str(ns.work_dir)]
    if ns.cpu_smoke:
        argv.append("--cpu-smoke")
    if ns.slide:
        argv += ["--slide", str(ns.slide)]
    if ns.manifest:
        argv += ["--manifest", str(ns.manifest)]
    return argv


class Budget:
    """Phase caps (``FULL_CAPS`` and ``RESERVE`` scaled to the budget) that end the command in time."""

    def __init__(self, total: float):
        self.deadline = time.perf_counter() + total
        self.caps = {k: v * total / 450 for k, v in FULL_CAPS.items()}
        self.reserve = {k: v * total / 450 for k, v in RESERVE.items()}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def cap(self, phase: str, later: list[str]) -> float:
        reserve = sum(self.reserve.get(p, 0) for p in later)
        return max(1.0, min(self.caps[phase], self.left() - reserve))


def _busy_text(b) -> str:
    if not b:
        return "n/a"
    return f"{b['mean']:.0f}/{b['p10']:.0f}/{b['p50']:.0f}" + (" STARVED" if b.get("starved") else "")


def fmt(x, spec=".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv=None) -> int:
    global T0
    ns = parse(argv)
    if ns.phase:
        CHILD_PHASES[ns.phase](ns, Partial(ns.result))
        return 0
    T0 = time.time()
    os.environ["BENCH_GPU_T0"] = repr(T0)
    ns.work_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(ns.max_seconds)
    phases = [p for p in PHASES if p in ns.phases]
    eff = full_block_batch(ns.batch_size)
    plan = (f"mode {'cpu-smoke' if ns.cpu_smoke else 'full'}: model {PRESET}"
            + (f" tiny twin {TINY}" if ns.cpu_smoke else " (ViT-H/14, 631 M params)")
            + f" random weights at {ns.checkpoint}; slide {ns.slide_shape[0]}x{ns.slide_shape[1]} real tissue, "
            f"pipeline on {ns.copies} copies; batch {ns.batch_size} (pipeline full-block batch {eff}); bf16; "
            f"phases {phases}; budget {ns.max_seconds:.0f} s, caps "
            + ", ".join(f"{k} {v:.0f} s" for k, v in budget.caps.items()))
    log(plan)
    if ns.plan:
        return 0
    if not ns.source_svs.exists():
        sys.exit(f"needs the real H&E slide at {ns.source_svs}")
    summary: dict = {"mode": "cpu-smoke" if ns.cpu_smoke else "full", "model": PRESET, "batch_size": ns.batch_size,
                     "pipeline_block_batch": eff, "precision": "bf16", "copies": ns.copies,
                     "max_seconds": ns.max_seconds, "cpus": os.cpu_count(), "phases": {}}
    ok = True

    # -- prepare: checkpoint and slide (cached)
    if not ns.checkpoint.exists():
        log(f"writing random checkpoint {ns.checkpoint.name} ...")
        res = run_child("ckpt", ns, budget.cap("ckpt", phases))
        if res.get("error") or res.get("capped") or not ns.checkpoint.exists():
            log(f"checkpoint FAILED: {res}")
            return finish(summary, ns, False)
        log(f"  checkpoint: {res['params'] / 1e6:.1f} M params, embed_dim {res['embed_dim']}, depth {res['depth']}, "
            f"heads {res['num_heads']}, reg tokens {res['reg_tokens']}, {res['mlp']}; {res['size_mb']:.0f} MiB "
            f"in {res['seconds']:.1f} s")
        summary["checkpoint"] = res
    else:
        log(f"checkpoint {ns.checkpoint.name}: cached")
        summary["checkpoint"] = {"cached": True}
    cached = slide_path(ns.slides_dir, tuple(ns.slide_shape)).exists()
    log(f"slide {ns.slide_shape[0]}x{ns.slide_shape[1]}: {'cached' if cached else 'building'} ...")
    res = run_child("build", ns, budget.cap("build", phases))
    if res.get("error") or res.get("capped") or "path" not in res:
        log(f"slide build FAILED: {res}")
        return finish(summary, ns, False)
    ns.slide = Path(res["path"])
    log(f"  slide {ns.slide.name}: {res['tiles']} tissue tiles, {res['size_mb']:.0f} MiB, "
        + ("cached" if cached else f"built in {res['build_s']:.1f} s") + f" (phase wall {res['wall_s']:.1f} s)")
    summary["slide"] = {"path": str(ns.slide), "tiles": res["tiles"], "size_mb": res["size_mb"],
                        "build_s": None if cached else res["build_s"], "cached": cached}
    ns.manifest = cohort_manifest(f"gpu-{ns.slide_shape[0]}x{ns.slide_shape[1]}", ns.slide, ns.copies, ns.slides_dir)

    # -- measured phases
    for i, phase in enumerate(phases):
        cap = budget.cap(phase, phases[i + 1:])
        if cap < min(10.0, budget.caps[phase] / 2):
            log(f"{phase}: SKIPPED, {budget.left():.0f} s left of the budget")
            summary["phases"][phase] = {"skipped": True}
            ok = False
            continue
        log(f"{phase}: running (cap {cap:.0f} s) ...")
        res = run_child(phase, ns, cap)
        summary["phases"][phase] = res
        status = "CAPPED" if res.get("capped") else ("FAILED " + res["error"] if res.get("error") else "done")
        log(f"{phase}: {status} in {res['wall_s']:.1f} s, tree RSS peak {res['rss_peak_mb']:.0f} MB"
            + (f", GPU util {res['gpu_util_mean']:.0f} % (active {res['gpu_util_mean_active']:.0f} %), "
               f"GPU mem {res['gpu_mem_max_mb']:.0f} MB" if "gpu_util_mean" in res else ""))
        ok &= not res.get("error")
        for key in ("datapath", "datapath_gpu_decode", "cold", "warm", "warm_gpu_decode", "pipeline",
                    "pipeline_gpu_decode"):
            r = res.get(key)
            if isinstance(r, dict) and "tiles" in r:
                log(f"  {key:9s} {r['tiles']} tiles in {fmt(r['seconds'])} s = {fmt(r['tps'])} tiles/s end to end, "
                    f"{fmt(r['tps_steady'])} steady, first tile after {fmt(r['ttft_s'], '.2f')} s"
                    + (" CAPPED" if r.get("capped") else "")
                    + (f"; report: GPU busy {r['report_busy_pct']}, idle {r['report_idle_s']}"
                       if r.get("report_busy_pct") else ""))
    return finish(summary, ns, ok)


def finish(summary: dict, ns, ok: bool) -> int:
    ph = summary["phases"]
    bare = ph.get("bare", {})
    ref = (bare.get("autocast_bf16") or {}).get("tps")

    def ratio(x):
        return None if not ref or x is None or (isinstance(x, float) and math.isnan(x)) else x / ref

    es, pipe = ph.get("embed_slide", {}), (ph.get("pipeline", {}).get("pipeline") or {})
    warm, cold = es.get("warm") or {}, es.get("cold") or {}
    pipe_gd, warm_gd = ph.get("pipeline", {}).get("pipeline_gpu_decode") or {}, es.get("warm_gpu_decode") or {}
    dp = ph.get("datapath", {})
    dp_plain, dp_gd = dp.get("datapath") or {}, dp.get("datapath_gpu_decode") or {}

    def busy(r):   # the run report's measured GPU busy % (mean, p10, p50) and its starvation verdict
        b = r.get("report_busy_pct") or {}
        return None if b.get("mean") is None else {**b, "starved": (r.get("report_starved") or {}).get("starved"),
                                                   "idle_s": r.get("report_idle_s")}
    summary["result"] = {
        "gpu": bare.get("gpu"), "device": bare.get("device"),
        "bare_tps": ref,
        "bare_block_batch_tps": (bare.get("autocast_bf16_block_batch") or {}).get("tps"),
        "bare_cast_bf16_tps": (bare.get("cast_bf16") or {}).get("tps"),
        "datapath_tps": dp_plain.get("tps"), "datapath_gpu_decode_tps": dp_gd.get("tps"),
        "pipeline_gpu_decode_tps": pipe_gd.get("tps"), "pipeline_gpu_decode_tps_steady": pipe_gd.get("tps_steady"),
        "embed_slide_warm_gpu_decode_tps": warm_gd.get("tps"),
        "pipeline_gpu_decode_steady_over_bare": ratio(pipe_gd.get("tps_steady")),
        "embed_slide_warm_gpu_decode_over_bare": ratio(warm_gd.get("tps")),
        "gpu_busy_pipeline": busy(pipe), "gpu_busy_pipeline_gpu_decode": busy(pipe_gd),
        "gpu_busy_embed_slide_warm": busy(warm), "gpu_busy_embed_slide_warm_gpu_decode": busy(warm_gd),
        "gpu_busy_datapath": busy(dp_plain), "gpu_busy_datapath_gpu_decode": busy(dp_gd),
        "pipeline_tps": pipe.get("tps"), "pipeline_tps_steady": pipe.get("tps_steady"),
        "pipeline_ttft_s": pipe.get("ttft_s"),
        "embed_slide_cold_tps": cold.get("tps"), "embed_slide_warm_tps": warm.get("tps"),
        "embed_slide_warm_tps_steady": warm.get("tps_steady"),
        "pipeline_over_bare": ratio(pipe.get("tps")),
        "pipeline_steady_over_bare": ratio(pipe.get("tps_steady")),
        "embed_slide_cold_over_bare": ratio(cold.get("tps")),
        "embed_slide_warm_over_bare": ratio(warm.get("tps")),
        "embed_slide_warm_steady_over_bare": ratio(warm.get("tps_steady")),
        "capped": sorted(k for k, v in ph.items() if v.get("capped")),
        "all_phases_ran": ok, "total_s": time.time() - T0,
    }
    r = summary["result"]
    print("\nSUMMARY", flush=True)
    rows = [("bare model tiles/s (bf16 autocast, batch %d)" % summary["batch_size"], fmt(r["bare_tps"])),
            ("bare model tiles/s at the pipeline's block batch %d" % summary["pipeline_block_batch"],
             fmt(r["bare_block_batch_tps"])),
            ("bare model tiles/s, weights cast to bf16", fmt(r["bare_cast_bf16_tps"])),
            ("data path tiles/s (pool encoder, all CPU threads)", fmt(r["datapath_tps"])),
            ("Pipeline tiles/s end to end / steady", f"{fmt(r['pipeline_tps'])} / {fmt(r['pipeline_tps_steady'])}"),
            ("Pipeline / bare: end to end, steady",
             f"{fmt(r['pipeline_over_bare'], '.3f')}, {fmt(r['pipeline_steady_over_bare'], '.3f')}"),
            ("embed_slide tiles/s cold / warm", f"{fmt(r['embed_slide_cold_tps'])} / {fmt(r['embed_slide_warm_tps'])}"),
            ("embed_slide / bare: cold, warm, warm steady",
             f"{fmt(r['embed_slide_cold_over_bare'], '.3f')}, {fmt(r['embed_slide_warm_over_bare'], '.3f')}, "
             f"{fmt(r['embed_slide_warm_steady_over_bare'], '.3f')}"),
            ("data path tiles/s with gpu_decode", fmt(r["datapath_gpu_decode_tps"])),
            ("Pipeline tiles/s with gpu_decode: end to end / steady",
             f"{fmt(r['pipeline_gpu_decode_tps'])} / {fmt(r['pipeline_gpu_decode_tps_steady'])}"),
            ("embed_slide warm tiles/s with gpu_decode", fmt(r["embed_slide_warm_gpu_decode_tps"])),
            ("GPU busy % (run report, mean/p10/p50): Pipeline", _busy_text(r["gpu_busy_pipeline"])),
            ("  ... Pipeline with gpu_decode", _busy_text(r["gpu_busy_pipeline_gpu_decode"])),
            ("  ... embed_slide warm / with gpu_decode",
             f"{_busy_text(r['gpu_busy_embed_slide_warm'])} / {_busy_text(r['gpu_busy_embed_slide_warm_gpu_decode'])}"),
            ("  ... data path / with gpu_decode",
             f"{_busy_text(r['gpu_busy_datapath'])} / {_busy_text(r['gpu_busy_datapath_gpu_decode'])}"),
            ("capped phases", ", ".join(r["capped"]) or "none"),
            ("total seconds", fmt(r["total_s"]))]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    summary = _no_nan(summary)
    text = json.dumps(summary, indent=1, default=str)
    print("\nJSON " + json.dumps(summary["result"], default=str), flush=True)
    targets = [p for p in (ns.json, Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT") else None) if p]
    for p in targets:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        log(f"summary written to {p}")
    return 0 if ok else 1


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny twin model, small slide, CPU: checks the script runs")
    p.add_argument("--plan", action="store_true", help="print the resolved plan and exit (checks the options)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="overall budget; every phase is capped to fit (default 450, smoke 300)")
    p.add_argument("--batch-size", type=int, default=None, help="ExecutionOptions.batch_size and the bare batch "
                   "(default 128, smoke 16)")
    p.add_argument("--slide-shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="level-0 size of the real-tissue slide (default 40000 40000, smoke 3000 3000)")
    p.add_argument("--copies", type=int, default=None, help="manifest rows (symlinks to the slide) for the Pipeline "
                   "(default 4, smoke 2)")
    p.add_argument("--bare-seconds", type=float, default=None, help="timed seconds per bare variant (default 15)")
    p.add_argument("--bare-warmup", type=int, default=3, help="untimed warm-up batches per bare variant (at least)")
    p.add_argument("--bare-warmup-seconds", type=float, default=None,
                   help="... and at least this many seconds of warm-up (default 3, smoke 1)")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES, help="measured phases to run")
    p.add_argument("--slides-dir", type=Path, default=REPO / "bench-out", help="where slides and the checkpoint are cached")
    p.add_argument("--source-svs", type=Path, default=CMU_SVS, help="the real H&E slide")
    p.add_argument("--checkpoint", type=Path, default=None, help="random checkpoint path (written when missing)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch for outputs (default bench-out/gpu/work)")
    p.add_argument("--json", type=Path, help="also write the JSON summary here")
    p.add_argument("--phase", choices=sorted(CHILD_PHASES), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    p.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    smoke = ns.cpu_smoke
    defaults = dict(max_seconds=300.0 if smoke else 450.0, batch_size=16 if smoke else 128,
                    slide_shape=[3000, 3000] if smoke else [40000, 40000], copies=2 if smoke else 4,
                    bare_seconds=2.0 if smoke else 15.0, bare_warmup_seconds=1.0 if smoke else 3.0)
    for k, v in defaults.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)
    if ns.checkpoint is None:
        ns.checkpoint = checkpoint_path(ns)
    if ns.work_dir is None:
        ns.work_dir = ns.slides_dir / "gpu" / "work"
    if not ns.phase:
        if ns.max_seconds < 60:
            p.error("--max-seconds must leave at least 60 s")
        if ns.batch_size < 1 or ns.copies < 1 or ns.bare_seconds <= 0 or min(ns.slide_shape) < 512:
            p.error("--batch-size, --copies, --bare-seconds must be positive; --slide-shape at least 512 px")
        if smoke:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""      # children inherit: everything on the CPU
    return ns


if __name__ == "__main__":
    sys.exit(main())
