"""`Pipeline`: a manifest of slides in, one Zarr store out, on a Dask cluster.

Every slide is planned by a task on the cluster, then the blocks of all
slides stream through the same workers; each block's embeddings are written
into the store by the worker that made them, and a slide is finalised (and
marked complete) by one more task once all its blocks landed.  A slide that
fails — missing, corrupt, no spacing — becomes a ``failed`` row in
``process_list.csv``; the others finish.  Re-running skips complete slides
and redoes incomplete ones from scratch.

Slide- and patient-level models add the aggregation stage: when a slide's
tile embeddings are complete, one task on a GPU worker reads them from the
store and writes the slide embedding (``_slides/<id>``); when all slides of
a patient are embedded, one more task writes the patient's.  At the end the
client gathers those small rows into the ``slides`` / ``patients`` tables.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.results import HierarchicalArtifact, PatientArtifact, RunResult, SlideArtifact, TileArtifact

PROCESS_LIST_COLUMNS = ["sample_id", "image_path", "mask_path", "patient_id", "status", "error_type", "error",
                        "num_tiles", "plan_seconds", "embed_seconds", "store_group", "coordinates_path",
                        "flat_path"]


@dataclass
class _Row:
    sample_id: str
    image_path: str
    mask_path: str = ""
    patient_id: str = ""
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
        self.model = model
        self.preprocessing = preprocessing or PreprocessingConfig()
        self.execution = model.resolve_execution(execution)
        if self.execution.output_dir is None:
            raise ValueError("Pipeline needs ExecutionOptions(output_dir=...) to know where the store goes")
        ex = self.execution
        if model.level == "tile" and (ex.save_slide_embeddings or ex.save_latents):
            raise ValueError(f"{model.name!r} is a tile-level model: it makes no slide embeddings or latents; "
                             "save_slide_embeddings / save_latents apply to slide- and patient-level models")
        if model.level == "slide" and ex.save_slide_embeddings:
            raise ValueError(f"{model.name!r} is slide-level: its slide embeddings are always saved; "
                             "save_slide_embeddings is for patient-level models")
        if ex.save_latents and model.slide_spec.latent_dim is None:
            raise ValueError(f"save_latents=True but {model.slide_spec.name!r} has no latents")
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
        if self.model.level == "patient":
            missing = [r["sample_id"] for r in rows if not r.get("patient_id")]
            if missing:
                where = manifest_path if manifest_path is not None else "slides"
                raise ValueError(f"{self.model.name!r} is a patient-level model: every slide needs a patient_id "
                                 f"(a 'patient_id' manifest column); missing in {where} for {missing[:5]}"
                                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        return [SlideInput.parse(r) for r in rows]

    def _run_attrs(self, config: PreprocessingConfig) -> dict[str, Any]:
        from slide2vec_dask import __version__
        from slide2vec_dask.tiling.plan import selection_config

        spec = self.model.tile_spec
        model = {} if self.model.level == "tile" else {
            "model": self.model.name, "model_level": self.model.level, "model_key": self.model.spec.key,
            "model_feature_dim": int(self.model.feature_dim)}
        return {**model, "encoder": spec.name, "encoder_key": spec.key, "feature_dim": int(spec.feature_dim),
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

        level = self.model.level
        rows = {it.sample_id: _Row(it.sample_id, str(it.image_path), str(it.mask_path or ""),
                                   str(it.extra.get("patient_id", "") or "")) for it in items}
        patients: dict[str, list[str]] = {}
        for it in items:
            if level == "patient":
                patients.setdefault(rows[it.sample_id].patient_id, []).append(it.sample_id)
        # A patient is done when its embedding was made from exactly these slides.
        done_patients = {p for p, members in patients.items()
                         if store.patient_embedded(path, p) and store.patient_slides(path, p) == members}
        execution = self.execution
        # Skipped only when the store holds everything this run asks to keep: a rerun that
        # newly asks for tile embeddings, latents or slide rows recomputes what is missing.
        def tiles_kept(sid):
            return level == "tile" or not execution.save_tile_embeddings or store.is_complete(path, sid)

        def slide_kept(sid):
            return store.slide_embedded(path, sid, with_latents=execution.save_latents)

        todo, aggregate = [], []
        for item in items:
            row, sid = rows[item.sample_id], item.sample_id
            if level == "tile" and store.is_complete(path, sid) \
                    or level == "slide" and slide_kept(sid) and tiles_kept(sid) \
                    or level == "patient" and row.patient_id in done_patients and tiles_kept(sid) \
                    and (not execution.save_slide_embeddings or slide_kept(sid)):
                row.status, row.error = "skipped", "already complete in the store"
                if level == "tile":
                    row.num_tiles = store.num_tiles(path, item.sample_id)
                    row.store_group = f"tiles/{item.sample_id}"
                else:
                    row.store_group = "slides" if level == "slide" else "patients"
            elif level != "tile" and tiles_kept(sid) and (slide_kept(sid) or store.is_complete(path, sid)):
                aggregate.append(item.sample_id)  # the tile stage of an earlier run is reused
            else:
                todo.append(item)

        cluster = None
        client = self.client or resolve_client(execution.scheduler_address)
        if client is None:
            from distributed import Client

            # The local cluster gets this machine's GPUs, and the run must then ask for them.
            execution = execution.replace(num_gpus=resolve_num_gpus(execution, None))
            cluster = start_local_cluster(execution.num_workers, execution.num_gpus)
            client = Client(cluster, set_as_default=False)
        process_list = out / "process_list.csv"
        run = _Run(self, execution, client, path, config, rows)
        try:
            if todo or aggregate:
                run.go(todo, aggregate, {p: s for p, s in patients.items() if p not in done_patients})
        finally:
            if cluster is not None:
                client.close()
                cluster.close()
            _write_process_list(process_list, rows.values())
        return self._result(path, rows, patients, process_list)

    def _result(self, path: Path, rows: dict, patients: dict, process_list: Path) -> RunResult:
        from slide2vec_dask import store

        ex, level = self.execution, self.model.level
        done = [r for r in rows.values() if r.status in ("success", "skipped")]
        slide_rows = [r.sample_id for r in rows.values() if store.slide_embedded(path, r.sample_id)]
        patient_rows = [p for p in patients if store.patient_embedded(path, p)]
        slides_kept = level == "slide" or (level == "patient" and ex.save_slide_embeddings)
        # This run's rows in input order, then those earlier runs left in the store.
        if level != "tile":
            finished = store.finished_rows(path, "slide", list(rows)) if slides_kept else []
            store.assemble(path, "slide", finished, with_latents=ex.save_latents,
                           attrs={"model": self.model.slide_spec.name})
        if level == "patient":
            finished = store.finished_rows(path, "patient", list(patients))
            store.assemble(path, "patient", finished, attrs={
                "model": self.model.name, "slides": {p: store.patient_slides(path, p) for p in finished}})
        store.consolidate(path)
        flat_dir = Path(ex.output_dir)
        flat = {r.sample_id: [Path(p) for p in r.flat_path.split(";") if p] for r in done}
        tiles_kept = level == "tile" or ex.save_tile_embeddings
        artifacts = [TileArtifact(r.sample_id, r.num_tiles, path, f"tiles/{r.sample_id}",
                                  Path(r.coordinates_path) if r.coordinates_path else None,
                                  next((p for p in flat[r.sample_id] if "tile_embeddings" in p.parts), None))
                     for r in done if tiles_kept and store.is_complete(path, r.sample_id)]
        hierarchical = [HierarchicalArtifact(r.sample_id, store.num_regions(path, r.sample_id), path,
                                             f"regions/{r.sample_id}",
                                             next((p for p in flat[r.sample_id]
                                                   if "hierarchical_embeddings" in p.parts), None))
                        for r in done if tiles_kept and store.has_regions(path, r.sample_id)]
        slide_artifacts = []
        if slides_kept:
            dim = int(self.model.slide_spec.feature_dim)
            for r in done:
                if r.sample_id in slide_rows:
                    slide_artifacts.append(SlideArtifact(
                        r.sample_id, dim, path, "slides",
                        store.export_row(path, "slide", r.sample_id, flat_dir, ex.output_format)
                        if ex.output_format else None, has_latents=ex.save_latents))
        patient_artifacts = [
            PatientArtifact(p, list(patients[p]), int(self.model.feature_dim), path, "patients",
                            store.export_row(path, "patient", p, flat_dir, ex.output_format)
                            if ex.output_format else None)
            for p in patients if p in patient_rows]
        return RunResult(tile_artifacts=artifacts, hierarchical_artifacts=hierarchical,
                         slide_artifacts=slide_artifacts, patient_artifacts=patient_artifacts,
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

    def go(self, items, aggregate=(), patients=None) -> None:
        """Tile stage for ``items``; then, for aggregating models, the slide and patient stages."""
        if items:
            self._tiles(items)
        if self.p.model.level != "tile":
            self._slides([r for r in self.rows.values() if r.status == "success"] +
                         [self.rows[s] for s in aggregate])
        if self.p.model.level == "patient":
            self._patients(patients or {})
        self._cleanup()

    def _tiles(self, items) -> None:
        from functools import partial

        from distributed import as_completed

        from slide2vec_dask import store
        from slide2vec_dask.dataflow.driver import run_blocks
        from slide2vec_dask.dataflow.embed import resolve_num_gpus
        from slide2vec_dask.dataflow.graph import EmbedSettings, tile_embedding_graph
        from slide2vec_dask.progress import get_progress_reporter
        from slide2vec_dask.store import write_block

        ex, spec = self.ex, self.p.model.tile_spec
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
                       num_workers=ex.num_workers,
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

    # -- aggregation stages -------------------------------------------------------------------
    def _settings(self):
        from slide2vec_dask.dataflow.embed import resolve_num_gpus
        from slide2vec_dask.dataflow.graph import EmbedSettings

        ex = self.ex
        return EmbedSettings(ex.batch_size, resolve_num_gpus(ex, self.client), ex.precision, ex.channels_last)

    def _slides(self, rows) -> None:
        """One task per slide, on a GPU worker: tiles/<id> from the store -> _slides/<id>."""
        from distributed import as_completed

        from slide2vec_dask import store
        from slide2vec_dask.dataflow.aggregate import slide_task

        spec, settings = self.p.model.slide_spec, self._settings()
        resources = {"GPU": 1} if settings.num_gpus > 0 else None
        attrs = {"model": spec.name, "model_key": spec.key, "tile_encoder": spec.tile_encoder.name,
                 "slide2vec_dask_version": _version()}
        futures = {}
        for row in rows:
            if store.slide_embedded(self.path, row.sample_id, with_latents=self.ex.save_latents):
                row.status = "success"
                continue
            row.started = row.started or time.perf_counter()
            futures[self.client.submit(slide_task, str(self.path), row.sample_id, spec, settings,
                                       self.ex.save_latents, attrs, pure=False, resources=resources)] = row
        for future in as_completed(list(futures), loop=self.client.loop):
            row, result = futures[future], _outcome(future)
            if isinstance(result, BaseException):
                row.fail(result if result.args else RuntimeError(f"{row.sample_id}: slide encoder failed"))
                continue
            row.status, row.num_tiles = "success", int(result)
            row.embed_seconds = round(time.perf_counter() - row.started, 3)
        for row in rows:
            if row.status == "success":
                row.store_group = "slides" if self.p.model.level == "slide" else "patients"

    def _patients(self, patients: dict[str, list[str]]) -> None:
        """One task per patient whose slides all have their slide embedding."""
        from distributed import as_completed

        from slide2vec_dask.dataflow.aggregate import patient_task

        spec, settings = self.p.model.spec, self._settings()
        resources = {"GPU": 1} if settings.num_gpus > 0 else None
        attrs = {"model": spec.name, "model_key": spec.key, "slide2vec_dask_version": _version()}
        futures = {}
        for patient_id, sample_ids in patients.items():
            failed = [s for s in sample_ids if self.rows[s].status != "success"]
            if failed:
                for s in sample_ids:
                    if self.rows[s].status == "success":
                        self.rows[s].fail(RuntimeError(f"patient {patient_id!r} has no embedding: its slide(s) "
                                                       f"{failed} failed (see their rows)"))
                continue
            futures[self.client.submit(patient_task, str(self.path), patient_id, list(sample_ids), spec,
                                       settings, attrs, pure=False, resources=resources)] = patient_id
        for future in as_completed(list(futures), loop=self.client.loop):
            patient_id, result = futures[future], _outcome(future)
            if isinstance(result, BaseException):
                for s in patients[patient_id]:
                    self.rows[s].fail(result)

    def _cleanup(self) -> None:
        """Drop the intermediates a slide/patient-level run was not asked to keep."""
        from slide2vec_dask import store

        level, ex = self.p.model.level, self.ex
        if level == "tile":
            return
        for row in self.rows.values():
            if row.status != "success":
                continue
            if not ex.save_tile_embeddings:
                store.drop(self.path, f"tiles/{row.sample_id}")
                store.drop(self.path, f"regions/{row.sample_id}")
            if level == "patient" and not ex.save_slide_embeddings:
                store.drop(self.path, f"{store.SLIDE_ROWS}/{row.sample_id}")

    def _finalize(self, graph) -> None:
        ex = self.ex
        row = self.rows[graph.sample_id]
        attrs = {"sample_id": graph.sample_id, "image_path": row.image_path, "mask_path": row.mask_path,
                 "encoder": self.p.model.tile_spec.name, "feature_dim": int(self.p.model.tile_spec.feature_dim),
                 "read_level": int(graph.level), "read_tile_size_px": int(graph.read_tile),
                 "slide2vec_dask_version": _version()}
        tiles_kept = self.p.model.level == "tile" or ex.save_tile_embeddings
        future = self.client.submit(_finalize_task, str(self.path), graph.sample_id, row.coordinates_path,
                                    graph.k, attrs, ex.output_format if tiles_kept else None, str(ex.output_dir),
                                    pure=False)
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
