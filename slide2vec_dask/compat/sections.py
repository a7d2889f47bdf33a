"""slide2vec 7.x / hs2p tiling sections as our `PreprocessingConfig` fields (a leaf: stdlib only).

7.x takes ``PreprocessingConfig(tiling=TilingConfig(...), segmentation=SegmentationConfig(...),
filter=FilterConfig(...), preview=PreviewConfig(...), masks=MaskSamplingConfig(...))`` — hs2p's
config records, or plain dicts with their keys.  Their keys carry hs2p's names, which are ours
too; each section is handed on as a mapping.  A key our engine does not know (yet) is dropped
when it holds hs2p's default — it then asks for what the engine does anyway — and refused
otherwise, naming it.  ``masks`` is validated here (`compat.masks`); a tissue-only one gives
the tissue threshold, one with classes samples annotation bags (`tiling.annotations`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from slide2vec_dask.compat.masks import parse_masks

logger = logging.getLogger("slide2vec_dask")

# hs2p 6.1's defaults of the keys a section may carry that our engine may not know.
HS2P_DEFAULTS: dict[str, dict[str, Any]] = {
    "segmentation": {"sthresh_up": 255, "use_otsu": False, "sam2_checkpoint_path": None, "sam2_config_path": None,
                     "sam2_device": "cpu", "sam2_num_workers": None},
    # a_h: 0 fills no hole, which is what a mask without hole filling does
    "filtering": {"a_h": (2, 0), "filter_grayspace": False, "grayspace_saturation_threshold": 0.05,
                  "grayspace_fraction_threshold": 0.6, "filter_blur": False, "blur_threshold": 50.0,
                  "qc_spacing_um": 2.0},
    # preview cosmetics: colours and transparency of the rendered overlay
    "preview": {"tissue_contour_color": None, "mask_overlay_alpha": None},
}
COSMETIC = {"tissue_contour_color", "mask_overlay_alpha"}


def as_mapping(name: str, record: Any) -> dict[str, Any] | None:
    """A section given as a dict, a dataclass record (hs2p's) or an object with ``__dict__``."""
    if record is None:
        return None
    if isinstance(record, Mapping):
        return dict(record)
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    raise ValueError(f"{name} must be a mapping (or hs2p's {name} config record), got {type(record).__name__}")


def known_keys(name: str, given: Mapping[str, Any], known: set[str] | dict) -> dict[str, Any]:
    """The keys of ``given`` the engine knows; unknown keys at hs2p's default are dropped, others refused."""
    out, defaults = {}, HS2P_DEFAULTS.get(name, {})
    for key, value in given.items():
        if key in known:
            out[key] = value
        elif key in COSMETIC:
            continue   # rendering colours of the previews: ours draw their own
        elif key in defaults and any(_same(value, d) for d in
                                     (defaults[key] if isinstance(defaults[key], tuple) else (defaults[key],))):
            continue
        else:
            if key in defaults:
                raise ValueError(f"{name}.{key}={value!r} is not supported by this release (only its "
                                 f"default, which is what this release does)")
            raise ValueError(f"{name}.{key}={value!r}: unknown key; known keys are {sorted(known)}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def tiling_fields(tiling: Any, fields: set[str]) -> dict[str, Any]:
    """hs2p's ``TilingConfig`` as our fields: spacing, tile size, tolerance, overlap, backends."""
    t = as_mapping("tiling", tiling)
    out: dict[str, Any] = {}
    for theirs, ours in (("requested_spacing_um", "requested_spacing_um"),
                         ("requested_tile_size_px", "requested_tile_size_px"),
                         ("backend", "backend"), ("mask_backend", "mask_backend")):
        if t.get(theirs) is not None:
            out[ours] = t[theirs]
    if t.get("tolerance") is not None:
        out["tolerance" if "tolerance" in fields else "spacing_tolerance"] = t["tolerance"]
    overlap = t.get("overlap") or 0
    if "overlap" in fields:
        out["overlap"] = t.get("overlap") or 0.0
    elif overlap:
        raise ValueError(f"tiling.overlap={overlap!r}: overlapping tiles are not supported by this release")
    unknown = set(t) - {"requested_spacing_um", "requested_tile_size_px", "tolerance", "overlap", "backend",
                        "mask_backend", "requested_backend", "requested_mask_backend"}
    if unknown:
        raise ValueError(f"tiling: unknown key(s) {sorted(unknown)}")
    return out


def tissue_threshold(masks: Any) -> float | None:
    """The tissue threshold a tissue-only ``masks`` section names (validated as hs2p does); None for
    annotation sampling (classes: `tiling.annotations` samples them) or no section."""
    sampling = parse_masks(masks)
    if sampling is None or not sampling.tissue_only:
        return None
    return sampling.min_coverage.get("tissue")
