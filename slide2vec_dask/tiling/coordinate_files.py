"""A plan as hs2p writes its tiling: ``<id>.coordinates.npz`` + ``<id>.coordinates.meta.json``.

The npz holds ``tile_index, x, y`` (level-0 px) and ``tissue_fractions``; the meta
states every section and key hs2p's loader checks (provenance, slide, tiling,
segmentation, filtering, artifact), so hs2p, slide2vec and `read_coordinates_from`
read the files back.  hs2p sorts tiles x, then y (``tile_order: x_then_y``); an
archive's coordinates follow its tar's members instead (our plan's row-major order).
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


def write_coordinates(folder: str | Path, sample_id: str, plan, attrs: dict, order: str = "x_then_y") -> Path:
    """The plan's hs2p coordinate files in ``folder`` (npz first, each written aside and renamed);
    returns the meta's path (hs2p writes no npz for a slide without tiles, and neither do we)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = tile_order(plan, order)
    npz = folder / f"{sample_id}{COORDINATES_SUFFIX}"
    if plan.num_tiles:
        def coordinates(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, tile_index=np.arange(plan.num_tiles, dtype=np.int32),
                                    x=np.asarray(plan.x, np.int64)[index], y=np.asarray(plan.y, np.int64)[index],
                                    tissue_fractions=np.asarray(plan.kept_tissue_fraction, np.float32)[index])
        atomic(npz, coordinates)
    else:
        npz.unlink(missing_ok=True)
    meta = folder / f"{sample_id}{META_SUFFIX}"
    atomic(meta, lambda tmp: tmp.write_text(json.dumps(hs2p_meta(sample_id, plan, attrs, order), indent=2,
                                                       sort_keys=True) + "\n"))
    return meta


def hs2p_meta(sample_id: str, plan, attrs: dict, order: str = "x_then_y") -> dict:
    """hs2p's ``.coordinates.meta.json`` for our plan (every section and key its loader checks).

    ``attrs``: what the slide's outputs state about the file (`plan.slide_attrs`), plus
    ``image_path`` / ``mask_path``.
    """
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
                  "base_spacing_um": plan.slide_spacing_um, "level_downsamples": downsamples},
        "tiling": {"requested_tile_size_px": plan.requested_tile_size_px,
                   "requested_spacing_um": plan.requested_spacing_um, "read_level": plan.level,
                   "read_tile_size_px": plan.read_tile_size_px, "read_spacing_um": plan.read_spacing_um,
                   "tile_size_lv0": plan.tile_size_lv0, "tolerance": cfg.get("spacing_tolerance", 0.05),
                   "step_px_lv0": int(plan.meta.get("step_px_lv0", plan.tile_size_lv0)),
                   "overlap": float(cfg.get("overlap", 0.0)), "min_tissue_fraction": float(plan.tissue_threshold),
                   "is_within_tolerance": not plan.resize_needed, "n_tiles": plan.num_tiles},
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
