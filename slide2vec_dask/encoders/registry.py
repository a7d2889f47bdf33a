"""The preset registry: one entry per named model, as data (timm-style).

A preset module calls `register_preset(...)` at import; adding a model
touches one place.  `get_preset` and `list_models` are all callers need.
"""

from __future__ import annotations

import difflib
from typing import Callable

from slide2vec_dask.encoders.base import EncoderSpec

LEVELS = ("tile", "slide", "patient")

# name -> factory(checkpoint_path=None, output_variant=None) -> EncoderSpec
_PRESETS: dict[str, Callable[..., EncoderSpec]] = {}
_LEVEL: dict[str, str] = {}


def register_preset(name: str, level: str = "tile"):
    """Decorator registering a preset factory.

    Tile level: ``factory(checkpoint_path=None, output_variant=None) -> EncoderSpec``.
    Slide / patient level: ``factory(checkpoint_path=None, output_variant=None,
    tile_checkpoint_path=None) -> AggregatorSpec`` (``output_variant`` may be
    refused with a ValueError when the model has only one output).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    key = name.lower()  # get_preset looks names up case-insensitively

    def decorate(factory: Callable[..., EncoderSpec]) -> Callable[..., EncoderSpec]:
        if key in _PRESETS:
            raise ValueError(f"preset {name!r} is registered twice")
        _PRESETS[key] = factory
        _LEVEL[key] = level
        return factory

    return decorate


PRESET_MODULES = (
    "slide2vec_dask.encoders.presets",
    "slide2vec_dask.encoders.aggregators.gigapath",
    "slide2vec_dask.encoders.aggregators.titan",
    "slide2vec_dask.encoders.aggregators.moozy",
    "slide2vec_dask.encoders.aggregators.prism",
)


def _load_presets() -> None:
    import importlib

    # Preset modules register themselves on import; a missing module just means no presets yet.
    for module in PRESET_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def get_preset(name: str) -> Callable[..., EncoderSpec]:
    _load_presets()
    key = name.lower()
    if key not in _PRESETS:
        close = difflib.get_close_matches(key, list(_PRESETS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}{hint} (list_models() shows all {len(_PRESETS)})")
    return _PRESETS[key]


def list_models(level: str | None = None) -> list[str]:
    """Names of the registered presets, optionally only those of one level."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS} or None, got {level!r}")
    _load_presets()
    return sorted(n for n in _PRESETS if level is None or _LEVEL[n] == level)


def preset_level(name: str) -> str:
    """``"tile"``, ``"slide"`` or ``"patient"`` for a registered preset."""
    get_preset(name)  # a clear error for unknown names
    return _LEVEL[name.lower()]
