"""The Dask worker plugin: every worker of the cluster samples its GPUs from the moment it joins.

Registered by the driver at the start of a run on a cluster (idempotent: one
plugin per cluster, whatever the number of runs); a worker that joins later
(an adaptive cluster) starts its sampler when it starts.  Nothing runs on a
CPU-only worker (`telemetry.nvml.start_sampler` returns None there).
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from slide2vec_dask.telemetry import nvml

NAME = "slide2vec-dask-telemetry"


class TelemetryPlugin(WorkerPlugin):
    name = NAME
    idempotent = True

    def setup(self, worker) -> None:
        nvml.start_sampler()


def register(client) -> None:
    """Start sampling on every worker of ``client``'s cluster, now and as workers join."""
    client.register_plugin(TelemetryPlugin(), name=NAME)
