"""The run report: what ran where, how busy the GPUs were, where the time went, what to change.

`RunTelemetry` lives on the client for one run.  The driver hands it every
block's `BlockTiming` (with the NVML samples its worker took meanwhile) as
results land; it folds them into sums, per-slide rows and per-GPU sample
arrays, and at the end `report()` makes one dict of bounded size whatever
the cohort -- apart from the per-slide table -- written as
``<output_dir>/run_report.json`` and ``run_report.md`` (`write_report`).
Per-block rows go to ``telemetry.jsonl`` only when asked.

How GPU figures are made:

* **busy %**: NVML's utilisation samples between the GPU's first block and its
  last (mean, p10, p50).  Without NVML (module or driver missing), the share of
  each 0.5 s bin the encoder's device thread ran instead -- host time, said so
  in ``gpu.source``.
* **idle GPU seconds**: each sample's idle share (100 % - utilisation) times
  its interval, split by when it was taken: before the GPU's first block
  (cluster start, model load, planning), between its first and last block,
  after its last (the tail).  Of the between-block idle, ``starved`` is the
  part when the encoder was not even running -- its device thread had no block
  to work on, so the data path did not keep up (the rest is idle inside the
  encoder's own run: kernel launches, small batches, the copy back).
* **starved** (the verdict): starved seconds over 10 % of the time from the
  GPU's first block to its last.  The starving stage is the host stage
  (planning, read, decode, cut, write) with the most seconds, and the report
  says what to change.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import platform
import socket
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from slide2vec_dask.atomic import atomic
from slide2vec_dask.telemetry import nvml
from slide2vec_dask.telemetry.clock import STAGES, BlockTiming

SCHEMA = 1
REPORT_JSON, REPORT_MD, TELEMETRY_JSONL = "run_report.json", "run_report.md", "telemetry.jsonl"
#: Between-block idle above this share of the time a GPU had work: the data path starves it.
STARVED_SHARE = 0.10
HOST_STAGES = ("plan", "read", "decode", "cut", "write")
ADVICE = {
    "plan": "plan ahead with more threads (ExecutionOptions(num_preprocessing_workers=...)), or reuse saved "
            "plans (PreprocessingConfig(read_coordinates_from=...))",
    "read": "give each GPU more decoding threads (ExecutionOptions(num_workers=...), or more CPU cores per GPU "
            "worker), raise prefetch_factor, or decode JPEG tiles on the GPU (ExecutionOptions(gpu_decode=True))",
    "decode": "decode JPEG tiles on the GPU (ExecutionOptions(gpu_decode=True)), or give each GPU more decoding "
              "threads (num_workers)",
    "cut": "give each GPU more threads (ExecutionOptions(num_workers=...))",
    "write": "write to a faster disk (a local output_dir), or give each GPU more threads (num_workers)",
}
VERSIONED = ("slide2vec-dask", "torch", "torchvision", "timm", "numpy", "dask", "distributed", "zarr",
             "tifffile", "imagecodecs", "nvidia-ml-py")


class _Gpu:
    """One GPU's samples (compact arrays) and the window it had blocks in."""

    def __init__(self, key: str):
        self.key = key
        self.t, self.util = array.array("d"), array.array("d")
        self.mem_used_max = 0.0
        self.power: list[float] = [0.0, 0]   # sum, count


class RunTelemetry:
    """One run's telemetry on the client; `report()` at the end."""

    def __init__(self, *, run_id: str, entry: str, settings: dict | None = None, interval: float = nvml.INTERVAL_S):
        self.run_id, self.entry, self.settings = run_id, entry, dict(settings or {})
        self.interval = interval
        self.started = time.time()
        self.finished: float | None = None
        self.hosts: set[str] = {socket.gethostname()}
        self.gpu_info: dict[str, dict] = {}
        self.gpus: dict[str, _Gpu] = {}
        self.totals = dict.fromkeys(("queue", *STAGES), 0.0)
        self.blocks = 0
        self.tiles = 0
        self.per_slide: dict[str, list] = {}          # sid -> [blocks, tiles, *STAGES seconds]
        self.devices: dict[str, list] = {}            # device key -> [tiles, first start, last end, busy s]
        self.windows: dict[str, list] = {}            # host or gpu uuid -> [first device start, last device end]
        # host or gpu uuid -> seconds the encoder's device thread ran in each `interval` bin since the start
        self.busy_bins: dict[str, array.array] = defaultdict(lambda: array.array("d"))
        self.cuda_windows: set[str] = set()           # the windows' keys that saw CUDA blocks (the fallback)
        self._jsonl = None

    def open_jsonl(self, output_dir: str | Path) -> None:
        """Also write every block's timing and every GPU sample to ``<output_dir>/telemetry.jsonl``."""
        self._jsonl = open(Path(output_dir) / TELEMETRY_JSONL, "w", buffering=1 << 16)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    # -- what the driver tells it ---------------------------------------------------------------
    def begin(self, executor) -> None:
        """Start sampling where the run's tasks go: every worker of a cluster, or this process."""
        client = getattr(executor, "client", None)
        if client is None:
            nvml.start_sampler(self.interval)
            found = {"local": nvml.gpus()}
        else:
            from slide2vec_dask.telemetry import plugin   # (distributed: only with a cluster)

            plugin.register(client)
            found = client.run(nvml.gpus, on_error="ignore")
            found["client"] = nvml.gpus()   # (an in-process worker's sampler is this process's)
        for infos in found.values():
            for info in infos or []:
                self.gpu_info[info["key"]] = info
                self.hosts.add(info["host"])
        self.samples(nvml.drain() if client is None else [])

    def end(self, executor) -> None:
        """Collect the samples no block carried (the tail) and close the clock."""
        client = getattr(executor, "client", None)
        try:
            if client is not None:
                for samples in client.run(nvml.drain, on_error="ignore").values():
                    if isinstance(samples, list):
                        self.samples(samples)
        except Exception:   # (a cluster going away at the end): the report does without its tail
            pass
        self.samples(nvml.drain())
        self.finished = time.time()

    def block(self, sid: str, timing: BlockTiming | None, submitted: float | None = None) -> None:
        """A block landed (its timing may be None: telemetry off)."""
        if timing is None:
            return
        self.blocks += 1
        self.tiles += timing.tiles
        self.hosts.add(timing.host)
        queue = max(0.0, (timing.read_start or timing.start) - submitted) if submitted else 0.0
        self.totals["queue"] += queue
        row = self.per_slide.setdefault(sid, [0, 0] + [0.0] * len(STAGES))
        row[0] += 1
        row[1] += timing.tiles
        for i, name in enumerate(STAGES):
            seconds = timing.seconds.get(name, 0.0)
            self.totals[name] += seconds
            row[2 + i] += seconds
        if timing.device_end:
            dkey = f"{timing.host}/{timing.pid}/{timing.device}"
            dev = self.devices.setdefault(dkey, [0, timing.device_start, timing.device_end, 0.0, timing.device])
            dev[0] += timing.tiles
            dev[1], dev[2] = min(dev[1], timing.device_start), max(dev[2], timing.device_end)
            dev[3] += timing.device_end - timing.device_start
            for where in (timing.gpu_uuid or timing.host,) + ((timing.host,) if timing.gpu_uuid else ()):
                w = self.windows.setdefault(where, [timing.device_start, timing.device_end])
                w[0], w[1] = min(w[0], timing.device_start), max(w[1], timing.device_end)
                self._bin(where, timing.device_start, timing.device_end)
            if timing.device.startswith("cuda"):
                self.cuda_windows.add(timing.gpu_uuid or timing.host)
        self.samples(timing.samples)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": "block", "sample_id": sid, "queue_s": round(queue, 6),
                                          **{k: v for k, v in timing.__dict__.items() if k != "samples"}}) + "\n")

    def samples(self, samples: Iterable) -> None:
        for t, key, util, _mem_util, used, power in samples:
            if t < self.started - self.interval:
                continue   # taken before this run (a sampler running since the worker started)
            gpu = self.gpus.get(key)
            if gpu is None:
                gpu = self.gpus[key] = _Gpu(key)
            if util is not None:
                gpu.t.append(t)
                gpu.util.append(util)
            if used is not None:
                gpu.mem_used_max = max(gpu.mem_used_max, used)
            if power is not None:
                gpu.power[0] += power
                gpu.power[1] += 1
            if self._jsonl is not None:
                self._jsonl.write(json.dumps({"kind": "gpu", "t": t, "gpu": key, "util": util,
                                              "mem_util": _mem_util, "mem_used_mb": used, "power_w": power}) + "\n")

    def _bin(self, where: str, start: float, end: float) -> None:
        """The device thread's run spread over `interval` bins since the start (a compact array)."""
        bins, step = self.busy_bins[where], self.interval
        t = max(start, self.started)
        while t < end:
            b = int((t - self.started) // step)
            if b >= len(bins):
                bins.extend([0.0] * (b + 1 - len(bins)))
            edge = self.started + (b + 1) * step
            bins[b] += min(end, edge) - t
            t = edge

    def _encoder_share(self, where: str | None, t: np.ndarray) -> np.ndarray:
        """For each time in ``t``: the share of its bin the encoder's device thread ran (0 to 1)."""
        bins = np.frombuffer(self.busy_bins[where], dtype=float) if where in self.busy_bins else np.zeros(0)
        index = ((t - self.started) // self.interval).astype(int)
        inside = (index >= 0) & (index < len(bins))
        share = np.zeros(len(t))
        share[inside] = np.minimum(bins[index[inside]] / self.interval, 1.0)
        return share

    def gpu_busy_now(self, seconds: float = 5.0) -> float | None:
        """Mean GPU utilisation of the last ``seconds`` of samples (the progress line), None without samples."""
        values = []
        for gpu in self.gpus.values():
            if gpu.t:
                last = gpu.t[-1]
                values += [u for t, u in zip(gpu.t[-64:], gpu.util[-64:]) if t >= last - seconds]
        return float(np.mean(values)) if values else None

    # -- the report -----------------------------------------------------------------------------
    def report(self, outcomes: Iterable, status: str = "complete") -> dict[str, Any]:
        finished = self.finished or time.time()
        rows = list(outcomes)
        counts = {k: sum(o.status == k for o in rows) for k in ("success", "failed", "skipped")}
        wall = max(finished - self.started, 1e-9)
        tiles_done = sum(o.num_tiles for o in rows if o.status == "success") if rows else self.tiles
        plan_s = float(sum(o.plan_seconds for o in rows))
        gpu = self._gpu_section(finished)
        where = {"plan_s": plan_s, **{f"{k}_s": v for k, v in self.totals.items()}}
        report = {
            "schema": SCHEMA, "status": status, "run_id": self.run_id, "entry": self.entry,
            "started": _iso(self.started), "finished": _iso(finished), "wall_s": round(wall, 3),
            "hosts": sorted(self.hosts), "versions": versions(),
            "settings_hash": settings_hash(self.settings), "settings": self.settings,
            "slides": {"total": len(rows), "succeeded": counts["success"], "failed": counts["failed"],
                       "skipped": counts["skipped"], "unfinished": len(rows) - sum(counts.values())},
            "tiles": {"total": int(tiles_done), "embedded_this_run": int(self.tiles), "blocks": self.blocks,
                      "per_s": round(self.tiles / wall, 2), "per_device": self._per_device()},
            "gpu": gpu,
            "time": {k: round(v, 3) for k, v in where.items()},
            "starved": _starved(gpu, where, self.blocks),
            "slowest_slides": self._slowest(rows),
            "per_slide": self._per_slide_table(rows),
        }
        return report

    def _per_device(self) -> list[dict]:
        out = []
        for key, (tiles, first, last, busy, device) in sorted(self.devices.items()):
            span = max(last - first, 1e-9)
            out.append({"device": key, "kind": "gpu" if device.startswith("cuda") else "cpu", "tiles": int(tiles),
                        "per_s": round(tiles / span, 2), "encoder_seconds": round(busy, 3)})
        return out

    def _where(self, key: str) -> str | None:
        """Which blocks ran on this GPU: those naming its uuid, else (no uuid known) its host's."""
        info = self.gpu_info.get(key, {})
        for where in (info.get("uuid") or key.split("/", 1)[-1], info.get("host") or key.split("/")[0]):
            if where and where in self.windows:
                return where
        return None

    def _gpu_section(self, finished: float) -> dict | None:
        sampled = {k: g for k, g in self.gpus.items() if len(g.t)}
        if sampled:
            return self._nvml_section(sampled, finished)
        if self.cuda_windows:
            return self._fallback_section(finished)
        return None

    def _nvml_section(self, sampled: dict, finished: float) -> dict:
        idle = dict.fromkeys(("before_first_block", "between_blocks", "starved", "tail"), 0.0)
        window_utils, per_gpu, had_work, steps = [], [], 0.0, []
        for key, g in sorted(sampled.items()):
            t, u = np.frombuffer(g.t, dtype=float), np.frombuffer(g.util, dtype=float)
            order = np.argsort(t, kind="stable")
            t, u = t[order], u[order]
            keep = (t >= self.started - self.interval) & (t <= finished + self.interval)
            t, u = t[keep], u[keep]
            if not len(t):
                continue
            step = float(np.median(np.diff(t))) if len(t) > 2 else self.interval   # the sampler's own interval
            steps.append(step)
            dt = np.diff(t, prepend=t[0] - step).clip(0, 4 * step)
            idle_s = (1 - u / 100.0) * dt
            where = self._where(key)
            if where is None:   # no block ever ran here: idle all along
                before = idle_s.sum()
                between = tail = starved = 0.0
                inside = np.zeros(len(t), bool)
            else:
                first, last = self.windows[where]
                inside = (t >= first) & (t <= last)
                before, tail = idle_s[t < first].sum(), idle_s[t > last].sum()
                between = idle_s[inside].sum()
                # of which the encoder was not even running: no block to work on (the data path)
                starved = (idle_s[inside] * (1 - self._encoder_share(where, t[inside]))).sum()
                had_work += last - first
            idle["before_first_block"] += before
            idle["between_blocks"] += between
            idle["starved"] += starved
            idle["tail"] += tail
            window_utils.append(u[inside] if inside.any() else u)
            info = self.gpu_info.get(key, {})
            per_gpu.append({"gpu": key, "name": info.get("name", ""), "samples": int(len(t)),
                            "busy_pct": _stats(u[inside] if inside.any() else u),
                            "idle_s": {"before_first_block": round(before, 2), "between_blocks": round(between, 2),
                                       "starved": round(starved, 2), "tail": round(tail, 2)},
                            "memory_used_max_mb": round(g.mem_used_max, 1),
                            "power_mean_w": round(g.power[0] / g.power[1], 1) if g.power[1] else None})
        utils = np.concatenate(window_utils) if window_utils else np.zeros(0)
        return {"source": "nvml", "interval_s": round(max(steps, default=self.interval), 3), "gpus": per_gpu, "count": len(per_gpu),
                "busy_pct": _stats(utils), "idle_s": {k: round(v, 2) for k, v in idle.items()},
                "had_work_s": round(had_work, 2)}

    def _fallback_section(self, finished: float) -> dict:
        """No NVML: the share of each bin the device thread ran (host time, not measured utilisation)."""
        idle = dict.fromkeys(("before_first_block", "between_blocks", "starved", "tail"), 0.0)
        fractions, per_gpu, had_work = [], [], 0.0
        for where in sorted(self.cuda_windows):
            first, last = self.windows[where]
            b0, b1 = int((first - self.started) // self.interval), int((last - self.started) // self.interval)
            bins = np.frombuffer(self.busy_bins[where], dtype=float)[b0 : b1 + 1]
            f = np.minimum(bins / self.interval, 1.0) * 100
            fractions.append(f)
            had_work += last - first
            between = float(((100 - f) / 100).sum() * self.interval)
            idle["before_first_block"] += max(first - self.started, 0.0)
            idle["between_blocks"] += between
            idle["starved"] += between
            idle["tail"] += max(finished - last, 0.0)
            per_gpu.append({"gpu": where, "busy_pct": _stats(f)})
        return {"source": f"device thread (NVML {nvml.STATUS['nvml']}): the share of time the encoder ran, "
                          "host time, not measured utilisation",
                "interval_s": self.interval, "gpus": per_gpu, "count": len(per_gpu),
                "busy_pct": _stats(np.concatenate(fractions) if fractions else np.zeros(0)),
                "idle_s": {k: round(v, 2) for k, v in idle.items()}, "had_work_s": round(had_work, 2)}

    def _slide_seconds(self, o) -> dict:
        row = self.per_slide.get(o.sample_id)
        seconds = {"plan": float(o.plan_seconds)}
        if row is not None:
            seconds.update({name: row[2 + i] for i, name in enumerate(STAGES)})
        return seconds

    def _slowest(self, rows: list, n: int = 5) -> list[dict]:
        ran = [o for o in rows if o.status != "skipped"]
        ran.sort(key=lambda o: -(o.plan_seconds + o.embed_seconds))
        out = []
        for o in ran[:n]:
            seconds = self._slide_seconds(o)
            total = o.plan_seconds + o.embed_seconds
            out.append({"sample_id": o.sample_id, "seconds": round(total, 3), "tiles": int(o.num_tiles),
                        "status": o.status, "why": _why(o, seconds, total)})
        return out

    def _per_slide_table(self, rows: list) -> list[dict]:
        table = []
        for o in rows:
            r = self.per_slide.get(o.sample_id)
            entry = {"sample_id": o.sample_id, "status": o.status, "tiles": int(o.num_tiles),
                     "plan_s": round(o.plan_seconds, 3), "embed_s": round(o.embed_seconds, 3)}
            if r is not None:
                entry["blocks"] = r[0]
                entry.update({f"{name}_s": round(r[2 + i], 3) for i, name in enumerate(STAGES)})
            table.append(entry)
        return table


def _why(o, seconds: dict, total: float) -> str:
    if o.status == "failed":
        return f"failed: {o.error_type}: {o.error}"[:300]
    if total <= 0:
        return "nothing to do"
    name, longest = max(seconds.items(), key=lambda kv: kv[1])
    words = {"plan": "planning (open, tissue mask, tiles)", "read": "reading and decoding its blocks",
             "decode": "decoding JPEG tiles", "cut": "cutting tiles", "device_wait": "waiting for the GPU "
             "(other slides' blocks ahead of it)", "transfer": "copying tiles to the GPU",
             "forward": "the encoder's forward pass", "write": "writing its embeddings"}
    summed = "" if name == "plan" else " summed over its blocks"
    text = f"{o.num_tiles} tiles; most time in {words.get(name, name)} ({longest:.2f} s{summed})"
    return text + (f"; {o.note}" if o.note else "")


def _starved(gpu: dict | None, where: dict, blocks: int) -> dict:
    if gpu is None:
        return {"starved": False, "message": "no GPU in this run"}
    had_work, between = gpu["had_work_s"], gpu["idle_s"]["starved"]
    share = between / had_work if had_work > 0 else 0.0
    host = {k: where.get(f"{k}_s", 0.0) for k in HOST_STAGES}
    stage = max(host, key=host.get) if any(host.values()) else None
    starved = share >= STARVED_SHARE and between >= 2 * gpu["interval_s"]
    out = {"starved": bool(starved), "starved_pct": round(100 * share, 1), "stage": stage}
    device = where.get("forward_s", 0.0) + where.get("transfer_s", 0.0)
    if starved:
        per = (lambda s: 1000 * s / max(blocks, 1))
        out["message"] = (
            f"the GPU was idle {between:.1f} s between blocks with no block to work on ({100 * share:.0f}% of the "
            f"{had_work:.1f} s from its first block to its last): the data path could not keep up. Per block the host spent {per(host[stage]):.0f} ms in "
            f"{stage} against {per(device):.0f} ms of transfer and forward on the GPU. To change: {ADVICE[stage]}")
    else:
        out["message"] = f"the GPU was fed: idle for want of blocks {100 * share:.0f}% of the time it had work"
    return out


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": None, "p10": None, "p50": None}
    return {"mean": round(float(np.mean(values)), 1), "p10": round(float(np.percentile(values, 10)), 1),
            "p50": round(float(np.percentile(values, 50)), 1)}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- files and lines -------------------------------------------------------------------------------
def summary_lines(report: dict, path: str | Path | None = None) -> list[str]:
    """The few lines a person reads at the end of a run (the CLI prints them; ``run_report.md`` starts with them)."""
    s, t, g = report["slides"], report["tiles"], report["gpu"]
    gpus = f"{g['count']} GPU" + ("s" if g["count"] != 1 else "") if g else "no GPU"
    lines = [f"run {report['run_id']} on {', '.join(report['hosts'][:3])}"
             + (f" +{len(report['hosts']) - 3}" if len(report["hosts"]) > 3 else "")
             + f" ({gpus}), settings {report['settings_hash']}: slides {s['succeeded']} done, {s['failed']} failed, "
             f"{s['skipped']} skipped; {t['embedded_this_run']} tiles in {report['wall_s']:.1f} s = "
             f"{t['per_s']:.1f} tiles/s"]
    if g:
        b, i = g["busy_pct"], g["idle_s"]
        busy = "n/a" if b["mean"] is None else f"{b['mean']:.0f}% mean (p10 {b['p10']:.0f}%, p50 {b['p50']:.0f}%)"
        src = "" if g["source"] == "nvml" else " [device-thread estimate: NVML unavailable]"
        lines.append(f"GPU busy {busy}{src}; idle {i['before_first_block']:.1f} s before the first block, "
                     f"{i['between_blocks']:.1f} s between blocks ({i['starved']:.1f} s of it with no block to "
                     f"work on), {i['tail']:.1f} s tail")
    tm = report["time"]
    parts = [f"{k[:-2]} {tm[k]:.1f} s" for k in ("plan_s", "read_s", "decode_s", "transfer_s", "forward_s", "write_s")
             if tm.get(k)]
    lines.append("time: " + (", ".join(parts) if parts else "nothing embedded"))
    if report["starved"]["starved"]:
        lines.append("GPU STARVED: " + report["starved"]["message"])
    if path is not None:
        lines.append(f"report: {path}")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Run {report['run_id']} ({report['status']})", ""]
    lines += [f"- {line}" for line in summary_lines(report)]
    lines += ["", f"Started {report['started']}, finished {report['finished']}; {report['entry']}; versions: "
              + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    if report["slowest_slides"]:
        lines += ["## Slowest slides", "", "| slide | seconds | tiles | why |", "|---|---|---|---|"]
        lines += [f"| {r['sample_id']} | {r['seconds']:.2f} | {r['tiles']} | {r['why'].replace('|', '/')} |"
                  for r in report["slowest_slides"]]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | Path, report: dict) -> Path:
    """``run_report.json`` and ``run_report.md``, each replaced atomically; the JSON's path."""
    out = Path(output_dir)
    path = out / REPORT_JSON
    text = json.dumps(report, indent=1, default=str, allow_nan=False)
    atomic(path, lambda tmp: tmp.write_text(text))
    md = markdown(report)
    atomic(out / REPORT_MD, lambda tmp: tmp.write_text(md))
    return path


class ReportWriter:
    """The report of a run that goes on (``"status": "running"``), rewritten at most every ``every`` seconds
    (and never more than ~10 % of the client's time): a run killed mid-way leaves one that says how far it got."""

    def __init__(self, output_dir: str | Path, telemetry: RunTelemetry, outcomes: dict, every: float = 10.0):
        self.out, self.telemetry, self.outcomes, self.every = Path(output_dir), telemetry, outcomes, every
        self.last, self.cost = 0.0, 0.0

    def maybe_write(self) -> None:
        now = time.monotonic()
        if now - self.last >= max(self.every, 10 * self.cost):
            try:
                write_report(self.out, self.telemetry.report(self.outcomes.values(), status="running"))
            except OSError:   # (a full disk for a moment): the final write says
                pass
            self.last = time.monotonic()
            self.cost = self.last - now


def gpu_line(busy: float | None) -> str:
    return "" if busy is None or math.isnan(busy) else f"GPU {busy:.0f}%"
