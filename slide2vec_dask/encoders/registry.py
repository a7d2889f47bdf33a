"""The preset registry: one entry per named model, as data (timm-style).

A preset module calls `register_preset(...)` at import; the registry finds
those modules itself (`preset_modules`), so adding a model touches one place.  `get_preset` and `list_models` are all callers need.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from slide2vec_dask.encoders.base import EncoderSpec

LEVELS = ("tile", "slide", "patient")

# name -> factory(checkpoint_path=None, output_variant=None) -> EncoderSpec
_PRESETS: dict[str, Callable[..., EncoderSpec]] = {}
_LEVEL: dict[str, str] = {}
_ABOUT: dict[str, "PresetAbout"] = {}


@dataclass(frozen=True)
class PresetAbout:
    """What a preset declares about itself beyond its factory: for `slide2vec-dask models -v` and the docs.

    ``outputs`` maps each output variant to its dimension (default first);
    ``architecture_module`` builds the bare published module (called under
    ``torch.device('meta')`` to count parameters without memory).
    """

    architecture: str
    outputs: tuple[tuple[str, int], ...]
    architecture_module: Callable[[], Any] | None = None


def register_preset(name: str, level: str = "tile", *, architecture: str = "",
                    outputs: dict | tuple | None = None, architecture_module: Callable[[], Any] | None = None):
    """Decorator registering a preset factory.

    Tile level: ``factory(checkpoint_path=None, output_variant=None) -> EncoderSpec``.
    Slide / patient level: ``factory(checkpoint_path=None, output_variant=None,
    tile_checkpoint_path=None) -> AggregatorSpec`` (``output_variant`` may be
    refused with a ValueError when the model has only one output).
    ``architecture``, ``outputs`` and ``architecture_module`` describe it (`PresetAbout`).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    key = name.lower()  # get_preset looks names up case-insensitively

    def decorate(factory: Callable[..., EncoderSpec]) -> Callable[..., EncoderSpec]:
        if key in _PRESETS:
            raise ValueError(f"{name!r} is already registered in the encoders registry")
        _PRESETS[key] = factory
        _LEVEL[key] = level
        _ABOUT[key] = PresetAbout(architecture, tuple(dict(outputs or {}).items()), architecture_module)
        return factory

    return decorate


def preset_about(name: str) -> PresetAbout:
    """The `PresetAbout` of a registered preset."""
    get_preset(name)
    return _ABOUT[canonical_name(name)]


# Where presets are declared: the tile table, and one module per slide / patient model in the
# aggregators package.  The list of modules is read from the package itself, so adding a model is
# one entry in the table or one new module there, never an edit here.
TILE_PRESET_MODULE = "slide2vec_dask.encoders.presets"
AGGREGATOR_PACKAGE = "slide2vec_dask.encoders.aggregators"
_loaded = False


def preset_modules() -> list[str]:
    """The modules that declare presets: the tile table, then every public module of the aggregators package."""
    import importlib
    import pkgutil

    package = importlib.import_module(AGGREGATOR_PACKAGE)
    found = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    return [TILE_PRESET_MODULE] + [f"{AGGREGATOR_PACKAGE}.{name}" for name in found]


def _load_presets() -> None:
    global _loaded
    if _loaded:
        return
    import importlib

    for module in preset_modules():  # each registers its presets on import
        importlib.import_module(module)
    _loaded = True   # (before the providers: one that reads the registry must not run them again)
    _run_providers()


# -- installed encoder providers (slide2vec 7.x's entry points) ----------------------------------
PROVIDER_GROUPS = ("slide2vec.encoders", "slide2vec_dask.encoders")


@dataclass(frozen=True)
class EncoderProviderDiagnostic:
    """An installed provider that failed: nothing it registered was kept."""

    provider_key: str     # the entry point's name
    provider: str         # its value, ``module:function``
    exception_type: str
    message: str

    def concise(self) -> str:
        return f"{self.exception_type}: {self.message}"


_DIAGNOSTICS: list[EncoderProviderDiagnostic] = []


def _run_providers() -> None:
    """Call every installed provider (entry points of `PROVIDER_GROUPS`, by name then value) once, each
    all or nothing: a provider that raises (or collides with a registered name) leaves no preset behind."""
    from importlib import metadata

    found = metadata.entry_points()
    eps = []
    for group in PROVIDER_GROUPS:
        try:
            eps += list(found.select(group=group))
        except AssertionError:   # a stand-in that knows one group only
            continue
    for ep in sorted(eps, key=lambda e: (str(e.name), str(e.value))):
        saved = (dict(_PRESETS), dict(_LEVEL), dict(_ABOUT))
        try:
            ep.load()()
        except Exception as exc:   # any failure of a user's provider: rolled back and reported
            for live, copy in zip((_PRESETS, _LEVEL, _ABOUT), saved):
                live.clear()
                live.update(copy)
            _DIAGNOSTICS.append(EncoderProviderDiagnostic(str(ep.name), str(ep.value), type(exc).__name__,
                                                          str(exc).strip("'\"") if isinstance(exc, KeyError) else str(exc)))
    _DIAGNOSTICS.sort(key=lambda d: (d.provider_key, d.provider))


def list_encoder_provider_diagnostics() -> tuple[EncoderProviderDiagnostic, ...]:
    """The installed encoder providers that failed, sorted by name and value."""
    _load_presets()
    return tuple(_DIAGNOSTICS)


def _warn_providers() -> None:
    if _DIAGNOSTICS:
        import warnings

        detail = "; ".join(f"{d.provider_key!r}: {d.concise()}" for d in _DIAGNOSTICS)
        warnings.warn(f"Skipped Encoder provider{'' if len(_DIAGNOSTICS) == 1 else 's'} {detail}", RuntimeWarning,
                      stacklevel=3)


class UnknownModelError(KeyError, ValueError):
    """An unknown model name (a ``ValueError`` here, a ``KeyError`` in slide2vec 7.x)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _EncoderRegistry:
    """slide2vec 7.x's ``encoder_registry``: ``require(name)`` is what the name was registered with
    (a plug-in's class, a preset's factory); ``names()``; ``in``."""

    def require(self, name: str):
        factory = get_preset(name)
        return getattr(factory, "owner", factory)

    def names(self) -> list[str]:
        return list_models()

    def __contains__(self, name: object) -> bool:
        _load_presets()
        return isinstance(name, str) and canonical_name(name) in _PRESETS


encoder_registry = _EncoderRegistry()


# slide2vec's other spellings of preset names (its model_settings aliases): a 7.x config or
# script naming ``conchv1.5`` or ``prov-gigapath`` finds the same preset.
ALIASES = {
    "conch-v1.5": "conchv15", "conch_v15": "conchv15", "conchv1.5": "conchv15", "conchv1_5": "conchv15",
    "phikon-v2": "phikonv2", "h-optimus-0-mini": "h0-mini", "prov-gigapath": "gigapath",
    "prov-gigapath-tile": "gigapath", "prov-gigapath-slide": "gigapath-slide", "kaiko-midnight": "midnight",
    "mstar-slide": "mstar", "dinov2": "dinov2-vitb14", "dinov2-base": "dinov2-vitb14",
    "dinov2-vitb": "dinov2-vitb14", "dinov3": "dinov3-vitb16", "dinov3-vitb": "dinov3-vitb16",
}


def canonical_name(name: str) -> str:
    """The registered name ``name`` stands for: lower case, slide2vec's aliases resolved."""
    key = str(name).strip().lower()
    return key if key in _PRESETS else ALIASES.get(key, key)


def get_preset(name: str) -> Callable[..., EncoderSpec]:
    _load_presets()
    key = canonical_name(name)
    if key not in _PRESETS:
        close = difflib.get_close_matches(key, list(_PRESETS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        skipped = "".join(f"; skipped provider {d.provider_key!r} ({d.concise()})" for d in _DIAGNOSTICS)
        raise UnknownModelError(f"unknown model preset {name!r}{hint} (list_models() shows all {len(_PRESETS)}). "
                                f"Available: {', '.join(sorted(_PRESETS))}{skipped}")
    return _PRESETS[key]


def list_models(level: str | None = None) -> list[str]:
    """Names of the registered presets, optionally only those of one level."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS} or None, got {level!r}")
    _load_presets()
    _warn_providers()
    return sorted(n for n in _PRESETS if level is None or _LEVEL[n] == level)


def preset_level(name: str) -> str:
    """``"tile"``, ``"slide"`` or ``"patient"`` for a registered preset."""
    get_preset(name)  # a clear error for unknown names
    return _LEVEL[canonical_name(name)]
