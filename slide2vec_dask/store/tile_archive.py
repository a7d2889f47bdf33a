"""A slide's tile archive written in hs2p's layout (``on_the_fly=False``), beside the store.

``<output_dir>/tiles/<id>.tiles.tar`` (+ ``.tiles.manifest.csv``) and
``<id>.coordinates.npz`` / ``.coordinates.meta.json``, which describe the
tiling as hs2p does, so hs2p and slide2vec read ours and we read theirs.  Each
file is written aside and renamed; the tar comes last, so a tar that exists
is a whole archive.  What a killed writer left is swept with the exports'.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from slide2vec_dask.store.output_dir import atomic
from slide2vec_dask.tiling.archive import archive_path


def write_archive(folder: Path, sample_id: str, plan, blobs, attrs: dict) -> Path:
    """The slide's archive, manifest and hs2p coordinates in ``folder``, each written aside and renamed.

    ``blobs`` yields each tile's JPEG bytes in the plan's (row-major) order.
    """
    rows = [(i, int(x), int(y)) for i, (x, y) in enumerate(zip(plan.x, plan.y))]

    def tar(tmp: Path) -> None:
        count = 0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, blob in enumerate(blobs):
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
                count += 1
        if count != plan.num_tiles:
            raise RuntimeError(f"{sample_id}: {count} tiles reached the archive, the plan has {plan.num_tiles}")

    def coordinates(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, tile_index=np.arange(plan.num_tiles, dtype=np.int32),
                                x=np.asarray(plan.x, np.int64), y=np.asarray(plan.y, np.int64),
                                tissue_fractions=np.asarray(plan.kept_tissue_fraction, np.float32))

    folder = Path(folder)
    atomic(folder / f"{sample_id}.tiles.manifest.csv",
           lambda tmp: tmp.write_text("tile_index,x,y\n" + "".join(f"{i},{x},{y}\n" for i, x, y in rows)))
    atomic(folder / f"{sample_id}.coordinates.npz", coordinates)
    atomic(folder / f"{sample_id}.coordinates.meta.json", lambda tmp: tmp.write_text(
        json.dumps(hs2p_meta(sample_id, plan, attrs), indent=2, sort_keys=True) + "\n"))
    tar_path = atomic(archive_path(folder, sample_id), tar)   # last: a tar that exists is a whole archive
    return tar_path


# hs2p filters we do not have, stated as off (their values are hs2p's defaults).
_HS2P_FILTERS_WE_LACK = {"a_h": 0, "filter_grayspace": False, "grayspace_saturation_threshold": 0.05,
                         "grayspace_fraction_threshold": 0.6, "filter_blur": False, "blur_threshold": 50.0,
                         "qc_spacing_um": 2.0}


def hs2p_meta(sample_id: str, plan, attrs: dict) -> dict:
    """hs2p's ``.coordinates.meta.json`` for our plan (every section and key its loader checks)."""
    cfg = plan.meta.get("config", {})
    seg, filt = cfg.get("segmentation", {}), cfg.get("filtering", {})
    return {
        "provenance": {"sample_id": sample_id, "image_path": attrs.get("image_path"),
                       "mask_path": attrs.get("mask_path") or None, "backend": attrs.get("backend", "auto"),
                       "requested_backend": cfg.get("backend", "auto"), "spacing_at_level_0": None,
                       "mask_backend": None, "requested_mask_backend": None},
        "slide": {"dimensions": [attrs.get("level0_width"), attrs.get("level0_height")],
                  "base_spacing_um": plan.slide_spacing_um, "level_downsamples": attrs.get("level_downsamples", [1.0])},
        "tiling": {"requested_tile_size_px": plan.requested_tile_size_px,
                   "requested_spacing_um": plan.requested_spacing_um, "read_level": plan.level,
                   "read_tile_size_px": plan.read_tile_size_px, "read_spacing_um": plan.read_spacing_um,
                   "tile_size_lv0": plan.tile_size_lv0, "tolerance": cfg.get("spacing_tolerance", 0.05),
                   "step_px_lv0": plan.tile_size_lv0, "overlap": 0.0,
                   "min_tissue_fraction": float(plan.tissue_threshold),
                   "is_within_tolerance": not plan.resize_needed, "n_tiles": plan.num_tiles},
        "segmentation": {"tissue_method": "mask" if attrs.get("mask_path") else "hsv",
                         "requested_seg_downsample": seg.get("downsample"), "seg_downsample": seg.get("downsample"),
                         "seg_level": None, "seg_spacing_um": None, "sthresh": seg.get("sthresh"),
                         "sthresh_up": seg.get("sthresh_up"), "mthresh": seg.get("mthresh"),
                         "close": seg.get("close"), "sam2_checkpoint_path": None, "sam2_config_path": None,
                         "mask_path": attrs.get("mask_path") or None, "ref_tile_size_px": filt.get("ref_tile_size"),
                         "tissue_mask_tissue_value": None, "mask_level": None, "mask_spacing_um": None},
        "filtering": {**_HS2P_FILTERS_WE_LACK, **{key: filt.get(key) for key in (
            "a_t", "filter_white", "filter_black", "white_threshold", "black_threshold", "fraction_threshold")}},
        "artifact": {"coordinate_space": "level0_px", "tile_order": "y_then_x", "annotation": None,
                     "selection_strategy": None, "output_mode": None},
    }

