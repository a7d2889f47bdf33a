"""slide2vec 7.1.4's inputs and options for images and dense outputs, by its names and fields.

* `ImageSpec`: one named image (a file, or pixels: a numpy array, a PIL image, a torch tensor).
* `SlideRegions`: one slide's regions of interest, level-0 top-left ``(x, y)``.
* `DenseOptions` (regions) / `DenseImageOptions` (images): the grid's geometry and what
  it holds (see `encoders.dense` for each ``feature_kind``).

The options are checked where they are used (every embed method, `Model.dense_identity_differences`,
`Model.prepare_dense_encoder`), as slide2vec 7.1.4 checks them: a bad value fails there, naming the
field; ``dataclasses.replace`` of a request is free to build one first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from slide2vec_dask.encoders.dense import FEATURE_KINDS, PAD_MODES

BACKENDS = ("auto", "tiff", "openslide", "vips", "cucim", "asap", "pil")


def check_sample_id(value: Any, what: str = "sample_id") -> str:
    """A sample id names a file: a non-empty path component."""
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text or PureWindowsPath(text).drive:
        raise ValueError(f"{what} {value!r} must be a non-empty file name (no '/', '\\', '..')")
    return text


def _spacing(value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{what} must be a positive finite number of µm per pixel, got {value!r}")
    return float(value)


def _is_pixels(value) -> bool:
    return not isinstance(value, (str, Path)) and (hasattr(value, "shape") or hasattr(value, "getbands"))


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """One image: ``image_path`` is a PNG/JPEG/TIFF file, or the pixels themselves (an ``(H, W, 3)``
    uint8 numpy array or torch tensor, ``(3, H, W)`` accepted, or a PIL image).

    ``spacing_at_level_0`` (µm/px) is needed by `Model.embed_images_dense` whenever a
    spacing is asked for and the image does not record one (PNG, JPEG, arrays).
    """

    sample_id: str
    image_path: Any
    spacing_at_level_0: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_id", check_sample_id(self.sample_id))
        object.__setattr__(self, "spacing_at_level_0",
                           _spacing(self.spacing_at_level_0, f"{self.sample_id}: spacing_at_level_0"))
        if not _is_pixels(self.image_path):
            object.__setattr__(self, "image_path", Path(self.image_path).expanduser())

    @property
    def in_memory(self) -> bool:
        return _is_pixels(self.image_path)


@dataclass(frozen=True, kw_only=True)
class SlideRegions:
    """One slide's regions: ``coordinates`` ``(N, 2)`` level-0 top-left ``(x, y)`` pixels.

    ``annotation`` files the grids under ``dense_embeddings/<annotation>/``;
    ``spacing_at_level_0`` overrides (or supplies) the slide's level-0 spacing.
    """

    sample_id: str
    image_path: Any
    coordinates: Any
    annotation: str | None = None
    spacing_at_level_0: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_id", check_sample_id(self.sample_id))
        object.__setattr__(self, "image_path", Path(self.image_path).expanduser())
        object.__setattr__(self, "spacing_at_level_0",
                           _spacing(self.spacing_at_level_0, f"{self.sample_id}: spacing_at_level_0"))
        if self.annotation is not None:
            object.__setattr__(self, "annotation", check_sample_id(self.annotation, "annotation"))
        coords = np.asarray(self.coordinates)
        if coords.size == 0:
            coords = coords.reshape(0, 2)
        if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.number):
            raise ValueError(f"{self.sample_id}: coordinates must be an (N, 2) array of level-0 (x, y), "
                             f"got shape {coords.shape}")
        if not np.all(np.equal(np.mod(coords, 1), 0)):
            raise ValueError(f"{self.sample_id}: coordinates must be whole pixels")
        object.__setattr__(self, "coordinates", coords.astype(np.int64))


@dataclass(frozen=True, kw_only=True)
class _DenseFields:
    tolerance: float = 0.05
    backend: str = "auto"
    pad_mode: str = "reflect"
    image_pad_value: float | None = None
    window_size: int | None = None
    overlap: float = 0.0
    feature_kind: str = "patch_features"
    attention_blocks: tuple[int, ...] = (-1,)
    attention_include_registers: bool = False

    def __post_init__(self) -> None:   # coercions only: the checks run where the options are used
        blocks = self.attention_blocks
        if isinstance(blocks, (int, np.integer)) and not isinstance(blocks, bool):
            object.__setattr__(self, "attention_blocks", (int(blocks),))
        elif isinstance(blocks, list):
            object.__setattr__(self, "attention_blocks", tuple(blocks))

    def validate(self) -> None:
        """Raise a ValueError naming the first bad field."""
        if self.feature_kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature_kind {self.feature_kind!r}: choose one of {list(FEATURE_KINDS)} "
                             "(patch_features: the patch tokens after the final norm; patch_features_prenorm: "
                             "before it; cls_attention: the CLS token's attention maps)")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad_mode {self.pad_mode!r}: choose one of {list(PAD_MODES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {list(BACKENDS)}")
        if isinstance(self.tolerance, bool) or not 0 <= float(self.tolerance) < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance!r}")
        if self.window_size is not None and (isinstance(self.window_size, bool) or int(self.window_size) <= 0
                                             or int(self.window_size) != self.window_size):
            raise ValueError(f"window_size must be a positive int or None, got {self.window_size!r}")
        if isinstance(self.overlap, bool) or not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        blocks = self.attention_blocks
        if isinstance(blocks, (int, np.integer)):
            blocks = (int(blocks),)
        blocks = tuple(blocks)
        if not blocks or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in blocks):
            raise ValueError(f"attention_blocks must be a non-empty tuple of ints, got {self.attention_blocks!r}")
        object.__setattr__(self, "attention_blocks", tuple(int(b) for b in blocks))
        if not isinstance(self.attention_include_registers, bool):
            raise ValueError("attention_include_registers must be True or False")
        if self.image_pad_value is not None:
            object.__setattr__(self, "image_pad_value", float(self.image_pad_value))


@dataclass(frozen=True, kw_only=True)
class DenseOptions(_DenseFields):
    """Dense grids of slide regions: each ROI read at ``spacing_um`` as a ``target_size`` square."""

    spacing_um: float
    target_size: int

    def validate(self) -> None:
        _spacing(self.spacing_um, "DenseOptions.spacing_um")
        if isinstance(self.target_size, bool) or not isinstance(self.target_size, (int, np.integer)) \
                or self.target_size <= 0:
            raise ValueError(f"DenseOptions.target_size must be a positive int, got {self.target_size!r}")
        super().validate()


@dataclass(frozen=True, kw_only=True)
class DenseImageOptions(_DenseFields):
    """Dense grids of whole images.  ``target_size`` (a side, or ``(height, width)``) is what every
    image must measure once read at ``spacing_um`` (None: the encoder's spacing; with neither, the
    image as it is): a check, never a resize."""

    target_size: int | tuple[int, int]
    spacing_um: float | None = None

    def validate(self) -> None:
        _spacing(self.spacing_um, "DenseImageOptions.spacing_um")
        size = self.target_size
        try:
            pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else tuple(size)
            bad = len(pair) != 2 or any(isinstance(v, bool) or int(v) != v or int(v) <= 0 for v in pair)
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise ValueError(f"DenseImageOptions.target_size must be a positive int or (height, width), got {size!r}")
        super().validate()

    @property
    def size(self) -> tuple[int, int]:
        size = self.target_size
        return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
