"""`open_slide`: pick a backend, open lazily, give errors a user can act on."""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from pathlib import Path

from slide2vec_dask.slide.base import Slide, UnreadableSlideError

# Names users know from other tools; each needs its own library.
_OPTIONAL = {
    "cucim": ("cucim", "pip install cucim-cu12  (NVIDIA GPUs, Linux)"),
    "vips": ("pyvips", "pip install pyvips[binary]"),
    "asap": ("multiresolutionimageinterface", "install ASAP from https://github.com/computationalpathologygroup/ASAP/releases"),
}


def open_slide(path: str | Path, backend: str = "auto", spacing_at_level_0: float | None = None) -> Slide:
    """Open a whole-slide image without decoding any pixels.

    ``backend="auto"`` uses tifffile for SVS, generic tiled TIFF and OME-TIFF
    (fast tile decoding) and OpenSlide for everything else.
    ``spacing_at_level_0`` (µm/px) overrides what the file says.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"slide not found: {path}")
    if path.is_dir():
        raise UnreadableSlideError(f"{path} is a directory, not a slide file (for MRXS pass the .mrxs file)")
    if backend == "auto":
        backend = _auto_backend(path)
    return Slide(path, _make_reader(path, backend), spacing_at_level_0)


def _auto_backend(path: Path) -> str:
    import tifffile

    from slide2vec_dask.slide.tiff import TiffReader

    try:
        with tifffile.TiffFile(path) as tif:
            return "tifffile" if TiffReader.reads_natively(tif) else "openslide"
    except Exception:
        return "openslide"


def _make_reader(path: Path, backend: str):
    if backend == "tifffile":
        from slide2vec_dask.slide.tiff import TiffReader

        try:
            return TiffReader(path)
        except Exception as exc:
            raise UnreadableSlideError(f"{path}: tifffile cannot read it as a slide ({type(exc).__name__}: {exc}); "
                                       "is the file complete? backend='openslide' may read other formats") from exc
    if backend == "openslide":
        import openslide

        from slide2vec_dask.slide.openslide_backend import OpenSlideReader

        try:
            return OpenSlideReader(path)
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
            raise UnreadableSlideError(
                f"{path}: not a readable whole-slide image (OpenSlide: {exc}). "
                "Check that the file is complete and in a slide format (SVS, TIFF, NDPI, MRXS, DICOM, ...)."
            ) from exc
    if backend in _OPTIONAL:
        module, how = _OPTIONAL[backend]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"backend={backend!r} needs the {module!r} package, which is not installed: {how}")
        raise NotImplementedError(
            f"backend={backend!r} is recognised but not implemented yet; use 'tifffile', 'openslide' or 'auto'"
        )
    raise ValueError(f"unknown backend {backend!r}; choose auto, tifffile, openslide, cucim, vips or asap")


_OPEN: "OrderedDict[tuple, Slide]" = OrderedDict()
_OPEN_LOCK = threading.Lock()
#: Open handles a process keeps (least recently used go): a worker of a cohort run meets
#: thousands of slides, and open files are a limited resource (often 1024 per process).
MAX_OPEN_SLIDES = 64


def _reopen(path: str, backend: str, spacing_at_level_0: float | None) -> Slide:
    """Unpickle a `Slide`: one open handle per process and file, shared by tasks."""
    p = Path(path)
    stat = p.stat()
    key = (path, backend, spacing_at_level_0, stat.st_size, stat.st_mtime_ns)
    with _OPEN_LOCK:
        slide = _OPEN.get(key)
        if slide is not None:
            _OPEN.move_to_end(key)
            return slide
    slide = Slide(p, _make_reader(p, backend), spacing_at_level_0)   # outside the lock: opening parses the file
    with _OPEN_LOCK:
        slide = _OPEN.setdefault(key, slide)
        _OPEN.move_to_end(key)
        while len(_OPEN) > MAX_OPEN_SLIDES:
            _OPEN.popitem(last=False)   # tasks still reading it hold their own reference; it closes when freed
        return slide
