"""`Pipeline`: a manifest of slides in, one Zarr store out, on a Dask cluster.

A thin caller: it validates the run, decides per slide what is left to do
(skip what the store holds, reuse finished tile embeddings when only the
aggregation is missing), picks the cluster, and hands the slides to the
streaming driver (`dataflow.driver.Driver`) with a store sink, which runs
every stage of every slide as one stream.  ``process_list.csv`` is rewritten atomically
as slides finish (at most every few seconds), so it is true after a crash.
A slide that fails — missing, corrupt, no spacing — becomes a ``failed``
row; the others finish.  Re-running skips complete slides and redoes the
rest.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from slide2vec_dask._version import __version__
from slide2vec_dask.clusters.client import resolve_client, resolve_num_gpus
from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig, check_bool
from slide2vec_dask.dataflow.blocks import EmbedSettings
from slide2vec_dask.encoders.dense import token_layout
from slide2vec_dask.dataflow.driver import Driver, Stages
from slide2vec_dask.dataflow.executors import DaskExecutor, executor_for
from slide2vec_dask.dataflow.sinks import StoreSink
from slide2vec_dask.dataflow.tasks import export_task, row_exports, tiling_task
from slide2vec_dask.exporters import check_available, current_files, flat_first, sweep_temporaries
from slide2vec_dask.exporters.flat import is_flat
from slide2vec_dask.inputs import SlideInput, current_fingerprints, read_manifest, validate_slides, why_stale
from slide2vec_dask.progress import get_progress_reporter
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.qc import QcGallery
from slide2vec_dask.telemetry import RunTelemetry, summary_lines, write_report
from slide2vec_dask.telemetry.report import ReportWriter
from slide2vec_dask.store.output_dir import OutputDirError, RunLock, atomic, check_output_dir, describe_os_error, sweep
from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER, archive_path
from slide2vec_dask.tiling.coordinate_files import COORDINATES_SUFFIX
from slide2vec_dask.tiling.peers import is_own_plan
from slide2vec_dask.tiling.plan import resolve_request, selection_config
from slide2vec_dask.tiling.tile_list import load_plan
from slide2vec_dask.results import (PROCESS_LIST_COLUMNS, HierarchicalArtifact, PatientArtifact, RunResult,
                                    SlideArtifact, SlideOutcome, TileArtifact)


logger = logging.getLogger("slide2vec_dask")


def _environment(what: str, exc: OSError):

    return OutputDirError(f"{what}: {describe_os_error(exc)}")


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
        if ex.output_format:

            check_available(ex.output_format)   # a missing extra fails here, not on the first finished slide
        self.client = client

    # -- entry points ------------------------------------------------------
    def run(self, slides: Sequence | None = None, manifest_path: str | Path | None = None, *,
            tiling_only: bool = False, on_slide_persisted=None) -> RunResult:
        """Embed every slide of ``slides`` (paths or dicts) or of the manifest CSV.

        slide2vec 7.x's order: ``run(slides, manifest_path)``.  A single ``.csv`` path given as
        ``slides`` is read as the manifest (the seed API's ``run(manifest)`` keeps working).
        ``tiling_only`` plans the slides (coordinates, previews) and embeds nothing.
        ``on_slide_persisted(artifact)`` is called for each slide's tile (or region) artifact.
        """
        if manifest_path is None and isinstance(slides, (str, Path)) and str(slides).lower().endswith(".csv"):
            slides, manifest_path = None, slides
        check_bool("tiling_only", tiling_only)
        items = self._items(manifest_path, slides)
        if tiling_only:
            return self._tile_only(items, self.preprocessing)
        return self._persisted(self._run(items, self.preprocessing), on_slide_persisted)

    def run_with_coordinates(self, coordinates_dir: str | Path, slides: Sequence | None = None,
                             manifest_path: str | Path | None = None, *, on_slide_persisted=None) -> RunResult:
        """Like `run`, reusing saved plans (``<coordinates_dir>/<sample_id>.npz``) instead of tiling.

        Without ``slides``/``manifest_path``, the slides are those the plans were made for.
        """
        coordinates_dir = Path(coordinates_dir)
        if not coordinates_dir.is_dir():
            raise FileNotFoundError(f"coordinates directory not found: {coordinates_dir}")
        if slides is None and manifest_path is None:
            slides = self._slides_from_plans(coordinates_dir)
        config = self.preprocessing.replace(read_coordinates_from=coordinates_dir)
        return self._persisted(self._run(self._items(manifest_path, slides), config), on_slide_persisted)

    @staticmethod
    def _persisted(result: RunResult, callback) -> RunResult:
        """slide2vec 7.x's ``on_slide_persisted``: each slide's artifact, once its files are in place."""
        if callback is not None:
            regions = {a.sample_id: a for a in result.hierarchical_artifacts}
            for artifact in result.tile_artifacts:
                callback(regions.get(artifact.sample_id, artifact))
        return result

    # -- internals -----------------------------------------------------------
    @staticmethod
    def _slides_from_plans(coordinates_dir: Path) -> list[dict]:
        """The slides saved plans (ours, or hs2p's ``.coordinates.npz`` + ``.meta.json``) were made for."""

        slides = []
        for path in sorted(coordinates_dir.glob("*.npz")):
            if is_own_plan(path):
                meta, sample_id = load_plan(path).meta, path.stem
            elif path.name.endswith(".coordinates.npz"):
                sample_id = path.name.removesuffix(".coordinates.npz")
                meta_path = path.with_name(f"{sample_id}.coordinates.meta.json")
                if not meta_path.is_file():
                    raise FileNotFoundError(f"{sample_id}: {meta_path} is missing (it says which slide "
                                            f"{path.name} was made from); pass slides= or manifest_path=")
                meta = json.loads(meta_path.read_text())["provenance"]
            else:
                continue
            slide = {"sample_id": sample_id, "image_path": meta["image_path"]}
            if meta.get("mask_path"):
                slide["mask_path"] = meta["mask_path"]
            slides.append(slide)
        if not slides:
            raise FileNotFoundError(f"no saved plans (*.npz) in {coordinates_dir}")
        return slides

    def _items(self, manifest_path, slides):

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
        return [SlideInput.parse(r, storage_options=self.execution.storage_options) for r in rows]

    def _run_attrs(self, config: PreprocessingConfig) -> dict[str, Any]:

        spec = self.model.tile_spec
        spacing, tile = resolve_request(spec, config, strict=False)
        model = {} if self.model.level == "tile" else {
            "model": self.model.name, "model_level": self.model.level, "model_key": self.model.spec.key,
            "model_feature_dim": int(self.model.feature_dim)}
        dense = {}
        if self.execution.save_dense:   # (recorded only when asked: stores made without it resume as before)
            layout = token_layout(spec)   # an encoder without a token grid is refused here, by name
            dense = {"dense": {"dtype": self.execution.dense_dtype, "patch_size": list(layout.patch_size)}}
        return {**model, "encoder": spec.name, "encoder_key": spec.key, "feature_dim": int(spec.feature_dim),
                "requested_spacing_um": spacing, "requested_tile_size_px": tile,
                "tiling": selection_config(config), "slide2vec_dask_version": __version__,
                # checked on every rerun (`EmbeddingStore.check_run`): features of another identity are
                # never mixed into the store, nor its sidecars
                "feature_identity": self.model.feature_identity(config, self.execution), **dense}

    def _run(self, items, config: PreprocessingConfig) -> RunResult:

        self.model.check_recommended(config, self.execution)
        out = Path(self.execution.output_dir)
        store = EmbeddingStore(out, run=uuid.uuid4().hex[:8])
        run_attrs = self._run_attrs(config)
        self._telemetry = RunTelemetry(run_id=store.run, entry="Pipeline.run",
                                       settings=report_settings(run_attrs, self.execution))
        self._prints: dict[tuple[str, str], dict | None] = {}
        if not self.execution.overwrite and store.exists():
            # A rerun with nothing to do only reads the store (which may be on a read-only mount);
            # its report, process_list.csv, is rewritten where the folder allows it.
            store.check_run(run_attrs)
            outcomes = self._outcomes(items)
            left = self._what_is_left(store, items, outcomes)
            if not any(left[:4]) and store.is_consolidated() and self._exports_current(store, outcomes):
                process_list = out / "process_list.csv"
                try:
                    _ProcessList(process_list, outcomes).write()
                except OSError as exc:
                    logger.warning("nothing to do: every slide is complete in %s; %s could not be updated (%s)",
                                   store.path, process_list, exc)
                self._telemetry.finished = time.time()
                return self._reported(self._result(store, outcomes, process_list, write=False), out, outcomes)
        check_output_dir(out)
        with RunLock(out):
            try:
                store.begin_run(run_attrs, overwrite=self.execution.overwrite)
            except OSError as exc:
                raise _environment(f"cannot prepare the store {store.path}", exc) from exc
            outcomes = self._outcomes(items)
            return self._stream(store, config, outcomes, *self._what_is_left(store, items, outcomes))

    def _tile_only(self, items, config: PreprocessingConfig) -> RunResult:
        out = Path(self.execution.output_dir)
        check_output_dir(out)
        outcomes = self._outcomes(items)
        process_list = out / "process_list.csv"
        writer = _ProcessList(process_list, outcomes)
        ex = self.execution
        executor = executor_for(ex.scheduler_address, ex.num_preprocessing_workers or ex.num_workers)
        run = uuid.uuid4().hex[:8]
        with RunLock(out):
            try:
                for item in items:
                    outcomes[item.sample_id].status = "planning"
                    executor.submit(tiling_task, item, self.model.tile_spec, config, str(out),
                                    key=(f"tiling-{run}", item.sample_id))
                for key, result in executor.completed():
                    row = outcomes[key[1]]
                    if isinstance(result, BaseException):
                        row.fail(result)
                    else:
                        row.status, row.num_tiles, row.note = "success", result["num_tiles"], result["note"]
                        row.plan_seconds, row.coordinates_path = round(result["seconds"], 3), result["plan_path"]
                        metas = [Path(m) for m in result["coordinates_meta"]]   # one per annotation bag
                        # (hs2p writes no npz for a slide without tiles)
                        row.flat_paths = [str(p) for meta in metas for p in
                                          (meta.with_name(f"{key[1]}{COORDINATES_SUFFIX}"), meta) if p.exists()]
                        row.bags = result["bags"]
                    writer.maybe_write()
            finally:
                executor.close()
                writer.write()
        rows = list(outcomes.values())
        return RunResult(tile_artifacts=[], process_list_path=process_list, store_path=EmbeddingStore(out).path,
                         num_failed=sum(o.status == "failed" for o in rows), outcomes=rows)

    def _outcomes(self, items) -> dict[str, SlideOutcome]:
        return {it.sample_id: SlideOutcome(it.sample_id, str(it.image_path), str(it.mask_path or ""),
                                           str(it.extra.get("patient_id", "") or "")) for it in items}

    def _stream(self, store, config, outcomes, todo, aggregate, resolved, patients, stale) -> RunResult:

        for sid, reason in stale.items():
            logger.warning("%s: %s; it is redone (its earlier embeddings stay until the new ones land)", sid, reason)
            outcomes[sid].note = f"redone: {reason}"
        process_list = store.output_dir / "process_list.csv"
        writer = _ProcessList(process_list, outcomes)
        execution, cluster, telemetry = self.execution, None, self._telemetry
        gallery = QcGallery(store.output_dir, outcomes, store.run)
        if execution.save_telemetry:
            telemetry.open_jsonl(store.output_dir)
        _write_report_quietly(store.output_dir, telemetry.report(outcomes.values(), status="running"))
        reporting = ReportWriter(store.output_dir, telemetry, outcomes)
        work = bool(todo or aggregate or resolved)
        client = (self.client or resolve_client(execution.scheduler_address)) if work else None
        if client is None and work:
            from distributed import Client

            from slide2vec_dask.clusters.local import start_local_cluster

            # The local cluster gets this machine's GPUs, and the run must then ask for them.
            execution = execution.with_gpus(resolve_num_gpus(execution.num_gpus, None))
            cluster = start_local_cluster(execution.num_workers, execution.num_gpus)
            client = Client(cluster, set_as_default=False)
        try:
            if work:
                settings, stages = EmbedSettings.of(execution, client, config), self._stages()
                driver = Driver(executor=DaskExecutor(client, execution.num_workers),
                                sink=StoreSink(store, stages, settings, execution.output_format), stages=stages,
                                config=config, execution=execution, settings=settings, outcomes=outcomes,
                                patients=patients, reporter=get_progress_reporter(),
                                on_change=lambda: (writer.maybe_write(), gallery.maybe_write(), reporting.maybe_write()),
                                telemetry=telemetry)
                driver.run(todo, aggregate, resolved)
            self._refresh_exports(store, outcomes)
        finally:
            if cluster is not None:
                client.close()
                cluster.close()
            telemetry.close()
            try:
                gallery.write()
            except OSError as exc:   # (a diagnostic: the run's results stand)
                logger.warning("could not write the QC gallery %s (%s)", gallery.path, exc)
            try:
                writer.write()
            except OSError as exc:
                raise _environment(f"could not write {process_list}; the store {store.path} holds every "
                                   "slide that finished (a rerun skips them and writes the list)", exc) from exc
            finally:
                if sys.exc_info()[0] is not None:   # a run that stops with an exception says so in its report
                    _write_report_quietly(store.output_dir, telemetry.report(outcomes.values(), status="interrupted"))
        return self._reported(self._result(store, outcomes, process_list), store.output_dir, outcomes)

    def _reported(self, result: RunResult, out: Path, outcomes: dict) -> RunResult:
        """The run report written (``run_report.json`` / ``.md``) and carried by the result."""
        result.report = self._telemetry.report(outcomes.values())
        result.report_path = _write_report_quietly(out, result.report)
        for line in summary_lines(result.report):
            logger.info("%s", line)
        return result

    def _exports_current(self, store, outcomes: dict) -> bool:
        """Whether every file ``output_format`` asks of the skipped slides is there and current
        (then the rerun only reads); their paths go on the outcomes for the artifacts."""

        formats, ex, level = self.execution.output_format, self.execution, self.model.level
        if not formats:
            return True
        skipped = [o for o in outcomes.values() if o.status == "skipped"]
        tiles = store.finished_slides() if level == "tile" or ex.save_tile_embeddings else set()
        rows = store.slide_rows() if level == "slide" or (level == "patient" and ex.save_slide_embeddings) else set()
        patients = store.patient_rows() if level == "patient" else set()
        found: dict[tuple[str, str], list[Path] | None] = {}
        for o in skipped:
            for kind, key, present in (("tile", o.sample_id, tiles), ("slide", o.sample_id, rows),
                                       ("patient", o.patient_id, patients)):
                if key in present and (kind, key) not in found:
                    found[kind, key] = current_files(store, kind, key, formats)
                    if found[kind, key] is None:
                        return False
        for o in skipped:
            o.flat_paths = [str(p) for p in found.get(("tile", o.sample_id), [])]
            o.slide_flat_path = flat_first(found.get(("slide", o.sample_id), []), "slide")
            o.patient_flat_path = flat_first(found.get(("patient", o.patient_id), []), "patient")
        return True

    def _refresh_exports(self, store, outcomes: dict) -> None:
        """Reruns make what is missing: the exports of slides complete in the store (a format newly
        asked for, a file deleted or made from an older group) are written from it, nothing embedded;
        and what writers killed in an earlier run left is swept."""


        for folder in (ARCHIVE_FOLDER, "coordinates"):   # the tile archives' writers and the plans' too
            if (Path(store.output_dir) / folder).is_dir():
                sweep(Path(store.output_dir) / folder)
        formats, ex = self.execution.output_format, self.execution
        if not formats:
            return
        if self.model.level == "tile" or ex.save_tile_embeddings:
            complete = store.finished_slides()
            for o in outcomes.values():
                if o.status == "skipped" and o.sample_id in complete:
                    try:
                        o.flat_paths = export_task(store, o.sample_id, formats)["flat_paths"]
                    except (OSError, RuntimeError, ValueError) as exc:   # its embeddings stay; the row says why
                        o.fail(exc)
        sweep_temporaries(store.output_dir, formats)

    def _finish_store(self, store, outcomes: dict, slides_kept: bool) -> None:
        level, ex = self.model.level, self.execution
        # This run's rows in input order, then those earlier runs left in the store.
        if slides_kept:
            store.assemble("slide", store.finished_rows("slide", list(outcomes)), with_latents=ex.save_latents,
                           attrs={"model": self.model.slide_spec.name})
        if level == "patient":
            finished = store.finished_rows("patient", list(dict.fromkeys(
                o.patient_id for o in outcomes.values() if o.patient_id)))
            store.assemble("patient", finished, attrs={
                "model": self.model.name, "slides": {p: store.patient_slides(p) for p in finished}})
        store.finish_run()

    def _stages(self):

        model, ex, level = self.model, self.execution, self.model.level
        stages = Stages(level, model.tile_spec)
        if level == "tile":
            return stages
        spec = model.slide_spec
        stages.slide_spec, stages.save_latents = spec, ex.save_latents
        stages.keep_tiles = ex.save_tile_embeddings
        stages.slide_attrs = {"model": spec.name, "model_key": spec.key, "tile_encoder": spec.tile_encoder.name,
                              "slide2vec_dask_version": __version__}
        if level == "patient":
            stages.patient_spec, stages.keep_slide_rows = model.spec, ex.save_slide_embeddings
            stages.patient_attrs = {"model": model.spec.name, "model_key": model.spec.key,
                                    "slide2vec_dask_version": __version__}
        return stages

    def _archive_missing(self, sample_id: str) -> bool:
        config = self.preprocessing
        if config.on_the_fly or config.read_tiles_from is not None:
            return False

        return not archive_path(Path(self.execution.output_dir) / ARCHIVE_FOLDER, sample_id).is_file()

    def _what_is_left(self, store, items, outcomes):
        """Split the slides into skipped, slide stage only (their tiles are in the store), to do, and stale.

        Skipped only when the store holds everything this run asks to keep, made from
        the same files: a rerun that newly asks for tile embeddings, latents or slide
        rows recomputes what is missing, and a slide whose image or mask file changed
        since (size or content fingerprint) is *stale*: redone from scratch.  A store
        problem about one slide (an unreadable attribute file) fails that slide only.
        """

        level, ex = self.model.level, self.execution
        complete = store.finished_slides()
        rows = store.slide_rows() if level != "tile" else set()
        patient_rows = store.patient_rows() if level == "patient" else set()
        stale: dict[str, str] = {}
        for it in items:
            sid, pid = it.sample_id, outcomes[it.sample_id].patient_id
            if sid not in complete and sid not in rows and pid not in patient_rows:
                continue
            try:
                records = store.provenance(sid, pid if level == "patient" else "")
                key = (str(it.image_path), str(it.mask_path or ""))
                if records and key not in self._prints:   # (once per run: this split runs before and after the lock)
                    self._prints[key] = current_fingerprints(it.image_path, it.mask_path)
                now = self._prints.get(key)
                reason = next(filter(None, (why_stale(r, now) for r in records)), None)
            except (OSError, ValueError) as exc:
                reason = f"its stored outputs cannot be read ({type(exc).__name__}: {exc})"
            if reason is None and sid in complete and self._archive_missing(sid):
                reason = "on_the_fly=False asks for its tile archive, and there is none"
            if reason:
                stale[sid] = reason
        complete -= set(stale)
        rows -= set(stale)
        patients: dict[str, list[str]] = {}
        if level == "patient":
            for it in items:
                patients.setdefault(outcomes[it.sample_id].patient_id, []).append(it.sample_id)
        stale_patients = {outcomes[s].patient_id for s in stale}
        # A patient is done when its embedding was made from exactly these slides, all unchanged.
        done_patients = {p for p, members in patients.items()
                         if p in patient_rows and p not in stale_patients and store.patient_slides(p) == members}

        def tiles_kept(sid):
            return level == "tile" or not ex.save_tile_embeddings or sid in complete

        def slide_kept(sid):
            return sid in rows and (not ex.save_latents or store.row_has_latents("slide", sid))

        todo, aggregate, resolved = [], [], []
        for item in items:
            row, sid = outcomes[item.sample_id], item.sample_id
            try:
                if level == "tile" and sid in complete \
                        or level == "slide" and slide_kept(sid) and tiles_kept(sid) \
                        or level == "patient" and row.patient_id in done_patients and tiles_kept(sid) \
                        and (not ex.save_slide_embeddings or slide_kept(sid)):
                    row.status, row.error = "skipped", "already complete in the store"
                    if level == "tile":
                        row.num_tiles = store.num_tiles(sid)
                        row.num_regions = store.num_regions(sid) if store.has_regions(sid) else 0
                        row.store_group = store.tiles_group(sid)
                    else:
                        row.store_group = store.table_group(level)
                elif level != "tile" and tiles_kept(sid) and slide_kept(sid):
                    resolved.append(sid)          # its slide row is there; only its patient is missing
                elif level != "tile" and tiles_kept(sid) and sid in complete:
                    aggregate.append(sid)         # the tile stage of an earlier run is reused
                else:
                    todo.append(item)
            except (OSError, ValueError) as exc:
                row.fail(exc)
        live = {p: s for p, s in patients.items() if p not in done_patients}
        return todo, aggregate, resolved, live, stale

    def _result(self, store, outcomes: dict, process_list: Path, write: bool = True) -> RunResult:
        """The run's `RunResult`; with ``write``, the slide/patient tables and the store's metadata first."""
        ex, level = self.execution, self.model.level
        done = [o for o in outcomes.values() if o.ok]
        slides_kept = level == "slide" or (level == "patient" and ex.save_slide_embeddings)
        if write:
            try:
                self._finish_store(store, outcomes, slides_kept)
            except OSError as exc:
                raise _environment(f"the slides are embedded, but the store's tables could not be written "
                                   f"in {store.path} (a rerun finishes them)", exc) from exc
        if not write:
            ex = ex.replace(output_format=None)    # (a rerun with nothing to do writes no files either)
        tiles_kept = level == "tile" or ex.save_tile_embeddings
        complete = store.finished_slides() if tiles_kept else set()

        def flat(o, level):   # the slide's flat file of that level (the one rule: `exporters.flat.is_flat`)
            return next((Path(p) for p in o.flat_paths if is_flat(p, level)), None)

        dim = int(self.model.tile_spec.feature_dim)
        artifacts = [TileArtifact(o.sample_id, o.num_tiles, store.path, store.tiles_group(o.sample_id),
                                  Path(o.coordinates_path) if o.coordinates_path else None,
                                  flat(o, "tile"), feature_dim=dim)
                     for o in done if o.sample_id in complete]
        r = self.preprocessing.region_multiple(resolve_request(self.model.tile_spec, self.preprocessing, strict=False)[1])
        hierarchical = [HierarchicalArtifact(o.sample_id, o.num_regions, store.path, store.regions_group(o.sample_id),
                                             flat(o, "hierarchical"), feature_dim=dim,
                                             tiles_per_region=None if r is None else r * r)
                        for o in done if o.sample_id in complete and o.num_regions]
        slide_artifacts, patient_artifacts = [], []
        if slides_kept:
            rows = store.slide_rows()
            dim = int(self.model.slide_spec.feature_dim)
            for o in done:
                if o.sample_id in rows:
                    path = o.slide_flat_path or _row_flat(store, "slide", o.sample_id, ex.output_format)
                    slide_artifacts.append(SlideArtifact(o.sample_id, dim, store.path, store.table_group("slide"),
                                                         Path(path) if path else None, has_latents=ex.save_latents))
        if level == "patient":
            have = store.patient_rows()
            by_patient = {}
            for o in outcomes.values():
                by_patient.setdefault(o.patient_id, []).append(o)
            for p, members in by_patient.items():
                if p in have and all(o.ok for o in members):
                    path = next((o.patient_flat_path for o in members if o.patient_flat_path), "") or \
                        _row_flat(store, "patient", p, ex.output_format)
                    patient_artifacts.append(PatientArtifact(p, [o.sample_id for o in members],
                                                             int(self.model.feature_dim), store.path,
                                                             store.table_group("patient"),
                                                             Path(path) if path else None))
        ordered = list(outcomes.values())
        return RunResult(tile_artifacts=artifacts, hierarchical_artifacts=hierarchical,
                         slide_artifacts=slide_artifacts, patient_artifacts=patient_artifacts,
                         process_list_path=process_list, store_path=store.path,
                         num_failed=sum(o.status == "failed" for o in ordered),
                         num_skipped=sum(o.status == "skipped" for o in ordered), outcomes=ordered)


class _ProcessList:
    """``process_list.csv``, rewritten atomically as slides finish, at most every few seconds."""

    def __init__(self, path: Path, outcomes: dict, every: float = 2.0):
        self.path, self.outcomes, self.every = path, outcomes, every
        self.last, self.cost, self.warned = 0.0, 0.0, False

    def maybe_write(self) -> None:
        now = time.monotonic()
        # Never more than ~10 % of the client's time, however long the manifest.
        if now - self.last >= max(self.every, 10 * self.cost):
            try:
                self.write()
            except OSError as exc:   # (disk full for a moment): the run goes on, the final write says
                self.last = now
                if not self.warned:
                    self.warned = True
                    logger.warning("could not update %s (%s); the run goes on", self.path, exc)

    def write(self) -> None:
        """Replace the file atomically; an error leaves the old file and no temporary behind."""
        start = time.monotonic()
        atomic(self.path, self._write_rows)
        self.last = time.monotonic()
        self.cost = self.last - start

    def _write_rows(self, tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=PROCESS_LIST_COLUMNS)
            writer.writeheader()
            for outcome in self.outcomes.values():
                writer.writerows(outcome.csv_rows())


def _row_flat(store, level: str, key: str, formats) -> str | None:
    """A row of an earlier run: its exports (written when missing or stale); slide2vec's flat file first."""
    return row_exports(store, level, key, formats)["flat_path"] or None if formats else None



def report_settings(run_attrs: dict, execution: ExecutionOptions) -> dict:
    """What the run report's settings hash covers: what was embedded, and how the run was set to go."""
    ex = execution
    return {**{k: v for k, v in run_attrs.items() if k != "slide2vec_dask_version"},
            "batch_size": ex.batch_size, "precision": ex.precision, "num_gpus": ex.num_gpus,
            "num_workers": ex.num_workers, "num_preprocessing_workers": ex.num_preprocessing_workers,
            "prefetch_factor": ex.prefetch_factor, "channels_last": ex.channels_last, "gpu_decode": ex.gpu_decode}


def _write_report_quietly(out: Path, report: dict) -> Path | None:
    """The report is a diagnostic: a folder that refuses it costs a warning, not the run."""
    try:
        return write_report(out, report)
    except OSError as exc:
        logger.warning("could not write the run report in %s (%s)", out, exc)
        return None
