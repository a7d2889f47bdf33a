"""The OpenSlide backend: every format OpenSlide reads (MRXS, NDPI, DICOM, SCN, ...).

Two things OpenSlide does that a block reader must not inherit:

* ``read_region`` takes level-0 coordinates and paints the level at
  ``x0 / downsample``.  On a level whose downsample is not a whole number
  (Aperio's levels of a slide whose size the factor does not divide, DICOM,
  NDPI) that origin falls between the level's pixels for almost every block,
  and cairo resamples the block: a seam at every block edge, tens of grey
  levels off.  No integer level-0 origin avoids it in general.  So on such a
  level, where the file is a TIFF whose pages are OpenSlide's levels
  (Aperio, generic TIFF), blocks are decoded from that page's own tiles;
  those are the pixels OpenSlide itself paints at the level's origin.  Where
  no such route exists the reads stay OpenSlide's and a warning says so.
* A failed decode leaves the handle in a sticky error state: every later read
  fails too.  A failed read is retried once on a fresh handle (the failure
  may have been another thread's), and if it fails again it becomes an
  `UnreadableSlideError` naming the file, level and tiles; the handle is
  fresh either way.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import tifffile

from slide2vec_dask.slide import tiff
from slide2vec_dask.slide.base import UnreadableSlideError, usable_spacing
from slide2vec_dask.slide.registry import ReaderSpec

log = logging.getLogger(__name__)

# OpenSlide vendors whose levels are plain tiled TIFF pages that tifffile decodes.
_TIFF_VENDORS = ("aperio", "generic-tiff")


class OpenSlideReader:
    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        self.path = Path(path)
        self._lock = threading.Lock()
        self._osr = openslide.OpenSlide(str(path))
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor", "unknown")
        self.level_shapes = [(h, w) for w, h in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.spacing_um = _spacing(props)
        self._tile_sizes = [(int(props.get(f"openslide.level[{i}].tile-height", 0)),
                             int(props.get(f"openslide.level[{i}].tile-width", 0)))
                            for i in range(len(self.level_shapes))]
        inexact = [i for i, d in enumerate(self.level_downsamples) if not d.is_integer()]
        self._pages = self._level_pages(inexact) if inexact else None
        if inexact and self._pages is None:
            log.warning("%s: level(s) %s have non-integer downsamples (%s); OpenSlide resamples blocks read "
                        "there by a fraction of a pixel, so their pixels differ slightly from the level's own",
                        path, inexact, ", ".join(f"{self.level_downsamples[i]:.5f}" for i in inexact))

    def _level_pages(self, levels: list[int]):
        """The level pages of the same file through tifffile, when they are OpenSlide's levels exactly."""
        if self.vendor not in _TIFF_VENDORS:
            return None
        try:
            pages = tiff.TiffReader(self.path)
        except Exception:   # noqa: BLE001 - no such route; OpenSlide's reads stay
            return None
        if pages.level_shapes != self.level_shapes:
            pages.close()
            return None
        return pages

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        if self._pages is not None and not ds.is_integer():
            return self._pages.read(level, y, x, height, width)
        rgba = self._read_region((round(x * ds), round(y * ds)), level, (width, height), (y, x))
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        # Transparent pixels (outside scanned areas) become white glass.
        a = alpha.astype(np.uint16)
        return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)

    def _read_region(self, origin, level, size, level_origin) -> np.ndarray:
        import openslide

        osr = self._osr
        try:
            return np.asarray(osr.read_region(origin, level, size))
        except openslide.OpenSlideError:
            self._fresh_handle(osr)
        try:   # the error may have been left by another read of the shared handle
            return np.asarray(self._osr.read_region(origin, level, size))
        except openslide.OpenSlideError as exc:
            self._fresh_handle(self._osr)
            raise UnreadableSlideError(
                f"{self.path}: OpenSlide cannot decode level {level}, {self._tiles(level, level_origin, size)} "
                f"({exc}); the file is damaged there"
            ) from exc

    def _tiles(self, level: int, level_origin, size) -> str:
        (y, x), (w, h) = level_origin, size
        th, tw = self._tile_sizes[level]
        if not th or not tw:
            return f"region x={x}, y={y}, {w}x{h} px"
        cols = f"{x // tw}" if x // tw == (x + w - 1) // tw else f"{x // tw}-{(x + w - 1) // tw}"
        rows = f"{y // th}" if y // th == (y + h - 1) // th else f"{y // th}-{(y + h - 1) // th}"
        return f"tile column {cols}, row {rows} ({tw}x{th} px tiles)"

    def _fresh_handle(self, failed) -> None:
        """Replace a handle OpenSlide has put in its sticky error state (once per failure)."""
        import openslide

        with self._lock:
            if self._osr is failed:
                self._osr = openslide.OpenSlide(str(self.path))   # the old one closes when its last reader drops it

    def close(self) -> None:
        self._osr.close()
        if self._pages is not None:
            self._pages.close()


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


def _claims(probe) -> int:
    return 50 if probe.openslide_format else 0


def _open(path: Path) -> OpenSlideReader:
    import openslide

    try:
        return OpenSlideReader(path)
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
        raise UnreadableSlideError(f"{path}: not a readable whole-slide image (OpenSlide: {exc}). "
                                   f"{_hint(path)}") from exc


def _hint(path: Path) -> str:
    try:
        with tifffile.TiffFile(path) as tif:
            stripped = not tif.pages.first.is_tiled
    except Exception:   # noqa: BLE001 - not a TIFF
        stripped = False
    if stripped:
        return ("It is a TIFF stored in strips, which OpenSlide does not read; backend='tifffile' "
                "(or 'auto') reads it.")
    return "Check that the file is complete and in a slide format (SVS, TIFF, NDPI, MRXS, DICOM, ...)."


READER = ReaderSpec(
    name="openslide", requires="openslide", install="pip install openslide-python openslide-bin",
    claims=_claims, open=_open,
    formats="everything OpenSlide reads: SVS, tiled TIFF, NDPI, MRXS, SCN, BIF, VMS, DICOM WSI, ...",
)
