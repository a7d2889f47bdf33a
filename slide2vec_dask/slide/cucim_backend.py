"""The cuCIM backend (``pip install 'slide2vec-dask[cucim]'``, i.e. ``cucim-cu12``): TIFF-family slides.

cuCIM's ``CuImage.read_region`` decodes on the CPU (its loader needs no GPU;
the full ``cucim-cu12`` install pulls CUDA wheels that are several GB).  It
takes a level-0 origin and reads the level from ``floor(x0 / downsample)``
with its float32 downsample, without resampling; so the origin asked for is
the level-0 point nearest the *middle* of the wanted level pixel, which maps
back to that pixel whatever the rounding.  The level geometry must be the one
OpenSlide sees (`tiff._level_pages`); where cuCIM's own pyramid differs, it
refuses and names the backends that read the file.  Spacing and vendor come
from the TIFF tags, as for the tifffile backend.  cuCIM converts Aperio's
JPEG 2000 YCbCr (33003) to RGB itself.

One thing it cannot do: report a damaged tile.  cuCIM prints libjpeg's
message to stdout and returns the tile's pixels undefined; nothing reaches
Python, so this backend cannot raise `UnreadableSlideError` for it.  Use
tifffile or OpenSlide on slides that may be damaged.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile

from slide2vec_dask.slide import tiff
from slide2vec_dask.slide.base import UnreadableSlideError
from slide2vec_dask.slide.registry import ReaderSpec


class CuCIMReader:
    backend = "cucim"

    def __init__(self, path: Path):
        from cucim import CuImage

        self.path = Path(path)
        with tifffile.TiffFile(path) as tif:
            pages, self.vendor, self.spacing_um = tiff.tiff_geometry(tif)
            shapes = [(page.shape[0], page.shape[1]) for page in pages]
        self._image = CuImage(str(path))
        res = self._image.resolutions
        got = [(h, w) for w, h in res["level_dimensions"]]
        if got != shapes:
            raise UnreadableSlideError(f"{path}: cuCIM finds levels {got} where the file's pyramid (OpenSlide's pages, OME SubIFDs) is {shapes}; "
                                       "backend='tifffile' or 'openslide' reads it")
        self._cucim_downsamples = [float(d) for d in res["level_downsamples"]]
        self._tiles = [(th, tw) for tw, th in res["level_tile_sizes"]]
        self.level_shapes = shapes
        h0, w0 = shapes[0]
        self.level_downsamples = [((h0 / h) + (w0 / w)) / 2 for h, w in shapes]

    def _origin(self, level: int, v: int) -> int:
        ds = self._cucim_downsamples[level]
        return v * int(ds) if ds.is_integer() else int(math.floor((v + 0.5) * ds + 0.5))

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        origin = (self._origin(level, x), self._origin(level, y))
        try:
            pixels = np.asarray(self._image.read_region(origin, (width, height), level=level))
        except Exception as exc:   # noqa: BLE001 - cuCIM raises RuntimeError/ValueError without a type of its own
            th, tw = self._tiles[level]
            raise UnreadableSlideError(
                f"{self.path}: cuCIM cannot decode level {level}, tile column {x // tw}-{(x + width - 1) // tw}, "
                f"row {y // th}-{(y + height - 1) // th} ({tw}x{th} px tiles): {exc}; the file is damaged there"
            ) from exc
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.shape[-1] == 1:
            return np.repeat(pixels, 3, axis=-1)
        return np.ascontiguousarray(pixels[..., :3])

    def close(self) -> None:
        self._image.close()


def _claims(probe) -> int:
    tif = probe.tiff
    return 10 if tif is not None and tif.pages.first.is_tiled and tiff.TiffReader.reads_natively(tif) else 0


def _open(path: Path) -> CuCIMReader:
    try:
        return CuCIMReader(path)
    except UnreadableSlideError:
        raise
    except Exception as exc:   # noqa: BLE001
        raise UnreadableSlideError(f"{path}: cuCIM cannot read it ({type(exc).__name__}: {exc}); "
                                   "backend='tifffile' or 'openslide' may") from exc


READER = ReaderSpec(
    name="cucim", requires="cucim",
    install="pip install 'slide2vec-dask[cucim]'  (cucim-cu12; Linux x86-64/aarch64, CUDA 12 wheels)",
    claims=_claims, open=_open, formats="SVS, generic tiled TIFF (cuCIM's cuslide)",
)
