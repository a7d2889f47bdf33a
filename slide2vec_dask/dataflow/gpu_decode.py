"""``gpu_decode``: a block's JPEG tiles decoded on the GPU (nvJPEG, ``torchvision.io.decode_jpeg``).

Where CPU decoding is what starves the GPU (a small model, few cores per GPU),
the block's read fetches only the file's compressed tiles (`jpeg_block`: a
`JpegBlock` of standalone JPEG streams, the level's shared tables spliced in,
and where each tile lands), and the embedding task decodes them in one batch
on its device, assembles the block there and cuts its tiles there
(`decode_block`, `cut_tiles`): the pixels never exist on the host.

Only tiled JPEG levels of files our own TIFF reader opens qualify (SVS and
other tiled TIFFs); anything else -- another reader, JPEG 2000, stripped
files, a tile archive, ``on_the_fly=False`` -- is decoded on the CPU as usual.
The first block of each slide level a process decodes is checked against the
CPU decoder (`MAX_MEAN_DIFF`, `MAX_P999_DIFF`: IDCT and chroma upsampling may
differ, colours may not); a level that fails the check is decoded on the CPU,
with a warning naming the slide.  Without a CUDA device the option falls back
with a warning (`EmbedSettings.of`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import tifffile

from slide2vec_dask.dataflow.sources import SlideRef
from slide2vec_dask.slide.tiff import tiff_geometry

logger = logging.getLogger("slide2vec_dask")

#: Decoders agree when the mean absolute difference is at most this (0-255 levels) ...
MAX_MEAN_DIFF = 1.5
#: ... and 99.9 % of the samples differ by at most this.
MAX_P999_DIFF = 8.0
_JPEG = 7


@dataclass
class JpegBlock:
    """A block as compressed tiles: decoded where it is embedded."""

    height: int
    width: int
    streams: list[bytes]          # standalone JPEG files, one per tile overlapping the block
    places: list[tuple]           # per stream: (block y, block x, tile y, tile x, h, w)
    blanks: list[tuple]           # (block y, block x, h, w) of tiles never written (sparse files): white
    level_key: tuple              # (path, level): what the decoder check is remembered by
    ref: SlideRef
    level: int
    origin: tuple[int, int]       # the block's (y, x) at its level


@dataclass
class _Level:
    seg_h: int
    seg_w: int
    cols: int
    offsets: tuple
    counts: tuple
    tables: bytes | None


_LOCK = threading.Lock()
# (path, size, mtime, level) -> the level's tile index (None: not JPEG); the last few only (an index
# is MBs for a big slide, and a worker sees a cohort)
_LEVELS: collections.OrderedDict = collections.OrderedDict()
MAX_LEVELS = 16
_CHECKED: dict[tuple, bool] = {}             # (path, level) -> the GPU decoder agreed with the CPU's


def jpeg_block(source, level: int, y: int, x: int, height: int, width: int, scale: int = 1,
               needed=None) -> JpegBlock | None:
    """The block's tiles as JPEG streams, or None when this level is not tiled JPEG of our TIFF reader
    on a local disk, or the block is decoded at reduced scale (``scaled_decode``: the CPU's libjpeg)."""
    if not isinstance(source, SlideRef) or scale != 1 or "://" in str(source.path):
        return None
    lv = _level(source, level)
    if lv is None or _CHECKED.get((source.path, level)) is False:
        return None
    fd = os.open(source.path, os.O_RDONLY)   # (per block: a cohort's worth of kept descriptors would run out)
    try:
        streams, places, blanks = _streams(fd, lv, y, x, height, width)
    finally:
        os.close(fd)
    return JpegBlock(height, width, streams, places, blanks, (source.path, level), source, level, (y, x))


def _streams(fd: int, lv: _Level, y: int, x: int, height: int, width: int) -> tuple[list, list, list]:
    streams, places, blanks = [], [], []
    for row in range(y // lv.seg_h, (y + height - 1) // lv.seg_h + 1):
        for col in range(x // lv.seg_w, (x + width - 1) // lv.seg_w + 1):
            sy, sx = row * lv.seg_h, col * lv.seg_w
            ty0, tx0 = max(y, sy), max(x, sx)
            ty1, tx1 = min(y + height, sy + lv.seg_h), min(x + width, sx + lv.seg_w)
            index = row * lv.cols + col
            if index >= len(lv.counts) or lv.counts[index] == 0:
                blanks.append((ty0 - y, tx0 - x, ty1 - ty0, tx1 - tx0))
                continue
            data = os.pread(fd, lv.counts[index], lv.offsets[index])
            streams.append(lv.tables[:-2] + data[2:] if lv.tables else data)
            places.append((ty0 - y, tx0 - x, ty0 - sy, tx0 - sx, ty1 - ty0, tx1 - tx0))
    return streams, places, blanks


def _level(source: SlideRef, level: int) -> _Level | None:
    stat = os.stat(source.path)
    key = (source.path, stat.st_size, stat.st_mtime_ns, level)
    with _LOCK:
        if key in _LEVELS:
            _LEVELS.move_to_end(key)
            return _LEVELS[key]
    found = None
    slide = source.open()
    if slide.backend == "tifffile":
        with tifffile.TiffFile(source.path) as tif:
            pages, _, _ = tiff_geometry(tif)
            page = pages[level] if level < len(pages) else None
            if (page is not None and page.is_tiled and page.compression == _JPEG and page.samplesperpixel == 3
                    and page.photometric in (2, 6) and page.dtype == np.uint8):
                found = _Level(page.chunks[0], page.chunks[1], page.chunked[1], tuple(page.dataoffsets),
                               tuple(page.databytecounts), page.jpegtables)
    with _LOCK:
        _LEVELS[key] = found
        while len(_LEVELS) > MAX_LEVELS:
            _LEVELS.popitem(last=False)
    return found


def decode_block(block: JpegBlock, device: str):
    """``(height, width, 3)`` uint8 on ``device``: the block's tiles decoded there in one batch.

    The first block of a slide level is checked against the CPU decoder; None when the GPU's
    pixels disagree (the caller decodes on the CPU from then on).
    """
    import torch

    with warnings.catch_warnings():   # torchvision 0.29 announces its image IO's move to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    out = torch.full((block.height, block.width, 3), 255, dtype=torch.uint8, device=device)
    if block.streams:
        data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in block.streams]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as exc:   # a tile nvJPEG refuses: this block goes to the CPU decoder (which says why)
            logger.warning("gpu_decode: %s level %d: %s; the block is decoded on the CPU", block.ref.path,
                           block.level, exc)
            return None
        for image, (by, bx, ty, tx, h, w) in zip(images, block.places):
            out[by : by + h, bx : bx + w] = image[:, ty : ty + h, tx : tx + w].permute(1, 2, 0)
    if not _agrees(block, out):
        return None
    return out


def _agrees(block: JpegBlock, pixels) -> bool:
    """Whether this slide level's GPU pixels match the CPU decoder's (checked once per level and process)."""
    key = block.level_key
    with _LOCK:
        known = _CHECKED.get(key)
    if known is not None:
        return known
    y, x = block.origin
    cpu = block.ref.read(block.level, y, x, block.height, block.width)
    diff = np.abs(pixels.cpu().numpy().astype(np.int16) - cpu.astype(np.int16))
    ok = bool(diff.mean() <= MAX_MEAN_DIFF and np.percentile(diff, 99.9) <= MAX_P999_DIFF)
    if not ok:
        warnings.warn(f"gpu_decode: {block.ref.path} level {block.level}: the GPU decoder's pixels differ from "
                      f"the CPU decoder's (mean {diff.mean():.2f}, max {diff.max()}); this slide is decoded on "
                      "the CPU", RuntimeWarning, stacklevel=2)
    with _LOCK:
        _CHECKED[key] = ok
    return ok


def cut_tiles(pixels, cuts: np.ndarray | None, tile: int):
    """`blocks.cut_tiles` for a tensor on the device: the block's tiles ``(n, tile, tile, 3)``."""
    import torch

    if cuts.dtype == bool:
        rows, cols = cuts.shape
        grid = pixels[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile, 3).transpose(1, 2)
        return grid[torch.from_numpy(cuts).to(pixels.device)].contiguous()
    return torch.stack([pixels[r : r + tile, c : c + tile] for r, c in cuts]) if len(cuts) else \
        pixels.new_zeros((0, tile, tile, 3))


def refuse_without_cuda(num_gpus: int) -> bool:
    """``gpu_decode`` for a run with ``num_gpus``: True when it can act, else False with a warning."""
    if num_gpus > 0:
        return True
    warnings.warn("gpu_decode=True, but this run has no GPU (num_gpus=0 or no CUDA device): JPEG tiles are "
                  "decoded on the CPU", RuntimeWarning, stacklevel=3)
    return False
