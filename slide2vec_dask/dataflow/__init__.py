"""The Dask dataflow: one driver for every entry point.

* `driver` — the one scheduler: what is in flight, and the order of the
  stages (plan, blocks, finalize, slide, patient) for every slide;
* `sinks` — where results land: the store (`Pipeline`) or memory (`Model.embed_*`);
* `executors` — where tasks run: a Dask cluster, or threads in this process;
* `tasks` — the worker-side functions of each stage;
* `blocks` — a block's layout, tiles and embeddings;
* `sources` — what a block reads from (a slide or a tile archive), named small;
* `worker` — the per-process model cache and device threads.
"""
