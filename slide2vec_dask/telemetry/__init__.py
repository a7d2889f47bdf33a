"""Telemetry and the run report: sampled on every worker, aggregated once on the client.

* `nvml`: a GPU sampler per worker process (NVML, every 0.5 s), nothing on CPU-only ones;
* `clock`: per-block timings taken where the block runs, returned with its result;
* `plugin`: the Dask worker plugin starting the samplers (imports ``distributed``);
* `report`: `RunTelemetry` on the client, the run report and its files.
"""

from slide2vec_dask.telemetry.clock import BlockTiming, Timed, timed_block, timed_read
from slide2vec_dask.telemetry.report import RunTelemetry, summary_lines, write_report

__all__ = ["BlockTiming", "RunTelemetry", "Timed", "summary_lines", "timed_block", "timed_read", "write_report"]
