"""Worker-side tasks of every run: plan, block, finalize, slide, patient.

Each is a plain function of small, picklable arguments (paths, specs, the
`EmbeddingStore`), and each is safe to run twice or on another worker after
a loss: its outputs are either chunks that a rerun rewrites with the same
values, or groups published by rename that a rerun finds already there.
Expected per-slide failures (missing, corrupt, no spacing, a damaged tile, no
tissue for a slide model, a store or export that cannot be written) are
*returned* as exceptions, so they become that slide's row without a worker
traceback ("Compute Failed") in the logs; anything else (a bug, an encoder
that fails) raises as usual.
Tasks given no store (the in-memory API) return what they made instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask._version import __version__
from slide2vec_dask.dataflow import gpu_decode, worker
from slide2vec_dask.dataflow.blocks import (BlockResult, EmbedSettings, block_layout, cut_block, decode_scale,
                                            embed_jpeg_block, embed_tiles)
from slide2vec_dask.dataflow.sources import ArchiveRef, SlideRef, read_block, source_of
from slide2vec_dask.exporters import export_row, export_slide, flat_first
from slide2vec_dask.qc import write_slide_image
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.telemetry import clock
from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER
from slide2vec_dask.tiling.coordinate_files import write_coordinates
from slide2vec_dask.tiling.annotations import ANNOTATION_ATTRS, bag_plan, plan_bags
from slide2vec_dask.tiling.plan import Plan, plan_for, slide_attrs, why_no_tiles, writes_archive

EXPECTED = (OSError, ValueError, NotImplementedError)
# Writing the store: also its own integrity errors (rows of a block that never landed, an export that failed).
WRITE_EXPECTED = (*EXPECTED, RuntimeError)


@dataclass
class PlannedSlide:
    """What the client keeps about a slide while its blocks are in flight (small).

    A grid plan keeps its cut mask (and, in hierarchical mode, which of the regions'
    tiles are tissue tiles); a plan of free positions keeps, per block, its read window
    and its tiles' places in it (or, from an archive, its members).
    """

    sample_id: str
    source: SlideRef | ArchiveRef
    level: int
    read_tile: int
    k: int
    cut: np.ndarray | None            # grid plans: (rows, cols) tiles to cut (whole regions in hierarchical mode)
    blocks: list[tuple[int, int]]     # blocks holding tiles, row-major
    num_tiles: int
    plan_path: str
    attrs: dict[str, Any]
    seconds: float
    free: dict | None = None          # free plans: block -> (read arguments, the block's tiles in its pixels)
    archive_tile: int | None = None   # on_the_fly=False: tiles also go to an archive, at this size
    empty_note: str = ""
    kept: np.ndarray | None = None    # hierarchical mode: (rows, cols) padded keep, the regions' tissue tiles
    plan: Plan | None = None          # the whole plan, for sinks that build results on the client
    decode_scale: int = 1             # scaled_decode: blocks decoded at 1/scale (`blocks.decode_scale`)

    @property
    def cut_tile(self) -> int:
        """The tile's side in the pixels a block task gets (read tile, decoded at 1/decode_scale)."""
        return self.read_tile // self.decode_scale

    def read_request(self, block: tuple[int, int]) -> tuple:
        """``(source, *arguments)``: what `read_block` reads for the block: its window, the scale it is
        decoded at and its tiles' rectangles (level pixels; only the file tiles under them are decoded)."""
        if self.free is not None:
            window, corners = self.free[block]
            if corners is None:   # an archive's members
                return (self.source, *window)
            level, y, x = window[:3]
        else:
            rows, cols = self.cut.shape
            span = self.k * self.read_tile
            y, x = block[0] * span, block[1] * span   # regions may reach past the edge (white)
            window = (self.level, y, x, min(span, rows * self.read_tile - y), min(span, cols * self.read_tile - x))
            corners = np.argwhere(self._part(self.cut, block)) * self.read_tile
        needed = np.concatenate([corners + (y, x), corners + (y + self.read_tile, x + self.read_tile)], axis=1)
        return (self.source, *window, self.decode_scale, needed)

    def cuts(self, block: tuple[int, int]) -> np.ndarray | None:
        """The block's tiles: a mask over its grid cells, their (row, col) in its pixels, or None (archives)."""
        if self.free is not None:
            cuts = self.free[block][1]
            return cuts if self.decode_scale == 1 else cuts // self.decode_scale
        return self._part(self.cut, block)

    def kept_in_block(self, block: tuple[int, int]) -> np.ndarray | None:
        """Hierarchical mode: which of the region's tiles (row-major) are tissue tiles; else None (all)."""
        return None if self.kept is None else self._part(self.kept, block).reshape(-1)

    def _part(self, mask: np.ndarray, block: tuple[int, int]) -> np.ndarray:
        k = self.k
        return mask[block[0] * k : (block[0] + 1) * k, block[1] * k : (block[1] + 1) * k]


def plan_task(item, spec, config, output_dir: str | None, store: EmbeddingStore | None = None,
              use_supertiles: bool = True, keep_plan: bool = False, qc_dir: str | None = None):
    """Open and plan one slide and save its plan; with a ``store``, give it an empty staging folder.

    ``keep_plan``: the `PlannedSlide` carries the whole plan (for a sink that builds its
    results where the driver runs).  ``qc_dir``: also draw the slide's QC picture there.
    """
    start = time.perf_counter()
    try:
        slide, plan = plan_for(item, spec, config, output_dir)
    except EXPECTED as exc:
        return exc
    grid = plan.grid
    if qc_dir is not None and slide is not None:
        write_slide_image(qc_dir, item.sample_id, slide, grid, config.segmentation.get("downsample", 64))
    if store is not None:
        store.prepare_slide(item.sample_id)
    attrs = {"sample_id": item.sample_id, "image_path": str(item.image_path),
             "mask_path": "" if item.mask_path is None else str(item.mask_path),
             "encoder": spec.name, "feature_dim": int(spec.feature_dim), "read_level": int(grid.level),
             "read_tile_size_px": int(grid.read_tile_size_px), "slide2vec_dask_version": __version__,
             # what exports state in their own units: level-0 spacing and size, tile size asked for
             "slide_spacing_um": float(grid.slide_spacing_um), "read_spacing_um": float(grid.read_spacing_um),
             "requested_tile_size_px": int(grid.requested_tile_size_px),
             "tile_layout": grid.layout,
             **{k: v for k, v in grid.meta.items() if k.endswith("_fingerprint") or k.endswith("_from")},
             # annotation bags (masks with classes): the classes, the bags and each bag's tiles
             **{k: grid.meta[k] for k in ANNOTATION_ATTRS if k in grid.meta}}
    if slide is not None:
        attrs.update(slide_attrs(slide))
    else:   # tiles from an archive: the slide is not opened
        attrs.update({k: grid.meta[k] for k in ("level0_height", "level0_width") if k in grid.meta})
    plan_path = "" if output_dir is None else str(Path(output_dir) / "coordinates" / f"{item.sample_id}.npz")
    k, cut, blocks, free = block_layout(grid, use_supertiles)
    if free is not None:
        free = {b: grid.block_read(tiles) for b, tiles in zip(blocks, free)}
    kept = grid.padded_keep if grid.layout == "grid" and grid.region_tile_multiple is not None else None
    scale = decode_scale(slide, grid, getattr(config, "scaled_decode", False),
                         None if free is None else free.values())
    if scale > 1:   # the tiles were decoded at 1/scale (scaled_decode), not in full and resized
        attrs["decode_scale"] = scale
    return PlannedSlide(item.sample_id, source_of(slide, grid), grid.level, grid.read_tile_size_px, k, cut, blocks,
                        grid.num_tiles, plan_path, attrs, time.perf_counter() - start, free,
                        grid.requested_tile_size_px if writes_archive(config, grid) else None,
                        "" if grid.num_tiles else why_no_tiles(grid), kept, plan if keep_plan else None, scale)


def tiling_task(item, spec, config, output_dir: str) -> dict[str, Any] | BaseException:
    """``tiling_only``: plan one slide (its plan and previews saved as in any run) and write hs2p's
    coordinate files for it under ``<output_dir>/tiles/``; no pixels embedded, no model loaded."""
    start = time.perf_counter()
    try:
        slide, plan = plan_for(item, spec, config, output_dir)
        try:
            attrs = {"image_path": str(item.image_path), "mask_path": None if item.mask_path is None
                     else str(item.mask_path), **(slide_attrs(slide) if slide is not None else {})}
            folder = Path(output_dir) / ARCHIVE_FOLDER
            if plan.grid.layout == "free" and plan.grid.member is not None:   # a file per bag, in its class's folder
                metas = [write_coordinates(folder if bag in ("tissue", "merged") else folder / bag, item.sample_id,
                                           bag_plan(plan.grid, bag), attrs)[1] for bag in plan_bags(plan.grid)]
            else:
                metas = [write_coordinates(folder, item.sample_id, plan.grid, attrs)[1]]
        finally:
            if slide is not None:
                slide.close()
    except EXPECTED as exc:
        return exc
    grid = plan.grid
    return {"num_tiles": grid.num_tiles, "seconds": time.perf_counter() - start,
            "coordinates_meta": [str(m) for m in metas], "bags": dict(grid.meta.get("bag_tiles") or {}),
            "plan_path": str(Path(output_dir) / "coordinates" / f"{item.sample_id}.npz"),
            "note": "" if grid.num_tiles else why_no_tiles(grid)}


def embed_block(pixels, cuts: np.ndarray | None, kept: np.ndarray | None, *, spec, read_tile: int,
                settings: EmbedSettings, archive_tile: int | None = None, store: EmbeddingStore | None = None,
                sample_id: str = "", block: tuple[int, int] = (0, 0)) -> BlockResult | int:
    """Read (when ``pixels`` is ``(source, *arguments)``), cut and embed one block.

    With a ``store`` the result goes into the block's own staging files and the task
    returns its tile count; without, it returns the `BlockResult`.
    """
    if isinstance(pixels, BaseException):   # its read task's returned failure
        return pixels
    if isinstance(pixels, tuple) and settings.gpu_decode and archive_tile is None:
        with clock.stage("read"):   # gpu_decode: only the compressed tiles are read here
            pixels = gpu_decode.jpeg_block(*pixels) or pixels
    if isinstance(pixels, tuple):
        try:
            with clock.stage("read"):
                pixels = read_block(*pixels)
        except EXPECTED as exc:   # a damaged tile, a file gone
            return exc
    result = None
    if isinstance(pixels, gpu_decode.JpegBlock):   # gpu_decode: decoded, cut and embedded on the device
        result = embed_jpeg_block(pixels, cuts, kept, spec=spec, read_tile=read_tile, settings=settings)
        if not isinstance(result, BlockResult):   # (no CUDA device here, or the GPU decoder disagreed)
            pixels, result = result, None
    if result is None:
        tiles, jpegs = cut_block(pixels, cuts, kept, spec=spec, read_tile=read_tile, settings=settings,
                                 archive_tile=archive_tile)
        del pixels   # the decoded block is freed here, not held while the tiles wait for the device
        result = embed_tiles(tiles, jpegs, kept, spec=spec, settings=settings)
    if store is None:
        return result
    try:
        with clock.stage("write"):
            if result.jpegs is not None:
                store.write_block_tiles(sample_id, block, result.jpegs)
            if result.grids is not None:
                store.write_block_dense(sample_id, block, result.grids)
            return store.write_block(sample_id, block, result.tiles, result.region)
    except WRITE_EXPECTED as exc:   # a full disk
        return exc


def read_task(source, *args):
    """A block's pixels, as a task of its own (GPU clusters: the read runs on any worker);
    an expected read failure is returned, and the block's `embed_block` hands it on."""
    try:
        with clock.stage("read"):
            return read_block(source, *args)
    except EXPECTED as exc:
        return exc


def read_jpeg_task(source, *args):
    """`read_task` for ``gpu_decode``: the block's compressed tiles when its level is tiled JPEG,
    decoded on the GPU worker that embeds it; else its pixels, decoded here."""
    try:
        with clock.stage("read"):
            return gpu_decode.jpeg_block(source, *args) or read_block(source, *args)
    except EXPECTED as exc:
        return exc


def finalize_task(store: EmbeddingStore, sample_id: str, plan_path: str, k: int, attrs: dict[str, Any],
                  output_format: tuple[str, ...] | None, archive_dir: str | None = None) -> dict[str, Any]:
    """Publish the slide's tile embeddings (and tile archive), then its exports in each asked format."""
    try:
        done = store.finalize_slide(sample_id, plan_path, k, attrs, archive_dir)
        flat = export_slide(store, sample_id, output_format or ())
    except WRITE_EXPECTED as exc:
        return exc
    return {**done, "flat_paths": [str(p) for p in flat]}


def export_task(store: EmbeddingStore, sample_id: str, output_format: tuple[str, ...]) -> dict[str, Any]:
    """A complete slide of an earlier run whose exports are missing or stale: written, nothing embedded."""
    return {"flat_paths": [str(p) for p in export_slide(store, sample_id, output_format)]}


def encode_slide(spec, features: np.ndarray, coords: np.ndarray, tile_size_lv0: int,
                 settings: EmbedSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """One slide's (embedding, latents) from its tile features, on this process's device."""
    def run(device):
        return worker.get_aggregator(spec, device, settings.precision).encode_slide(features, coords, tile_size_lv0)

    return worker.run_on_device(settings.num_gpus, run)


def encode_patient(spec, slide_embeddings: np.ndarray, settings: EmbedSettings) -> np.ndarray:
    """One patient's embedding from its slides' embeddings (in the patient's slide order)."""
    def run(device):
        return worker.get_aggregator(spec, device, settings.precision).encode_patient(slide_embeddings)

    return worker.run_on_device(settings.num_gpus, run)


def slide_task(store: EmbeddingStore, sample_id: str, spec, settings: EmbedSettings, save_latents: bool,
               attrs: dict[str, Any], keep_tiles: bool, output_format: tuple[str, ...] | None) -> dict[str, Any]:
    """``tiles/<id>`` -> ``_slides/<id>``, on the device's own thread; drops the tiles when not kept."""
    try:
        return _slide_task(store, sample_id, spec, settings, save_latents, attrs, keep_tiles, output_format)
    except _WriteFailed as exc:   # the store or an export could not be written
        return exc.__cause__
    except OSError as exc:        # a file of the store gone or unreadable
        return exc


class _WriteFailed(Exception):
    """A store write or export of a slide/patient task failed (its cause is the slide's error)."""


def _writing(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except WRITE_EXPECTED as exc:
        raise _WriteFailed() from exc


def _slide_task(store, sample_id, spec, settings, save_latents, attrs, keep_tiles, output_format):
    tile_prints = store.fingerprints("tiles", sample_id) if store.is_complete(sample_id) else None
    same_files = tile_prints is None or store.fingerprints("slide", sample_id) == tile_prints
    if store.has_row("slide", sample_id) and same_files and \
            (not save_latents or store.row_has_latents("slide", sample_id)):
        # Made already: by an earlier run, or by this task before its worker was lost.
        num = int(store.row_attrs("slide", sample_id).get("num_tiles", 0))
    else:
        if tile_prints is None:
            return FileNotFoundError(f"{sample_id}: no finished tile embeddings in {store.path}; rerun the slide")
        if store.num_tiles(sample_id) == 0:
            return ValueError(f"{sample_id}: no tiles (no tissue found), so no slide embedding; check the slide or lower "
                              "PreprocessingConfig(tissue_threshold=...)")

        def run(device):
            # Read on the device's own thread, straight into device memory: no full copy on the host.
            features, coords, tile_size_lv0 = store.read_tile_features(sample_id, device)
            encoded = worker.get_aggregator(spec, device, settings.precision).encode_slide(features, coords,
                                                                                          tile_size_lv0)
            return (*encoded, len(coords))

        embedding, latents, num = worker.run_on_device(settings.num_gpus, run)
        _writing(store.write_row, "slide", sample_id, embedding, latents if save_latents else None,
                 {**attrs, **tile_prints, "num_tiles": int(num)})
    if not keep_tiles:
        _writing(store.drop_tiles, sample_id)
    return {"num_tiles": int(num), **_writing(row_exports, store, "slide", sample_id, output_format)}


def row_exports(store: EmbeddingStore, level: str, key: str, output_format, dest=None) -> dict[str, Any]:
    """The row's exports: ``flat_path`` (slide2vec's flat file when asked, else the first) and all paths."""
    paths = [str(p) for p in export_row(store, level, key, output_format or (), dest)]
    return {"flat_path": flat_first(paths, level), "export_paths": paths}


def patient_task(store: EmbeddingStore, patient_id: str, sample_ids: list[str], spec, settings: EmbedSettings,
                 attrs: dict[str, Any], keep_slide_rows: bool, output_format: tuple[str, ...] | None) -> dict[str, Any]:
    """The slides' rows in ``_slides`` -> ``_patients/<patient_id>``; drops the slide rows when not kept."""
    try:
        return _patient_task(store, patient_id, sample_ids, spec, settings, attrs, keep_slide_rows, output_format)
    except _WriteFailed as exc:
        return exc.__cause__
    except OSError as exc:
        return exc


def _patient_task(store, patient_id, sample_ids, spec, settings, attrs, keep_slide_rows, output_format):
    made = store.row_attrs("patient", patient_id)    # {} when there is no row yet
    done = made.get("sample_ids") == list(sample_ids) and \
        all(made.get("slide_fingerprints", {}).get(s) == store.fingerprints("slide", s)
            for s in sample_ids if store.has_row("slide", s))
    if not done:   # (a rerun after a lost worker may find it done, its slide rows already dropped)
        slides = np.stack([store.read_row("slide", s)[0] for s in sample_ids])
        embedding = encode_patient(spec, slides, settings)
        _writing(store.write_row, "patient", patient_id, embedding, None, {
            **attrs, "sample_ids": list(sample_ids),
            # Its slide rows may be dropped next: the patient row remembers which files it was made from.
            "slide_fingerprints": {s: store.fingerprints("slide", s) for s in sample_ids}})
    if not keep_slide_rows:
        for s in sample_ids:
            _writing(store.drop_row, "slide", s)
    return _writing(row_exports, store, "patient", patient_id, output_format)
