"""Tissue masks at the segmentation downsample: computed, or read from a file.

All methods run on a small thumbnail, so segmentation never decodes level 0
of a pyramidal slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def segment_tissue(thumbnail: np.ndarray, segmentation: Mapping[str, Any]) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    ``hsv``: saturation above ``sthresh`` (glass is grey, stain is coloured);
    ``otsu``: saturation above its Otsu threshold (adapts to faint stains);
    ``threshold``: grey level below ``threshold`` (anything darker than glass).
    """
    from scipy import ndimage

    method = segmentation["method"]
    if method == "threshold":
        grey = thumbnail.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        mask = grey < segmentation["threshold"]
    else:
        sat = _saturation(thumbnail)
        if segmentation["mthresh"] and min(sat.shape) > 1:
            sat = ndimage.median_filter(sat, size=int(segmentation["mthresh"]))
        cut = otsu_threshold(sat) if method == "otsu" else segmentation["sthresh"]
        mask = sat > cut
    if segmentation["close"] and mask.any():
        structure = np.ones((int(segmentation["close"]),) * 2, dtype=bool)
        mask = ndimage.binary_closing(mask, structure=structure, border_value=0) | mask
    return mask


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255 (as PIL and OpenCV define it)."""
    mx = rgb.max(axis=-1).astype(np.int32)
    mn = rgb.min(axis=-1).astype(np.int32)
    return np.where(mx > 0, (255 * (mx - mn) + mx // 2) // np.maximum(mx, 1), 0).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a uint8 image: the cut that maximises between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between))


def read_mask_file(path: str | Path, shape: tuple[int, int], sample: str = "") -> np.ndarray:
    """A user's label TIFF (any resolution, tissue > 0) resampled to ``shape``.

    The file is assumed to cover the whole slide; its coarsest level that is
    still at least ``shape`` is read, then nearest-neighbour resampled.
    """
    import tifffile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{sample or 'slide'}: mask file not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            levels = tif.series[0].levels
            fitting = [lv for lv in levels if lv.shape[0] >= shape[0] and lv.shape[1] >= shape[1]]
            labels = (fitting[-1] if fitting else levels[0]).asarray()
    except Exception as exc:
        raise ValueError(f"{sample or 'slide'}: cannot read mask file {path} as a label TIFF ({exc})") from exc
    if labels.ndim == 3:  # (H, W, C) label images: any non-zero channel is tissue
        labels = labels.max(axis=-1)
    rows = (np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]
    cols = (np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]
    return labels[rows.astype(np.int64)][:, cols.astype(np.int64)] > 0


def drop_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Remove connected tissue pieces smaller than ``min_pixels`` mask pixels (dust, debris)."""
    from scipy import ndimage

    if min_pixels <= 0 or not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]
