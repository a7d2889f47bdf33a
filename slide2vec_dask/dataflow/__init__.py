"""The Dask dataflow: who runs what, and when.

* `stages` — the cohort driver behind `Pipeline.run`: one stream of plan,
  block, finalize, slide and patient tasks (`tasks`) over all slides;
* `driver` — the in-flight window both executors follow, and `run_blocks`,
  the block executor of the in-memory API (`Model.embed_slide(s)`, `embed`);
* `graph` — a slide's tile embeddings as `map_blocks` over its blocks;
* `worker` — the per-process model cache and device threads;
* `aggregate` — slide / patient encoders on in-memory features and on stored tiles;
* `clusters` — which cluster runs the work, and the embedded local one.
"""
