"""Validated run configuration: how slides are tiled, and how the work runs.

Both dataclasses check their values at construction, so a typo fails before
any slide is opened.  Fields that belong to a capability this release does
not have yet raise ``NotImplementedError`` when set, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

BACKENDS = ("auto", "tifffile", "openslide", "cucim", "vips", "asap")
PRECISIONS = ("fp16", "bf16", "fp32")
SEGMENTATION_METHODS = ("hsv", "otsu", "threshold")
# Per-slide files written next to the store (see slide2vec_dask.exporters, one module each).
OUTPUT_FORMATS = ("pt", "npz", "trident-h5", "clam-h5", "stamp-h5", "anndata", "spatialdata", "geojson")

SEGMENTATION_DEFAULTS: dict[str, Any] = {
    "method": "hsv",
    "downsample": 64,
    "sthresh": 8,          # hsv: minimum saturation (0-255) of tissue
    "mthresh": 7,          # median filter size on the mask source, 0 = off
    "close": 4,            # morphological closing size in mask pixels, 0 = off
    "threshold": 220,      # threshold: grey level below which a pixel is tissue
}
FILTERING_DEFAULTS: dict[str, Any] = {
    "ref_tile_size": 224,  # tile size (px at the requested spacing) of the area unit
    "a_t": 0,              # drop tissue components smaller than a_t ref tiles; 0 = keep all
    "filter_white": False,
    "filter_black": False,
    "white_threshold": 220,
    "black_threshold": 25,
    "fraction_threshold": 0.9,
}
PREVIEW_DEFAULTS: dict[str, Any] = {
    "save_mask_preview": False,
    "save_tiling_preview": False,
    "downsample": 32,
}


def _merged(name: str, given: Mapping[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; known keys are {sorted(defaults)}")
    return {**defaults, **given}


def _positive(name: str, value: float | None, *, integer: bool = False) -> None:
    if value is None:
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class PreprocessingConfig:
    """How a slide becomes tiles.

    ``requested_spacing_um`` / ``requested_tile_size_px`` left as ``None`` take
    the model's own contract (its spacing and tile size).
    """

    backend: str = "auto"
    requested_spacing_um: float | None = None
    requested_tile_size_px: int | None = None
    tissue_threshold: float = 0.1
    segmentation: Mapping[str, Any] = field(default_factory=dict)
    filtering: Mapping[str, Any] = field(default_factory=dict)
    preview: Mapping[str, Any] = field(default_factory=dict)
    on_the_fly: bool = True
    use_supertiles: bool = True
    read_coordinates_from: str | Path | None = None
    read_tiles_from: str | Path | None = None
    resume: bool = False
    region_tile_multiple: int | None = None
    requested_region_size_px: int | None = None
    spacing_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _positive("requested_spacing_um", self.requested_spacing_um)
        _positive("requested_tile_size_px", self.requested_tile_size_px, integer=True)
        if not isinstance(self.tissue_threshold, (int, float)) or not 0.0 <= self.tissue_threshold <= 1.0:
            raise ValueError(f"tissue_threshold must be within [0, 1], got {self.tissue_threshold!r}")
        if not 0.0 <= self.spacing_tolerance < 1.0:
            raise ValueError(f"spacing_tolerance must be within [0, 1), got {self.spacing_tolerance!r}")
        seg = _merged("segmentation", self.segmentation, SEGMENTATION_DEFAULTS)
        if seg["method"] not in SEGMENTATION_METHODS:
            raise ValueError(f"segmentation method must be one of {SEGMENTATION_METHODS}, got {seg['method']!r}")
        _positive("segmentation downsample", seg["downsample"])
        filt = _merged("filtering", self.filtering, FILTERING_DEFAULTS)
        if not 0.0 <= filt["fraction_threshold"] <= 1.0:
            raise ValueError(f"filtering fraction_threshold must be within [0, 1], got {filt['fraction_threshold']!r}")
        _positive("filtering ref_tile_size", filt["ref_tile_size"], integer=True)
        if filt["a_t"] < 0:
            raise ValueError(f"filtering a_t must be >= 0, got {filt['a_t']!r}")
        prev = _merged("preview", self.preview, PREVIEW_DEFAULTS)
        _positive("preview downsample", prev["downsample"])
        object.__setattr__(self, "segmentation", seg)
        object.__setattr__(self, "filtering", filt)
        object.__setattr__(self, "preview", prev)
        if not self.on_the_fly:
            raise NotImplementedError(
                "on_the_fly=False (tiles extracted to disk first) is not supported: slide2vec-dask always "
                "reads tiles straight from the slide, which is what on_the_fly=True does."
            )
        if self.read_tiles_from is not None:
            raise NotImplementedError(
                "read_tiles_from (pre-extracted tile tar archives) is not supported: tiles are read from "
                "the slide itself; use read_coordinates_from to reuse a tiling."
            )
        if self.region_tile_multiple is not None:
            r = self.region_tile_multiple
            if not isinstance(r, int) or isinstance(r, bool) or r < 2:
                raise ValueError(f"region_tile_multiple must be an integer >= 2 (regions of R x R tiles), got {r!r}")
        _positive("requested_region_size_px", self.requested_region_size_px, integer=True)
        if self.requested_region_size_px is not None and self.requested_tile_size_px is not None:
            self.region_multiple(self.requested_tile_size_px)

    def region_multiple(self, tile_size_px: int) -> int | None:
        """Tiles per region side (None: flat mode), checked against the tile size in use."""
        r, size = self.region_tile_multiple, self.requested_region_size_px
        if size is None:
            return r
        if size % tile_size_px or size // tile_size_px < 2:
            raise ValueError(f"requested_region_size_px={size} must be a multiple (>= 2) of the tile size "
                             f"{tile_size_px} px")
        if r is not None and size != r * tile_size_px:
            raise ValueError(f"requested_region_size_px={size} disagrees with region_tile_multiple={r} x "
                             f"tile size {tile_size_px} px = {r * tile_size_px}")
        return size // tile_size_px

    def replace(self, **changes: Any) -> "PreprocessingConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ExecutionOptions:
    """How the work runs and what is written.

    ``num_workers`` is the number of threads (local) that read and decode
    blocks next to the encoder; ``prefetch_factor`` blocks per worker may be
    queued ahead of the encoder, which bounds memory.  ``scheduler_address``
    runs on an existing Dask cluster; an active ``distributed.Client`` is
    used as well, as everywhere in Dask.

    ``save_tile_embeddings`` keeps the tile embeddings of a slide- or
    patient-level model's run (they are an intermediate otherwise);
    ``save_slide_embeddings`` keeps a patient-level run's slide embeddings;
    ``save_latents`` stores the model's latents next to its embeddings.
    """

    batch_size: int = 32
    num_gpus: int | None = None
    precision: str | None = None
    num_workers: int | None = None
    num_preprocessing_workers: int | None = None
    prefetch_factor: int = 4
    persistent_workers: bool = True
    output_dir: str | Path | None = None
    output_format: str | tuple[str, ...] | None = None   # one name or several; kept as a tuple
    save_tile_embeddings: bool = False
    save_slide_embeddings: bool = False
    save_latents: bool = False
    scheduler_address: str | None = None
    channels_last: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        _positive("batch_size", self.batch_size, integer=True)
        _positive("num_workers", self.num_workers, integer=True)
        _positive("num_preprocessing_workers", self.num_preprocessing_workers, integer=True)
        _positive("prefetch_factor", self.prefetch_factor, integer=True)
        if self.num_gpus is not None and (not isinstance(self.num_gpus, int) or self.num_gpus < 0):
            raise ValueError(f"num_gpus must be an integer >= 0, got {self.num_gpus!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {self.precision!r}")
        if self.output_format is not None:
            given = self.output_format
            names = (given,) if isinstance(given, str) else tuple(given) if isinstance(given, (list, tuple)) else ()
            if not names or any(n not in OUTPUT_FORMATS for n in names):
                raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, a list of them, or None; "
                                 f"got {given!r}")
            object.__setattr__(self, "output_format", tuple(dict.fromkeys(names)))
        if self.scheduler_address is not None and not str(self.scheduler_address).startswith(("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")):
            raise ValueError(f"scheduler_address must look like 'tcp://host:port', got {self.scheduler_address!r}")

    def replace(self, **changes: Any) -> "ExecutionOptions":
        return dataclasses.replace(self, **changes)
