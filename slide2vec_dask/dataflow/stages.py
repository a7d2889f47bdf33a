"""The cohort driver: one stream from manifest to store, every stage of every slide.

Per slide: plan -> its blocks -> finalize -> slide embedding (slide and
patient models) -> patient embedding once that patient's last slide is in.
Each stage is submitted the moment its input exists, so one slide's
finalisation overlaps the next slides' blocks and the GPU never waits at a
stage boundary.  What is in flight is decided here and nowhere else:

* blocks: at most ``window()`` (cluster threads x ``prefetch_factor``,
  followed as workers join or leave, or fixed by ``num_workers``);
* plans: only while fewer blocks are queued than the window holds, at most
  ``num_preprocessing_workers`` (default: the cluster's threads) at once, so
  planning runs just ahead of the embedding front, never over the cohort;
* the client keeps state only for slides with work in flight (their plan's
  keep mask and counters); a finished slide leaves its outcome row behind
  and nothing else, so a 100 000-row manifest costs what its rows cost.

Tasks have deterministic keys (``plan-``, ``read-``, ``embed-``,
``finalize-``, ``slide-``, ``patient-`` + sample id + run token) and are
idempotent (see `tasks`): when a worker is lost, Dask recomputes what it
held and the store ends the same.  A slide's own failure (its exception)
becomes its outcome; the others go on.  A block is one task (read and
embed where it is decoded) unless the cluster has GPUs: then its read runs
on any worker and only the ``embed-`` task asks for ``resources={"GPU": 1}``.
Blocks are submitted directly, not as culled ``map_blocks`` graphs (the
in-memory API's way): a graph per slide cost the client per-slide work that
a cohort of small slides cannot afford.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from slide2vec_dask.dataflow import tasks
from slide2vec_dask.dataflow.sources import read_block
from slide2vec_dask.results import SlideOutcome
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER


@dataclass
class Stages:
    """What a run computes: the tile encoder always; the slide / patient models when the model has them."""

    level: str                      # "tile" | "slide" | "patient"
    tile_spec: Any
    slide_spec: Any = None
    patient_spec: Any = None
    keep_tiles: bool = True         # slide/patient runs: keep tiles/<id> after the slide embedding
    keep_slide_rows: bool = True    # patient runs: keep _slides/<id> after the patient embedding
    save_latents: bool = False
    slide_attrs: dict = field(default_factory=dict)
    patient_attrs: dict = field(default_factory=dict)


@dataclass
class _InFlight:
    plan: tasks.PlannedSlide
    queued: int
    running: int = 0
    failed: bool = False
    started: float = 0.0


class CohortDriver:
    """Runs ``todo`` (full pipeline) and ``aggregate`` (slide stage only) slides through one stream."""

    def __init__(self, *, client, store: EmbeddingStore, stages: Stages, config, execution, settings,
                 outcomes: dict[str, SlideOutcome], patients: dict[str, list[str]], reporter,
                 on_change: Callable[[], None] = lambda: None):
        self.client, self.store, self.stages = client, store, stages
        self.config, self.ex, self.settings = config, execution, settings
        self.outcomes, self.reporter, self.on_change = outcomes, reporter, on_change
        self.gpu = {"GPU": 1} if settings.num_gpus > 0 else None
        self.run_token = store.run or uuid.uuid4().hex[:8]   # task keys name the run, as its staging does
        # patient -> its slides, and how many of them are still unresolved / failed
        self.patients = patients
        self.patient_of = {s: p for p, members in patients.items() for s in members}
        self.patient_left = {p: len(members) for p, members in patients.items()}
        self.patient_failed: dict[str, list[str]] = {}
        self.in_flight: dict[str, _InFlight] = {}
        self.queue: deque[tuple[_InFlight, tuple[int, int]]] = deque()
        self.blocks_running = 0
        self.plans_running = 0
        self.slide_tasks_running = 0
        self.tags: dict[str, tuple[str, str]] = {}
        self.counts = {"planned": 0, "done": 0, "failed": 0, "tiles": 0}

    # -- the loop ------------------------------------------------------------------------------
    def run(self, todo: list, aggregate: list[str], resolved: list[str] = ()) -> None:
        """``resolved``: slides whose slide rows exist already (patient runs count them as in)."""
        from distributed import as_completed

        from slide2vec_dask.dataflow.driver import shared_argument, window_size

        from slide2vec_dask.dataflow.worker import forget_failures

        self.client.run(forget_failures)   # a model refused in an earlier run is tried again, once per worker
        self.tile_spec = shared_argument(self.client, self.stages.tile_spec, f"encoder-{self.stages.tile_spec.key}")
        self.window = window_size(self.client, self.ex.num_workers, self.ex.prefetch_factor)
        planners = self.ex.num_preprocessing_workers
        self.plan_cap = (lambda: planners) if planners else (lambda: max(1, self.window() // self.ex.prefetch_factor))
        self.todo = iter(todo)
        self.aggregate = deque(aggregate)
        # Results are fetched by the client's event loop as tasks finish, not one round trip each here.
        self.results = as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        self.total = len(todo) + len(aggregate) + len(resolved)
        self.reporter.start(0, f"{self.total} slides")
        self._cohort()
        for sid in resolved:
            self._slide_row_in(sid)
        self._top_up()
        for future, result in self.results:
            kind, sid = self.tags.pop(future.key)
            if future.status == "error":   # with_results hands over (type, exception, traceback)
                result = result[1] if isinstance(result, tuple) else future.exception()
            try:
                getattr(self, f"_on_{kind}")(sid, result)
            except (OSError, ValueError, RuntimeError) as exc:   # a store call about one slide: that slide fails
                self._isolate(kind, sid, exc)
            del future, result
            self._top_up()
            self.on_change()

    def _submit(self, kind: str, sid: str, fn, *args, key: str, **kwargs):
        future = self.client.submit(fn, *args, key=f"{key}-{self.run_token}", pure=False, **kwargs)
        self.tags[future.key] = (kind, sid)
        self.results.add(future)
        return future

    def _top_up(self) -> None:
        window = self.window()
        while self.queue and self.blocks_running < window:
            state, block = self.queue.popleft()
            state.queued -= 1
            if state.failed:
                self._maybe_done(state)
                continue
            self._submit_block(state, block)
        while self.aggregate and self.slide_tasks_running < window:
            self._submit_slide(self.aggregate.popleft())
        while len(self.queue) < window and self.plans_running < self.plan_cap():
            item = next(self.todo, None)
            if item is None:
                break
            self.plans_running += 1
            self.outcomes[item.sample_id].status = "planning"
            self._submit("plan", item.sample_id, tasks.plan_task, self.store, item, self.tile_spec,
                         self.config, self.ex, key=f"plan-{item.sample_id}")

    # -- tile stage ------------------------------------------------------------------------------
    def _on_plan(self, sid: str, result) -> None:
        self.plans_running -= 1
        row = self.outcomes[sid]
        if isinstance(result, BaseException):
            self._fail(sid, result)
            return
        plan: tasks.PlannedSlide = result
        row.status, row.num_tiles, row.plan_seconds = "running", plan.num_tiles, round(plan.seconds, 3)
        if not plan.num_tiles:
            row.note = plan.empty_note
        row.coordinates_path = plan.plan_path
        self.counts["planned"] += 1
        self.counts["tiles"] += plan.num_tiles
        self._cohort()
        state = _InFlight(plan, queued=len(plan.blocks), started=time.perf_counter())
        self.in_flight[sid] = state
        if not plan.blocks:
            self._finalize(state)
        else:
            self.queue.extend((state, block) for block in plan.blocks)

    def _submit_block(self, state: _InFlight, block: tuple[int, int]) -> None:
        plan, tag = state.plan, f"{state.plan.sample_id}-{block[0]}-{block[1]}"
        pixels = plan.read_request(block)
        if self.gpu is not None:   # the read runs on any worker; only the embedding asks for a GPU
            pixels = self.client.submit(read_block, *pixels, key=f"read-{tag}-{self.run_token}", pure=False)
        # (without GPUs it is one task: read and embed where the block is decoded, nothing moves)
        self._submit("block", plan.sample_id, tasks.embed_block, pixels, plan.keep_block(block),
                     store=self.store, sample_id=plan.sample_id, block=block, spec=self.tile_spec,
                     read_tile=plan.read_tile, settings=self.settings, archive_tile=plan.archive_tile,
                     key=f"embed-{tag}", resources=self.gpu)
        state.running += 1
        self.blocks_running += 1

    def _on_block(self, sid: str, result) -> None:
        self.blocks_running -= 1
        state = self.in_flight[sid]
        state.running -= 1
        if isinstance(result, BaseException):
            if not state.failed:
                state.failed = True
                self._fail(sid, result)
        elif not state.failed:
            self.reporter.advance(int(result))
        self._maybe_done(state)

    def _maybe_done(self, state: _InFlight) -> None:
        if state.queued or state.running:
            return
        sid = state.plan.sample_id
        if state.failed:
            self.in_flight.pop(sid, None)
            self.store.discard_staging(sid)
        else:
            self._finalize(state)

    def _finalize(self, state: _InFlight) -> None:
        plan = state.plan
        keep = self.stages.level == "tile" or self.stages.keep_tiles
        archive_dir = str(Path(self.ex.output_dir) / ARCHIVE_FOLDER) if plan.archive_tile else None
        self._submit("finalize", plan.sample_id, tasks.finalize_task, self.store, plan.sample_id, plan.plan_path,
                     plan.k, plan.attrs, self.ex.output_format if keep else None, archive_dir,
                     key=f"finalize-{plan.sample_id}")

    def _on_finalize(self, sid: str, result) -> None:
        state = self.in_flight.pop(sid)
        row = self.outcomes[sid]
        if isinstance(result, BaseException):
            self.store.discard_staging(sid)
            self._fail(sid, result)
            return
        row.num_tiles, row.num_regions = int(result["num_tiles"]), int(result["num_regions"])
        row.flat_paths = list(result["flat_paths"])
        row.embed_seconds = round(time.perf_counter() - state.started, 3)
        if self.stages.level == "tile":
            row.store_group = self.store.tiles_group(sid)
            self._succeed(sid)
        else:
            self._submit_slide(sid)

    # -- slide and patient stages --------------------------------------------------------------
    def _submit_slide(self, sid: str) -> None:
        st = self.stages
        self.outcomes[sid].status = "aggregating"
        self.slide_tasks_running += 1
        self._submit("slide", sid, tasks.slide_task, self.store, sid, st.slide_spec, self.settings,
                     st.save_latents, st.slide_attrs, st.keep_tiles,
                     self.ex.output_format if st.level == "slide" or st.keep_slide_rows else None,
                     key=f"slide-{sid}", resources=self.gpu)

    def _on_slide(self, sid: str, result) -> None:
        self.slide_tasks_running -= 1
        if isinstance(result, BaseException):
            self._fail(sid, result if result.args else RuntimeError(f"{sid}: slide encoder failed"))
            return
        row = self.outcomes[sid]
        row.num_tiles = int(result["num_tiles"])
        row.slide_flat_path = result["flat_path"]
        row.flat_paths = list(row.flat_paths) + [p for p in result["export_paths"] if p != result["flat_path"]]
        self._slide_row_in(sid)

    def _slide_row_in(self, sid: str) -> None:
        if self.stages.level == "slide" or sid not in self.patient_of:   # (its patient is in the store already)
            self.outcomes[sid].store_group = self.store.table_group(self.stages.level)
            self._succeed(sid)
        else:
            self.outcomes[sid].status = "waiting for patient"
            self._patient_progress(sid, failed=False)

    def _patient_progress(self, sid: str, failed: bool) -> None:
        pid = self.patient_of.get(sid)
        if pid is None:
            return
        if failed:
            self.patient_failed.setdefault(pid, []).append(sid)
        self.patient_left[pid] -= 1
        if self.patient_left[pid]:
            return
        members = self.patients[pid]
        bad = self.patient_failed.pop(pid, [])
        if bad:
            error = RuntimeError(f"patient {pid!r} has no embedding: its slide(s) {bad} failed (see their rows)")
            for s in members:
                if s not in bad:
                    self._fail(s, error, patient=False)
            return
        st = self.stages
        self._submit("patient", pid, tasks.patient_task, self.store, pid, list(members), st.patient_spec,
                     self.settings, st.patient_attrs, st.keep_slide_rows, self.ex.output_format,
                     key=f"patient-{pid}", resources=self.gpu)

    def _on_patient(self, pid: str, result) -> None:
        members = self.patients[pid]
        for s in members:
            row = self.outcomes[s]
            if isinstance(result, BaseException):
                self._fail(s, result, patient=False)
            else:
                row.store_group, row.patient_flat_path = self.store.table_group("patient"), result["flat_path"]
                if s == members[0]:   # the patient's other files, listed once
                    row.flat_paths = list(row.flat_paths) + [p for p in result["export_paths"]
                                                             if p != result["flat_path"]]
                self._succeed(s)

    def _isolate(self, kind: str, sid: str, exc: BaseException) -> None:
        state = self.in_flight.pop(sid, None) if kind != "block" else None
        if kind == "block" and sid in self.in_flight:
            self.in_flight[sid].failed = True
        if state is not None:
            state.failed = True
        for s in (self.patients.get(sid, []) if kind == "patient" else [sid]):
            self._fail(s, exc, patient=kind != "patient")

    # -- outcomes ------------------------------------------------------------------------------
    def _succeed(self, sid: str) -> None:
        self.outcomes[sid].status = "success"
        self.counts["done"] += 1
        self._cohort()

    def _fail(self, sid: str, exc: BaseException, patient: bool = True) -> None:
        row = self.outcomes[sid]
        if row.status == "failed":
            return
        row.fail(exc)
        self.counts["failed"] += 1
        self._cohort()
        if patient:
            self._patient_progress(sid, failed=True)

    def _cohort(self) -> None:
        cohort = getattr(self.reporter, "cohort", None)
        if cohort is not None:
            c = self.counts
            cohort(slides_total=self.total, slides_planned=c["planned"], slides_done=c["done"],
                   slides_failed=c["failed"], tiles_total=c["tiles"])
