"""A plan as hs2p writes its tiling: ``<id>.coordinates.npz`` + ``<id>.coordinates.meta.json``.

The npz holds ``tile_index, x, y`` (level-0 px) and ``tissue_fractions``; the meta
states every section and key hs2p's loader checks (provenance, slide, tiling,
segmentation, filtering, artifact), so hs2p, slide2vec and `read_coordinates_from`
read the files back.  hs2p sorts tiles x, then y (``tile_order: x_then_y``); an
archive's coordinates follow its tar's members instead (our plan's row-major order), and
a finished slide's (the pt / npz exports) the order its tiles were embedded in
(``as_embedded``).  This module is the one writer of these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slide2vec_dask.atomic import atomic

COORDINATES_SUFFIX = ".coordinates.npz"
META_SUFFIX = ".coordinates.meta.json"


def tile_order(plan, order: str) -> np.ndarray:
    """Indices of the plan's tiles in hs2p's order (``x_then_y``) or the plan's own (``y_then_x``)."""
    x, y = np.asarray(plan.x, np.int64), np.asarray(plan.y, np.int64)
    return np.lexsort((y, x)) if order == "x_then_y" else np.arange(len(x))


def write_coordinates(folder: str | Path, sample_id: str, plan, attrs: dict, order: str = "x_then_y",
                      tiles: tuple | None = None) -> list[Path]:
    """The plan's hs2p coordinate files in ``folder`` (npz first, each written aside and renamed);
    returns ``[npz, meta]`` (hs2p writes no npz for a slide without tiles, and neither do we).

    ``tiles``: a finished slide's ``(x, y, tissue_fractions)`` in the order they were embedded
    (``order="as_embedded"``), written instead of the plan's; ``plan`` may then be None (a store
    whose saved plan is gone), the geometry coming from ``attrs`` (the slide's tile attrs).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tiles is None:
        index = tile_order(plan, order)
        tiles = (np.asarray(plan.x, np.int64)[index], np.asarray(plan.y, np.int64)[index],
                 np.asarray(plan.kept_tissue_fraction, np.float32)[index])
    x, y, fractions = (np.asarray(a).reshape(-1) for a in tiles)
    if len(fractions) != len(x):   # a store without per-tile tissue fractions
        fractions = np.full(len(x), np.nan, np.float32)
    npz = folder / f"{sample_id}{COORDINATES_SUFFIX}"
    if len(x):
        def coordinates(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, tile_index=np.arange(len(x), dtype=np.int32), x=x.astype(np.int64),
                                    y=y.astype(np.int64), tissue_fractions=fractions.astype(np.float32))
        atomic(npz, coordinates)
    else:
        npz.unlink(missing_ok=True)
    meta = folder / f"{sample_id}{META_SUFFIX}"
    doc = hs2p_meta(sample_id, plan, attrs, order, num_tiles=len(x))
    atomic(meta, lambda tmp: tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n"))
    return [npz, meta]


def hs2p_meta(sample_id: str, plan, attrs: dict, order: str = "x_then_y", num_tiles: int | None = None) -> dict:
    """hs2p's ``.coordinates.meta.json`` for our plan (every section and key its loader checks).

    ``attrs``: what the slide's outputs state about the file (`plan.slide_attrs`), plus
    ``image_path`` / ``mask_path``; with ``plan`` None, a finished slide's tile attrs stand in
    for the plan (its geometry; the segmentation / filtering settings are then unknown).
    """
    plan = _AttrsPlan(attrs) if plan is None else plan
    num_tiles = plan.num_tiles if num_tiles is None else int(num_tiles)
    cfg = plan.meta.get("config", {})
    seg, filt = cfg.get("segmentation", {}), cfg.get("filtering", {})
    downsamples = [float(d) for d in attrs.get("level_downsamples", [1.0])]
    seg_level = plan.meta.get("seg_level")
    seg_spacing = None if seg_level is None else float(plan.slide_spacing_um) * downsamples[seg_level]
    mask_path = attrs.get("mask_path") or plan.meta.get("mask_path") or None
    segmented = mask_path is None
    ref = filt.get("ref_tile_size") or plan.requested_tile_size_px
    return {
        "provenance": {"sample_id": sample_id, "image_path": attrs.get("image_path") or plan.meta.get("image_path"),
                       "mask_path": mask_path, "backend": attrs.get("backend", "auto"),
                       "requested_backend": cfg.get("backend", "auto"), "spacing_at_level_0": None,
                       "mask_backend": None, "requested_mask_backend": None},
        "slide": {"dimensions": [attrs.get("level0_width"), attrs.get("level0_height")],
                  "base_spacing_um": float(plan.slide_spacing_um), "level_downsamples": downsamples},
        "tiling": {"requested_tile_size_px": plan.requested_tile_size_px,
                   "requested_spacing_um": plan.requested_spacing_um, "read_level": plan.level,
                   "read_tile_size_px": plan.read_tile_size_px, "read_spacing_um": plan.read_spacing_um,
                   "tile_size_lv0": plan.tile_size_lv0,
                   "tolerance": cfg.get("spacing_tolerance", None if isinstance(plan, _AttrsPlan) else 0.05),
                   "step_px_lv0": int(plan.meta.get("step_px_lv0", plan.tile_size_lv0)),
                   "overlap": float(cfg.get("overlap", 0.0)), "min_tissue_fraction": None if plan.tissue_threshold is None else float(plan.tissue_threshold),
                   "is_within_tolerance": not plan.resize_needed, "n_tiles": num_tiles},
        "segmentation": {
            "tissue_method": seg.get("method", "hsv") if segmented else "precomputed_mask",
            "requested_seg_downsample": seg.get("downsample"),
            "seg_downsample": None if seg_spacing is None else max(1, round(seg_spacing / plan.slide_spacing_um)),
            "seg_level": seg_level, "seg_spacing_um": seg_spacing,
            **{key: seg.get(key) if segmented else None for key in ("sthresh", "sthresh_up", "mthresh", "close")},
            "sam2_checkpoint_path": None, "sam2_config_path": None, "mask_path": mask_path,
            "ref_tile_size_px": ref, "tissue_mask_tissue_value": None if segmented else 1,
            "mask_level": None, "mask_spacing_um": None},
        "filtering": {key: filt.get(key, default) for key, default in _HS2P_FILTERING.items()},
        "artifact": {"coordinate_space": "level0_px", "tile_order": order,   # (an annotation bag's: its class)
                     **{k: plan.meta.get(k) for k in ("annotation", "selection_strategy", "output_mode")}},
    }


# hs2p's filtering keys, with its defaults for a plan saved before a key existed
_HS2P_FILTERING = {"a_t": 4, "a_h": 2, "filter_white": False, "filter_black": False, "white_threshold": 220,
                   "black_threshold": 25, "fraction_threshold": 0.9, "filter_grayspace": False,
                   "grayspace_saturation_threshold": 0.05, "grayspace_fraction_threshold": 0.6,
                   "filter_blur": False, "blur_threshold": 50.0, "qc_spacing_um": 2.0}


class _AttrsPlan:
    """A finished slide's tile attrs read as the plan they were written from (geometry only)."""

    def __init__(self, attrs: dict):
        self.meta: dict = {}
        self.slide_spacing_um = float(attrs["slide_spacing_um"])
        self.requested_spacing_um = float(attrs["requested_spacing_um"])
        self.requested_tile_size_px = int(attrs["requested_tile_size_px"])
        self.tile_size_lv0 = int(attrs["tile_size_lv0"])
        self.level = int(attrs.get("read_level", 0))
        self.read_tile_size_px = int(attrs.get("read_tile_size_px", self.requested_tile_size_px))
        self.read_spacing_um = float(attrs.get("read_spacing_um", self.requested_spacing_um))
        self.resize_needed = self.read_tile_size_px != self.requested_tile_size_px
        self.tissue_threshold = attrs.get("tissue_threshold")   # None: not recorded (nor the tolerance)
        self.num_tiles = int(attrs.get("num_tiles", 0))
