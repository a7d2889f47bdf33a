"""The libvips backend (``pip install 'slide2vec-dask[vips]'``): TIFF-family slides decoded by libvips.

The pyramid is the one OpenSlide sees, found by `tiff._level_pages` (the same
pages the tifffile backend reads); each level is opened as that page
(``tiffload page=`` or, for OME-TIFF, ``subifd=``) and a block is one
``Region.fetch`` of exactly the block's pixels in the level's own
coordinates, so no level is resampled.  Decode warnings are errors
(``fail_on="warning"``): a damaged tile is an `UnreadableSlideError` naming
file, level and tile, never a grey block.  Aperio's JPEG 2000 in YCbCr
(33003) is converted like the tifffile backend converts it.

pyvips-binary's libvips has no OpenSlide loader, so MRXS, NDPI, DICOM and
friends are not this backend's; `auto` prefers the tifffile backend for what
both read and picks this one only when no other reader is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from slide2vec_dask.slide import tiff
from slide2vec_dask.slide.base import UnreadableSlideError
from slide2vec_dask.slide.registry import ReaderSpec


_JPEG2000 = {33003, 33004, 33005, 34712}   # Aperio YCbCr / RGB, and plain JPEG 2000


class VipsReader:
    backend = "vips"

    def __init__(self, path: Path):
        import pyvips

        self.path = Path(path)
        with tifffile.TiffFile(path) as tif:
            pages, self.vendor, self.spacing_um = tiff.tiff_geometry(tif)
            base = pages[0]
            subifds = len(tif.pages.first.subifds or ())
            if base.is_ome and subifds and len(pages) == subifds + 1:
                where = [{"page": 0}] + [{"page": 0, "subifd": i} for i in range(subifds)]
            else:
                where = [{"page": page.index} for page in pages]
            self._ycbcr = [page.compression == tiff._APERIO_JP2K_YCBCR for page in pages]
            jp2k = sorted({page.compression for page in pages} & _JPEG2000)
            if jp2k and not pyvips.type_find("VipsForeign", "jp2kload"):
                raise UnreadableSlideError(
                    f"{path}: its tiles are JPEG 2000 (TIFF compression {jp2k[0]}) and this libvips is built "
                    "without JPEG 2000 support (pyvips-binary is); backend='tifffile' or 'openslide' reads it")
            self._tiles = [(page.chunks[0], page.chunks[1]) for page in pages]
            shapes = [(page.shape[0], page.shape[1]) for page in pages]
        self._images = [pyvips.Image.tiffload(str(path), access="random", fail_on="warning", **kw) for kw in where]
        got = [(im.height, im.width) for im in self._images]
        if got != shapes:
            raise UnreadableSlideError(f"{path}: libvips finds levels {got} where the TIFF holds {shapes}; "
                                       "backend='tifffile' or 'openslide' reads it")
        self.level_shapes = shapes
        h0, w0 = shapes[0]
        self.level_downsamples = [((h0 / h) + (w0 / w)) / 2 for h, w in shapes]

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        import pyvips

        image = self._images[level]
        try:
            data = pyvips.Region.new(image).fetch(x, y, width, height)
        except pyvips.Error as exc:
            th, tw = self._tiles[level]
            raise UnreadableSlideError(
                f"{self.path}: libvips cannot decode level {level}, tile column {x // tw}-{(x + width - 1) // tw}, "
                f"row {y // th}-{(y + height - 1) // th} ({tw}x{th} px tiles): {str(exc).strip()}; "
                "the file is damaged there"
            ) from exc
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, image.bands)
        if image.bands == 1:
            return np.repeat(pixels, 3, axis=-1)
        if self._ycbcr[level]:
            return tiff._ycbcr_to_rgb(pixels)
        return np.ascontiguousarray(pixels[..., :3])

    def close(self) -> None:
        self._images = []


def _claims(probe) -> int:
    import pyvips

    tif = probe.tiff
    if tif is None or not tiff.TiffReader.reads_natively(tif):
        return 0
    if tif.pages.first.compression in _JPEG2000 and not pyvips.type_find("VipsForeign", "jp2kload"):
        return 0
    return 20


def _open(path: Path) -> VipsReader:
    import pyvips

    try:
        return VipsReader(path)
    except UnreadableSlideError:
        raise
    except (pyvips.Error, Exception) as exc:   # noqa: BLE001 - tifffile or libvips cannot parse it
        raise UnreadableSlideError(f"{path}: libvips cannot read it as a TIFF slide ({type(exc).__name__}: "
                                   f"{str(exc).strip()}); is the file complete? backend='openslide' may read "
                                   "other formats") from exc


READER = ReaderSpec(
    name="vips", requires="pyvips", install="pip install 'slide2vec-dask[vips]'  (pyvips + pyvips-binary)",
    claims=_claims, open=_open, formats="SVS, generic tiled TIFF, OME-TIFF (libvips' tiffload)",
)
