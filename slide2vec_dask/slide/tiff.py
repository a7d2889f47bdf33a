"""The tifffile backend: SVS, generic tiled TIFF and OME-TIFF.

Pixels are decoded from the file's own tiles: a region's tile byte ranges are
read with ``os.pread`` (thread-safe, no shared file position) and decoded by
tifffile's per-page decoder (imagecodecs underneath).  A slide at a URL is read
the same way through `remote.RemoteFile`: its header once, through a block cache,
and a block's tiles as a few coalesced range requests (`_source`).  We deliberately do not
go through ``zarr.open(tif.aszarr())`` on this hot path: measured here it
halves decode throughput and does not scale with threads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from slide2vec_dask.slide import remote
from slide2vec_dask.slide.base import UnreadableSlideError, usable_spacing
from slide2vec_dask.slide.registry import ReaderSpec

log = logging.getLogger(__name__)

# Vendor TIFF dialects whose geometry or colour tifffile does not give us as
# plain tiles; OpenSlide handles them (auto picks it for these).
_OPENSLIDE_DIALECTS = ("is_ndpi", "is_scn", "is_philips", "is_bif")
_UM_PER_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3}


@dataclass
class _Level:
    page: tifffile.TiffPage
    seg_h: int
    seg_w: int
    cols: int
    offsets: tuple
    counts: tuple


class TiffReader:
    backend = "tifffile"

    def __init__(self, path: Path | remote.RemotePath):
        self.path = path
        self._bytes = _source(path)
        try:
            self._tif = tifffile.TiffFile(self._bytes.handle())
        except Exception:
            self._bytes.close()
            self._bytes.check()   # the server's failure, if that is what broke the parse
            raise
        try:
            if isinstance(path, remote.RemotePath):
                _check_remote_dialect(self._tif, path)
            series = self._tif.series[0]
            page0 = series.keyframe
            if page0.dtype != np.uint8 or page0.samplesperpixel not in (1, 3, 4) or page0.planarconfig != 1:
                raise ValueError(
                    f"tifffile backend reads 8-bit interleaved RGB(A)/grey images; this one is "
                    f"{page0.dtype}, {page0.samplesperpixel} samples, planar config {page0.planarconfig}"
                )
            self._levels = [self._level(page) for page in _level_pages(self._tif, series)]
            self._bytes.check()   # a read tifffile's parser swallowed (a server gone) is that error, not damage
            _check_geometry(self._tif, self._levels, self._bytes.size)
            self.vendor, self.spacing_um = tiff_vendor(page0), _spacing(self._tif, page0)
        except Exception:
            self._tif.close()
            self._bytes.close()
            self._bytes.check()
            raise
        # A reader dropped from the open-slide cache closes its file when it is freed.
        self._closer = weakref.finalize(self, _close_both, self._bytes, self._tif)
        self.level_shapes = [(lv.page.shape[0], lv.page.shape[1]) for lv in self._levels]
        big = [i for i, lv in enumerate(self._levels) if not lv.page.is_tiled and lv.seg_h * lv.seg_w > 1 << 24]
        if big:
            log.warning("%s: level(s) %s are stored in strips of over 16 MP; every block read decodes whole "
                        "strips, so reading is slow (re-save the slide as a tiled TIFF to avoid this)", path, big)
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = [((h0 / h) + (w0 / w)) / 2 for h, w in self.level_shapes]

    @staticmethod
    def reads_natively(tif: tifffile.TiffFile) -> bool:
        """Whether `auto` should pick this backend for an already-open file."""
        page = tif.pages.first
        if any(getattr(page, flag, False) for flag in _OPENSLIDE_DIALECTS):
            return False
        # Tiles, or strips (a plain TIFF image: OpenSlide reads no strips at all).
        return page.dtype == np.uint8 and page.planarconfig == 1 and page.samplesperpixel in (1, 3, 4)

    @staticmethod
    def _level(page: tifffile.TiffPage) -> _Level:
        seg_h, seg_w = page.chunks[0], page.chunks[1]
        return _Level(page, seg_h, seg_w, page.chunked[1], page.dataoffsets, page.databytecounts)

    skips_unneeded = True   # read / read_scaled take ``needed``: tiles no needed rectangle touches stay white

    def read(self, level: int, y: int, x: int, height: int, width: int, needed=None) -> np.ndarray:
        lv = self._levels[level]
        out = np.empty((height, width, 3), dtype=np.uint8)
        skip = _unneeded(needed, lv.seg_h, lv.seg_w)
        rows = range(y // lv.seg_h, (y + height - 1) // lv.seg_h + 1)
        cols = range(x // lv.seg_w, (x + width - 1) // lv.seg_w + 1)
        wanted = [r * lv.cols + c for r in rows for c in cols if not skip(r, c)]
        with self._bytes.planned(_ranges(lv, wanted)):   # remote: the block's tiles in few requests
            for row in rows:
                for col in cols:
                    sy, sx = row * lv.seg_h, col * lv.seg_w
                    if skip(row, col):
                        out[max(y, sy) - y : sy + lv.seg_h - y, max(x, sx) - x : sx + lv.seg_w - x] = 255
                        continue
                    ty0, tx0 = max(y, sy), max(x, sx)
                    ty1, tx1 = min(y + height, sy + lv.seg_h), min(x + width, sx + lv.seg_w)
                    seg = self._segment(lv, row * lv.cols + col, level)
                    out[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = seg[ty0 - sy : ty1 - sy, tx0 - sx : tx1 - sx]
        return out

    def decode_scales(self, level: int) -> tuple[int, ...]:
        """The reduced scales (2, 4, 8) this level's codec decodes at directly, largest first.

        JPEG: libjpeg's scaled IDCT (an 8x8 block becomes 4x4, 2x2 or 1x1).  JPEG 2000: a
        reduced resolution of the wavelet pyramid (OpenJPEG's ``reduce``).  Every other
        codec (none, LZW, deflate, WebP, ...) decodes in full only: ``()``.  A scale must
        divide the tile size, so reduced tiles tile the reduced level exactly.
        """
        lv = self._levels[level]
        page = lv.page
        if page.compression == 7 and page.photometric in (1, 2, 6) and page.samplesperpixel in (1, 3):
            scales = (8, 4, 2)
        elif page.compression in _JP2K_CODECS and page.samplesperpixel in (1, 3):
            scales = (8, 4, 2)
        else:
            return ()
        return tuple(s for s in scales if lv.seg_h % s == 0 and lv.seg_w % s == 0)

    def read_scaled(self, level: int, y: int, x: int, height: int, width: int, scale: int,
                    needed=None) -> np.ndarray:
        """RGB ``(ceil(height / scale), ceil(width / scale), 3)``: the region decoded at 1/``scale``.

        Each tile is decoded straight at the reduced scale (`decode_scales`), never in full;
        ``y`` and ``x`` must be multiples of ``scale`` so the reduced tiles' pixels line up.
        ``needed`` (as for `read`) in level pixels.
        """
        if scale not in self.decode_scales(level) or y % scale or x % scale:
            raise ValueError(f"{self.path}: level {level} cannot be decoded at 1/{scale} from ({y}, {x})")
        lv = self._levels[level]
        th, tw = lv.seg_h // scale, lv.seg_w // scale
        ry, rx = y // scale, x // scale
        rh, rw = -(-height // scale), -(-width // scale)
        out = np.empty((rh, rw, 3), dtype=np.uint8)
        skip = _unneeded(needed, lv.seg_h, lv.seg_w)
        rows = range(ry // th, (ry + rh - 1) // th + 1)
        cols = range(rx // tw, (rx + rw - 1) // tw + 1)
        wanted = [r * lv.cols + c for r in rows for c in cols if not skip(r, c)]
        with self._bytes.planned(_ranges(lv, wanted)):   # remote: the block's tiles in few requests
            for row in rows:
                for col in cols:
                    sy, sx = row * th, col * tw
                    if skip(row, col):
                        out[max(ry, sy) - ry : sy + th - ry, max(rx, sx) - rx : sx + tw - rx] = 255
                        continue
                    ty0, tx0 = max(ry, sy), max(rx, sx)
                    ty1, tx1 = min(ry + rh, sy + th), min(rx + rw, sx + tw)
                    seg = self._scaled_segment(lv, row * lv.cols + col, level, scale)
                    out[ty0 - ry : ty1 - ry, tx0 - rx : tx1 - rx] = seg[ty0 - sy : ty1 - sy, tx0 - sx : tx1 - sx]
        return out

    def _scaled_segment(self, lv: _Level, index: int, level: int, scale: int) -> np.ndarray:
        """One tile decoded at 1/``scale`` (``(seg_h / scale, seg_w / scale, 3)``)."""
        th, tw = lv.seg_h // scale, lv.seg_w // scale
        count = lv.counts[index]
        if count == 0:
            return np.full((th, tw, 3), 255, dtype=np.uint8)
        data = self._bytes.pread(count, lv.offsets[index])
        page = lv.page
        try:
            if page.compression == 7:
                seg = decode_jpeg_scaled(data, page.jpegtables, page.photometric, scale, (lv.seg_w, lv.seg_h))
            else:
                seg = decode_jp2k_reduced(data, scale, (lv.seg_w, lv.seg_h))
                if page.compression == _APERIO_JP2K_YCBCR:
                    seg = _ycbcr_to_rgb(seg)
            if seg.ndim == 2:
                seg = np.repeat(seg[..., None], 3, axis=-1)
            if seg.shape != (th, tw, 3):
                raise ValueError(f"decoded at 1/{scale} to {seg.shape[1]} x {seg.shape[0]} px, not {tw} x {th}")
        except Exception as exc:
            raise UnreadableSlideError(f"{self.path}: level {level}, tile {index} (column {index % lv.cols}, row "
                                       f"{index // lv.cols}; page {page.index}) cannot be decoded at 1/{scale} "
                                       f"({type(exc).__name__}: {exc}); the file is damaged there") from exc
        return seg[..., :3]

    def read_reduced(self, level: int, scale: int) -> np.ndarray | None:
        """The whole level at 1/``scale`` (2, 4 or 8) straight from the codec's reduced decode, or None.

        A thumbnail of a single-level slide would otherwise decode every pixel of
        level 0; decoding each JPEG tile at 1/8 is ~5x faster (0.09 vs 0.45 ms a
        240 px tile here) and close to an area average (mean difference 0.1 grey
        level on CMU-1).  None when the level's codec cannot (`decode_scales`) or a
        tile will not decode so: the caller then decodes in full (and says what is wrong).
        """
        if self._levels[level].page.compression != 7 or scale not in self.decode_scales(level):
            return None
        h, w = self.level_shapes[level]
        try:
            return self.read_scaled(level, 0, 0, h, w, scale)   # (remote: its tiles in few large requests)
        except UnreadableSlideError:
            return None

    def _segment(self, lv: _Level, index: int, level: int) -> np.ndarray:
        count = lv.counts[index]
        if count == 0:  # sparse file: a tile that was never written is background
            return np.full((lv.seg_h, lv.seg_w, 3), 255, dtype=np.uint8)
        data = self._bytes.pread(count, lv.offsets[index])
        try:
            seg = lv.page.decode(data, index, jpegtables=lv.page.jpegtables)[0]
        except Exception as exc:
            raise UnreadableSlideError(f"{self.path}: level {level}, tile {index} (column {index % lv.cols}, row "
                                       f"{index // lv.cols}; page {lv.page.index}) cannot be decoded "
                                       f"({type(exc).__name__}: {exc}); the file is damaged there") from exc
        seg = seg.reshape(seg.shape[-3:])
        if seg.shape[-1] == 1:
            return np.repeat(seg, 3, axis=-1)
        if lv.page.compression == _APERIO_JP2K_YCBCR:
            return _ycbcr_to_rgb(seg)
        return seg[..., :3]

    def is_current(self) -> bool:
        """Whether the file is still the one parsed (at a URL: the store's size and version tag)."""
        return self._bytes.is_current()

    def close(self) -> None:
        self._closer()


def _unneeded(needed, seg_h: int, seg_w: int):
    """``skip(row, col)``: whether no rectangle of ``needed`` touches that tile of the file.

    ``needed``: ``(n, 4)`` level-pixel ``(y0, x0, y1, x1)`` rectangles (a block's tissue tiles), or
    None (every tile).  A block at the edge of the tissue then decodes only the file tiles under
    its tissue tiles (on a sparse slide a third of the tiles it read were never cut).
    """
    if needed is None:
        return lambda row, col: False
    rects = np.asarray(needed, dtype=np.int64).reshape(-1, 4)
    marked = set()
    for y0, x0, y1, x1 in rects:
        for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
            for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                marked.add((row, col))
    return lambda row, col: (row, col) not in marked


def _close_both(source, tif: tifffile.TiffFile) -> None:
    source.close()
    tif.close()


class _LocalFile:
    """A local file read with ``os.pread``: the same interface as `remote.RemoteFile`, nothing planned."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def pread(self, count: int, offset: int) -> bytes:
        return os.pread(self._fd, count, offset)

    def planned(self, ranges):
        return contextlib.nullcontext()

    def handle(self) -> Path:
        return self.path

    def check(self) -> None:
        pass

    def is_current(self) -> bool:
        return True   # a local file's identity is in the open-slide cache's key (size, mtime)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _source(path):
    return remote.RemoteFile(path) if isinstance(path, remote.RemotePath) else _LocalFile(path)


def _ranges(lv: _Level, indices: list[int]) -> list[tuple[int, int]]:
    return [(lv.offsets[i], lv.counts[i]) for i in indices]


def _check_geometry(tif: tifffile.TiffFile, levels: list[_Level], size: int) -> None:
    """Refuse a file whose header does not fit its contents, before any size it declares is used.

    A level's declared width and height must need exactly the tiles (strips) the file lists:
    a header claiming 10^6 x 10^6 px over 4 real tiles would otherwise size a 43.7 GiB
    thumbnail.  Every tile must lie within the file, and so must the next image directory
    (a file cut after its last level still parses, with its later pages silently gone).
    """
    for i, lv in enumerate(levels):
        page, listed = lv.page, len(lv.offsets)
        needed = int(np.prod(page.chunked, dtype=np.int64))
        if listed != needed or len(lv.counts) != listed:
            h, w = page.shape[:2]
            raise ValueError(f"level {i} (page {page.index}) declares {w} x {h} px, which takes {needed} "
                             f"tiles of {lv.seg_w} x {lv.seg_h}, but the file lists {listed} tiles: "
                             "its header is corrupt")
        end = max((o + c for o, c in zip(lv.offsets, lv.counts)), default=0)
        if end > size:
            raise ValueError(f"level {i} needs {end} bytes but the file has {size}: it is truncated")
    following = _next_ifd(tif)
    if following >= size:
        raise ValueError(f"its last image directory points to byte {following}, past its end ({size} bytes): "
                         "it is truncated")


def _next_ifd(tif: tifffile.TiffFile) -> int:
    """Where the last page says the next image directory is (0: nowhere, the chain ends)."""
    where = tif.pages.next_page_offset
    if where is None:
        return 0
    fh = tif.filehandle
    fh.seek(where)
    data = fh.read(tif.tiff.offsetsize)
    if len(data) < tif.tiff.offsetsize:   # the pointer itself is cut off
        return fh.size + 1
    return int(struct.unpack(tif.tiff.offsetformat, data)[0])


def tiff_vendor(page: tifffile.TiffPage) -> str:
    """What wrote the TIFF, as the readers name it."""
    return "aperio" if page.is_svs else "ome-tiff" if page.is_ome else "generic-tiff"


def tiff_geometry(tif: tifffile.TiffFile) -> tuple[list[tifffile.TiffPage], str, float | None]:
    """The pyramid's pages (as OpenSlide finds them), the vendor and level-0 spacing: what every
    TIFF-reading backend agrees on, whatever library decodes the pixels."""
    pages = _level_pages(tif, tif.series[0])
    return pages, tiff_vendor(pages[0]), _spacing(tif, pages[0])


def _level_pages(tif: tifffile.TiffFile, series) -> list[tifffile.TiffPage]:
    """The pyramid as OpenSlide sees it: tifffile's levels plus every tiled page that is a reduced copy of level 0.

    tifffile's SVS series takes page 1 for the thumbnail, so an Aperio-described
    file whose page 1 is a tiled level (libvips' ``tiffsave`` keeps the
    description, and so do other converters) came out as one level, and every
    plan then decoded all of level 0 for its thumbnail.  OpenSlide takes every
    tiled page as a level; so do we (same samples, same aspect).  OME-TIFF
    pyramids live in SubIFDs, which tifffile's series already reads.
    """
    pages = [lv.keyframe for lv in series.levels]
    base = pages[0]
    if base.is_ome:
        return pages
    h0, w0 = base.shape[:2]
    seen = {page.offset for page in pages}
    for page in tif.pages:
        if page.offset in seen or not page.is_tiled or page.dtype != base.dtype \
                or page.samplesperpixel != base.samplesperpixel or page.planarconfig != base.planarconfig:
            continue
        h, w = page.shape[:2]
        if not (h < h0 and w < w0):
            continue
        dh, dw = h0 / h, w0 / w
        if abs(dh - dw) / max(dh, dw) > 0.02 + 2.0 / min(h, w):   # another picture (a label, a macro)
            continue
        pages.append(page)
        seen.add(page.offset)
    return sorted(pages, key=lambda page: -page.shape[0] * page.shape[1])


_APERIO_JP2K_YCBCR = 33003
_YCC: tuple | None = None


def _ycbcr_to_rgb(seg: np.ndarray) -> np.ndarray:
    """YCbCr -> RGB with libjpeg's integer tables, as OpenSlide converts Aperio's JPEG 2000 (33003).

    tifffile hands these tiles over as decoded, i.e. still YCbCr: read as RGB they
    are wrong colours with no error (glass turned to tissue).  Bit-exact with OpenSlide.
    """
    global _YCC
    if _YCC is None:
        scale, half = 16, 1 << 15
        x = np.arange(256, dtype=np.int64) - 128

        def fix(v: float) -> int:
            return int(v * (1 << scale) + 0.5)

        _YCC = ((fix(1.40200) * x + half) >> scale, (fix(1.77200) * x + half) >> scale,
                -fix(0.34414) * x + half, -fix(0.71414) * x)
    cr_r, cb_b, cb_g, cr_g = _YCC
    y = seg[..., 0].astype(np.int64)
    cb, cr = seg[..., 1], seg[..., 2]
    out = np.empty(seg.shape[:-1] + (3,), dtype=np.uint8)
    out[..., 0] = np.clip(y + cr_r[cr], 0, 255)
    out[..., 1] = np.clip(y + ((cb_g[cb] + cr_g[cr]) >> 16), 0, 255)
    out[..., 2] = np.clip(y + cb_b[cb], 0, 255)
    return out


_JP2K_CODECS = (33003, 33005, 34712)   # Aperio YCbCr, Aperio RGB, JPEG 2000


def decode_jpeg_scaled(data: bytes, tables: bytes | None, photometric: int, scale: int,
                       size: tuple[int, int]) -> np.ndarray:
    """A TIFF JPEG tile of ``size`` (w, h) decoded by libjpeg at 1/``scale``: its DCT scaling
    (each 8x8 block's inverse transform taken at 8/scale points a side), through Pillow's ``draft``.

    ``tables``: the page's shared JPEGTables (abbreviated tiles, as Aperio writes them);
    ``photometric`` 2 (RGB) says the components are RGB already, not YCbCr.  The header's
    size is checked before anything is decoded.
    """
    image = Image.open(io.BytesIO(tables[:-2] + data[2:] if tables else data))
    _check_size(image, size)
    mode = "L" if image.mode == "L" else "RGB"
    image.draft(mode, (size[0] // scale, size[1] // scale))
    if image.decoderconfig[:1] != (scale,):
        raise ValueError(f"libjpeg did not decode at 1/{scale}")
    if mode == "RGB":
        colorspace = "RGB" if photometric == 2 else "YCbCr"
        image.tile = [image.tile[0]._replace(args=("RGB", colorspace))]
    return np.asarray(image)


def decode_jp2k_reduced(data: bytes, scale: int, size: tuple[int, int]) -> np.ndarray:
    """A JPEG 2000 tile of ``size`` (w, h) decoded at 1/``scale`` from its wavelet pyramid (OpenJPEG's
    reduce, through Pillow): the codestream's own lower resolution, its components as stored."""
    image = Image.open(io.BytesIO(data))
    _check_size(image, size)
    image.reduce = scale.bit_length() - 1
    image.load()
    return np.asarray(image)


def _check_size(image: Image.Image, size: tuple[int, int]) -> None:
    if image.size != tuple(size):
        raise ValueError(f"the tile's header says {image.size[0]} x {image.size[1]} px, not {size[0]} x {size[1]}")


def _spacing(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """Level-0 µm/px from Aperio MPP, OME PhysicalSize, or TIFF resolution tags."""
    if page.is_svs:
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
        if match:
            return usable_spacing(float(match.group(1)))
    if page.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            size = pixels.get("PhysicalSizeX")
            if size is not None:
                unit = pixels.get("PhysicalSizeXUnit", "µm")
                return usable_spacing(float(size) * _UM_PER_UNIT.get(unit, float("nan")))
        except (ET.ParseError, StopIteration, ValueError):
            pass
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    num, den = xres.value
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    if um_per_unit is None or num == 0:
        return None
    return usable_spacing(um_per_unit * den / num)




def _claims(probe) -> int:
    return 100 if probe.tiff is not None and TiffReader.reads_natively(probe.tiff) else 0


def _claims_url(path: remote.RemotePath) -> int:
    """Any URL that is not another reader's: a TIFF is the common case, and opening says if it is not."""
    return 50


def _open(path: Path | remote.RemotePath) -> TiffReader:
    try:
        return TiffReader(path)
    except (FileNotFoundError, PermissionError, remote.RemoteAccessError):
        raise
    except Exception as exc:
        if isinstance(path, remote.RemotePath):
            raise UnreadableSlideError(_remote_refusal(path, exc)) from exc
        raise UnreadableSlideError(f"{path}: tifffile cannot read it as a slide ({type(exc).__name__}: {exc}); "
                                   "is the file complete? backend='openslide' may read other formats") from exc


def _remote_refusal(path: remote.RemotePath, exc: Exception) -> str:
    return (f"{path}: the tifffile reader, the only one that reads slides at a URL in byte ranges (besides "
            f"OME-Zarr and DICOMweb), cannot read it ({type(exc).__name__}: {exc}). SVS, generic and OME-TIFF "
            "are read in place; other formats (NDPI, MRXS, SCN, Philips TIFF, VSI...) only OpenSlide, vips or "
            "cuCIM read, and they read local files only: copy the slide to local disk, or mount the bucket "
            "(mountpoint-s3, gcsfuse, s3fs-fuse) and give the mounted path")


def _check_remote_dialect(tif: tifffile.TiffFile, path) -> None:
    """A TIFF dialect tifffile does not decode as plain tiles, at a URL: say what reads it."""
    page = tif.pages.first
    dialect = next((flag[3:].upper() for flag in _OPENSLIDE_DIALECTS if getattr(page, flag, False)), None)
    if dialect is not None:
        raise ValueError(f"it is a {dialect} TIFF, whose tiles only OpenSlide decodes")


READER = ReaderSpec(
    name="tifffile", requires="tifffile", install="pip install tifffile imagecodecs", claims=_claims, open=_open,
    formats="SVS (JPEG, JPEG 2000 YCbCr/RGB), generic tiled or stripped TIFF, OME-TIFF (SubIFD pyramids)",
    claims_url=_claims_url,
)
