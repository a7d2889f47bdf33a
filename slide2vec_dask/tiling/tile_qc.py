"""Pixel filters on candidate tiles, read at ``qc_spacing_um``, as hs2p 6.1.0 applies them.

Each tile is read at the level `select_level` picks for ``qc_spacing_um`` (its
footprint there: the tile's physical size over that level's spacing), the part
beyond the level left black and marked invalid, resized with OpenCV (area when
shrinking) to the tile's size at ``qc_spacing_um``, and refused when

* ``filter_white``: more than ``fraction_threshold`` of its valid pixels have every
  channel above ``white_threshold``;
* ``filter_black``: more than ``fraction_threshold`` have every channel below
  ``black_threshold``;
* ``filter_grayspace``: more than ``grayspace_fraction_threshold`` have HSV
  saturation (0..1) below ``grayspace_saturation_threshold``;
* ``filter_blur``: the variance of its Laplacian (grey, over the valid pixels'
  box) is below ``blur_threshold``.

Tiles are read by 8 x 8 tile cells of the QC level, one window each (hs2p's batching).
"""

from __future__ import annotations

from typing import Any, Mapping

import cv2
import numpy as np

from slide2vec_dask.tiling.grid import select_level

FILTER_KEYS = ("filter_white", "filter_black", "filter_grayspace", "filter_blur")


def needs_pixel_qc(filtering: Mapping[str, Any]) -> bool:
    return any(bool(filtering[key]) for key in FILTER_KEYS)


def filter_tiles(slide, xy: np.ndarray, filtering: Mapping[str, Any], *, requested_tile_size_px: int,
                 requested_spacing_um: float, tolerance: float) -> np.ndarray:
    """(n,) bool: which of the tiles at level-0 ``xy`` pass the pixel filters ``filtering`` turns on."""
    keep = np.ones(len(xy), bool)
    if not needs_pixel_qc(filtering) or not len(xy):
        return keep
    qc_spacing = float(filtering["qc_spacing_um"])
    level, read_spacing, _ = select_level(slide.level_spacings, qc_spacing, tolerance)
    physical_um = float(requested_tile_size_px) * float(requested_spacing_um)
    qc_tile = max(1, int(round(physical_um / qc_spacing)))
    read_tile = max(1, int(round(physical_um / read_spacing)))
    img_h, img_w = slide.level_shapes[level]
    ds = float(slide.level_downsamples[level])
    origin = np.floor(np.asarray(xy, np.int64).astype(np.float64) * (1.0 / ds)).astype(np.int64)   # (x, y)
    span = read_tile * 8
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(origin.tolist()):
        cells.setdefault((x // span, y // span), []).append(i)
    for (cx, cy), members in cells.items():
        x0, y0 = cx * span, cy * span
        width = min(span + read_tile, max(0, img_w - x0))
        height = min(span + read_tile, max(0, img_h - y0))
        window = slide.read_level(level, y0, x0, height, width) if width > 0 and height > 0 else None
        for i in members:
            x, y = origin[i]
            tile = np.zeros((read_tile, read_tile, 3), np.uint8)
            valid = np.zeros((read_tile, read_tile), bool)
            if window is not None:
                part = window[y - y0 : y - y0 + read_tile, x - x0 : x - x0 + read_tile]
                tile[: part.shape[0], : part.shape[1]] = part
            vw, vh = int(min(read_tile, max(0, img_w - x))), int(min(read_tile, max(0, img_h - y)))
            if vw > 0 and vh > 0:
                valid[:vh, :vw] = True
            if read_tile != qc_tile:
                tile, valid = _resized(tile, valid, qc_tile)
            keep[i] = passes(tile, valid, filtering)
    return keep


def _resized(tile: np.ndarray, valid: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    shrink = not (size > tile.shape[0] or size > tile.shape[1])
    tile = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    valid = cv2.resize(valid.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return tile, valid


def _fraction(pixels: np.ndarray, valid: np.ndarray) -> float:
    count = int(valid.sum())
    return 0.0 if count == 0 else float(pixels[valid].mean())


def passes(tile: np.ndarray, valid: np.ndarray, filtering: Mapping[str, Any]) -> bool:
    """Whether one QC-sized tile passes every filter ``filtering`` turns on."""
    if filtering["filter_white"] and _fraction(np.all(tile > int(filtering["white_threshold"]), axis=-1),
                                               valid) > float(filtering["fraction_threshold"]):
        return False
    if filtering["filter_black"] and _fraction(np.all(tile < int(filtering["black_threshold"]), axis=-1),
                                               valid) > float(filtering["fraction_threshold"]):
        return False
    if filtering["filter_grayspace"]:
        saturation = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[:, :, 1].astype(np.float32) / 255.0
        grey = saturation < float(filtering["grayspace_saturation_threshold"])
        if _fraction(grey, valid) > float(filtering["grayspace_fraction_threshold"]):
            return False
    if filtering["filter_blur"] and blur_score(tile, valid) < float(filtering["blur_threshold"]):
        return False
    return True


def blur_score(tile: np.ndarray, valid: np.ndarray) -> float:
    """Variance of the Laplacian of the tile's grey levels, over its valid pixels' bounding box."""
    ys, xs = np.nonzero(valid)
    if ys.size == 0:
        return float("inf")
    tile = np.ascontiguousarray(tile[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    return float(cv2.Laplacian(cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())
