"""Worker-side tasks of a cohort run: plan, read, embed, finalize, slide, patient.

Each is a plain function of small, picklable arguments (paths, specs, the
`EmbeddingStore`), and each is safe to run twice or on another worker after
a loss: its outputs are either chunks that a rerun rewrites with the same
values, or groups published by rename that a rerun finds already there.
Expected per-slide failures (missing, corrupt, no spacing, no tissue for a
slide model) are *returned* as exceptions, so they become that slide's row
without a worker traceback in the logs; anything else raises as usual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.dataflow.graph import EmbedSettings, block_layout
from slide2vec_dask.dataflow.sources import ArchiveRef, SlideRef, read_block, source_of
from slide2vec_dask.store import EmbeddingStore

EXPECTED = (OSError, ValueError, NotImplementedError)


@dataclass
class PlannedSlide:
    """What the client keeps about a slide while its blocks are in flight (small).

    A grid plan keeps its keep mask; a plan of free positions keeps, per block, its
    read window and its tiles' places in it (or, from an archive, its members).
    """

    sample_id: str
    source: SlideRef | ArchiveRef
    level: int
    read_tile: int
    k: int
    keep: np.ndarray | None           # grid plans: (rows, cols) tiles to embed (whole regions in hierarchical mode)
    blocks: list[tuple[int, int]]     # blocks holding tiles, row-major
    num_tiles: int
    plan_path: str
    attrs: dict[str, Any]
    seconds: float
    free: dict | None = None          # free plans: block -> (read arguments, the block's tiles in its pixels)
    archive_tile: int | None = None   # on_the_fly=False: tiles also go to an archive, at this size
    empty_note: str = ""

    def read_request(self, block: tuple[int, int]) -> tuple:
        """``(source, *arguments)``: what `read_block` reads for the block."""
        if self.free is not None:
            return (self.source, *self.free[block][0])
        rows, cols = self.keep.shape
        span = self.k * self.read_tile
        y, x = block[0] * span, block[1] * span   # regions may reach past the edge (white)
        return (self.source, self.level, y, x, min(span, rows * self.read_tile - y),
                min(span, cols * self.read_tile - x))

    def keep_block(self, block: tuple[int, int]) -> np.ndarray | None:
        """The block's tiles: a mask over its grid cells, their (row, col) in its pixels, or None (archives)."""
        if self.free is not None:
            return self.free[block][1]
        k = self.k
        return self.keep[block[0] * k : (block[0] + 1) * k, block[1] * k : (block[1] + 1) * k]


def plan_task(store: EmbeddingStore, item, spec, config, execution):
    """Open and plan one slide, save its plan, and give it an empty staging folder."""
    from slide2vec_dask.dataflow.embed import plan_for, slide_attrs

    start = time.perf_counter()
    try:
        slide, plan = plan_for(item, spec, config, execution)
    except EXPECTED as exc:
        return exc
    grid = plan.grid
    store.prepare_slide(item.sample_id)
    from slide2vec_dask import __version__

    attrs = {"sample_id": item.sample_id, "image_path": str(item.image_path),
             "mask_path": "" if item.mask_path is None else str(item.mask_path),
             "encoder": spec.name, "feature_dim": int(spec.feature_dim), "read_level": int(grid.level),
             "read_tile_size_px": int(grid.read_tile_size_px), "slide2vec_dask_version": __version__,
             # what exports state in their own units: level-0 spacing and size, tile size asked for
             "slide_spacing_um": float(grid.slide_spacing_um), "read_spacing_um": float(grid.read_spacing_um),
             "requested_tile_size_px": int(grid.requested_tile_size_px),
             "tile_layout": grid.layout,
             **{k: v for k, v in grid.meta.items() if k.endswith("_fingerprint") or k.endswith("_from")}}
    if slide is not None:
        attrs.update(slide_attrs(slide))
    else:   # tiles from an archive: the slide is not opened
        attrs.update({k: grid.meta[k] for k in ("level0_height", "level0_width") if k in grid.meta})
    source = source_of(slide, grid)
    plan_path = str(Path(execution.output_dir) / "coordinates" / f"{item.sample_id}.npz")
    k, keep, blocks, free = block_layout(grid, config.use_supertiles)
    if free is not None:
        free = {b: grid.block_read(tiles) for b, tiles in zip(blocks, free)}
    return PlannedSlide(item.sample_id, source, grid.level, grid.read_tile_size_px, k, keep, blocks,
                        grid.num_tiles, plan_path, attrs, time.perf_counter() - start, free,
                        grid.requested_tile_size_px if writes_archive(config, grid) else None,
                        "" if grid.num_tiles else _why_no_tiles(grid))


def _why_no_tiles(grid) -> str:
    if grid.layout == "free":
        return "no tiles: the coordinates given list none"
    if 0 in grid.shape:
        return f"no tiles: the slide is smaller than one tile ({grid.read_tile_size_px} px at read level {grid.level})"
    return "no tiles: no tissue found (see PreprocessingConfig segmentation / tissue_threshold)"


def writes_archive(config, plan) -> bool:
    """``on_the_fly=False``: the run writes the tiles it reads to an archive (unless they come from one)."""
    return not config.on_the_fly and getattr(plan, "archive", None) is None


def embed_block(pixels: np.ndarray, keep: np.ndarray | None, *, store: EmbeddingStore, sample_id: str,
                block: tuple[int, int], spec, read_tile: int, settings: EmbedSettings,
                archive_tile: int | None = None) -> int:
    """Embed a block's tiles and write them into its own staging file; the tile count.

    ``pixels`` is the block, or ``(source, *arguments)`` to read it here first.  With
    ``archive_tile`` (``on_the_fly=False``) the tiles are JPEG-encoded at that size and
    staged for the slide's archive, and what is embedded is those JPEGs decoded: a later
    run from the archive gets the same embeddings.
    """
    from slide2vec_dask.dataflow.graph import block_tiles_of, encode_tiles

    if isinstance(pixels, tuple):
        pixels = read_block(*pixels)
    tiles = block_tiles_of(pixels, keep, read_tile)
    if archive_tile is not None:
        from slide2vec_dask.tiling.archive import decode_jpeg_tiles, encode_jpeg_tiles

        blobs = encode_jpeg_tiles(tiles, archive_tile)
        store.write_block_tiles(sample_id, block, blobs)
        tiles = decode_jpeg_tiles(blobs) if blobs else tiles[:0]
    out = encode_tiles(tiles, keep, spec=spec, settings=settings)
    return store.write_block(sample_id, block, out)


def finalize_task(store: EmbeddingStore, sample_id: str, plan_path: str, k: int, attrs: dict[str, Any],
                  output_format: tuple[str, ...] | None, archive_dir: str | None = None) -> dict[str, Any]:
    """Publish the slide's tile embeddings (and tile archive), then its exports in each asked format."""
    from slide2vec_dask.exporters import export_slide

    done = store.finalize_slide(sample_id, plan_path, k, attrs, archive_dir)
    flat = export_slide(store, sample_id, output_format or ())
    return {**done, "flat_paths": [str(p) for p in flat]}


def export_task(store: EmbeddingStore, sample_id: str, output_format: tuple[str, ...]) -> dict[str, Any]:
    """A complete slide of an earlier run whose exports are missing or stale: written, nothing embedded."""
    from slide2vec_dask.exporters import export_slide

    return {"flat_paths": [str(p) for p in export_slide(store, sample_id, output_format)]}


def slide_task(store: EmbeddingStore, sample_id: str, spec, settings: EmbedSettings, save_latents: bool,
               attrs: dict[str, Any], keep_tiles: bool, output_format: tuple[str, ...] | None) -> dict[str, Any]:
    """``tiles/<id>`` -> ``_slides/<id>``, on the device's own thread; drops the tiles when not kept."""
    from slide2vec_dask.dataflow import worker

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
        store.write_row("slide", sample_id, embedding, latents if save_latents else None,
                        {**attrs, **tile_prints, "num_tiles": int(num)})
    if not keep_tiles:
        store.drop_tiles(sample_id)
    return {"num_tiles": int(num), **row_exports(store, "slide", sample_id, output_format)}


def row_exports(store: EmbeddingStore, level: str, key: str, output_format) -> dict[str, Any]:
    """The row's exports: ``flat_path`` (slide2vec's flat file when asked, else the first) and all paths."""
    from slide2vec_dask.exporters import export_row, flat_first

    paths = [str(p) for p in export_row(store, level, key, output_format or ())]
    return {"flat_path": flat_first(paths, level), "export_paths": paths}


def patient_task(store: EmbeddingStore, patient_id: str, sample_ids: list[str], spec, settings: EmbedSettings,
                 attrs: dict[str, Any], keep_slide_rows: bool, output_format: tuple[str, ...] | None) -> dict[str, Any]:
    """The slides' rows in ``_slides`` -> ``_patients/<patient_id>``; drops the slide rows when not kept."""
    from slide2vec_dask.dataflow.aggregate import encode_patient

    made = store.row_attrs("patient", patient_id)    # {} when there is no row yet
    done = made.get("sample_ids") == list(sample_ids) and \
        all(made.get("slide_fingerprints", {}).get(s) == store.fingerprints("slide", s)
            for s in sample_ids if store.has_row("slide", s))
    if not done:   # (a rerun after a lost worker may find it done, its slide rows already dropped)
        slides = np.stack([store.read_row("slide", s)[0] for s in sample_ids])
        embedding = encode_patient(spec, slides, settings)
        store.write_row("patient", patient_id, embedding, None, {
            **attrs, "sample_ids": list(sample_ids),
            # Its slide rows may be dropped next: the patient row remembers which files it was made from.
            "slide_fingerprints": {s: store.fingerprints("slide", s) for s in sample_ids}})
    if not keep_slide_rows:
        for s in sample_ids:
            store.drop_row("slide", s)
    return row_exports(store, "patient", patient_id, output_format)
