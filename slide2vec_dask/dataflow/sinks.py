"""Where the driver's results land: the store (`Pipeline`) or memory (`Model.embed_*`).

The driver asks a sink, stage by stage, what to run and tells it what
landed; nothing else collects rows.  A stage's answer is a `driver.Task`
(run on the executor) or its result, ready (made on the client).

* `StoreSink`: blocks are staged on the workers, finalized into
  ``tiles/<id>`` (and exports, tile archives), slide and patient rows
  written by tasks that read the store themselves; outcome rows name what
  was written.  A slide's failure is its row.
* `MemorySink`: block results come back to the client and are placed into
  each slide's arrays as they land (`tiling.tile_list.block_members` says
  where, for every layout); a finished slide becomes an `EmbeddedSlide`, the
  slide and patient models run as tasks on those arrays.  The first failure
  raises (``fail_fast``): a user calling ``embed_slides`` gets an exception,
  not a status row.
* `DenseSink`: regions and images (`dense_tasks`): their blocks write each item's
  ``.pt`` file and sidecar (slide2vec's layout) or hand back its array; the sink
  keeps one artifact per item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.dataflow import dense_tasks, tasks
from slide2vec_dask.dataflow.blocks import BlockResult, EmbedSettings
from slide2vec_dask.dataflow.driver import Stages, Task
from slide2vec_dask.inputs import SlideInput
from slide2vec_dask.qc import QC_FOLDER
from slide2vec_dask.results import EmbeddedPatient, EmbeddedSlide, SlideOutcome
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.store.tile_archive import write_archive
from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER, in_plan_order
from slide2vec_dask.tiling.tile_list import block_members


class StoreSink:
    """Results into the run's `EmbeddingStore` (``<output_dir>/embeddings.zarr``) and its exports."""

    keeps_plans = False   # the client keeps only masks and counters per slide
    fail_fast = False     # a slide's failure is its outcome row

    def __init__(self, store: EmbeddingStore, stages: Stages, settings: EmbedSettings, output_format):
        self.store, self.stages, self.settings, self.formats = store, stages, settings, output_format
        self.run = store.run
        self.qc_dir = str(Path(store.output_dir) / QC_FOLDER)   # each planned slide's QC picture (`qc`)

    def planned(self, plan: tasks.PlannedSlide) -> None:
        pass

    def block_landed(self, sid: str, block, tiles_written: int) -> int:
        return int(tiles_written)

    def discard(self, sid: str) -> None:
        self.store.discard_staging(sid)

    def finalize(self, plan: tasks.PlannedSlide, keep_tiles: bool) -> Task:
        archive_dir = str(Path(self.store.output_dir) / ARCHIVE_FOLDER) if plan.archive_tile else None
        return Task(tasks.finalize_task, (self.store, plan.sample_id, plan.plan_path, plan.k, plan.attrs,
                                          self.formats if keep_tiles else None, archive_dir))

    def finalized(self, sid: str, result: dict, row: SlideOutcome) -> None:
        row.flat_paths = list(result["flat_paths"])
        if self.stages.level == "tile":
            row.store_group = self.store.tiles_group(sid)

    def slide(self, sid: str, st: Stages) -> Task:
        formats = self.formats if st.level == "slide" or st.keep_slide_rows else None
        return Task(tasks.slide_task, (self.store, sid, st.slide_spec, self.settings, st.save_latents,
                                       st.slide_attrs, st.keep_tiles, formats), gpu=True)

    def slide_landed(self, sid: str, result: dict, row: SlideOutcome) -> None:
        row.num_tiles = int(result["num_tiles"])
        row.slide_flat_path = result["flat_path"]
        row.flat_paths = list(row.flat_paths) + [p for p in result["export_paths"] if p != result["flat_path"]]

    def slide_done(self, sid: str, row: SlideOutcome, level: str) -> None:
        row.store_group = self.store.table_group(level)

    def patient(self, pid: str, members: list[str], st: Stages) -> Task:
        return Task(tasks.patient_task, (self.store, pid, members, st.patient_spec, self.settings,
                                         st.patient_attrs, st.keep_slide_rows, self.formats), gpu=True)

    def patient_landed(self, pid: str, result: dict, rows: list[SlideOutcome]) -> None:
        for i, row in enumerate(rows):
            row.store_group, row.patient_flat_path = self.store.table_group("patient"), result["flat_path"]
            if i == 0:   # the patient's other files, listed once
                row.flat_paths = list(row.flat_paths) + [p for p in result["export_paths"]
                                                         if p != result["flat_path"]]


class _Slide:
    """One slide's arrays while its blocks land."""

    def __init__(self, plan: tasks.PlannedSlide, feature_dim: int):
        grid = plan.plan.grid
        self.plan = plan
        blocks, members = block_members(grid, plan.k)
        self.members = dict(zip(blocks, members))
        self.tiles = np.zeros((grid.num_tiles, feature_dim), dtype=np.float32)
        self.regions = None
        if plan.kept is not None:   # hierarchical: region i is the i-th block, row-major
            self.region_of = {b: i for i, b in enumerate(blocks)}
            self.regions = np.zeros((grid.num_regions, plan.k * plan.k, feature_dim), dtype=np.float32)
        self.jpegs: dict | None = {} if plan.archive_tile else None

    def add(self, block, result: BlockResult) -> int:
        self.tiles[self.members[block]] = result.tiles
        if self.regions is not None:
            self.regions[self.region_of[block]] = result.region
        if self.jpegs is not None:
            self.jpegs[block] = result.jpegs
        return len(result.tiles)


class MemorySink:
    """Results into `EmbeddedSlide` / `EmbeddedPatient` objects, in input order."""

    store = None
    keeps_plans = True    # results are built here, from the whole plan
    fail_fast = True
    run = ""
    qc_dir = None         # (the QC gallery is the Pipeline's: one page per run folder)

    def __init__(self, items: list[SlideInput], stages: Stages, settings: EmbedSettings, output_dir):
        if settings.dense_dtype is not None:
            raise ValueError("ExecutionOptions(save_dense=True) keeps token grids in Pipeline.run's store "
                             "(dense/<sample_id>); in memory, take grids with Model.embed_regions_dense")
        self.items = {it.sample_id: it for it in items}
        self.stages, self.settings, self.output_dir = stages, settings, output_dir
        self.feature_dim = int(stages.tile_spec.feature_dim)
        self.open: dict[str, _Slide] = {}
        self.slides: dict[str, EmbeddedSlide] = {}
        self.plans: dict[str, Any] = {}    # each slide's plan (its annotation bags split the result)
        self.patients: dict[str, EmbeddedPatient] = {}

    def planned(self, plan: tasks.PlannedSlide) -> None:
        self.open[plan.sample_id] = _Slide(plan, self.feature_dim)

    def block_landed(self, sid: str, block, result: BlockResult) -> int:
        return self.open[sid].add(block, result)

    def discard(self, sid: str) -> None:
        self.open.pop(sid, None)

    def finalize(self, plan: tasks.PlannedSlide, keep_tiles: bool) -> dict[str, int]:
        """Made here: the slide's `EmbeddedSlide` (and, ``on_the_fly=False``, its tile archive)."""
        slide = self.open.pop(plan.sample_id)
        grid = plan.plan.grid
        if slide.jpegs is not None:
            write_archive(Path(self.output_dir) / ARCHIVE_FOLDER, plan.sample_id, grid,
                          in_plan_order(grid, plan.k, slide.jpegs.__getitem__), plan.attrs)
        self.slides[plan.sample_id] = self._embedded(self.items[plan.sample_id], plan, slide)
        self.plans[plan.sample_id] = grid
        return {"num_tiles": grid.num_tiles, "num_regions": 0 if slide.regions is None else len(slide.regions)}

    def finalized(self, sid: str, result: dict, row: SlideOutcome) -> None:
        pass

    def slide(self, sid: str, st: Stages):
        r = self.slides[sid]
        if r.num_tiles == 0:
            return ValueError(f"{sid}: no tissue tiles, so no slide embedding; check the slide or lower "
                              "PreprocessingConfig(tissue_threshold=...)")
        coords = np.stack([r.x, r.y], axis=1).astype(np.int64)
        return Task(tasks.encode_slide, (st.slide_spec, r.tile_embeddings.numpy(), coords, r.tile_size_lv0,
                                         self.settings), gpu=True)

    def slide_landed(self, sid: str, result, row: SlideOutcome) -> None:
        import torch

        embedding, latents = result
        r = self.slides[sid]
        r.slide_embedding = torch.from_numpy(embedding)
        r.latents = None if latents is None else torch.from_numpy(latents)
        r.attrs["slide_encoder"] = self.stages.slide_spec.name

    def slide_done(self, sid: str, row: SlideOutcome, level: str) -> None:
        pass

    def patient(self, pid: str, members: list[str], st: Stages) -> Task:
        stacked = np.stack([self.slides[s].slide_embedding.numpy() for s in members])
        return Task(tasks.encode_patient, (st.patient_spec, stacked, self.settings), gpu=True)

    def patient_landed(self, pid: str, result, rows: list[SlideOutcome]) -> None:
        import torch

        slides = {row.sample_id: self.slides[row.sample_id].slide_embedding for row in rows}
        self.patients[pid] = EmbeddedPatient(pid, torch.from_numpy(np.asarray(result)), slides)

    def _embedded(self, item: SlideInput, planned: tasks.PlannedSlide, slide: _Slide) -> EmbeddedSlide:
        import torch

        plan, spec = planned.plan, self.stages.tile_spec
        grid = plan.grid
        hierarchical: dict[str, Any] = {}
        if slide.regions is not None:
            hierarchical = {"hierarchical_embeddings": torch.from_numpy(slide.regions),
                            "region_x": grid.region_x, "region_y": grid.region_y,
                            "tile_mask": grid.tile_mask, "region_tile_multiple": grid.region_tile_multiple}
        return EmbeddedSlide(
            **hierarchical,
            sample_id=item.sample_id,
            tile_embeddings=torch.from_numpy(slide.tiles),
            x=grid.x, y=grid.y, tile_size_lv0=grid.tile_size_lv0,
            image_path=item.image_path, mask_path=item.mask_path,
            mask_preview_path=plan.mask_preview_path, tiling_preview_path=plan.tiling_preview_path,
            class_coverage=getattr(grid, "class_coverage", None), classes=tuple(grid.meta.get("classes") or ()),
            attrs={
                "encoder": spec.name,
                "feature_dim": int(spec.feature_dim),
                "requested_spacing_um": grid.requested_spacing_um,
                "requested_tile_size_px": grid.requested_tile_size_px,
                "read_level": grid.level,
                "read_spacing_um": grid.read_spacing_um,
                "read_tile_size_px": grid.read_tile_size_px,
                "slide_spacing_um": grid.slide_spacing_um,
                "tissue_threshold": grid.tissue_threshold,
                "precision": self.settings.precision or "auto",
            },
        )


class DenseSink:
    """Regions and images (`dense_tasks`): each item's artifact, written by its block when there is an
    output directory (slide2vec's ``.pt`` layout), else holding its array; the first failure raises."""

    store = None
    keeps_plans = False
    fail_fast = True
    run = ""

    def __init__(self, request: dense_tasks.DenseRequest):
        self.request = request
        self.results: dict[tuple[str, int], Any] = {}   # (unit, item index) -> artifact

    def plan_task(self, unit, spec) -> Task:
        plan = dense_tasks.plan_regions if self.request.kind == "regions" else dense_tasks.plan_images
        return Task(plan, (unit, spec, self.request))

    def planned(self, plan) -> None:
        for index, record in plan.done:   # written by an earlier run for this same request
            self.results[(plan.sample_id, index)] = dense_tasks.artifact(self.request, record)

    def block_landed(self, sid: str, block, result) -> int:
        for index, record, data in result:
            self.results[(sid, index)] = dense_tasks.artifact(self.request, record, data)
        return len(result)

    def discard(self, sid: str) -> None:
        pass

    def finalize(self, plan, keep_tiles: bool) -> dict[str, int]:
        return {"num_tiles": plan.num_tiles, "num_regions": 0}

    def finalized(self, sid: str, result: dict, row: SlideOutcome) -> None:
        pass
