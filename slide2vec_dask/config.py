"""Validated run configuration: how slides are tiled, and how the work runs.

Both dataclasses check every value at construction — its type (a boolean is
``True``/``False``, never ``"flase"``; a number is a number), its range, and
each key of the dict-valued options — so the Python API, YAML files and CLI
overrides (all of which build these classes) refuse a typo before any
cluster starts or any file is touched.  An option this release cannot act on
does not exist.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from slide2vec_dask.compat import sections
from slide2vec_dask.slide.registry import backend_names
from slide2vec_dask.slide.remote import is_url
from slide2vec_dask.tissue import ARTIFACT_MODES, ARTIFACT_SPACINGS, LEARNED_METHODS

BACKENDS = backend_names()   # the reader registry is the one list (slide/registry.py)
PRECISIONS = ("fp16", "bf16", "fp32")
SEGMENTATION_METHODS = ("hsv", "otsu", "threshold", *LEARNED_METHODS)   # learned ones: slide2vec_dask.tissue


def output_formats() -> tuple[str, ...]:
    """The export formats (per-slide files next to the store): the exporter registry's list, the one list.

    Imported here, not at the top: listing the formats imports every format module (and the
    store), which a config that writes no export does not need; and the exporters never
    import this module, so asking them cannot run into an import cycle.
    """
    from slide2vec_dask.exporters import registry

    return registry.names()


def __getattr__(name: str) -> Any:
    if name == "OUTPUT_FORMATS":   # kept for callers of the old constant: computed, not a second list
        return output_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Segmentation and filtering: hs2p 6.1.0's keys and slide2vec 7.1.4's defaults (tiling/masks.py,
# tiling/contours.py and tiling/tile_qc.py do what hs2p does with each).
SEGMENTATION_DEFAULTS: dict[str, Any] = {
    "method": "hsv",       # hsv: hs2p's HSV gate; otsu / threshold: blurred saturation over Otsu's cut / sthresh
    "downsample": 64,      # segment the pyramid level whose downsample is nearest this
    "sthresh": 8,          # threshold: saturation (0-255) above which a pixel is tissue
    "sthresh_up": 255,     # the value tissue takes in the mask
    "mthresh": 7,          # otsu / threshold: median blur size (odd; 0 or 1: none)
    "close": 4,            # morphological closing size in mask pixels, 0 = off
    # learned methods (hest, grandqc, sam2) and the artefact pass: README "Learned tissue masks"
    "model_spacing_um": None,       # µm/px the model reads at; None: its publisher's (1, 10, 8)
    "patch_size": None,             # hest / grandqc input side; None: 512
    "overlap": 0,                   # px neighbouring patches share (their scores averaged)
    "confidence_threshold": 0.5,    # probability above which a pixel is tissue
    "batch_size": 8,                # patches per forward pass
    "device": "auto",               # auto (the worker's GPU, else CPU), cpu, cuda, cuda:N
    "checkpoint_path": None,        # hest / grandqc weights file; None: the hub (cache first)
    "sam2_checkpoint_path": None,   # slide2vec / hs2p names for SAM2
    "sam2_config_path": None,
    "sam2_device": None,            # None: `device`
    "sam2_num_workers": None,       # at most this many slides in SAM2 at once per worker
    "artifacts": None,              # None, "all" or "pen": GrandQC artefacts removed from the mask
    "artifacts_spacing_um": 1.0,    # 1, 1.5 or 2: which GrandQC artefact model
    "artifacts_checkpoint_path": None,
}
FILTERING_DEFAULTS: dict[str, Any] = {
    "ref_tile_size": None,  # side (px at the requested spacing) of the area unit; None: the tile size
    "a_t": 4,              # drop tissue contours of at most a_t reference tiles (less their holes)
    "a_h": 2,              # holes: recorded, and, as in hs2p 6.1.0, no hole is dropped by size
    "filter_white": False,
    "filter_black": False,
    "white_threshold": 220,
    "black_threshold": 25,
    "fraction_threshold": 0.9,
    "filter_grayspace": False,
    "grayspace_saturation_threshold": 0.05,
    "grayspace_fraction_threshold": 0.6,
    "filter_blur": False,
    "blur_threshold": 50.0,
    "qc_spacing_um": 2.0,   # the spacing the white / black / grayspace / blur filters look at
}
GRIDS = ("contours", "slide")
MAX_OVERLAP = 0.75    # neighbouring tiles share at most 3/4 of a tile (a block holds at most 16 tiles a cell)
PREVIEW_DEFAULTS: dict[str, Any] = {
    "save_mask_preview": False,
    "save_tiling_preview": False,
    "downsample": 32,
}


# Ranges every option is held to.  Spacings: what any scanner or pyramid level can mean
# (the readers' plausibility rule for level 0 is the same); tiles: below 16 px no model
# sees anything, above 4096 px a tile is a region.
SPACING_RANGE_UM = (0.01, 100.0)
TILE_SIZE_RANGE_PX = (16, 4096)
REGION_SIZE_MAX_PX = 16384


def _type_name(value: Any) -> str:
    return type(value).__name__


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6


def shown(value: Any, limit: int = 160) -> str:
    """``repr(value)`` bounded, for every message that quotes a config value: a full repr of a
    nested, shared value (a YAML alias bomb, 10**9 items) would never finish."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


YAML_1_1_BOOLEANS = ("yes", "no", "on", "off", "y", "n")


def check_bool(name: str, value: Any) -> bool:
    """A real boolean: ``"flase"``, ``"no"`` or ``1`` are refused, never taken as true."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    hint = ("; YAML's yes/no/on/off are not booleans here, write true or false"
            if isinstance(value, str) and value.strip().lower() in YAML_1_1_BOOLEANS else "")
    raise ValueError(f"{name} must be true or false, got {shown(value)} ({_type_name(value)}){hint}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    import numpy as np

    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer{_range(low, high)}, got {shown(value)} ({_type_name(value)})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer{_range(low, high)}, got {shown(value)}")
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 optional: bool = False, low_open: bool = False, high_open: bool = False) -> float | None:
    import numpy as np

    if value is None and optional:
        return None
    ok = (not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        span = _range(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a number{span}, got {shown(value)} ({_type_name(value)})")
    return value


def check_choice(name: str, value: Any, choices: tuple, optional: bool = False) -> Any:
    if (value is None and optional) or (isinstance(value, str) and value in choices):
        return value
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}" + (" or None" if optional else "")
                     + f", got {shown(value)}")


def check_path(name: str, value: Any, optional: bool = True) -> Path | None:
    import os

    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ValueError(f"{name} must be a path, got {shown(value)} ({_type_name(value)})")
    return value


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _grey(name: str, value: Any) -> Any:
    return check_number(name, value, 0, 255)


def _odd(name: str, value: Any) -> int:
    value = check_int(name, value, 0, 255)
    if value > 1 and value % 2 == 0:
        raise ValueError(f"{name} must be an odd integer in [3, 255] (a median blur's size; 0 or 1: none), "
                         f"got {value}")
    return value


# key -> check, for the dict-valued options: every key typed and ranged.
_SEGMENTATION_CHECKS = {
    "method": lambda n, v: check_choice(n, v, SEGMENTATION_METHODS),
    "downsample": lambda n, v: check_number(n, v, 1, 4096),
    "sthresh": lambda n, v: check_int(n, v, 0, 255),
    "sthresh_up": lambda n, v: check_int(n, v, 1, 255),
    "mthresh": _odd,
    "close": lambda n, v: check_int(n, v, 0, 255),
    "model_spacing_um": lambda n, v: check_number(n, v, *SPACING_RANGE_UM, optional=True),
    "patch_size": lambda n, v: check_int(n, v, 32, 4096, optional=True),
    "overlap": lambda n, v: check_int(n, v, 0, 4095),
    "confidence_threshold": lambda n, v: check_number(n, v, 0, 1),
    "batch_size": lambda n, v: check_int(n, v, 1, 1024),
    "device": lambda n, v: _device(n, v),
    "checkpoint_path": lambda n, v: _path_str(n, v),
    "sam2_checkpoint_path": lambda n, v: _path_str(n, v),
    "sam2_config_path": lambda n, v: _path_str(n, v),
    "sam2_device": lambda n, v: None if v is None else _device(n, v),
    "sam2_num_workers": lambda n, v: check_int(n, v, 1, 1024, optional=True),
    "artifacts": lambda n, v: check_choice(n, v, ARTIFACT_MODES, optional=True),
    "artifacts_spacing_um": lambda n, v: _artifact_spacing(n, v),
    "artifacts_checkpoint_path": lambda n, v: _path_str(n, v),
}


def _device(name: str, value: Any) -> str:
    if isinstance(value, str) and (value in ("auto", "cpu", "cuda") or (
            value.startswith("cuda:") and value[5:].isdigit())):
        return value
    raise ValueError(f"{name} must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {shown(value)}")


def _artifact_spacing(name: str, value: Any) -> float:
    """GrandQC publishes artefact models at 1, 1.5 and 2 µm/px only."""
    if check_number(name, value) not in ARTIFACT_SPACINGS:
        raise ValueError(f"{name} must be one of {', '.join(f'{s:g}' for s in ARTIFACT_SPACINGS)} "
                         f"(GrandQC's artefact models), got {shown(value)}")
    return float(value)


def _path_str(name: str, value: Any) -> str | None:
    """A path kept as text: the segmentation options are saved with each plan (JSON)."""
    return None if check_path(name, value) is None else str(value)


_FILTERING_CHECKS = {
    "ref_tile_size": lambda n, v: check_int(n, v, 1, TILE_SIZE_RANGE_PX[1], optional=True),
    "a_t": lambda n, v: check_number(n, v, 0),
    "a_h": lambda n, v: check_number(n, v, 0),
    "filter_white": check_bool,
    "filter_black": check_bool,
    "white_threshold": _grey,
    "black_threshold": _grey,
    "fraction_threshold": lambda n, v: check_number(n, v, 0, 1),
    "filter_grayspace": check_bool,
    "grayspace_saturation_threshold": lambda n, v: check_number(n, v, 0, 1),
    "grayspace_fraction_threshold": lambda n, v: check_number(n, v, 0, 1),
    "filter_blur": check_bool,
    "blur_threshold": lambda n, v: check_number(n, v, 0),
    "qc_spacing_um": lambda n, v: check_number(n, v, *SPACING_RANGE_UM),
}
_PREVIEW_CHECKS = {
    "save_mask_preview": check_bool,
    "save_tiling_preview": check_bool,
    "downsample": lambda n, v: check_number(n, v, 1, 4096),
}


def _merged(name: str, given: Mapping[str, Any] | None, defaults: dict[str, Any],
            checks: dict[str, Any]) -> dict[str, Any]:
    if given is not None and not isinstance(given, Mapping):
        raise ValueError(f"{name} must be a mapping of keys to values, got {shown(given)} ({_type_name(given)})")
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults), key=str)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {shown(unknown)}; known keys are {sorted(defaults)}")
    merged = {**defaults, **given}
    return {key: checks[key](f"{name}.{key}", value) for key, value in merged.items()}


@dataclass(frozen=True)
class PreprocessingConfig:
    """How a slide becomes tiles.

    ``requested_spacing_um`` / ``requested_tile_size_px`` left as ``None`` take
    the model's own contract (its spacing and tile size).  Tiles are laid as
    hs2p lays them (``grid="contours"``: a grid per tissue contour, the default)
    or on one grid over the slide (``grid="slide"``, hierarchical mode's);
    ``overlap`` is the share of a tile its neighbours overlap.
    """

    backend: str = "auto"
    requested_spacing_um: float | None = None
    requested_tile_size_px: int | None = None
    tissue_threshold: float = 0.01
    segmentation: Mapping[str, Any] = field(default_factory=dict)
    filtering: Mapping[str, Any] = field(default_factory=dict)
    preview: Mapping[str, Any] = field(default_factory=dict)
    use_supertiles: bool = True
    read_coordinates_from: str | Path | None = None
    read_tiles_from: str | Path | None = None
    on_the_fly: bool = True
    resume: bool = False
    region_tile_multiple: int | None = None
    requested_region_size_px: int | None = None
    spacing_tolerance: float = 0.05
    overlap: float = 0.0
    grid: str | None = None
    # slide2vec 7.x's sections (hs2p's config records or dicts), folded into the fields above by
    # `_fold_sections`: tiling -> spacing, tile size, tolerance, overlap, backends; filter ->
    # filtering; masks: tissue-only -> tissue_threshold, with classes -> annotation bags
    # (tiling/annotations.py).  Masks are read with tifffile.
    tiling: Any = None
    filter: Any = None
    masks: Any = None
    mask_backend: str = "auto"
    # slide2vec 7.x's reading knobs: save_tiles writes each slide's tile archive and embeds from it
    # (on_the_fly=False); gpu_decode is ExecutionOptions.gpu_decode (either asks for it); the others
    # mean nothing here and are accepted with a warning when set to anything but their default
    save_tiles: bool = False
    gpu_decode: bool = False
    adaptive_batching: bool = False
    jpeg_backend: str = "pil"
    num_cucim_workers: int = 4
    #: A slide read at a finer level than asked (a 40x slide at 20x: no 20x level): decode its JPEG
    #: tiles straight at 1/2, 1/4 or 1/8 (libjpeg's DCT scaling; JPEG 2000: a reduced wavelet level)
    #: instead of in full and then resizing; a warning where the codec cannot (README "40x slides").
    #: Off by default: on real tissue it changes embeddings more than JPEG re-encoding does.
    scaled_decode: bool = False

    def __post_init__(self) -> None:
        self._fold_sections()
        self._slide2vec_knobs()
        check_choice("mask_backend", self.mask_backend, ("auto", "tifffile"))
        check_choice("backend", self.backend, BACKENDS)
        check_number("requested_spacing_um", self.requested_spacing_um, *SPACING_RANGE_UM, optional=True)
        check_int("requested_tile_size_px", self.requested_tile_size_px, *TILE_SIZE_RANGE_PX, optional=True)
        check_number("tissue_threshold", self.tissue_threshold, 0, 1)
        check_number("spacing_tolerance", self.spacing_tolerance, 0, 1, high_open=True)
        check_number("overlap", self.overlap, 0, MAX_OVERLAP)   # (beyond: over 16 tiles start in one tile's square)
        check_choice("grid", self.grid, GRIDS, optional=True)
        for name in ("use_supertiles", "resume", "on_the_fly", "scaled_decode"):
            check_bool(name, getattr(self, name))
        for name in ("read_coordinates_from", "read_tiles_from"):
            check_path(name, getattr(self, name))
        if self.read_coordinates_from is not None and self.read_tiles_from is not None:
            raise ValueError("give read_coordinates_from or read_tiles_from, not both: a tile archive brings "
                             "its own coordinates (its manifest)")
        seg = _merged("segmentation", self.segmentation, SEGMENTATION_DEFAULTS, _SEGMENTATION_CHECKS)
        filt = _merged("filtering", self.filtering, FILTERING_DEFAULTS, _FILTERING_CHECKS)
        prev = _merged("preview", self.preview, PREVIEW_DEFAULTS, _PREVIEW_CHECKS)
        object.__setattr__(self, "segmentation", seg)
        object.__setattr__(self, "filtering", filt)
        object.__setattr__(self, "preview", prev)
        if self.region_tile_multiple is not None:
            check_int("region_tile_multiple (regions of R x R tiles)", self.region_tile_multiple, 2, 64)
        check_int("requested_region_size_px", self.requested_region_size_px, TILE_SIZE_RANGE_PX[0] * 2,
                  REGION_SIZE_MAX_PX, optional=True)
        if self.requested_region_size_px is not None and self.requested_tile_size_px is not None:
            self.region_multiple(self.requested_tile_size_px)
        hierarchical = self.region_tile_multiple is not None or self.requested_region_size_px is not None
        if hierarchical and self.grid == "contours":
            raise ValueError("hierarchical mode (region_tile_multiple / requested_region_size_px) needs one grid "
                             "over the slide: use grid='slide' (or leave grid unset)")
        if self.overlap and (hierarchical or self.grid == "slide"):
            raise ValueError(f"overlap={self.overlap} needs the per-contour grid: the slide-wide grid (grid='slide', "
                             "and hierarchical mode) lays tiles edge to edge; drop overlap or use grid='contours'")
        if hierarchical and not self.on_the_fly:
            raise ValueError("on_the_fly=False (tile archives) has no hierarchical mode: a region's padding "
                             "tiles have no place in an archive; drop region_tile_multiple / "
                             "requested_region_size_px, or keep on_the_fly=True")

    def grid_for(self, tile_size_px: int) -> str:
        """The tile layout: ``grid``, else hs2p's grid per tissue contour, or one slide-wide grid
        in hierarchical mode (regions need one)."""
        if self.grid is not None:
            return self.grid
        return "slide" if self.region_multiple(tile_size_px) is not None else "contours"
    def _slide2vec_knobs(self) -> None:
        import logging

        for name in ("save_tiles", "gpu_decode", "adaptive_batching"):
            check_bool(name, getattr(self, name))
        check_choice("jpeg_backend", self.jpeg_backend, ("pil", "turbojpeg"))
        check_int("num_cucim_workers", self.num_cucim_workers, 1, 1024)
        if self.save_tiles:
            object.__setattr__(self, "on_the_fly", False)
        ignored = {"adaptive_batching": (self.adaptive_batching, "batches follow the engine's blocks"),
                   "jpeg_backend": (self.jpeg_backend != "pil", "tile archives use our JPEG encoder"),
                   "num_cucim_workers": (self.num_cucim_workers != 4, "our readers decode in the engine's threads")}
        for name, (given, why) in ignored.items():
            if given:
                logging.getLogger("slide2vec_dask").warning("PreprocessingConfig(%s=%r) is ignored: %s", name,
                                                            getattr(self, name), why)

    def _fold_sections(self) -> None:
        """slide2vec 7.x's ``tiling`` / ``segmentation`` / ``filter`` / ``preview`` / ``masks`` (records or
        dicts with hs2p's names) into our fields (`compat.sections`); the records stay as given."""
        names = {f.name for f in dataclasses.fields(self)}
        if self.tiling is not None:
            for key, value in sections.tiling_fields(self.tiling, names).items():
                object.__setattr__(self, key, value)
        if self.filter is not None:
            given = sections.as_mapping("filter", self.filter)
            object.__setattr__(self, "filtering", {**dict(self.filtering or {}), **given})
        for name, defaults in (("segmentation", SEGMENTATION_DEFAULTS), ("filtering", FILTERING_DEFAULTS),
                               ("preview", PREVIEW_DEFAULTS)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                value = sections.as_mapping(name, value)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, sections.known_keys(name, value, defaults))
        threshold = sections.tissue_threshold(self.masks)
        if threshold is not None:
            object.__setattr__(self, "tissue_threshold", threshold)

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
        # a field changed by name wins over the 7.x section it was folded from
        folded = {"tiling": {"requested_spacing_um", "requested_tile_size_px", "spacing_tolerance", "tolerance",
                             "overlap", "backend", "mask_backend"}, "filter": {"filtering"}, "masks": {"tissue_threshold"}}
        for section, fields in folded.items():
            if section not in changes and fields & set(changes):
                changes[section] = None
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ExecutionOptions:
    """How the work runs and what is written.

    ``num_workers`` counts threads, not processes: the threads that read and
    decode blocks (without a cluster, ``Model.embed_*`` run one more beside
    them, so the encoder's device thread always has a block waiting; the
    embedded local cluster gets ``num_workers`` threads per worker process;
    on any cluster it fixes the window below instead of following the
    cluster's threads).  At most threads x ``prefetch_factor`` blocks are in
    flight, which bounds memory.  ``persistent_workers`` acts only without a
    cluster: False frees the model after each ``Model.embed_*`` call (a
    cluster's workers keep theirs for the cluster's life).
    ``scheduler_address`` runs on an existing Dask cluster; an active
    ``distributed.Client`` is used as well, as everywhere in Dask.

    ``save_tile_embeddings`` keeps the tile embeddings of a slide- or
    patient-level model's run (they are an intermediate otherwise);
    ``save_slide_embeddings`` keeps a patient-level run's slide embeddings;
    ``save_latents`` stores the model's latents next to its embeddings.
    ``save_dense`` (`Pipeline.run`, ViT encoders) also keeps every tissue tile's patch-token
    grid, from the same forward, in the store's ``dense/<sample_id>`` group
    (``embedding (tile, token_y, token_x, feature)``, one chunk per tile) in ``dense_dtype``.

    ``gpu_decode`` decodes the slide's JPEG tiles on the GPU (nvJPEG, through
    ``torchvision.io.decode_jpeg``) instead of on the CPU threads, for runs
    where decoding is what starves the GPU; where there is no CUDA device or
    the file's tiles are not plain JPEG it falls back to the CPU decoder with
    a warning.  ``save_telemetry`` also writes every block's timings and every
    GPU sample to ``<output_dir>/telemetry.jsonl`` (the run report is always
    written).
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
    save_dense: bool = False        # Pipeline.run: every tissue tile's token grid in dense/<sample_id>
    dense_dtype: str = "fp16"       # ... stored as "fp16" or "fp32"
    gpu_decode: bool = False
    save_telemetry: bool = False
    # slide2vec 7.x: the on-disk feature dtype of the pt/npz files and of in-memory results
    # (None: fp16 for fp16 runs, else fp32), and its name for the reading threads
    output_dtype: str | None = None
    num_workers_per_gpu: int | None = None
    # fsspec's options for slides at URLs (endpoint_url, anon, profile...); credentials are better left
    # to the environment.  Never shown (repr), stored or logged.
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1, 1 << 16)
        check_bool("save_dense", self.save_dense)
        check_choice("dense_dtype", self.dense_dtype, ("fp16", "fp32"))
        check_int("num_workers", self.num_workers, 1, optional=True)
        check_int("num_preprocessing_workers", self.num_preprocessing_workers, optional=True)
        if self.num_preprocessing_workers is not None and self.num_preprocessing_workers < 1:
            raise ValueError(f"num_preprocessing_workers must be non-negative, and here at least 1 (None: the CPU "
                             f"count), got {self.num_preprocessing_workers}")
        check_int("prefetch_factor", self.prefetch_factor, 1, 1024)
        check_int("num_gpus", self.num_gpus, optional=True)
        if self.num_gpus is not None and self.num_gpus < 1:   # slide2vec 7.x: an error, its wording
            raise ValueError(f"num_gpus must be at least 1 (or None: every visible GPU), got {self.num_gpus}; to run "
                             "on the CPU, use Model(..., device='cpu') (command line: --run-on-cpu or --num-gpus 0)")
        check_choice("precision", self.precision, PRECISIONS, optional=True)
        check_choice("output_dtype", self.output_dtype, ("fp16", "fp32"), optional=True)
        check_int("num_workers_per_gpu", self.num_workers_per_gpu, 0, optional=True)
        if self.num_workers is None and self.num_workers_per_gpu is not None:
            # one reading pool per worker process, and the embedded cluster has one process per GPU;
            # slide2vec's 0 (read in the main process) is one reading thread here
            object.__setattr__(self, "num_workers", max(1, self.num_workers_per_gpu))
        for name in ("persistent_workers", "save_tile_embeddings", "save_slide_embeddings", "save_latents",
                     "channels_last", "overwrite", "gpu_decode", "save_telemetry"):
            check_bool(name, getattr(self, name))
        check_path("output_dir", self.output_dir)
        if is_url(self.output_dir):
            raise ValueError(
                f"output_dir {shown(self.output_dir)} is a URL; the store is written to a local or mounted folder "
                "only: its guarantees (a run killed at any moment resumes; a rerun gives an identical store; one "
                "run at a time) rest on atomic renames and an exclusive lock file, which object stores do not "
                "offer. Write to local disk (or a shared volume) and copy the finished folder to the bucket "
                "(aws s3 sync, gcloud storage rsync)")
        if self.storage_options is not None and (not isinstance(self.storage_options, Mapping)
                                                 or not all(isinstance(k, str) for k in self.storage_options)):
            raise ValueError("storage_options must be a mapping of fsspec option names to values, got "
                             f"{_type_name(self.storage_options)}")
        if self.output_format is not None:
            given, known = self.output_format, output_formats()
            names = (given,) if isinstance(given, str) else tuple(given) if isinstance(given, (list, tuple)) else ()
            if not names or any(n not in known for n in names):
                raise ValueError(f"output_format must be one of {known}, a list of them, or None; got {shown(given)}")
            object.__setattr__(self, "output_format", tuple(dict.fromkeys(names)))
        if self.scheduler_address is not None and not isinstance(self.scheduler_address, str):
            raise ValueError(f"scheduler_address must be a string like 'tcp://host:port', "
                             f"got {shown(self.scheduler_address)}")
        if self.scheduler_address is not None and not str(self.scheduler_address).startswith(("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")):
            raise ValueError(f"scheduler_address must look like 'tcp://host:port', got {shown(self.scheduler_address)}")

    def replace(self, **changes: Any) -> "ExecutionOptions":
        if self.num_gpus == 0 and "num_gpus" not in changes:   # a CPU run stays one (`with_gpus`)
            return dataclasses.replace(self, num_gpus=None, **changes).with_gpus(0)
        return dataclasses.replace(self, **changes)

    def with_output_dir(self, output_dir: str | Path | None) -> "ExecutionOptions":
        """slide2vec 7.x: a copy writing to ``output_dir`` (None: this one)."""
        return self if output_dir is None else self.replace(output_dir=Path(output_dir))

    def resolved_num_gpus(self) -> int:
        """slide2vec 7.x: the GPUs a run uses, ``num_gpus`` or every visible one (at least 1)."""
        if self.num_gpus is not None:
            return int(self.num_gpus)
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1

    def with_gpus(self, num_gpus: int) -> "ExecutionOptions":
        """A copy that runs on ``num_gpus`` GPUs, 0 meaning the CPU: how a device choice
        (``Model(device="cpu")``, a CPU-only machine) reaches the engine, where the public field
        refuses 0 as slide2vec 7.x does."""
        new = dataclasses.replace(self, num_gpus=None)
        object.__setattr__(new, "num_gpus", int(num_gpus))
        return new
