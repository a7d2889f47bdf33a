"""The one scheduler: every stage of every slide, as one stream, for every entry point.

`Pipeline.run` and `Model.embed_*` differ only in their *sink* (where
results land: the store, or memory: `dataflow.sinks`) and their *executor*
(a Dask cluster, or threads in this process: `dataflow.executors`).  Per
slide: plan -> its blocks -> finalize -> slide embedding (slide and patient
models) -> patient embedding once that patient's last slide is in.  Each
stage is submitted the moment its input exists, so one slide's finalisation
overlaps the next slides' blocks and the GPU never waits at a stage
boundary.  What is in flight is decided here and nowhere else:

* blocks: at most ``window()`` = the executor's threads x ``prefetch_factor``
  (a cluster's threads are followed as workers join or leave; ``num_workers``
  fixes them);
* plans: only while fewer blocks are queued than the window holds, at most
  ``num_preprocessing_workers`` (default: the executor's threads) at once, so
  planning runs just ahead of the embedding front, never over the cohort;
* the client keeps state only for slides with work in flight (their plan's
  masks and counters); a finished slide leaves its outcome row (and, for
  the memory sink, its result) behind and nothing else.

Tasks have deterministic keys, ``("<stage>-<run token>", sample id[, block
row, block col])`` with stage ``plan``, ``read``, ``embed``, ``finalize``,
``slide``, ``patient`` (a patient's key names the patient), and are
idempotent (see `tasks`): when a worker is lost, Dask recomputes what it
held and the store ends the same.  A slide's own failure (its exception)
becomes its outcome; the others go on -- unless the sink says ``fail_fast``
(the in-memory API raises the first failure).  A block is one task (read and
embed where it is decoded) unless the cluster has GPUs: then its read runs
on any worker and only the ``embed-`` task asks for ``resources={"GPU": 1}``.
Blocks are submitted directly as tasks, not as culled graphs: a graph per
slide costs the client per-slide work that a cohort of small slides cannot
afford.  Units other than slides (a slide's regions of interest, a run of
images: `dense_tasks`) go through the same stream: their sink says how to plan
them (``sink.plan_task``) and their plan how to encode a block
(``plan.embed_task``).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from slide2vec_dask.dataflow import tasks, worker
from slide2vec_dask.results import SlideOutcome
from slide2vec_dask.telemetry import RunTelemetry, Timed, timed_block, timed_read
from slide2vec_dask.tissue.run import uses_model


@dataclass
class Stages:
    """What a run computes: the tile encoder always; the slide / patient models when asked."""

    level: str                      # "tile" | "slide" | "patient"
    tile_spec: Any
    slide_spec: Any = None
    patient_spec: Any = None
    keep_tiles: bool = True         # slide/patient runs: keep the tile embeddings after the slide embedding
    keep_slide_rows: bool = True    # patient runs: keep the slide rows after the patient embedding
    save_latents: bool = False
    slide_attrs: dict = field(default_factory=dict)
    patient_attrs: dict = field(default_factory=dict)


@dataclass
class Task:
    """A stage's work as a sink describes it: ``fn(*args, **kwargs)`` on the executor."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    gpu: bool = False               # runs where the models are (``resources={"GPU": 1}`` on a GPU cluster)


@dataclass
class _InFlight:
    plan: tasks.PlannedSlide
    queued: int
    running: int = 0
    failed: bool = False
    started: float = 0.0


class Driver:
    """Runs ``todo`` (every stage) and ``aggregate`` (slide stage only) slides through one stream."""

    def __init__(self, *, executor, sink, stages: Stages, config, execution, settings,
                 outcomes: dict[str, SlideOutcome], patients: dict[str, list[str]], reporter,
                 label: str = "", on_change: Callable[[], None] = lambda: None,
                 telemetry: RunTelemetry | None = None):
        self.executor, self.sink, self.stages = executor, sink, stages
        self.config, self.ex, self.settings = config, execution, settings
        self.outcomes, self.reporter, self.on_change = outcomes, reporter, on_change
        self.label = label
        self.gpu = {"GPU": 1} if settings.num_gpus > 0 and executor.splits_reads else None
        self.run_token = sink.run or uuid.uuid4().hex[:8]   # task keys name the run (the store's, when it has one)
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
        self.tags: dict[tuple, tuple] = {}   # task key -> (stage, sample or patient id, block)
        self.counts = {"planned": 0, "done": 0, "failed": 0, "tiles": 0}
        self.failure: BaseException | None = None
        self._cohort_display = callable(getattr(reporter, "cohort", None))
        self._reporter_started = False
        # block timings and GPU samples land here with each block's result (`telemetry`)
        self.telemetry = telemetry or RunTelemetry(run_id=self.run_token, entry="driver")
        self.submitted: dict[tuple, float] = {}   # block key -> when it was submitted (queue wait)
        self._gpu_display = callable(getattr(reporter, "gpu", None))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, todo: list, aggregate: list[str] = (), resolved: list[str] = ()) -> None:
        """``resolved``: slides whose slide rows exist already (patient runs count them as in)."""
        ex = self.executor
        ex.run_everywhere(worker.forget_failures)   # a model refused earlier is tried again, once per worker
        self.tile_spec = ex.shared(self.stages.tile_spec, f"encoder-{self.stages.tile_spec.key}")
        planners = self.ex.num_preprocessing_workers
        self.plan_cap = (lambda: planners) if planners else ex.threads
        self.todo = iter(todo)
        self.todo_left = len(todo)
        self.aggregate = deque(aggregate)
        self.total = len(todo) + len(aggregate) + len(resolved)
        if self._cohort_display:   # a display that follows the cohort starts now; a plain one at the first tile
            self._start_reporter(0)
        self.telemetry.begin(ex)
        try:
            self._cohort()
            for sid in resolved:
                self._slide_row_in(sid)
            self._top_up()
            for key, result in ex.completed():
                kind, sid, block = self.tags.pop(key)
                try:
                    getattr(self, f"_on_{kind}")(sid, block, result)
                except (OSError, ValueError, RuntimeError) as exc:   # a sink call about one slide: that slide fails
                    if self.sink.fail_fast:
                        raise
                    self._isolate(kind, sid, exc)
                del result
                if self.failure is not None and self.sink.fail_fast:
                    raise self.failure
                self._top_up()
                self.on_change()
        finally:
            self.telemetry.end(ex)
            if not self._reporter_started:
                self._start_reporter(self.counts["tiles"])
            self.reporter.close()

    def window(self) -> int:
        """Blocks in flight: the executor's threads x ``prefetch_factor`` (the one rule)."""
        return self.executor.threads() * self.ex.prefetch_factor

    def _key(self, stage: str, *parts) -> tuple:
        """A task's key.  Dask names a string key's group and prefix by its leading words
        (``key_split``): ``embed-TCGA-BH-A0BZ-...`` -> ``embed-TCGA-BH``, ``plan-case-slide-...`` ->
        ``plan-case-slide``, one per slide or site, and the scheduler and workers keep per-prefix
        state (durations, metrics) for the cluster's life.  A tuple key's group is its first
        element and its prefix that element's words: one per stage (and run), whatever the ids."""
        return (f"{stage}-{self.run_token}", *parts)

    def _submit(self, kind: str, sid: str, task: Task, *, key: tuple, block=None):
        resources = self.gpu if task.gpu else None
        self.tags[key] = (kind, sid, block)
        self.executor.submit(task.fn, *task.args, key=key, resources=resources, **task.kwargs)

    def _step(self, kind: str, sid: str, step, key: tuple) -> None:
        """A sink's answer for a stage: a `Task` to run, or its result, ready (made on the client)."""
        if isinstance(step, Task):
            self._submit(kind, sid, step, key=key)
        else:
            getattr(self, f"_on_{kind}")(sid, None, step)

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
            self.todo_left -= 1
            self.outcomes[item.sample_id].status = "planning"
            planner = getattr(self.sink, "plan_task", None)   # units other than slides: the sink plans them
            task = planner(item, self.tile_spec) if planner is not None else Task(tasks.plan_task, (
                item, self.tile_spec, self.config, self.ex.output_dir, self.sink.store, self.config.use_supertiles,
                self.sink.keeps_plans, self.sink.qc_dir), gpu=uses_model(self.config.segmentation))   # learned masks: a GPU task
            self._submit("plan", item.sample_id, task, key=self._key("plan", item.sample_id))

    # -- tile stage ------------------------------------------------------------------------------
    def _on_plan(self, sid: str, _, result) -> None:
        self.plans_running -= 1
        row = self.outcomes[sid]
        if isinstance(result, BaseException):
            self._fail(sid, result)
            return
        plan: tasks.PlannedSlide = result
        row.status, row.num_tiles, row.plan_seconds = "running", plan.num_tiles, round(plan.seconds, 3)
        attrs = getattr(plan, "attrs", None) or {}   # (regions and images have no bags)
        row.bags, row.bag_colors = dict(attrs.get("bag_tiles") or {}), attrs.get("colors")
        if not plan.num_tiles:
            row.note = plan.empty_note
        row.coordinates_path = plan.plan_path
        self.counts["planned"] += 1
        self.counts["tiles"] += plan.num_tiles
        self._cohort()
        state = _InFlight(plan, queued=len(plan.blocks), started=time.perf_counter())
        self.in_flight[sid] = state
        self.sink.planned(plan)
        if not plan.blocks:
            self._finalize(state)
        else:
            self.queue.extend((state, block) for block in plan.blocks)

    def _submit_block(self, state: _InFlight, block: tuple[int, int]) -> None:
        plan, tag = state.plan, (state.plan.sample_id, int(block[0]), int(block[1]))
        pixels = plan.read_request(block)
        if self.gpu is not None:   # the read runs on any worker; only the embedding asks for a GPU
            read = (tasks.read_jpeg_task if self.settings.gpu_decode and not hasattr(plan, "embed_task")
                    and plan.archive_tile is None else tasks.read_task)
            pixels = self.executor.submit_input(timed_read, read, *pixels, key=self._key("read", *tag))
        # (without GPUs it is one task: read and embed where the block is decoded, nothing moves)
        if hasattr(plan, "embed_task"):   # regions, images: their plan says how a block is encoded
            task = plan.embed_task(pixels, block, self.tile_spec, self.settings)
        else:
            task = Task(tasks.embed_block, (pixels, plan.cuts(block), plan.kept_in_block(block)), dict(
                spec=self.tile_spec, read_tile=plan.cut_tile, settings=self.settings, archive_tile=plan.archive_tile,
                store=self.sink.store, sample_id=plan.sample_id, block=block), gpu=True)
        key = self._key("embed", *tag)
        self.submitted[key] = time.time()
        self._submit("block", plan.sample_id, Task(timed_block, (task.fn, *task.args), task.kwargs, gpu=task.gpu),
                     key=key, block=block)
        state.running += 1
        self.blocks_running += 1

    def _on_block(self, sid: str, block, result) -> None:
        self.blocks_running -= 1
        submitted = self.submitted.pop(self._key("embed", sid, int(block[0]), int(block[1])), None)
        if isinstance(result, Timed):
            self.telemetry.block(sid, result.timing, submitted)
            result = result.value
            if self._gpu_display:
                self.reporter.gpu(self.telemetry.gpu_busy_now())
        state = self.in_flight[sid]
        state.running -= 1
        if isinstance(result, BaseException):
            if not state.failed:
                state.failed = True
                self._fail(sid, result)
        elif not state.failed:
            self._advance(self.sink.block_landed(sid, block, result))
        self._maybe_done(state)

    def _maybe_done(self, state: _InFlight) -> None:
        if state.queued or state.running:
            return
        sid = state.plan.sample_id
        if state.failed:
            self.in_flight.pop(sid, None)
            self.sink.discard(sid)
        else:
            self._finalize(state)

    def _finalize(self, state: _InFlight) -> None:
        keep = self.stages.level == "tile" or self.stages.keep_tiles
        self._step("finalize", state.plan.sample_id, self.sink.finalize(state.plan, keep),
                   key=self._key("finalize", state.plan.sample_id))

    def _on_finalize(self, sid: str, _, result) -> None:
        state = self.in_flight.pop(sid)
        row = self.outcomes[sid]
        if isinstance(result, BaseException):
            self.sink.discard(sid)
            self._fail(sid, result)
            return
        row.num_tiles, row.num_regions = int(result["num_tiles"]), int(result["num_regions"])
        row.embed_seconds = round(time.perf_counter() - state.started, 3)
        self.sink.finalized(sid, result, row)
        if self.stages.level == "tile":
            self._succeed(sid)
        else:
            self._submit_slide(sid)

    # -- slide and patient stages --------------------------------------------------------------
    def _submit_slide(self, sid: str) -> None:
        self.outcomes[sid].status = "aggregating"
        self.slide_tasks_running += 1
        self._step("slide", sid, self.sink.slide(sid, self.stages), key=self._key("slide", sid))

    def _on_slide(self, sid: str, _, result) -> None:
        self.slide_tasks_running -= 1
        if isinstance(result, BaseException):
            self._fail(sid, result if result.args else RuntimeError(f"{sid}: slide encoder failed"))
            return
        self.sink.slide_landed(sid, result, self.outcomes[sid])
        self._slide_row_in(sid)

    def _slide_row_in(self, sid: str) -> None:
        if self.stages.level == "slide" or sid not in self.patient_of:   # (its patient is in already)
            self.sink.slide_done(sid, self.outcomes[sid], self.stages.level)
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
        self._step("patient", pid, self.sink.patient(pid, list(members), self.stages), key=self._key("patient", pid))

    def _on_patient(self, pid: str, _, result) -> None:
        members = self.patients[pid]
        if not isinstance(result, BaseException):
            self.sink.patient_landed(pid, result, [self.outcomes[s] for s in members])
        for s in members:
            if isinstance(result, BaseException):
                self._fail(s, result, patient=False)
            else:
                self._succeed(s)

    def _isolate(self, kind: str, sid: str, exc: BaseException) -> None:
        state = self.in_flight.pop(sid, None) if kind != "block" else None
        if kind == "block" and sid in self.in_flight:
            self.in_flight[sid].failed = True
        if state is not None:
            state.failed = True
        for s in (self.patients.get(sid, []) if kind == "patient" else [sid]):
            self._fail(s, exc, patient=kind != "patient")

    # -- outcomes and progress -----------------------------------------------------------------
    def _succeed(self, sid: str) -> None:
        self.outcomes[sid].status = "success"
        self.counts["done"] += 1
        self._cohort()

    def _fail(self, sid: str, exc: BaseException, patient: bool = True) -> None:
        row = self.outcomes[sid]
        if row.status == "failed":
            return
        row.fail(exc)
        self.failure = self.failure or exc
        self.counts["failed"] += 1
        self._cohort()
        if patient:
            self._patient_progress(sid, failed=True)

    def _start_reporter(self, total: int) -> None:
        self._reporter_started = True
        self.reporter.start(total, self.label or f"{self.total} slides")

    def _advance(self, n: int) -> None:
        if not self._reporter_started:
            # A plain reporter cannot learn a total later: it gets the tiles once every slide is
            # planned (a single slide: before its first tile), else 0 (unknown).
            self._start_reporter(self.counts["tiles"] if not self.todo_left and not self.plans_running else 0)
        self.reporter.advance(n)

    def _cohort(self) -> None:
        if self._cohort_display:
            c = self.counts
            self.reporter.cohort(slides_total=self.total, slides_planned=c["planned"], slides_done=c["done"],
                                 slides_failed=c["failed"], tiles_total=c["tiles"])
