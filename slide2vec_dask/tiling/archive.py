"""Tile archives in hs2p's layout: read (``read_tiles_from``) and written (``on_the_fly=False``).

``<id>.tiles.tar`` holds one JPEG per tile (``%06d.jpg``, the tile's index
in ``<id>.tiles.manifest.csv``: ``tile_index, x, y`` in level-0 px), at the
requested tile size; ``<id>.coordinates.npz`` / ``.coordinates.meta.json``
describe the tiling as hs2p does, so hs2p and slide2vec read ours and we
read theirs.  Tiles are encoded with Pillow at quality 90, hs2p's default.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

JPEG_QUALITY = 90


def read_archive_tiles(path: str, offsets: np.ndarray, sizes: np.ndarray, tile: int) -> np.ndarray:
    """The JPEG members at ``offsets`` / ``sizes`` of the tar, decoded: ``(n, tile, tile, 3)`` uint8."""
    from PIL import Image

    out = np.empty((len(offsets), tile, tile, 3), dtype=np.uint8)
    order = np.argsort(offsets)   # one forward pass through the file
    with open(path, "rb") as f:
        for i in order:
            f.seek(int(offsets[i]))
            data = f.read(int(sizes[i]))
            try:
                with Image.open(io.BytesIO(data)) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as exc:
                raise OSError(f"{path}: the tile at byte {int(offsets[i])} is not a readable JPEG ({exc})") from None
            if pixels.shape[:2] != (tile, tile):
                raise ValueError(f"{path}: a tile is {pixels.shape[1]}x{pixels.shape[0]} px, the plan expects "
                                 f"{tile}x{tile} (an archive made for another tile size)")
            out[i] = pixels
    return out


def encode_jpeg_tiles(tiles: np.ndarray, size: int, quality: int = JPEG_QUALITY) -> list[bytes]:
    """Each tile resized to ``size`` (bilinear, as hs2p does) and JPEG-encoded."""
    from PIL import Image

    out = []
    for tile in tiles:
        im = Image.fromarray(tile)
        if im.size != (size, size):
            im = im.resize((size, size), resample=Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_jpeg_tiles(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def jpeg_block(pixels: np.ndarray, keep, read_tile: int, size: int) -> list[bytes]:
    """A block's tiles as JPEGs (the in-memory API's archive task; see `graph.block_tiles_of`)."""
    from slide2vec_dask.dataflow.graph import block_tiles_of

    if keep is not None and keep.ndim == 3:
        keep = keep[:, :, 0]
    return encode_jpeg_tiles(block_tiles_of(pixels, keep, read_tile), size)


def in_plan_order(plan, k: int, blobs_of):
    """Each tile's JPEG in the plan's row-major order, a band of blocks at a time; ``blobs_of(block)``
    gives a block's JPEGs in the order its tiles were cut."""
    from slide2vec_dask.tiling.tile_list import bands, block_members

    for band in bands(*block_members(plan, k)):
        found = {}
        for block, index in band:
            found.update(zip(index.tolist(), blobs_of(block)))
        yield from (found[i] for i in sorted(found))


def write_archive(folder: Path, sample_id: str, plan, blobs, attrs: dict) -> Path:
    """The slide's archive, manifest and hs2p coordinates in ``folder``, each written aside and renamed.

    ``blobs`` yields each tile's JPEG bytes in the plan's (row-major) order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / f"{sample_id}.tiles.tar"
    tmp = folder / f".{sample_id}.tiles.tar.{os.getpid()}.tmp"
    rows = []
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, (x, y, blob) in enumerate(zip(plan.x, plan.y, blobs)):
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
                rows.append((i, int(x), int(y)))
        if len(rows) != plan.num_tiles:
            raise RuntimeError(f"{sample_id}: {len(rows)} tiles reached the archive, the plan has {plan.num_tiles}")
        _atomic_text(folder / f"{sample_id}.tiles.manifest.csv",
                     "tile_index,x,y\n" + "".join(f"{i},{x},{y}\n" for i, x, y in rows))
        coords = folder / f".{sample_id}.coordinates.{os.getpid()}.tmp.npz"
        np.savez_compressed(coords, tile_index=np.arange(plan.num_tiles, dtype=np.int32),
                            x=np.asarray(plan.x, np.int64), y=np.asarray(plan.y, np.int64),
                            tissue_fractions=np.asarray(plan.kept_tissue_fraction, np.float32))
        os.replace(coords, folder / f"{sample_id}.coordinates.npz")
        _atomic_text(folder / f"{sample_id}.coordinates.meta.json",
                     json.dumps(hs2p_meta(sample_id, plan, attrs), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, tar_path)
    finally:
        tmp.unlink(missing_ok=True)
    return tar_path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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

