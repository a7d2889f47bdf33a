"""slide2vec 7.x's ``masks`` section (hs2p's ``MaskSamplingConfig``), validated as hs2p validates it
(a leaf: stdlib only, so the config checks it when made; `tiling.annotations` acts on it).

``pixel_mapping`` class -> label value(s) 0..255 (each value one class's); ``min_coverage`` class ->
the share of a tile the class must cover for the tile to join its bag (only listed classes are
sampled); ``colors`` class -> RGB or None (previews, the QC gallery); ``strategy`` joint |
independent; ``output_mode`` per_annotation | merged.  The shipped ``{background: 0, tissue: 1}``
vocabulary sampling only ``tissue`` is plain tissue tiling.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping

TISSUE_ONLY = {"background": (0,), "tissue": (1,)}
STRATEGIES = ("joint", "independent")
OUTPUT_MODES = ("per_annotation", "merged")


@dataclass(frozen=True)
class MaskSampling:
    """A validated ``masks`` section (hs2p's ``MaskSamplingConfig`` meanings)."""

    pixel_mapping: dict[str, tuple[int, ...]]
    min_coverage: dict[str, float]
    colors: dict[str, tuple[int, int, int] | None] | None = None
    output_mode: str = "per_annotation"
    strategy: str = "joint"

    @property
    def classes(self) -> tuple[str, ...]:
        """The sampled classes, in ``min_coverage``'s order (hs2p's active annotations)."""
        return tuple(self.min_coverage)

    @property
    def tissue_only(self) -> bool:
        """Plain tissue tiling: the shipped vocabulary sampling only tissue (or nothing), as hs2p decides."""
        return not self.min_coverage or (self.pixel_mapping == TISSUE_ONLY and set(self.min_coverage) == {"tissue"})

    @property
    def bags(self) -> tuple[str, ...]:
        """The bags a slide gets: each class, or ``("merged",)``."""
        return ("merged",) if self.output_mode == "merged" else self.classes

    def record(self) -> dict[str, Any]:
        """JSON-able, for a plan's config (what makes a saved plan reusable)."""
        return {"pixel_mapping": {k: list(v) for k, v in self.pixel_mapping.items()},
                "min_coverage": dict(self.min_coverage),
                "output_mode": self.output_mode, "strategy": self.strategy}


def parse_masks(masks: Any) -> MaskSampling | None:
    """``masks`` (a mapping or a dataclass record) validated as hs2p validates it; None when absent.

    A class whose pixel value is None is dropped (slide2vec's way to remove a default class), as
    is a None coverage (that class is declared, not sampled)."""
    if masks is None:
        return None
    m = _mapping("masks", masks)
    unknown = set(m) - {"pixel_mapping", "min_coverage", "colors", "output_mode", "strategy"}
    if unknown:
        raise ValueError(f"masks: unknown key(s) {sorted(unknown)}; known: pixel_mapping, min_coverage, colors, "
                         "output_mode, strategy")
    mapping = _entries(m.get("pixel_mapping"), "pixel_mapping")
    coverage = _entries(m.get("min_coverage"), "min_coverage")
    if mapping is None:
        raise ValueError("masks.pixel_mapping is required (class name -> label value, e.g. {'background': 0, "
                         "'tumor': 1})")
    if coverage is None:
        raise ValueError("masks.min_coverage is required (class name -> the share of a tile it must cover)")
    colors = _entries(m.get("colors"), "colors")
    removed = {k for k, v in mapping.items() if v is None}
    mapping = {k: v for k, v in mapping.items() if v is not None}
    coverage = {k: v for k, v in coverage.items() if k not in removed and v is not None}
    if colors is not None:
        colors = {k: v for k, v in colors.items() if k not in removed}
    pixel_mapping = _checked_mapping(mapping)
    checked_coverage = {}
    for name, value in coverage.items():
        if name not in pixel_mapping:
            raise ValueError(f"masks.min_coverage names {name!r}, which pixel_mapping does not declare "
                             f"(declared: {sorted(pixel_mapping)})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"masks.min_coverage[{name!r}] must be a number in [0, 1], got {value!r}")
        checked_coverage[name] = float(value)
    output_mode = m.get("output_mode") or "per_annotation"
    strategy = m.get("strategy") or "joint"
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"masks.output_mode must be one of {list(OUTPUT_MODES)}, got {output_mode!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"masks.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return MaskSampling(pixel_mapping, checked_coverage, _checked_colors(colors, pixel_mapping), output_mode,
                        strategy)


def _mapping(name: str, record: Any) -> dict[str, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    fields = getattr(record, "__dataclass_fields__", None)
    if fields is not None:
        return {f: getattr(record, f) for f in fields}
    raise ValueError(f"{name} must be a mapping (or slide2vec's MaskSamplingConfig), got {type(record).__name__}")


def _entries(value: Any, name: str) -> dict[str, Any] | None:
    """A mapping, or slide2vec's YAML spelling: a list of one-entry mappings."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(e, Mapping) for e in value):
        return {str(k): v for e in value for k, v in e.items()}
    raise ValueError(f"masks.{name} must be a mapping (class -> value) or a list of one-entry mappings, "
                     f"got {type(value).__name__}")


def check_class_name(name: str) -> str:
    """Class names become folder names (``tile_embeddings/<class>/``): one safe path component."""
    if name == "merged":
        raise ValueError("masks: the class name 'merged' is reserved for output_mode='merged' (one bag of all)")
    if not name or name in {".", ".."} or any(ch in name for ch in "/\\\x00"):
        raise ValueError(f"masks: class name {name!r} must be a safe folder name (non-empty, no / or \\, "
                         "not . or ..)")
    return name


def _checked_mapping(mapping: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    seen: dict[int, str] = {}
    out = {}
    for name, entry in mapping.items():
        check_class_name(name)
        values = tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)
        if not values:
            raise ValueError(f"masks.pixel_mapping[{name!r}] lists no label value")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"masks.pixel_mapping[{name!r}] must be integer label values, got {value!r}")
            if not 0 <= int(value) <= 255:
                raise ValueError(f"masks.pixel_mapping[{name!r}]={int(value)} is outside the label range [0, 255]")
            if int(value) in seen:
                raise ValueError(f"masks.pixel_mapping: {name!r} and {seen[int(value)]!r} both claim label value "
                                 f"{int(value)}; each value belongs to one class")
            seen[int(value)] = name
        out[name] = tuple(int(v) for v in values)
    return out


def _checked_colors(colors: dict[str, Any] | None, mapping: dict[str, tuple[int, ...]]):
    if colors is None:
        return None
    missing, extra = sorted(set(mapping) - set(colors)), sorted(set(colors) - set(mapping))
    if missing or extra:
        raise ValueError(f"masks.colors must list exactly pixel_mapping's classes (missing {missing}, "
                         f"unexpected {extra})")
    out = {}
    for name, color in colors.items():
        if color is not None and (isinstance(color, (str, bytes)) or len(color) != 3 or any(
                isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= 255 for c in color)):
            raise ValueError(f"masks.colors[{name!r}] must be None or three integers 0..255, got {color!r}")
        out[name] = None if color is None else tuple(int(c) for c in color)
    return out
