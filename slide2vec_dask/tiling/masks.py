"""Tissue masks as hs2p 6.1.0 (slide2vec's tiler) makes them: computed, or read from a file.

The mask is made on the pyramid level whose downsample is nearest
``segmentation["downsample"]`` (the whole level, as hs2p reads it), with
OpenCV's own colour conversion, median blur and morphology, so every pixel of
it is hs2p's:

* ``hsv``: OpenCV's HSV gate ``90 <= H <= 180``, ``8 <= S``, ``103 <= V``
  (H in OpenCV's 0..180 units; hs2p's bounds, which ``sthresh`` does not move);
* ``otsu``: saturation, median-blurred by ``mthresh`` (0 or 1: not blurred), above Otsu's threshold;
* ``threshold``: saturation, median-blurred by ``mthresh``, above ``sthresh``;

each then closed with a ``close`` x ``close`` square (OpenCV's ``MORPH_CLOSE``).
Tissue pixels hold ``sthresh_up`` (255 by default), glass 0.  The level is read
in strips, so only the mask (1 byte a pixel) is held whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from slide2vec_dask.slide import plain_image
from slide2vec_dask.slide.remote import RemoteFile, RemotePath, location

HSV_LOWER = np.array((90, 8, 103))     # hs2p's `_segment_hsv` bounds (OpenCV units: H 0..180, S and V 0..255)
HSV_UPPER = np.array((180, 255, 255))
SEG_MAX_PIXELS = 1 << 28               # the segmentation level's size in pixels (a mask byte each) we accept
STRIP_PIXELS = 1 << 24                 # RGB pixels read at a time while segmenting


def seg_level(level_downsamples: list[float], downsample: float) -> int:
    """The level whose downsample is nearest ``downsample`` (hs2p's `select_level_for_downsample`)."""
    return int(np.argmin([abs(float(d) - float(downsample)) for d in level_downsamples]))


def segment_tissue(image: np.ndarray, segmentation: Mapping[str, Any]) -> np.ndarray:
    """uint8 tissue mask (``sthresh_up`` / 0) of an RGB image, exactly as hs2p's `segment_tissue_image`."""
    return close_mask(gate(np.ascontiguousarray(image[..., :3]), segmentation), segmentation)


def gate(image: np.ndarray, segmentation: Mapping[str, Any]) -> np.ndarray:
    """The per-pixel part: hsv's mask, or the (median-blurred) saturation the other methods threshold."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    if segmentation["method"] == "hsv":
        mask = cv2.inRange(hsv, HSV_LOWER, HSV_UPPER)
        up = int(segmentation["sthresh_up"])
        return mask if up == 255 else np.where(mask > 0, up, 0).astype(np.uint8)
    saturation = np.ascontiguousarray(hsv[:, :, 1])
    size = int(segmentation["mthresh"])
    return cv2.medianBlur(saturation, size) if size > 1 else saturation


def threshold(values: np.ndarray, segmentation: Mapping[str, Any]) -> np.ndarray:
    """otsu / threshold: the blurred saturation made a mask (hsv's gate is one already)."""
    method, up = segmentation["method"], int(segmentation["sthresh_up"])
    if method == "hsv":
        return values
    if method == "otsu":
        _, mask = cv2.threshold(values, 0, up, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, mask = cv2.threshold(values, int(segmentation["sthresh"]), up, cv2.THRESH_BINARY)
    return mask


def close_mask(mask: np.ndarray, segmentation: Mapping[str, Any]) -> np.ndarray:
    mask = threshold(mask, segmentation)
    size = int(segmentation["close"])
    if size > 0:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((size, size), np.uint8))
    return mask.astype(np.uint8, copy=False)


def segment_level(slide, level: int, segmentation: Mapping[str, Any], sample: str = "") -> np.ndarray:
    """The tissue mask of a whole pyramid level, read strip by strip (each strip with the median's
    margin, so the blur sees what it would on the whole level)."""
    height, width = slide.level_shapes[level]
    check_budget(slide, level, sample)
    margin = max(0, int(segmentation["mthresh"]) // 2) if segmentation["method"] != "hsv" else 0
    rows = max(1, STRIP_PIXELS // max(width, 1))
    out = np.empty((height, width), np.uint8)
    for y in range(0, height, rows):
        y0, y1 = max(0, y - margin), min(height, y + rows + margin)
        strip = gate(slide.read_level(level, y0, 0, y1 - y0, width), segmentation)
        out[y : min(height, y + rows)] = strip[y - y0 : y - y0 + min(rows, height - y)]
    return close_mask(out, segmentation)


def check_budget(slide, level: int, sample: str = "") -> None:
    """Refuse a segmentation level over `SEG_MAX_PIXELS` before allocating its mask (the size comes
    from the file's header, which may be wrong or hostile)."""
    height, width = slide.level_shapes[level]
    if height * width > SEG_MAX_PIXELS:
        raise ValueError(
            f"{sample or slide.path}: segmentation reads level {level} whole ({width} x {height} px), over "
            f"the budget of {SEG_MAX_PIXELS} px; the slide has no level nearer segmentation['downsample'] "
            "(as hs2p, the level nearest it is read): give the slide a pyramid, a tissue mask file, or raise "
            "segmentation['downsample'] if a coarser level exists")


def read_mask_file(path: str | Path, shape: tuple[int, int], sample: str = "") -> np.ndarray:
    """A user's label TIFF, PNG or JPEG (any resolution, tissue > 0) resampled to ``shape``, as a 255 / 0 mask.

    The file is assumed to cover the whole slide; its coarsest level that is
    still at least ``shape`` is read, then nearest-neighbour resampled.
    """
    import tifffile

    path = location(path)
    if isinstance(path, RemotePath):   # read in place: its header, then the one level it needs
        handle = RemoteFile(path).handle()
    elif not path.exists():
        raise FileNotFoundError(f"{sample or 'slide'}: mask file not found: {path}")
    else:
        handle = path
    try:
        if plain_image.image_format(handle):   # a PNG / JPEG label image
            labels = plain_image.read_labels(handle)
        else:
            with tifffile.TiffFile(handle) as tif:
                levels = tif.series[0].levels
                fitting = [lv for lv in levels if lv.shape[0] >= shape[0] and lv.shape[1] >= shape[1]]
                labels = (fitting[-1] if fitting else levels[0]).asarray()
    except Exception as exc:
        raise ValueError(f"{sample or 'slide'}: cannot read mask file {path} as a label TIFF, PNG or JPEG "
                         f"({exc})") from exc
    if labels.ndim == 3:  # (H, W, C) label images: any non-zero channel is tissue
        labels = labels.max(axis=-1)
    rows = (np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]
    cols = (np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]
    return np.where(labels[rows.astype(np.int64)][:, cols.astype(np.int64)] > 0, 255, 0).astype(np.uint8)
