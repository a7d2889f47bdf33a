"""The feature identity: what made a set of features, recorded with them and compared on resume.

slide2vec 7.x records it under ``compatibility`` in every sidecar (encoder, a hash of its
code, output variant, precision, feature dtype, encoder input size, transform; for slide and
patient models also the tile encoder, its code and variant), and resume reuses an artifact only
when it matches.  Ours is the same record, in the store's run attributes (so a rerun with
another identity is refused before anything is written, `EmbeddingStore.check_run`) and in the
``.meta.json`` sidecars of the pt/npz exports.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping


class _MissingField:
    """A field the record does not hold (distinct from a recorded ``None``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING_FIELD"

    def __reduce__(self):
        return (_MissingField, ())


MISSING_FIELD = _MissingField()


def output_dtype(output_dtype: str | None, precision: str) -> str:
    """The on-disk feature dtype: ``output_dtype``, else fp16 for fp16 runs and fp32 otherwise."""
    return output_dtype or ("fp16" if precision == "fp16" else "fp32")


def encoder_code(spec) -> dict[str, str]:
    """What identifies the encoder's code and weights: a plug-in's class hash, or the preset recipe."""
    code = (spec.info or {}).get("encoder_code")
    if code:
        return dict(code)
    return {"fingerprint": hashlib.sha256(str(spec.key).encode()).hexdigest(), "object": f"slide2vec_dask:{spec.name}",
            "source": str((spec.info or {}).get("hub_id") or (spec.info or {}).get("repo") or "")}


def transform_record(spec) -> dict[str, Any]:
    """The photometric transform the engine applies: tiles are read at the tile size, then normalised."""
    return {"center_crop": None, "normalize": {"mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std]},
            "resize": None}


def feature_identity(model, tile_size_px: int, precision: str, dtype: str | None = None,
                     region_tile_multiple: int | None = None) -> dict[str, Any]:
    """The identity of the features ``model`` makes from ``tile_size_px`` tiles at ``precision``."""
    spec, tile = model.spec, model.tile_spec
    identity: dict[str, Any] = {
        "encoder_name": spec.name, "encoder_code": encoder_code(spec),
        "output_variant": (spec.info or {}).get("output_variant") or "default",
        "precision": precision, "feature_dtype": output_dtype(dtype, precision),
        "requested_tile_size_px": int(tile_size_px), "encoder_input_size_px": int(tile.tile_size_px),
        "transform": transform_record(tile),
    }
    if model.level != "tile":
        identity.update({"tile_encoder": tile.name, "tile_encoder_code": encoder_code(tile),
                         "tile_encoder_output_variant": (tile.info or {}).get("output_variant") or "default"})
    if region_tile_multiple is not None:
        identity["region_tile_multiple"] = int(region_tile_multiple)
        identity["requested_region_size_px"] = int(region_tile_multiple) * int(tile_size_px)
    return identity


def dense_identity(spec, plan, precision: str, images: bool, transform_spec=None) -> dict[str, Any]:
    """The request-wide identity of a dense request, by slide2vec 7.1.4's field names: what every dense
    sidecar records under ``compatibility`` and `Model.dense_identity_differences` compares.  Image grids
    also state their geometry (one per request); a region's read plan is per sample, recorded beside it.
    ``transform_spec`` (default ``spec``) is the spec the normalisation is read from."""
    request = plan.record()
    geometry = {k: request.pop(k) for k in ("target_size", "patch_size", "encoded_size", "pad", "grid_shape")}
    identity: dict[str, Any] = {
        "encoder_name": spec.name, "encoder_code": encoder_code(spec),
        "output_variant": (spec.info or {}).get("output_variant") or "default", "precision": precision,
    }
    if images:
        identity.update(geometry)
    identity.update(request)   # pad_mode, image_pad_value, window_size, overlap, feature_kind, attention_*, dtype
    identity["transform"] = transform_record(spec if transform_spec is None else transform_spec)
    return identity


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any],
                encoded_pixels: bool = True) -> dict[str, tuple[Any, Any]]:
    """``{field: (recorded, current)}`` for each field of ``current`` the record holds otherwise or not at all
    (`MISSING_FIELD`); the transform is left out when no pixels were encoded (a zero-tile slide)."""
    out = {}
    for field, value in current.items():
        if field == "transform" and not encoded_pixels:
            continue
        old = recorded.get(field, MISSING_FIELD)
        if old is MISSING_FIELD or _plain(old) != _plain(value):
            out[field] = (old, value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return value
    return value
