"""Tissue contours and the tiles laid over them, as hs2p 6.1.0 lays them (slide2vec's tiles).

* Contours: OpenCV's `findContours` (two-level hierarchy: pieces and their
  holes) on the segmentation mask; a piece whose area minus its holes' is at
  most ``a_t`` reference tiles (``ref_tile_size`` px at the read spacing) is
  dropped; kept contours are scaled to level-0 pixels.
* Tiles: one grid per contour, from the corner of its level-0 bounding box,
  every ``step`` px (the tile less ``overlap``, rounded at the read level) up
  to the box's far edge clipped to the slide, so edge tiles may overhang the
  slide (they are read white there).  A tile's tissue fraction is the share of
  its footprint on the mask (origin floored, size rounded) covered by its own
  contour, less the contour's holes, and by tissue; tiles at or above
  ``tissue_threshold`` are kept; a position found by two contours is kept once
  (the first's fraction); tiles sorted by x, then y, as hs2p writes them.

OpenCV is used for contours, filling and (in `masks`) colour conversion and
morphology because those define hs2p's answer pixel for pixel: a rewrite would
have to match `findContours`' border following and the polygon filler's
fixed-point edge rules exactly, and any miss moves tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from slide2vec_dask.tiling.grid import select_level


@dataclass
class Contours:
    """Tissue contours in level-0 px (int32, OpenCV's (n, 1, 2)), each with its holes, and the mask."""

    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    mask: np.ndarray                               # the segmentation mask they were found on
    slide_dimensions: tuple[int, int]              # level-0 (width, height)
    kept_mask: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.contours)


def min_contour_area(mask_shape: tuple[int, int], slide_dimensions: tuple[int, int], *, a_t: float,
                     ref_tile_size_px: int, requested_spacing_um: float, spacings: list[float],
                     tolerance: float) -> float:
    """``a_t`` reference tiles in mask px: the area a contour (less its holes) must exceed."""
    if a_t <= 0:
        return 0
    _, read_spacing, _ = select_level(spacings, requested_spacing_um, tolerance)
    current_scale = read_spacing / spacings[0]
    scale_x = slide_dimensions[0] / mask_shape[1]
    scale_y = slide_dimensions[1] / mask_shape[0]
    ref_w = ref_tile_size_px * current_scale / scale_x
    ref_h = ref_tile_size_px * current_scale / scale_y
    return a_t * int(ref_w * ref_h)


def detect_contours(mask: np.ndarray, slide_dimensions: tuple[int, int], min_area: float) -> Contours:
    """The mask's tissue pieces above ``min_area`` (mask px), with their holes, in level-0 px."""
    if mask.max(initial=0) == 0:
        return Contours([], [], mask, slide_dimensions)
    scale_x = slide_dimensions[0] / mask.shape[1]
    scale_y = slide_dimensions[1] / mask.shape[0]
    raw, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or not raw:
        return Contours([], [], mask, slide_dimensions)
    hierarchy = hierarchy[0]
    kept, holes = [], []
    for i, h in enumerate(hierarchy):
        if h[3] != -1:
            continue
        children = np.flatnonzero(hierarchy[:, 3] == i)
        area = cv2.contourArea(raw[i])
        if children.size:
            area -= float(np.sum([cv2.contourArea(raw[c]) for c in children]))
        if area == 0 or area <= min_area:
            continue
        kept.append(_to_level0(raw[i], scale_x, scale_y))
        holes.append([_to_level0(raw[c], scale_x, scale_y) for c in children.tolist()])
    return Contours(kept, holes, mask, slide_dimensions)


def _to_level0(contour: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    out = contour.astype(np.float64)
    out[:, 0, 0] *= scale_x
    out[:, 0, 1] *= scale_y
    return out.astype(np.int32)


def _to_mask(contour: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    out = contour.astype(np.float64)
    out[:, 0, 0] *= scale_x
    out[:, 0, 1] *= scale_y
    return np.round(out).astype(np.int32)


def tile_stride(read_tile_size_px: int, tile_size_lv0: int, overlap: float) -> int:
    """Level-0 px between neighbouring tile origins: the overlap applied (and rounded) at the read level."""
    read_step = max(1, round(read_tile_size_px * (1.0 - float(overlap))))
    return max(1, round(read_step * tile_size_lv0 / read_tile_size_px))


def contour_tiles(contours: Contours, *, tile_size_lv0: int, step_lv0: int,
                  tissue_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) int64 level-0 (x, y) and (n,) float32 tissue fractions of the kept tiles, sorted x then y."""
    xy, fractions = [], []
    for contour, holes in zip(contours.contours, contours.holes):
        cand, frac = _tiles_for_contour(contour, holes, contours.mask, contours.slide_dimensions,
                                        tile_size_lv0, step_lv0)
        keep = frac >= tissue_threshold
        xy.append(cand[keep])
        fractions.append(frac[keep])
    if not xy:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    xy, fractions = np.concatenate(xy), np.concatenate(fractions)
    if len(xy) > 1:
        _, first = np.unique(xy, axis=0, return_index=True)
        first.sort()
        xy, fractions = xy[first], fractions[first]
        order = np.lexsort((xy[:, 1], xy[:, 0]))
        xy, fractions = xy[order], fractions[order]
    return xy.astype(np.int64), fractions.astype(np.float32)


def _tiles_for_contour(contour, holes, mask, slide_dimensions, tile_size_lv0: int, step_lv0: int):
    slide_w, slide_h = slide_dimensions
    x, y, w, h = cv2.boundingRect(contour)
    x_start, y_start, x_end, y_end = max(x, 0), max(y, 0), min(x + w, slide_w), min(y + h, slide_h)
    empty = np.empty((0, 2), np.int64), np.empty(0, np.float32)
    if x_end <= x_start or y_end <= y_start:
        return empty
    xs = np.arange(x_start, x_end, step_lv0, dtype=np.int64)
    ys = np.arange(y_start, y_end, step_lv0, dtype=np.int64)
    if not len(xs) or not len(ys):
        return empty
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    candidates = np.stack([gx.ravel(), gy.ravel()], axis=1)
    mask_h, mask_w = mask.shape[:2]
    scale_x, scale_y = mask_w / slide_w, mask_h / slide_h
    x0 = min(mask_w, max(0, round(x * scale_x)))
    y0 = min(mask_h, max(0, round(y * scale_y)))
    x1 = min(mask_w, max(0, round((x + w - 1) * scale_x) + 1))
    y1 = min(mask_h, max(0, round((y + h - 1) * scale_y) + 1))
    crop = contour_mask(contour, holes, mask, slide_dimensions, (x0, y0, x1, y1))
    return candidates, coverage(candidates, crop, tile_size_lv0, slide_dimensions, (mask_w, mask_h), (x0, y0))


def contour_mask(contour, holes, mask, slide_dimensions, bounds) -> np.ndarray:
    """The contour filled (less its holes, their one-pixel rims kept) and anded with the tissue, on
    the mask's crop ``bounds`` = (x0, y0, x1, y1)."""
    mask_h, mask_w = mask.shape[:2]
    scale_x, scale_y = mask_w / slide_dimensions[0], mask_h / slide_dimensions[1]
    x0, y0, x1, y1 = bounds
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    if out.size == 0:
        return out
    cv2.drawContours(out, [_to_mask(contour, scale_x, scale_y)], -1, 1, thickness=-1, offset=(-x0, -y0))
    if holes:
        scaled = [_to_mask(hole, scale_x, scale_y) for hole in holes]
        cv2.drawContours(out, scaled, -1, 0, thickness=-1, offset=(-x0, -y0))
        cv2.drawContours(out, scaled, -1, 1, thickness=1, offset=(-x0, -y0))
    return out * (mask[y0:y1, x0:x1] > 0).astype(np.uint8)


def kept_tissue(contours: Contours) -> np.ndarray:
    """The whole mask's tissue inside kept contours (the union of their `contour_mask`), 0 / 1."""
    if contours.kept_mask is None:
        mask = contours.mask
        union = np.zeros(mask.shape[:2], np.uint8)
        for contour, holes in zip(contours.contours, contours.holes):
            union |= contour_mask(contour, holes, mask, contours.slide_dimensions, (0, 0, mask.shape[1], mask.shape[0]))
        contours.kept_mask = union
    return contours.kept_mask


def coverage(candidates: np.ndarray, crop: np.ndarray, tile_size_lv0: int, slide_dimensions: tuple[int, int],
             mask_dimensions: tuple[int, int], origin: tuple[int, int]) -> np.ndarray:
    """Fraction of each tile's footprint on the mask that ``crop`` (a crop of it at ``origin``) covers.

    The footprint: the tile's origin projected with a floor, its side rounded
    (at least one pixel); outside the crop counts as glass.  float32, as hs2p.
    """
    if crop.size == 0 or not len(candidates):
        return np.zeros(len(candidates), np.float32)
    crop_h, crop_w = crop.shape[:2]
    mask_w, mask_h = mask_dimensions
    scale_x, scale_y = mask_w / slide_dimensions[0], mask_h / slide_dimensions[1]
    dtype = np.int32 if crop.size < 2**31 else np.int64   # exact counts, half hs2p's float64 memory
    integral = np.zeros((crop_h + 1, crop_w + 1), dtype)
    integral[1:, 1:] = np.cumsum(np.cumsum(crop > 0, axis=0, dtype=dtype), axis=1)
    tile_w = max(1, round(tile_size_lv0 * scale_x))
    tile_h = max(1, round(tile_size_lv0 * scale_y))
    ox = np.floor(candidates[:, 0].astype(np.float64) * scale_x).astype(np.int64) - origin[0]
    oy = np.floor(candidates[:, 1].astype(np.float64) * scale_y).astype(np.int64) - origin[1]
    x1, y1 = np.clip(ox, 0, crop_w), np.clip(oy, 0, crop_h)
    x2, y2 = np.clip(ox + tile_w, 0, crop_w), np.clip(oy + tile_h, 0, crop_h)
    total = (integral[y2, x2].astype(np.int64) - integral[y1, x2] - integral[y2, x1] + integral[y1, x1]).astype(np.float64)
    return np.clip((total / (tile_w * tile_h)).astype(np.float32), 0.0, 1.0)
