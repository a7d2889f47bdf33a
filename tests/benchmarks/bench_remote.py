#!/usr/bin/env python
"""Benchmark: data-path tiles/s of slides read in place from S3 (moto) and DICOMweb (Orthanc),
against the same files read locally, with 0, 10 and 50 ms of added round-trip latency.

Not a pytest test.  Run it by hand::

    . .venv/bin/activate
    tests/servers/start-orthanc.sh          # for the DICOMweb rows (skipped without it)
    python tests/benchmarks/bench_remote.py --repeats 3 --json bench-out/remote.json

What one row is: ``Model.from_module(global average pool).embed_slide`` of one slide at
0.5 µm/px, 224 px tiles, previews off — open, segment, plan, read, decode, cut, the trivial
encoder — in a fresh subprocess; tiles / wall seconds of that call.  The slide
(``--shape``, default 12000 x 10000, JPEG q90, 240 px tiles, levels x1 x4 x16) is written by
`testing.write_svs`; the DICOMweb series is its wsidicomizer conversion.

The servers run outside the timed process: moto's S3 as a ``moto_server`` subprocess, a plain
HTTP range server (`testing.servers.RangeServer`) in its own subprocess, Orthanc as started by
tests/servers/start-orthanc.sh.  moto answers every ranged GET by reading (and copying) the
whole object under a lock, so its rows measure moto more than the reader; the HTTP rows
are the same range requests against a server that reads only the range (what S3, GCS and
any CDN do), i.e. the reader's own cost.  Latency is added by `testing.servers.DelayProxy`
(half the round trip each way, chunks stamped when read and sent when due, so throughput is
not capped), run in its own subprocess in front of each server.  Rows are interleaved (every
source x latency, then again) so machine noise hits all alike; medians (min..max).

Target (issue 24): at 10 ms, remote tiles/s >= 0.7 x the same files read locally.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPACING_UM, TILE_PX = 0.5, 224
ORTHANC_DIR = Path(os.environ.get("SLIDE2VEC_ORTHANC_DIR", "/tmp/slide2vec-orthanc"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def child(slide: str) -> dict:
    import torch

    from slide2vec_dask import ExecutionOptions, Model, PreprocessingConfig

    options = json.loads(os.environ.get("BENCH_STORAGE_OPTIONS") or "null")   # not on the command line
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Model.from_module(pool, name="avgpool", spacing_um=SPACING_UM, tile_size_px=TILE_PX, feature_dim=3)
    pre = PreprocessingConfig(requested_spacing_um=SPACING_UM, requested_tile_size_px=TILE_PX)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as out:
        t0 = time.perf_counter()
        result = model.embed_slide(slide, preprocessing=pre,
                                   execution=ExecutionOptions(output_dir=out, storage_options=options))
        seconds = time.perf_counter() - t0
    return {"tiles": int(result.num_tiles), "seconds": seconds, "tps": result.num_tiles / seconds}


def run_child(slide: str, options: dict | None = None) -> dict:
    env = {**ENV, "BENCH_STORAGE_OPTIONS": json.dumps(options)}
    out = subprocess.run([sys.executable, __file__, "--child", slide], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def start_proxy(target: int, rtt_ms: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    code = (f"import time; from slide2vec_dask.testing.servers import DelayProxy; "
            f"p = DelayProxy({target}, {rtt_ms / 1000}, port={port}); time.sleep(1e9)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    wait_for(port)
    return proc, port


def prepare(folder: Path, shape: tuple[int, int]) -> tuple[Path, Path | None]:
    """The benchmark slide (and its DICOM conversion, when wsidicomizer runs here)."""
    from slide2vec_dask import testing

    slide = folder / f"remote_{shape[0]}x{shape[1]}.svs"
    if not slide.exists():
        h, w = shape
        image = testing.tissue_image(h, w, [(h // 8, w // 8, h * 7 // 8, w * 7 // 8)], seed=2)
        testing.write_svs(slide, image, mpp=SPACING_UM, downsamples=(1, 4, 16), quality=90)
    dicom = folder / (slide.stem + ".dicom")
    if not dicom.exists():
        try:
            import wsidicomizer

            dicom.mkdir()
            wsidicomizer.WsiDicomizer.convert(slide, dicom)
        except Exception as exc:   # noqa: BLE001 - no libturbojpeg: the DICOMweb rows are skipped
            print(f"no DICOM conversion ({type(exc).__name__}: {exc}); DICOMweb rows skipped", flush=True)
            dicom.rmdir() if dicom.exists() and not any(dicom.iterdir()) else None
            return slide, None
    return slide, dicom


def upload_to_orthanc(dicom: Path) -> tuple[int, str] | None:
    """The series' path on the running Orthanc (start-orthanc.sh), uploaded; None without one."""
    url_file = ORTHANC_DIR / "url"
    if not url_file.is_file():
        return None
    base = url_file.read_text().strip()
    import pydicom

    for path in sorted(dicom.iterdir()):
        request = urllib.request.Request(f"{base}/instances", data=path.read_bytes(),
                                         headers={"Content-Type": "application/dicom"})
        urllib.request.urlopen(request).read()
    ds = pydicom.dcmread(next(dicom.iterdir()), stop_before_pixels=True)
    return int(base.rsplit(":", 1)[1]), f"dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    ap.add_argument("--shape", type=int, nargs=2, default=(12000, 10000), metavar=("H", "W"))
    ap.add_argument("--latencies", type=float, nargs="+", default=(0, 10, 50), help="added round trip, ms")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--sources", nargs="+", default=("local", "http", "s3", "dicomweb"),
                    help="which kinds of rows to run")
    ap.add_argument("--child", metavar="SLIDE")
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(child(ns.child)))
        return
    ns.slides_dir.mkdir(parents=True, exist_ok=True)
    slide, dicom = prepare(ns.slides_dir, tuple(ns.shape))

    procs: list[subprocess.Popen] = []
    try:
        s3_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV))
        wait_for(s3_port)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="bench")
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").upload_file(str(slide), "bench",
                                                                                      slide.name)
        http_port = free_port()
        code = (f"import time; from slide2vec_dask.testing.servers import RangeServer; "
                f"RangeServer({str(slide.parent)!r}, port={http_port}); time.sleep(1e9)")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=ENV))
        wait_for(http_port)
        orthanc = upload_to_orthanc(dicom) if dicom is not None else None
        if orthanc is None:
            print("no Orthanc running (tests/servers/start-orthanc.sh): DICOMweb rows skipped", flush=True)

        sources: dict[str, tuple[str, dict | None]] = {"local svs": (str(slide), None)}
        if dicom is not None:
            sources["local dicom"] = (str(dicom), None)
        for rtt in ns.latencies:
            port = http_port
            if rtt:
                proc, port = start_proxy(http_port, rtt)
                procs.append(proc)
            sources[f"http +{rtt:g} ms"] = (f"http://127.0.0.1:{port}/{slide.name}", None)
            port = s3_port
            if rtt:
                proc, port = start_proxy(s3_port, rtt)
                procs.append(proc)
            sources[f"s3 +{rtt:g} ms"] = (f"s3://bench/{slide.name}", {
                "key": "bench", "secret": "bench", "endpoint_url": f"http://127.0.0.1:{port}",
                "client_kwargs": {"region_name": "us-east-1"}})
            if orthanc is not None:
                port = orthanc[0]
                if rtt:
                    proc, port = start_proxy(orthanc[0], rtt)
                    procs.append(proc)
                sources[f"dicomweb +{rtt:g} ms"] = (f"dicomweb+http://127.0.0.1:{port}/{orthanc[1]}", None)

        sources = {k: v for k, v in sources.items() if k.split()[0] in ns.sources}
        rows: dict[str, list[dict]] = {}
        for r in range(ns.repeats):
            for name, (where, options) in sources.items():
                res = run_child(where, options)
                rows.setdefault(name, []).append(res)
                print(f"[{r + 1}/{ns.repeats}] {name:18s} {res}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()

    def median(name: str) -> float | None:
        ok = [x["tps"] for x in rows.get(name, []) if "tps" in x]
        return statistics.median(ok) if ok else None

    print(f"\n{'source':18s} | tiles | tiles/s median (min..max) | x local")
    table = []
    for name, runs in rows.items():
        ok = [x for x in runs if "tps" in x]
        if not ok:
            print(f"{name:18s} |     - | error: {runs[0]['error']}")
            table.append({"source": name, "error": runs[0]["error"]})
            continue
        tps = [x["tps"] for x in ok]
        local = median("local dicom" if name.startswith("dicomweb") else "local svs")
        ratio = statistics.median(tps) / local if local else float("nan")
        print(f"{name:18s} | {ok[0]['tiles']:5d} | {statistics.median(tps):7.1f} ({min(tps):.1f}..{max(tps):.1f})"
              f" | {ratio:.2f}")
        table.append({"source": name, "tiles": ok[0]["tiles"], "tps": tps, "median_tps": statistics.median(tps),
                      "vs_local": ratio})
    for kind, local in (("http", "local svs"), ("s3", "local svs"), ("dicomweb", "local dicom")):
        at10, base = median(f"{kind} +10 ms"), median(local)
        if at10 and base:
            verdict = "met" if at10 / base >= 0.7 else "NOT met"
            print(f"{kind} at 10 ms: {at10 / base:.2f} x {local} (target >= 0.7: {verdict})")
    if ns.json:
        ns.json.write_text(json.dumps({"rows": table, "repeats": ns.repeats, "shape": ns.shape,
                                       "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
