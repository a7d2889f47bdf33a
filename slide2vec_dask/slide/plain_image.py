"""The Pillow backend (``pil``, as hs2p names it): a PNG or JPEG image read as a one-level slide.

Small scans, crops and test images come as plain rasters.  The image has no
pyramid and no tiles, so it is decoded whole, once, on the first read, and
kept; its size is read from the header and refused over Pillow's
decompression-bomb limit (`MAX_PIXELS`, hs2p's ceiling too) before any
pixel is decoded.  The spacing comes from the file's resolution (a PNG's
``pHYs``, a JPEG's JFIF density) when it is one a microscope could give;
otherwise the slide needs ``spacing_at_level_0`` (the Slide's error says so).
Alpha is dropped and grey or palette images become RGB, as hs2p reads them.

`read_labels` reads a label mask (PNG/JPEG, tissue > 0) for `tiling.masks`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from slide2vec_dask.slide.base import UnreadableSlideError, usable_spacing
from slide2vec_dask.slide.registry import ReaderSpec

#: Pillow's default decompression-bomb limit (89,478,485 px; hs2p's ceiling for PIL slides): 256 MiB of RGB.
MAX_PIXELS = 89_478_485
#: The formats read, by their first bytes.
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def image_format(source) -> str | None:
    """``"PNG"`` / ``"JPEG"`` when the file (a path, or an open binary file: a mask at a URL) starts as one."""
    try:
        if hasattr(source, "read"):
            start = source.tell()
            head = source.read(8)
            source.seek(start)
        else:
            with open(source, "rb") as f:
                head = f.read(8)
    except OSError:
        return None
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _open_bounded(path: Path, what: str = "slide"):
    """The image opened (header only) after its size is checked against `MAX_PIXELS`."""
    from PIL import Image

    try:
        image = Image.open(path)   # reads the header; a bomb raises here, before any decode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:   # (warnings made errors)
        raise UnreadableSlideError(f"{path}: the image is over {MAX_PIXELS} px ({exc}); a {what} this large "
                                   "belongs in a tiled pyramidal TIFF (e.g. libvips' tiffsave --tile --pyramid)")
    width, height = image.size
    if width * height > MAX_PIXELS or width < 1 or height < 1:
        image.close()
        raise UnreadableSlideError(
            f"{path}: the image declares {width} x {height} px; a plain {image.format} {what} is decoded whole, "
            f"so it must hold 1 to {MAX_PIXELS} px; store a larger one as a tiled pyramidal TIFF")
    return image


def _spacing(image) -> float | None:
    """µm/px from the file's resolution (``dpi`` in Pillow's terms), when a microscope could give it."""
    dpi = image.info.get("dpi")
    try:
        x, y = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return None
    if x <= 0 or y <= 0 or abs(x - y) > 1e-3 * max(x, y):
        return None
    return usable_spacing(25_400.0 / x)


class PlainImageReader:
    backend = "pil"

    def __init__(self, path: Path):
        self.path = Path(path)
        with _open_bounded(self.path) as image:
            self.vendor = str(image.format or "image").lower()
            self.spacing_um = _spacing(image)
            width, height = image.size
        self.level_shapes = [(height, width)]
        self.level_downsamples = [1.0]
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                try:
                    with _open_bounded(self.path) as image:
                        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
                except UnreadableSlideError:
                    raise
                except Exception as exc:   # noqa: BLE001 - Pillow's errors for a truncated or corrupt file
                    raise UnreadableSlideError(f"{self.path}: Pillow cannot decode the image "
                                               f"({type(exc).__name__}: {exc}); is the file complete?") from exc
                if pixels.shape[:2] != self.level_shapes[0]:
                    raise UnreadableSlideError(f"{self.path}: the image changed since it was opened "
                                               f"({pixels.shape[1]} x {pixels.shape[0]} px now)")
                self._pixels = pixels
            return self._pixels

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        if level != 0:
            raise IndexError(f"{self.path}: a plain image has only level 0, not {level}")
        return np.array(self._decoded()[y : y + height, x : x + width])

    def close(self) -> None:
        self._pixels = None


def read_labels(path) -> np.ndarray:
    """A label image's values, 2-D (an RGB(A) image: its largest channel; a palette image: the indices);
    ``path`` may be an open binary file."""
    path = path if hasattr(path, "read") else Path(path)
    with _open_bounded(path, "mask") as image:
        alpha = image.mode in ("RGBA", "LA", "PA")
        labels = np.asarray(image)
    if alpha:   # transparency is not a label
        labels = labels[..., :-1]
    return labels.max(axis=-1) if labels.ndim == 3 else labels


def _claims(probe) -> int:
    return 100 if image_format(probe.path) else 0


def _open(path: Path) -> PlainImageReader:
    return PlainImageReader(path)


READER = ReaderSpec(
    name="pil", requires="PIL", install="pip install pillow", claims=_claims, open=_open,
    formats=f"plain PNG and JPEG images (one level, decoded whole, at most {MAX_PIXELS} px)",
)
