#!/usr/bin/env python
"""Telemetry overhead (issue 25): the data path's tiles/s with telemetry on, over off.

Not a pytest test.  ``Model.embed_slide`` of a real-tissue slide (built once
from ``CMU-1-Small-Region.svs`` into ``bench-out/``, as ``bench_embed.py``
does) with a mean-pool "encoder" -- the data path alone: read, decode, cut,
the device thread, the driver -- run alternately with block timing on and off
(`telemetry.clock.set_enabled`), ``--repeats`` pairs, one warm-up call first.
On a GPU machine the NVML sampler runs in both (it is per process, started
once); what is switched is the per-block timing, the samples carried with
results and the client's aggregation.  Target: median(on) / median(off) >= 0.98::

    python tests/benchmarks/bench_telemetry.py                  # 8000 x 8000 slide, 5 pairs
    python tests/benchmarks/bench_telemetry.py --slide-shape 20000 16000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embed import CMU_SVS, REPO, ensure_slide  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slide-shape", type=int, nargs=2, default=[8000, 8000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slides-dir", type=Path, default=REPO / "bench-out")
    p.add_argument("--json", type=Path)
    ns = p.parse_args(argv)

    import torch

    from slide2vec_dask import ExecutionOptions, Model
    from slide2vec_dask.telemetry import clock

    slide = ensure_slide(ns.slides_dir, tuple(ns.slide_shape), CMU_SVS)
    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                              name="mean-rgb", feature_dim=3)
    execution = ExecutionOptions(batch_size=64)

    def once(on: bool) -> float:
        clock.set_enabled(on)
        t0 = time.perf_counter()
        result = model.embed_slide(slide, execution=execution)
        seconds = time.perf_counter() - t0
        return result.num_tiles / seconds

    once(True)   # warm-up: the slide in the page cache, the model built
    rates: dict[bool, list[float]] = {True: [], False: []}
    for i in range(ns.repeats):
        for on in ((True, False) if i % 2 == 0 else (False, True)):   # alternate which goes first
            rates[on].append(once(on))
            print(f"  telemetry {'on ' if on else 'off'}: {rates[on][-1]:8.1f} tiles/s", flush=True)
    clock.set_enabled(True)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    ratio = on / off
    print(f"data path tiles/s, median of {ns.repeats}: telemetry on {on:.1f}, off {off:.1f}; on/off = {ratio:.3f} "
          f"(target >= 0.98): {'PASS' if ratio >= 0.98 else 'FAIL'}")
    if ns.json:
        ns.json.write_text(json.dumps({"on": rates[True], "off": rates[False], "ratio": ratio}))
    return 0 if ratio >= 0.98 else 1


if __name__ == "__main__":
    sys.exit(main())
