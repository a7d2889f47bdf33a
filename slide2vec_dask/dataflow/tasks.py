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

from slide2vec_dask.dataflow.graph import EmbedSettings, block_layout, encode_block
from slide2vec_dask.store import EmbeddingStore

EXPECTED = (OSError, ValueError, NotImplementedError)


@dataclass(frozen=True)
class SlideRef:
    """A slide as tasks name it: reopened (once per process) where it is read."""

    path: str
    backend: str
    spacing_at_level_0: float | None

    def open(self):
        from slide2vec_dask.slide.open import _reopen

        return _reopen(self.path, self.backend, self.spacing_at_level_0)


@dataclass
class PlannedSlide:
    """What the client keeps about a slide while its blocks are in flight (small)."""

    sample_id: str
    slide: SlideRef
    level: int
    read_tile: int
    k: int
    keep: np.ndarray                  # (rows, cols) tiles to embed: whole regions in hierarchical mode
    blocks: list[tuple[int, int]]     # blocks holding kept tiles, row-major
    num_tiles: int
    plan_path: str
    attrs: dict[str, Any]
    seconds: float

    def window(self, block: tuple[int, int]) -> tuple[int, int, int, int]:
        """The block's (y, x, height, width) in read-level pixels; regions may reach past the edge (white)."""
        rows, cols = self.keep.shape
        span = self.k * self.read_tile
        y, x = block[0] * span, block[1] * span
        return y, x, min(span, rows * self.read_tile - y), min(span, cols * self.read_tile - x)

    def keep_block(self, block: tuple[int, int]) -> np.ndarray:
        k = self.k
        return self.keep[block[0] * k : (block[0] + 1) * k, block[1] * k : (block[1] + 1) * k]


def plan_task(store: EmbeddingStore, item, spec, config, execution):
    """Open and plan one slide, save its plan, and give it an empty staging folder."""
    from slide2vec_dask.dataflow.embed import plan_for

    start = time.perf_counter()
    try:
        slide, plan = plan_for(item, spec, config, execution)
    except EXPECTED as exc:
        return exc
    grid = plan.grid
    k, keep, blocks = block_layout(grid, config.use_supertiles)
    store.prepare_slide(item.sample_id)
    from slide2vec_dask import __version__

    attrs = {"sample_id": item.sample_id, "image_path": str(item.image_path),
             "mask_path": "" if item.mask_path is None else str(item.mask_path),
             "encoder": spec.name, "feature_dim": int(spec.feature_dim), "read_level": int(grid.level),
             "read_tile_size_px": int(grid.read_tile_size_px), "slide2vec_dask_version": __version__,
             # what exports state in their own units: level-0 spacing and size, tile size asked for
             "slide_spacing_um": float(grid.slide_spacing_um), "read_spacing_um": float(grid.read_spacing_um),
             "requested_tile_size_px": int(grid.requested_tile_size_px),
             "level0_height": int(slide.level_shapes[0][0]), "level0_width": int(slide.level_shapes[0][1]),
             **{k: v for k, v in grid.meta.items() if k.endswith("_fingerprint")}}
    plan_path = str(Path(execution.output_dir) / "coordinates" / f"{item.sample_id}.npz")
    return PlannedSlide(item.sample_id, SlideRef(str(slide.path), slide.backend, item.spacing_at_level_0),
                        grid.level, grid.read_tile_size_px, k, keep, blocks, grid.num_tiles,
                        plan_path, attrs, time.perf_counter() - start)


def read_block(slide: SlideRef, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
    """A block's pixels straight from the file (runs on any worker)."""
    return slide.open().read_level(level, y, x, height, width)


def embed_block(pixels: np.ndarray, keep: np.ndarray, *, store: EmbeddingStore, sample_id: str,
                block: tuple[int, int], spec, read_tile: int,
                settings: EmbedSettings) -> int:
    """Embed a block's kept tiles and write them into its own staging file; the tile count.

    ``pixels`` is the block, or ``(slide, level, y, x, height, width)`` to read it here first.
    """
    if isinstance(pixels, tuple):
        pixels = read_block(*pixels)
    out = encode_block(pixels, keep, spec=spec, read_tile=read_tile, settings=settings)
    return store.write_block(sample_id, block, out)


def finalize_task(store: EmbeddingStore, sample_id: str, plan_path: str, k: int, attrs: dict[str, Any],
                  output_format: tuple[str, ...] | None) -> dict[str, Any]:
    """Publish the slide's tile embeddings, then its exports in each asked format (as it finishes)."""
    from slide2vec_dask.exporters import export_slide

    done = store.finalize_slide(sample_id, plan_path, k, attrs)
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
