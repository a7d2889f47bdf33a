"""The OpenSlide backend: every format OpenSlide reads (MRXS, NDPI, DICOM, SCN, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slide2vec_dask.slide.base import usable_spacing


class OpenSlideReader:
    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.level_shapes = [(h, w) for w, h in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.spacing_um = _spacing(props)

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        rgba = np.asarray(self._osr.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        # Transparent pixels (outside scanned areas) become white glass.
        a = alpha.astype(np.uint16)
        return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        self._osr.close()


def _spacing(props) -> float | None:
    mpp = props.get("openslide.mpp-x")
    if mpp:
        return usable_spacing(float(mpp))   # OpenSlide turns a 25.4 dpi placeholder into mpp 1000
    unit, xres = props.get("tiff.ResolutionUnit"), props.get("tiff.XResolution")
    if unit and xres:
        per = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        if per and float(xres) > 0:
            return usable_spacing(per / float(xres))
    return None
