"""Slides in, `EmbeddedSlide`s out: open, plan, build graphs, stream blocks.

Blocks of every slide flow through one executor, so the encoder never
waits between slides; each slide's rows are placed as its blocks land.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.dataflow.clusters import resolve_client
from slide2vec_dask.dataflow.driver import default_threads, run_blocks
from slide2vec_dask.dataflow.graph import EmbedSettings, SlideGraph, tile_embedding_graph
from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.progress import get_progress_reporter
from slide2vec_dask.results import EmbeddedSlide
from slide2vec_dask.slide import open_slide
from slide2vec_dask.tiling.grid import TileGrid
from slide2vec_dask.tiling.plan import Plan, plan_slide


@dataclass
class SlideInput:
    """One slide as the API accepts it: a path, or a dict with the manifest's columns."""

    image_path: Path
    sample_id: str
    mask_path: Path | None = None
    spacing_at_level_0: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, slide: Any, *, spacing_at_level_0: float | None = None, mask_path=None,
              sample_id: str | None = None) -> "SlideInput":
        if isinstance(slide, SlideInput):
            return slide
        if isinstance(slide, Mapping):
            if "image_path" not in slide:
                raise ValueError(f"a slide dict needs an 'image_path' key, got keys {sorted(slide)}")
            d = dict(slide)
            path = Path(d.pop("image_path"))
            sid = d.pop("sample_id", None) or sample_id or path.stem
            mask = d.pop("mask_path", None) or mask_path
            spacing = d.pop("spacing_at_level_0", None)
            spacing = spacing if spacing is not None else spacing_at_level_0
            return cls(path, str(sid), Path(mask) if mask else None,
                       None if spacing is None else float(spacing), d)
        if isinstance(slide, (str, Path)):
            path = Path(slide)
            return cls(path, sample_id or path.stem, Path(mask_path) if mask_path else None, spacing_at_level_0)
        raise TypeError(f"a slide is a path or a dict with 'image_path', got {type(slide).__name__}")


def resolve_request(spec: EncoderSpec, config: PreprocessingConfig) -> tuple[float, int]:
    """Spacing and tile size to tile at: the config's, else the model's own contract."""
    spacing = config.requested_spacing_um if config.requested_spacing_um is not None else spec.spacing_um
    if spacing is None:
        raise ValueError(f"model {spec.name!r} has no native spacing; set PreprocessingConfig(requested_spacing_um=...)")
    tile = config.requested_tile_size_px or spec.tile_size_px
    return spacing, tile


def plan_for(item: SlideInput, spec: EncoderSpec, config: PreprocessingConfig,
             execution: ExecutionOptions) -> tuple[Any, Plan]:
    """The slide (None when its tiles come from an archive) and its plan, saved under the output."""
    from slide2vec_dask.store.provenance import fingerprint, slide_fingerprints

    spacing, tile = resolve_request(spec, config)
    out = Path(execution.output_dir) if execution.output_dir is not None else None
    if config.read_tiles_from is not None:
        from slide2vec_dask.tiling.peers import archive_plan

        _no_regions(item, config, tile, f"the tile archive in {config.read_tiles_from}")
        slide, plan = None, Plan(archive_plan(Path(config.read_tiles_from), item.sample_id, spacing, tile))
        plan.grid.meta["tiles_fingerprint"] = fingerprint(plan.grid.archive)
    else:
        slide = open_slide(item.image_path, backend=config.backend, spacing_at_level_0=item.spacing_at_level_0)
        saved = _saved_plan(item, config, out, slide, spacing, tile)
        if saved is not None:
            _check_plan(saved, slide, spacing, tile, item, config)
            plan = Plan(saved)
        else:
            plan = plan_slide(slide, config, spacing_um=spacing, tile_size_px=tile, sample_id=item.sample_id,
                              mask_path=item.mask_path, preview_dir=None if out is None else out / "preview")
        # which files the plan (and so every result made from it) describes
        plan.grid.meta.update(slide_fingerprints(item.image_path, item.mask_path))
    if out is not None:  # every run's output holds the plans it used
        plan.grid.save(out / "coordinates" / f"{item.sample_id}.npz")
    return slide, plan


def slide_attrs(slide) -> dict[str, Any]:
    """What a slide's outputs (its tile group, its archive's meta) state about the file it was read from."""
    return {"level0_height": int(slide.level_shapes[0][0]), "level0_width": int(slide.level_shapes[0][1]),
            "backend": slide.backend, "level_downsamples": [float(d) for d in slide.level_downsamples]}


def _no_regions(item: SlideInput, config: PreprocessingConfig, tile: int, where: str) -> None:
    if config.region_multiple(tile) is not None:
        raise ValueError(f"{item.sample_id}: hierarchical mode (region_tile_multiple / requested_region_size_px) "
                         f"needs tiles on one grid, and {where} places them freely (a grid per tissue region, "
                         "as hs2p, CLAM and TRIDENT tile); drop the region options or tile the slide here")


def _saved_plan(item: SlideInput, config: PreprocessingConfig, out: Path | None, slide, spacing: float,
                tile: int):
    from slide2vec_dask.store.provenance import current_fingerprints, why_stale
    from slide2vec_dask.tiling.peers import coordinates_file, is_own_plan, peer_coordinates
    from slide2vec_dask.tiling.tile_list import load_plan

    if config.read_coordinates_from is not None:
        path = coordinates_file(Path(config.read_coordinates_from), item.sample_id)
        if not path.exists():
            raise FileNotFoundError(f"{item.sample_id}: no saved coordinates at {path} (read_coordinates_from)")
        if not is_own_plan(path):   # hs2p / slide2vec, CLAM or TRIDENT coordinates
            _no_regions(item, config, tile, f"the coordinates in {path}")
            return peer_coordinates(path, item.sample_id, slide, spacing, tile, config.spacing_tolerance)
        grid = load_plan(path)
        stale = why_stale(grid.meta, current_fingerprints(item.image_path, item.mask_path))
        if stale:
            raise ValueError(f"{item.sample_id}: the saved coordinates {path} do not fit: {stale}; plan the "
                             "slide again (drop read_coordinates_from for it)")
        return grid
    if config.resume and out is not None:
        path = out / "coordinates" / f"{item.sample_id}.npz"
        if path.exists():
            grid = load_plan(path)
            from slide2vec_dask.tiling.plan import selection_config

            same = (grid.meta.get("config") == selection_config(config)
                    and grid.meta.get("image_path") == str(item.image_path)
                    and grid.meta.get("mask_path") == (None if item.mask_path is None else str(item.mask_path))
                    and why_stale(grid.meta, current_fingerprints(item.image_path, item.mask_path)) is None)
            return grid if same else None   # a plan of another file is never laid over this one's pixels
    return None


def _check_plan(grid, slide, spacing: float, tile: int, item: SlideInput,
                config: PreprocessingConfig) -> None:
    problems = []
    if abs(grid.requested_spacing_um - spacing) > 1e-9 or grid.requested_tile_size_px != tile:
        problems.append(f"it was made for {grid.requested_tile_size_px} px at {grid.requested_spacing_um} µm/px, "
                        f"this run asks for {tile} px at {spacing} µm/px")
    if grid.region_tile_multiple != config.region_multiple(tile):
        problems.append(f"its regions are {grid.region_tile_multiple} tiles wide, this run asks for "
                        f"{config.region_multiple(tile)}")
    if grid.level >= slide.level_count:
        problems.append(f"it reads level {grid.level}, the slide has {slide.level_count}")
    elif grid.layout == "grid":
        lh, lw = slide.level_shapes[grid.level]
        if grid.shape[0] * grid.read_tile_size_px > lh or grid.shape[1] * grid.read_tile_size_px > lw:
            problems.append("its grid does not fit this slide's dimensions")
    if problems:
        raise ValueError(f"{item.sample_id}: saved coordinates do not fit: " + "; ".join(problems))


def embed_slides(items: Sequence[SlideInput], spec: EncoderSpec, config: PreprocessingConfig,
                 execution: ExecutionOptions) -> list[EmbeddedSlide]:
    """Embed several slides, results in input order (any failure raises)."""
    if execution.output_format is not None:
        raise ValueError("output_format writes per-slide files from Pipeline.run; embed_slide(s) "
                         "return embeddings in memory (EmbeddedSlide.to_xarray() to save them yourself)")
    if not config.on_the_fly and config.read_tiles_from is None and execution.output_dir is None:
        raise ValueError("on_the_fly=False writes each slide's tile archive to <output_dir>/tiles/: set "
                         "ExecutionOptions(output_dir=...)")
    client = resolve_client(execution.scheduler_address)
    settings = embed_settings(execution, client)
    num_gpus = settings.num_gpus

    planners = execution.num_preprocessing_workers or min(len(items), default_threads()) or 1
    with cf.ThreadPoolExecutor(planners, thread_name_prefix="slide2vec-plan") as pool:
        planned = list(pool.map(lambda it: plan_for(it, spec, config, execution), items))
    if not config.on_the_fly and config.read_tiles_from is None:
        planned = _archive_first(items, planned, spec, config, execution, client, settings)

    graphs: list[SlideGraph] = []
    collectors: list[_Collector] = []
    for slide, plan in planned:
        graph = tile_embedding_graph(slide, plan.grid, spec, settings, config.use_supertiles)
        graphs.append(graph)
        collectors.append(_Collector(plan.grid, graph, spec.feature_dim) if graph.keep is not None
                          else _FreeCollector(plan.grid, graph, spec.feature_dim))
    slot = {id(g): c for g, c in zip(graphs, collectors)}

    reporter = get_progress_reporter()
    total = sum(p.grid.num_tiles for _, p in planned)
    reporter.start(total, items[0].sample_id if len(items) == 1 else f"{len(items)} slides")

    def on_block(graph: SlideGraph, block: tuple[int, int], result: np.ndarray) -> None:
        reporter.advance(slot[id(graph)].add(block, result))

    jobs = ((g, b) for g in graphs for b in g.blocks)
    try:
        run_blocks(jobs, on_block, client=client, num_workers=execution.num_workers,
                   prefetch_factor=execution.prefetch_factor, gpu_resources=client is not None and num_gpus > 0)
    finally:
        reporter.close()
        if client is None and not execution.persistent_workers:
            from slide2vec_dask.dataflow.worker import release_encoders

            release_encoders(spec.key)
    return [_result(item, plan, c, spec, settings) for item, (_, plan), c in zip(items, planned, collectors)]


def _archive_first(items, planned, spec: EncoderSpec, config: PreprocessingConfig, execution: ExecutionOptions,
                   client, settings: EmbedSettings) -> list:
    """``on_the_fly=False``: each slide's tiles read, JPEG-encoded and written to its archive in
    ``<output_dir>/tiles/`` first; the slides are then embedded from those archives, as
    `Pipeline.run` embeds them (the decoded JPEGs), so a later ``read_tiles_from`` run agrees."""
    from slide2vec_dask.dataflow.driver import run_cpu_blocks
    from slide2vec_dask.dataflow.graph import archive_graph
    from slide2vec_dask.store.tile_archive import write_archive
    from slide2vec_dask.tiling.archive import in_plan_order
    from slide2vec_dask.tiling.peers import archive_plan

    from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER

    folder = Path(execution.output_dir) / ARCHIVE_FOLDER
    spacing, tile = resolve_request(spec, config)
    graphs = [archive_graph(tile_embedding_graph(slide, plan.grid, spec, settings, config.use_supertiles),
                            plan.grid.requested_tile_size_px) for slide, plan in planned]
    blobs: dict[int, dict] = {id(g): {} for g in graphs}

    def on_block(graph, block, result) -> None:
        blobs[id(graph)][block] = result

    run_cpu_blocks(((g, b) for g in graphs for b in g.source.blocks), on_block, client=client,
                   num_workers=execution.num_workers, prefetch_factor=execution.prefetch_factor)
    out = []
    for item, (slide, plan), graph in zip(items, planned, graphs):
        grid, staged = plan.grid, blobs.pop(id(graph))
        attrs = {"image_path": str(item.image_path), "mask_path": str(item.mask_path or ""), **slide_attrs(slide)}
        write_archive(folder, item.sample_id, grid, in_plan_order(grid, graph.source.k, staged.__getitem__), attrs)
        archived = archive_plan(folder, item.sample_id, spacing, tile)
        out.append((None, Plan(archived, plan.mask_preview_path, plan.tiling_preview_path)))
    return out


class _Collector:
    """Places a slide's block results: kept tiles in row-major order, and whole regions."""

    def __init__(self, grid: TileGrid, graph: SlideGraph, feature_dim: int):
        self.k = graph.k
        # Flat index of every kept tile on the (possibly region-padded) grid the blocks cover.
        self.index = np.full(graph.keep.shape, -1, dtype=np.int64)
        self.index[: grid.shape[0], : grid.shape[1]][grid.keep] = np.arange(grid.num_tiles)
        self.tiles = np.zeros((grid.num_tiles, feature_dim), dtype=np.float32)
        self.regions = None
        if grid.region_tile_multiple is not None:
            self.region_index = np.full(grid.region_shape, -1, dtype=np.int64)
            self.region_index[grid.region_keep] = np.arange(grid.num_regions)
            self.regions = np.zeros((grid.num_regions, self.k * self.k, feature_dim), dtype=np.float32)

    def add(self, block: tuple[int, int], result: np.ndarray) -> int:
        k = self.k
        index = self.index[block[0] * k : (block[0] + 1) * k, block[1] * k : (block[1] + 1) * k]
        kept = index >= 0
        self.tiles[index[kept]] = result[kept]
        if self.regions is not None:
            self.regions[self.region_index[block]] = result.reshape(k * k, -1)
        return int(kept.sum())


class _FreeCollector:
    """Places the block results of a plan of free positions: each block's rows at its tiles' indices."""

    def __init__(self, plan, graph, feature_dim: int):
        self.index = graph.tiles
        self.tiles = np.zeros((plan.num_tiles, feature_dim), dtype=np.float32)
        self.regions = None

    def add(self, block: tuple[int, int], result: np.ndarray) -> int:
        self.tiles[self.index[block]] = result
        return len(result)


def embed_settings(execution: ExecutionOptions, client) -> EmbedSettings:
    """What every embedding task of a call needs from its options (the one place they are read)."""
    return EmbedSettings(execution.batch_size, resolve_num_gpus(execution, client), execution.precision,
                         execution.channels_last)


def resolve_num_gpus(execution: ExecutionOptions, client) -> int:
    if execution.num_gpus is not None:
        if execution.num_gpus > 0 and client is None:
            import torch

            if torch.cuda.device_count() == 0:
                raise ValueError(f"num_gpus={execution.num_gpus} but no CUDA device is visible here; "
                                 "use num_gpus=0 (CPU) or run on a GPU machine or cluster")
        return execution.num_gpus
    if client is not None:
        # A cluster's GPUs are what its workers declare (``--resources GPU=N``): use them when any
        # worker has some, as many per worker process as the best-equipped one declares.
        declared = [info.get("resources", {}).get("GPU", 0)
                    for info in client.scheduler_info(n_workers=-1)["workers"].values()]
        return int(max(declared, default=0))
    import torch

    return torch.cuda.device_count()


def _result(item: SlideInput, plan: Plan, collected: _Collector, spec: EncoderSpec,
            settings: EmbedSettings) -> EmbeddedSlide:
    import torch

    grid = plan.grid
    hierarchical = {}
    if collected.regions is not None:
        hierarchical = {"hierarchical_embeddings": torch.from_numpy(collected.regions),
                        "region_x": grid.region_x, "region_y": grid.region_y,
                        "tile_mask": grid.tile_mask, "region_tile_multiple": grid.region_tile_multiple}
    return EmbeddedSlide(
        **hierarchical,
        sample_id=item.sample_id,
        tile_embeddings=torch.from_numpy(collected.tiles),
        x=grid.x, y=grid.y, tile_size_lv0=grid.tile_size_lv0,
        image_path=item.image_path, mask_path=item.mask_path,
        mask_preview_path=plan.mask_preview_path, tiling_preview_path=plan.tiling_preview_path,
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
            "precision": settings.precision or "auto",
        },
    )
