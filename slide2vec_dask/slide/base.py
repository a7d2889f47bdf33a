"""The `Slide`: a lazy, picklable view of one whole-slide image.

A backend ("reader") knows one file format family and decodes pixels; the
`Slide` adds what every backend shares: spacing resolution and its override,
level geometry, thumbnails and the lazy dask view.  A `Slide` pickles as its
path and options and re-opens the file in the receiving process, so Dask can
ship it to workers without shipping file handles.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from slide2vec_dask.slide import registry, remote


#: The most pixels a thumbnail (the tissue mask's image, a preview) may have, and so the most a
#: thumbnail's intermediate (a level decoded at 1/8 by libjpeg) may hold: 2^26 px, 192 MiB of RGB.
#: A large real slide (200k x 100k px at 0.25 µm/px) is 4.9 MP at the default 64x; a whole 75 x 25 mm
#: glass at 0.12 µm/px is 32 MP at 64x: both fit.  A header claiming 10^6 x 10^6 px does not (244 MP
#: at 64x, 15.6 GP, 43.7 GiB, as libjpeg's 1/8 decode).  Bounded, the slide fails alone instead of the worker.
THUMBNAIL_MAX_PIXELS = 1 << 26
#: Pixels of level decoded at a time for a thumbnail (~48 MiB of RGB).
_BLOCK_PIXELS = 1 << 24


class UnreadableSlideError(ValueError):
    """The file exists but is not a slide any backend can read."""


def usable_spacing(spacing: float | None) -> float | None:
    """A level-0 spacing a microscope could have produced (0.01-100 µm/px), else None.

    Writers put placeholders where they know none: 72 or 25.4 dpi (libvips
    writes 25.4, which OpenSlide reports as mpp 1000).  Taken at face value
    they fail later with a confusing spacing error; as None they are a
    `MissingSpacingError` that says what to pass.  Every backend goes through here.
    """
    if spacing is None or not math.isfinite(spacing):
        return None
    return spacing if 0.01 <= spacing <= 100.0 else None


class MissingSpacingError(ValueError):
    """The slide does not say how many µm a pixel is, and none was given."""


class Reader(Protocol):
    """What a backend provides; everything is in pixels of the given level."""

    backend: str
    vendor: str
    level_shapes: list[tuple[int, int]]        # (height, width) per level
    level_downsamples: list[float]
    spacing_um: float | None                   # level-0 µm/px from the file, if any

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray: ...

    def close(self) -> None: ...


class Slide:
    """A whole-slide image opened lazily: metadata now, pixels on demand."""

    def __init__(self, path: Path | remote.RemotePath, reader: Reader, spacing_at_level_0: float | None = None):
        self.path = path
        self._reader = reader
        self._spacing_override = spacing_at_level_0
        self._thumb_lock = threading.Lock()
        self._thumb_cache: tuple[tuple[int, int], np.ndarray] | None = None
        spacing = spacing_at_level_0 if spacing_at_level_0 is not None else reader.spacing_um
        if spacing is None or not math.isfinite(spacing) or spacing <= 0:
            reader.close()
            raise MissingSpacingError(
                f"{path}: the slide does not record its pixel spacing (µm/px at level 0). "
                "Pass it explicitly, e.g. open_slide(path, spacing_at_level_0=0.25), "
                "embed_slide(..., spacing_at_level_0=0.25) or a 'spacing_at_level_0' manifest column."
            )
        self.spacing = float(spacing)

    # -- metadata ---------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._reader.backend

    @property
    def vendor(self) -> str:
        return self._reader.vendor

    @property
    def level_count(self) -> int:
        return len(self._reader.level_shapes)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each level, finest first."""
        return list(self._reader.level_shapes)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._reader.level_downsamples)

    @property
    def level_spacings(self) -> list[float]:
        """µm per pixel at each level."""
        return [self.spacing * d for d in self._reader.level_downsamples]

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height), as OpenSlide reports it."""
        h, w = self._reader.level_shapes[0]
        return w, h

    def __repr__(self) -> str:
        shapes = ", ".join(f"{h}x{w}" for h, w in self.level_shapes)
        return (f"<Slide {self.path.name!r} backend={self.backend} vendor={self.vendor} "
                f"spacing={self.spacing:g}µm levels=[{shapes}]>")

    # -- pixels -----------------------------------------------------------
    def read_level(self, level: int, y: int, x: int, height: int, width: int, needed=None) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` at ``level``, origin in that level's pixels.

        Not OpenSlide's ``read_region`` (level-0 origin, (x, y), RGBA), hence its own name.

        Pixels outside the level are white, so edge blocks need no special case.  ``needed``:
        ``(n, 4)`` level-pixel ``(y0, x0, y1, x1)`` rectangles, the only pixels the caller uses;
        a backend that can (tifffile) skips the file's tiles none of them touches.
        """
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: level {level} out of range (0..{self.level_count - 1})")
        lh, lw = self._reader.level_shapes[level]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + height, lh), min(x + width, lw)
        extra = {"needed": needed} if needed is not None and getattr(self._reader, "skips_unneeded", False) else {}
        if (y0, x0, y1, x1) == (y, x, y + height, x + width):
            return self._reader.read(level, y, x, height, width, **extra)
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._reader.read(level, y0, x0, y1 - y0, x1 - x0, **extra)
        return out

    def decode_scales(self, level: int) -> tuple[int, ...]:
        """The reduced scales (of 2, 4, 8) at which the backend decodes ``level`` straight from the
        file's codec, largest first (`read_level_scaled`); ``()`` when it decodes in full only."""
        scales = getattr(self._reader, "decode_scales", None)
        return tuple(scales(level)) if scales is not None else ()

    def read_level_scaled(self, level: int, y: int, x: int, height: int, width: int, scale: int,
                          needed=None) -> np.ndarray:
        """`read_level` at 1/``scale``: ``(ceil(height / scale), ceil(width / scale), 3)``, decoded at that
        scale by the codec (never in full, then reduced); ``y`` and ``x`` multiples of ``scale``.

        Pixels outside the level are white.  ValueError when ``scale`` is not in `decode_scales`.
        ``needed`` as for `read_level`, in level pixels.
        """
        if scale == 1:
            return self.read_level(level, y, x, height, width, needed)
        if scale not in self.decode_scales(level) or y % scale or x % scale:
            raise ValueError(f"{self.path}: level {level} cannot be decoded at 1/{scale} from ({y}, {x}) "
                             f"(it decodes at {self.decode_scales(level) or 'full scale only'})")
        lh, lw = self._reader.level_shapes[level]
        # the level's own pixels, cut to whole reduced pixels (a ragged level edge goes white)
        lh, lw = lh - lh % scale, lw - lw % scale
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + height, lh), min(x + width, lw)
        if (y0, x0, y1, x1) == (y, x, y + height, x + width) and not height % scale and not width % scale:
            return self._reader.read_scaled(level, y, x, height, width, scale, needed)
        out = np.full((-(-height // scale), -(-width // scale), 3), 255, dtype=np.uint8)
        if y1 > y0 and x1 > x0:
            part = self._reader.read_scaled(level, y0, x0, y1 - y0, x1 - x0, scale, needed)
            oy, ox = (y0 - y) // scale, (x0 - x) // scale
            out[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part
        return out

    def to_dask(self, level: int = 0, chunks: int | tuple[int, int] = 2048,
                shape: tuple[int, int] | None = None):
        """The level as a lazy ``(height, width, 3)`` uint8 dask array.

        Each chunk is one task that decodes its own pixels straight from the
        file, so choose block-sized chunks here rather than rechunking later.
        ``shape`` may extend the level to the right and bottom with white
        (e.g. to whole regions); by default it is the level's own.
        """
        import dask.array as da

        if isinstance(chunks, int):
            chunks = (chunks, chunks)
        view = _LevelArray(self, level, shape)
        name = f"slide-{_token(self)}-L{level}-{chunks[0]}x{chunks[1]}-{view.shape[0]}x{view.shape[1]}"
        return da.from_array(view, chunks=(chunks[0], chunks[1], 3), name=name,
                             asarray=False, lock=False, fancy=False)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        fitting = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(fitting, key=lambda i: self.level_downsamples[i], default=0)

    def thumbnail(self, downsample: float) -> np.ndarray:
        """RGB image of the whole slide, ``downsample`` times smaller than level 0.

        Built from the coarsest level that is at least as fine, area-averaged
        strip by strip (memory stays small even for a single-level slide);
        the last result is cached, so a mask and a preview can share a decode.
        """
        from PIL import Image

        level = self.best_level_for_downsample(downsample)
        factor = int(max(1, math.floor(downsample / self.level_downsamples[level] + 1e-6)))
        h0, w0 = self.level_shapes[0]
        out_h, out_w = max(1, round(h0 / downsample)), max(1, round(w0 / downsample))
        self._check_budget(downsample, out_h, out_w, _reduced_size(self.level_shapes[level], factor))
        pixels = self._reduced_level(level, factor)
        if pixels.shape[:2] != (out_h, out_w):
            pixels = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.BILINEAR))
        return pixels

    def _check_budget(self, downsample: float, out_h: int, out_w: int, reduced: int) -> None:
        """Refuse a thumbnail over `THUMBNAIL_MAX_PIXELS` (it, or the level reduced to make it) before
        allocating it: the size comes from the file's header, which may be wrong or hostile."""
        if max(out_h * out_w, reduced) <= THUMBNAIL_MAX_PIXELS:
            return
        h0, w0 = self.level_shapes[0]
        raise UnreadableSlideError(
            f"{self.path}: a thumbnail at downsample {downsample:g} would be {out_w} x {out_h} px, over the "
            f"budget of {THUMBNAIL_MAX_PIXELS} px; the file declares level 0 as {w0} x {h0} px and "
            f"{self.level_count} level(s). If that size is real, raise segmentation['downsample'] "
            "(or preview['downsample']); if not, the file's header is damaged")

    def _reduced_level(self, level: int, factor: int) -> np.ndarray:
        with self._thumb_lock:
            if self._thumb_cache is not None and self._thumb_cache[0] == (level, factor):
                return self._thumb_cache[1]
            scale = next((s for s in (8, 4, 2) if factor % s == 0), 1)
            reduced = getattr(self._reader, "read_reduced", None)
            # libjpeg's 1/scale decode holds the whole level at 1/scale: only when that fits the budget too
            fits = _reduced_size(self.level_shapes[level], scale) <= THUMBNAIL_MAX_PIXELS
            pixels = reduced(level, scale) if reduced is not None and scale > 1 and fits else None
            if pixels is not None:   # JPEG tiles decoded at 1/scale by libjpeg, then the rest by area
                pixels = _block_mean(pixels, factor // scale)
            else:
                pixels = self._reduce_by_blocks(level, factor)
            self._thumb_cache = ((level, factor), pixels)
            return pixels

    def _reduce_by_blocks(self, level: int, factor: int) -> np.ndarray:
        """The level area-averaged by ``factor``, read in blocks of ~16 MP (whole multiples of
        ``factor``, so only the last row and column of blocks are ragged): full-width strips,
        split into columns only when ``factor`` rows of the level are over 16 MP already."""
        h, w = self.level_shapes[level]
        side = math.isqrt(_BLOCK_PIXELS)
        cols = w if w * factor <= _BLOCK_PIXELS else min(w, factor * max(1, side // factor))
        rows = factor * max(1, _BLOCK_PIXELS // (cols * factor))
        out = np.empty((-(-h // factor), -(-w // factor), 3), dtype=np.uint8)
        for y in range(0, h, rows):
            for x in range(0, w, cols):
                block = _block_mean(self.read_level(level, y, x, min(rows, h - y), min(cols, w - x)), factor)
                out[y // factor : y // factor + block.shape[0], x // factor : x // factor + block.shape[1]] = block
        return out

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        path = self.path if isinstance(self.path, remote.RemotePath) else str(self.path)   # a URL keeps its options
        return reopen, (path, self.backend, self._spacing_override)


def make_reader(path: Path | remote.RemotePath, backend: str) -> Reader:
    """The reader ``backend`` names for ``path``; ``"auto"``: the installed one that reads it best."""
    if isinstance(path, remote.RemotePath):
        spec, refusal = registry.choose_url(path, backend)
        if spec is None:
            raise UnreadableSlideError(f"{path}: {refusal}")
    elif backend == "auto":
        spec, damage = registry.choose(path)
        if spec is None:
            raise UnreadableSlideError(
                f"{path}: no installed reader opens this file (tried {', '.join(_installed())})"
                + (f"; {damage}" if damage else "")
                + ". Check that the file is complete and in a slide format (SVS, TIFF, NDPI, MRXS, DICOM, ...)."
            )
    else:
        spec = registry.require(backend)
    return _open_with(spec, path)


def _open_with(spec: registry.ReaderSpec, path: Path) -> Reader:
    """``spec.open(path)``; whatever a reader's library raises on a bad file is an `UnreadableSlideError`
    naming the file and the reader (a missing file or permission, a missing library, memory, and a
    reader that refuses the backend itself stay what they are)."""
    try:
        return spec.open(path)
    except (UnreadableSlideError, FileNotFoundError, PermissionError, ImportError, MemoryError, NotImplementedError,
            remote.RemoteAccessError):
        raise
    except Exception as exc:   # noqa: BLE001 - each library has its own exception types
        raise UnreadableSlideError(f"{path}: the {spec.name} reader cannot open it ({type(exc).__name__}: {exc}); "
                                   "is the file complete and a slide?") from exc


def _installed() -> list[str]:
    return [spec.name for spec in registry.readers() if spec.available()]


def _reduced_size(shape: tuple[int, int], factor: int) -> int:
    """Pixels of a level of ``shape`` area-averaged by ``factor`` (ragged edges kept)."""
    return -(-shape[0] // factor) * -(-shape[1] // factor)


_OPEN: "OrderedDict[tuple, Slide]" = OrderedDict()
_OPEN_LOCK = threading.Lock()
#: Open handles a process keeps (least recently used go): a worker of a cohort run meets
#: thousands of slides, and open files are a limited resource (often 1024 per process).
MAX_OPEN_SLIDES = 64
#: Seconds between checks that a cached slide at a URL is still the object it parsed (one HEAD).
RECHECK_S = 30.0
_CHECKED: dict[tuple, float] = {}


def reopen(path: str, backend: str, spacing_at_level_0: float | None) -> Slide:
    """Unpickle a `Slide`: one open handle per process and file, shared by tasks.

    A slide at a URL is parsed once per process too (its header is requests away); a reader
    that can tell (`is_current`) is asked, at most every `RECHECK_S`, whether the object is
    still the one it parsed, so a long-lived worker never lays an old header over a replaced
    object's bytes.
    """
    p = remote.location(path)
    if isinstance(p, remote.RemotePath):
        key = (str(p), backend, spacing_at_level_0, _options_token(p))
    else:
        stat = p.stat()
        key = (path, backend, spacing_at_level_0, stat.st_size, stat.st_mtime_ns)
    with _OPEN_LOCK:
        slide = _OPEN.get(key)
        if slide is not None:
            _OPEN.move_to_end(key)
            due = isinstance(p, remote.RemotePath) and time.monotonic() - _CHECKED.get(key, 0.0) > RECHECK_S
            if due:
                _CHECKED[key] = time.monotonic()
    if slide is not None:
        current = getattr(slide._reader, "is_current", None)
        if not due or current is None or current():
            return slide
        with _OPEN_LOCK:
            if _OPEN.get(key) is slide:
                del _OPEN[key]
    slide = Slide(p, make_reader(p, backend), spacing_at_level_0)   # outside the lock: opening parses the file
    with _OPEN_LOCK:
        _CHECKED.setdefault(key, time.monotonic())
        slide = _OPEN.setdefault(key, slide)
        _OPEN.move_to_end(key)
        while len(_OPEN) > MAX_OPEN_SLIDES:
            _OPEN.popitem(last=False)   # tasks still reading it hold their own reference; it closes when freed
        return slide


class _LevelArray:
    """Array-like view of one level for `dask.array.from_array`."""

    def __init__(self, slide: Slide, level: int, shape: tuple[int, int] | None = None):
        self.slide = slide
        self.level = level
        h, w = shape or slide.level_shapes[level]
        self.shape = (h, w, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        y0, y1, _ = key[0].indices(self.shape[0])
        x0, x1, _ = key[1].indices(self.shape[1])
        block = self.slide.read_level(self.level, y0, x0, y1 - y0, x1 - x0)
        return block[:, :, key[2]] if len(key) > 2 else block


def _options_token(path: remote.RemotePath) -> str:
    from dask.base import tokenize

    return tokenize(sorted(path.storage_options.items(), key=lambda kv: kv[0]))


def _token(slide: Slide) -> str:
    from dask.base import tokenize

    if isinstance(slide.path, remote.RemotePath):
        return tokenize(str(slide.path), remote.identity(slide.path), slide.backend, slide.spacing)
    stat = slide.path.stat()
    return tokenize(str(slide.path), stat.st_size, stat.st_mtime_ns, slide.backend, slide.spacing)


def _block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Area-average by an integer factor; a ragged edge averages what it has.

    PIL's box reduction in C: 5-10x faster than a numpy mean over a reshaped
    view (measured 14-21 ms against 76-171 ms on a 2967x2220 slide), which made
    the thumbnail the most expensive part of planning a small slide.
    """
    if factor == 1:
        return pixels
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).reduce(factor))
