"""`Pipeline`: a manifest of slides in, one Zarr store out, on a Dask cluster.

Every slide is planned by a task on the cluster, then the blocks of all
slides stream through the same workers; each block's embeddings are written
into the store by the worker that made them, and a slide is finalised (and
marked complete) by one more task once all its blocks landed.  A slide that
fails — missing, corrupt, no spacing — becomes a ``failed`` row in
``process_list.csv``; the others finish.  Re-running skips complete slides
and redoes incomplete ones from scratch.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.results import HierarchicalArtifact, RunResult, TileArtifact

PROCESS_LIST_COLUMNS = ["sample_id", "image_path", "mask_path", "status", "error_type", "error", "num_tiles",
                        "plan_seconds", "embed_seconds", "store_group", "coordinates_path", "flat_path"]


@dataclass
class _Row:
    sample_id: str
    image_path: str
    mask_path: str = ""
    status: str = "pending"
    error_type: str = ""
    error: str = ""
    num_tiles: int = 0
    plan_seconds: float = 0.0
    embed_seconds: float = 0.0
    store_group: str = ""
    coordinates_path: str = ""
    flat_path: str = ""
    started: float = field(default=0.0, repr=False)

    def fail(self, exc: BaseException) -> None:
        self.status, self.error_type, self.error = "failed", type(exc).__name__, str(exc).replace("\n", " ")


class Pipeline:
    """Batch embedding of many slides into ``<output_dir>/embeddings.zarr``.

    ``client`` (a ``distributed.Client``) or ``execution.scheduler_address``
    selects an existing cluster; otherwise a local one sized to the machine
    is started for the run and closed after it.
    """

    def __init__(self, model, preprocessing: PreprocessingConfig | None = None,
                 execution: ExecutionOptions | None = None, client=None):
        if model.level != "tile":
            raise NotImplementedError(f"Pipeline runs tile-level models for now; {model.name!r} is "
                                      f"{model.level}-level")
        self.model = model
        self.preprocessing = preprocessing or PreprocessingConfig()
        self.execution = model.resolve_execution(execution)
        if self.execution.output_dir is None:
            raise ValueError("Pipeline needs ExecutionOptions(output_dir=...) to know where the store goes")
        self.client = client

    # -- entry points ------------------------------------------------------
    def run(self, manifest_path: str | Path | None = None, slides: Sequence | None = None) -> RunResult:
        """Embed every slide of the manifest (or of ``slides``: paths or dicts)."""
        return self._run(self._items(manifest_path, slides), self.preprocessing)

    def run_with_coordinates(self, coordinates_dir: str | Path, slides: Sequence | None = None,
                             manifest_path: str | Path | None = None) -> RunResult:
        """Like `run`, reusing saved plans (``<coordinates_dir>/<sample_id>.npz``) instead of tiling.

        Without ``slides``/``manifest_path``, the slides are those the plans were made for.
        """
        coordinates_dir = Path(coordinates_dir)
        if not coordinates_dir.is_dir():
            raise FileNotFoundError(f"coordinates directory not found: {coordinates_dir}")
        if slides is None and manifest_path is None:
            slides = self._slides_from_plans(coordinates_dir)
        config = self.preprocessing.replace(read_coordinates_from=coordinates_dir)
        return self._run(self._items(manifest_path, slides), config)

    # -- internals -----------------------------------------------------------
    @staticmethod
    def _slides_from_plans(coordinates_dir: Path) -> list[dict]:
        from slide2vec_dask.tiling.grid import TileGrid

        slides = []
        for path in sorted(coordinates_dir.glob("*.npz")):
            meta = TileGrid.load(path).meta
            slide = {"sample_id": path.stem, "image_path": meta["image_path"]}
            if meta.get("mask_path"):
                slide["mask_path"] = meta["mask_path"]
            slides.append(slide)
        if not slides:
            raise FileNotFoundError(f"no saved plans (*.npz) in {coordinates_dir}")
        return slides

    def _items(self, manifest_path, slides):
        from slide2vec_dask.dataflow.embed import SlideInput
        from slide2vec_dask.manifest import read_manifest, validate_slides

        if (manifest_path is None) == (slides is None):
            raise ValueError("give exactly one of manifest_path or slides")
        if manifest_path is not None:
            rows = read_manifest(manifest_path)
        else:
            rows = [s if isinstance(s, dict) else {"image_path": s} for s in slides]
            rows = [{**r, "sample_id": r.get("sample_id") or Path(r["image_path"]).stem} for r in rows]
            validate_slides(rows, [f"slides[{i}]" for i in range(len(rows))])
        return [SlideInput.parse(r) for r in rows]

    def _run_attrs(self, config: PreprocessingConfig) -> dict[str, Any]:
        from slide2vec_dask import __version__
        from slide2vec_dask.tiling.plan import selection_config

        spec = self.model.spec
        return {"encoder": spec.name, "encoder_key": spec.key, "feature_dim": int(spec.feature_dim),
                "requested_spacing_um": config.requested_spacing_um or spec.spacing_um,
                "requested_tile_size_px": config.requested_tile_size_px or spec.tile_size_px,
                "tiling": selection_config(config), "slide2vec_dask_version": __version__}

    def _run(self, items, config: PreprocessingConfig) -> RunResult:
        from slide2vec_dask import store
        from slide2vec_dask.dataflow.clusters import resolve_client, start_local_cluster
        from slide2vec_dask.dataflow.embed import resolve_num_gpus

        out = Path(self.execution.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = store.store_path(out)
        store.init_store(path, self._run_attrs(config), overwrite=self.execution.overwrite)

        rows = {it.sample_id: _Row(it.sample_id, str(it.image_path), str(it.mask_path or "")) for it in items}
        todo = []
        for item in items:
            if store.is_complete(path, item.sample_id):
                row = rows[item.sample_id]
                row.status, row.error = "skipped", "already complete in the store"
                row.num_tiles = store.num_tiles(path, item.sample_id)
                row.store_group = f"tiles/{item.sample_id}"
            else:
                todo.append(item)

        cluster = None
        execution = self.execution
        client = self.client or resolve_client(execution.scheduler_address)
        if client is None:
            from distributed import Client

            # The local cluster gets this machine's GPUs, and the run must then ask for them.
            execution = execution.replace(num_gpus=resolve_num_gpus(execution, None))
            cluster = start_local_cluster(execution.num_workers, execution.num_gpus)
            client = Client(cluster, set_as_default=False)
        process_list = out / "process_list.csv"
        try:
            if todo:
                _Run(self, execution, client, path, config, rows).go(todo)
        finally:
            if cluster is not None:
                client.close()
                cluster.close()
            _write_process_list(process_list, rows.values())
        store.consolidate(path)
        done = [r for r in rows.values() if r.status in ("success", "skipped")]
        flat = {r.sample_id: [Path(p) for p in r.flat_path.split(";") if p] for r in done}
        artifacts = [TileArtifact(r.sample_id, r.num_tiles, path, r.store_group,
                                  Path(r.coordinates_path) if r.coordinates_path else None,
                                  next((p for p in flat[r.sample_id] if "tile_embeddings" in p.parts), None))
                     for r in done]
        hierarchical = [HierarchicalArtifact(r.sample_id, store.num_regions(path, r.sample_id), path,
                                             f"regions/{r.sample_id}",
                                             next((p for p in flat[r.sample_id]
                                                   if "hierarchical_embeddings" in p.parts), None))
                        for r in done if store.has_regions(path, r.sample_id)]
        return RunResult(tile_artifacts=artifacts, hierarchical_artifacts=hierarchical,
                         process_list_path=process_list, store_path=path,
                         num_failed=sum(r.status == "failed" for r in rows.values()),
                         num_skipped=sum(r.status == "skipped" for r in rows.values()))


class _Run:
    """One run's bookkeeping on the client: plans, blocks left per slide, finalisation."""

    def __init__(self, pipeline: Pipeline, execution: ExecutionOptions, client, path: Path,
                 config: PreprocessingConfig, rows: dict):
        self.p, self.ex, self.client = pipeline, execution, client
        self.path, self.config, self.rows = path, config, rows
        self.remaining: dict[str, int] = {}
        self.finalizing: dict = {}
        self.region_index: dict = {}

    def go(self, items) -> None:
        from functools import partial

        from distributed import as_completed

        from slide2vec_dask import store
        from slide2vec_dask.dataflow.clusters import cluster_threads
        from slide2vec_dask.dataflow.driver import run_blocks
        from slide2vec_dask.dataflow.embed import resolve_num_gpus
        from slide2vec_dask.dataflow.graph import EmbedSettings, tile_embedding_graph
        from slide2vec_dask.progress import get_progress_reporter
        from slide2vec_dask.store import write_block

        ex, spec = self.ex, self.p.model.spec
        futures = {self.client.submit(_plan_task, it, spec, self.config, ex, pure=False): it for it in items}
        graphs = []
        settings = EmbedSettings(ex.batch_size, resolve_num_gpus(ex, self.client), ex.precision, ex.channels_last)
        for future in as_completed(futures, loop=self.client.loop):
            item, result = futures[future], _outcome(future)
            row = self.rows[item.sample_id]
            if isinstance(result, BaseException):
                row.fail(result)
                continue
            slide, plan, seconds = result
            row.plan_seconds = round(seconds, 3)
            row.coordinates_path = str(Path(ex.output_dir) / "coordinates" / f"{item.sample_id}.npz")
            graph = tile_embedding_graph(slide, plan.grid, spec, settings, self.config.use_supertiles,
                                         sample_id=item.sample_id)
            graphs.append(graph)
            store.prepare_slide(self.path, item.sample_id, plan.grid, graph.keep.shape, graph.k, spec.feature_dim)
            if plan.grid.region_tile_multiple is not None:
                self.region_index[item.sample_id] = _region_index(plan.grid)
            self.remaining[item.sample_id] = len(graph.blocks)
            row.status, row.num_tiles, row.started = "running", plan.grid.num_tiles, time.perf_counter()
            if not graph.blocks:
                self._finalize(graph)

        reporter = get_progress_reporter()
        reporter.start(sum(self.rows[g.sample_id].num_tiles for g in graphs), f"{len(graphs)} slides")
        path = str(self.path)

        def sink(graph, block):  # runs on the worker that holds the block's embeddings
            regions = self.region_index.get(graph.sample_id)
            region = None if regions is None else int(regions[block])
            return partial(write_block, path, graph.sample_id, block, graph.k, region=region)

        def on_block(graph, block, result):
            row = self.rows[graph.sample_id]
            if isinstance(result, BaseException):
                if row.status != "failed":
                    row.fail(result)
            elif row.status == "running":
                reporter.advance(int(result))
            self.remaining[graph.sample_id] -= 1
            if self.remaining[graph.sample_id] == 0 and row.status == "running":
                self._finalize(graph)

        try:
            run_blocks(((g, b) for g in graphs for b in g.blocks), on_block, client=self.client,
                       num_workers=ex.num_workers or cluster_threads(self.client),
                       prefetch_factor=ex.prefetch_factor, gpu_resources=settings.num_gpus > 0, sink=sink)
        finally:
            reporter.close()
            for row in self.rows.values():
                if row.status == "failed":
                    store.discard_staging(self.path, row.sample_id)
        for future in as_completed(list(self.finalizing), loop=self.client.loop):
            row, result = self.rows[self.finalizing[future]], _outcome(future)
            if isinstance(result, BaseException):
                row.fail(result)
            else:
                row.status, row.store_group = "success", f"tiles/{row.sample_id}"
                row.flat_path = ";".join(result)
                row.embed_seconds = round(time.perf_counter() - row.started, 3)

    def _finalize(self, graph) -> None:
        ex = self.ex
        row = self.rows[graph.sample_id]
        attrs = {"sample_id": graph.sample_id, "image_path": row.image_path, "mask_path": row.mask_path,
                 "encoder": self.p.model.spec.name, "feature_dim": int(self.p.model.spec.feature_dim),
                 "read_level": int(graph.level), "read_tile_size_px": int(graph.read_tile),
                 "slide2vec_dask_version": _version()}
        future = self.client.submit(_finalize_task, str(self.path), graph.sample_id, row.coordinates_path,
                                    graph.k, attrs, ex.output_format, str(ex.output_dir), pure=False)
        self.finalizing[future] = graph.sample_id


def _region_index(grid):
    """(region rows, region cols) -> row of the region in ``regions/<id>`` (-1: not kept)."""
    import numpy as np

    index = np.full(grid.region_shape, -1, dtype=np.int64)
    index[grid.region_keep] = np.arange(grid.num_regions)
    return index


def _outcome(future):
    """A finished future's result, or its exception (not raised: one slide's failure is its own)."""
    return future.exception() if future.status == "error" else future.result()


def _version() -> str:
    from slide2vec_dask import __version__

    return __version__


def _plan_task(item, spec, config, execution):
    """Worker side: open and plan one slide (timed).

    A bad slide is an expected outcome, not a crash: its error is returned as
    the result (no worker traceback in the logs) and becomes its failed row.
    """
    from slide2vec_dask.dataflow.embed import plan_for

    start = time.perf_counter()
    try:
        slide, plan = plan_for(item, spec, config, execution)
    except (OSError, ValueError, NotImplementedError) as exc:
        return exc
    return slide, plan, time.perf_counter() - start


def _finalize_task(path: str, sample_id: str, plan_path: str, k: int, attrs: dict, output_format, output_dir):
    from slide2vec_dask import store

    store.finalize_slide(path, sample_id, plan_path, k, attrs)
    if output_format is None:
        return []
    return [str(p) for p in store.export_flat(path, sample_id, Path(output_dir), output_format)]


def _write_process_list(path: Path, rows) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROCESS_LIST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    tmp.replace(path)
