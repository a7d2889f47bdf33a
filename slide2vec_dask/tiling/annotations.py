"""Annotation-aware bags, as slide2vec 7.x / hs2p 6.1 sample them: one bag of tiles per class.

``PreprocessingConfig(masks=...)`` (slide2vec's ``MaskSamplingConfig`` or a dict with its keys)
names the classes of a slide's label mask: ``pixel_mapping`` class -> label value(s),
``min_coverage`` class -> the share of a tile the class must cover for the tile to join that
class's bag (only listed classes are sampled), ``colors`` (previews), ``strategy`` and
``output_mode``.  The shipped ``{background: 0, tissue: 1}`` sampling ``tissue`` is plain
tissue tiling; anything else samples annotations, as hs2p decides.

* The mask is read on the slide's segmentation level: a label raster (TIFF, any resolution,
  8 or 16 bit, values 0..255, every value declared) resized nearest-neighbour as hs2p reads
  it, or vector annotations (QuPath's GeoJSON export or plain GeoJSON) rasterised there.
* ``strategy="joint"``: one tiling over the union of the sampled classes (its contours, its
  tile filters), then each class keeps the tiles it covers at least ``min_coverage``;
  ``"independent"``: each class is tiled on its own, as tissue is.
* The plan holds every tile once (a tile in two bags is embedded once) with a class coverage
  table and each class's bag; ``output_mode="merged"`` makes one bag of every sampled tile.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from slide2vec_dask.compat.masks import MaskSampling, check_class_name, parse_masks

__all__ = ["MaskSampling", "check_class_name", "parse_masks", "read_labels", "rasterise", "read_geojson",
           "class_masks", "union_mask", "merge_bags", "bag_indices", "plan_bags", "bags_of", "bag_plan", "Bags", "Shape"]

VECTOR_SUFFIXES = (".geojson", ".json")
ANNOTATION_ATTRS = ("classes", "bags", "bag_tiles", "strategy", "output_mode", "colors")   # a plan's meta, kept
MAX_MASK_PIXELS = 1 << 30       # a label raster's pixels we decode (its header is checked first)
MAX_VECTOR_BYTES = 1 << 30      # a GeoJSON file's size we parse


# -- reading a slide's annotations -------------------------------------------------------------------
def is_vector(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def read_labels(path: str | Path, shape: tuple[int, int], slide_dimensions: tuple[int, int],
                sampling: MaskSampling, sample: str = "") -> np.ndarray:
    """The slide's labels (uint8) on a ``shape`` (height, width) raster covering the whole slide."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{sample or 'slide'}: annotation file not found: {path}")
    if is_vector(path):
        return rasterise(read_geojson(path, sample), shape, slide_dimensions, sampling, f"{sample}: {path}")
    return read_label_raster(path, shape, sampling, sample)


def read_label_raster(path: Path, shape: tuple[int, int], sampling: MaskSampling, sample: str = "") -> np.ndarray:
    """A label TIFF / PNG read as hs2p reads it: its coarsest level at least as fine as ``shape``
    (level 0 when none is), every value checked to be declared, then resized nearest-neighbour
    (OpenCV's, so the very pixels hs2p samples)."""
    where = f"{sample or 'slide'}: label mask {path}"
    try:
        if path.suffix.lower() in (".tif", ".tiff", ".btf"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                levels = tif.series[0].levels
                fitting = [lv for lv in levels if lv.shape[0] >= shape[0] and lv.shape[1] >= shape[1]]
                level = fitting[-1] if fitting else levels[0]
                if int(np.prod(level.shape[:2])) > MAX_MASK_PIXELS:
                    raise ValueError(f"its level of {level.shape[1]} x {level.shape[0]} px is over the "
                                     f"{MAX_MASK_PIXELS} px read budget; give it a pyramid")
                native = level.asarray()
        else:
            native = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if native is None:
                raise ValueError("OpenCV cannot decode it (not a PNG / image file?)")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"{where}: cannot be read as a label image ({exc})") from exc
    native = np.asarray(native)
    if native.ndim == 3:
        if any(not np.array_equal(native[..., 0], native[..., c]) for c in range(1, native.shape[-1])):
            raise ValueError(f"{where}: its channels differ; a label mask has one channel (or repeats one)")
        native = native[..., 0]
    if native.ndim != 2 or native.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected a 2-D integer label raster, got {native.dtype} {native.shape}")
    if native.size and (int(native.min()) < 0 or int(native.max()) > 255):
        raise ValueError(f"{where}: label values span [{int(native.min())}, {int(native.max())}], outside [0, 255]")
    labels = np.ascontiguousarray(native, dtype=np.uint8)
    _check_declared(labels, sampling, where)
    if labels.shape != tuple(shape):
        labels = cv2.resize(labels, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_NEAREST)
    return labels


def _check_declared(labels: np.ndarray, sampling: MaskSampling, where: str) -> None:
    present = set(np.flatnonzero(cv2.calcHist([labels], [0], None, [256], [0, 256])).tolist())
    declared = {v for values in sampling.pixel_mapping.values() for v in values}
    if present - declared:
        raise ValueError(f"{where}: holds label values {sorted(present - declared)} that masks.pixel_mapping does "
                         f"not declare (declared: {sorted(declared)}); declare every value (an unsampled class "
                         "gets no min_coverage)")


@dataclass
class Shape:
    """One annotation: its class and its polygons, each a list of rings (outer first, then holes) in level-0 px."""

    name: str
    polygons: list[list[np.ndarray]]


def read_geojson(path: Path, sample: str = "") -> list[Shape]:
    """QuPath's GeoJSON export (a FeatureCollection, a bare list of features or one feature) or plain GeoJSON.

    A feature's class is ``properties.classification.name`` (QuPath), else its ``class`` or
    ``name`` property; Polygon, MultiPolygon and GeometryCollections of them are read, other
    geometries (points, lines) cover no area and are skipped."""
    where = f"{sample or 'slide'}: annotations {path}"
    if path.stat().st_size > MAX_VECTOR_BYTES:
        raise ValueError(f"{where}: {path.stat().st_size} bytes, over the {MAX_VECTOR_BYTES} byte budget")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not valid GeoJSON ({exc})") from exc
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, Mapping) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list):
        raise ValueError(f"{where}: expected a FeatureCollection, a Feature or a list of features")
    shapes = []
    for i, feature in enumerate(features):
        if not isinstance(feature, Mapping) or not isinstance(feature.get("geometry"), (Mapping, type(None))):
            raise ValueError(f"{where}: feature {i} is not a GeoJSON Feature with a geometry")
        polygons = _polygons(feature.get("geometry"), f"{where}: feature {i}")
        if not polygons:
            continue
        shapes.append(Shape(_class_name(feature, f"{where}: feature {i}"), polygons))
    return shapes


def _class_name(feature: Mapping, where: str) -> str:
    props = feature.get("properties") or {}
    classification = props.get("classification")
    if isinstance(classification, Mapping) and classification.get("name"):
        return str(classification["name"])
    if isinstance(classification, str) and classification:
        return classification
    for key in ("class", "name"):
        if props.get(key):
            return str(props[key])
    raise ValueError(f"{where} has no class (properties.classification.name, 'class' or 'name'); classify it "
                     "in QuPath or give it a 'class' property")


def _polygons(geometry: Mapping | None, where: str) -> list[list[np.ndarray]]:
    if geometry is None:
        return []
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    try:
        if kind == "Polygon":
            return [_rings(coords)]
        if kind == "MultiPolygon":
            return [_rings(p) for p in coords]
        if kind == "GeometryCollection":
            return [p for g in geometry.get("geometries") or [] for p in _polygons(g, where)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: malformed {kind} coordinates ({exc})") from exc
    return []   # points and lines enclose no area


def _rings(coords) -> list[np.ndarray]:
    rings = [np.asarray(ring, dtype=np.float64).reshape(-1, 2) for ring in coords]
    if not rings or any(not np.isfinite(r).all() for r in rings):
        raise ValueError("a ring is empty or not finite")
    return rings


def rasterise(shapes: list[Shape], shape: tuple[int, int], slide_dimensions: tuple[int, int],
              sampling: MaskSampling, where: str = "") -> np.ndarray:
    """The annotations as labels on a ``shape`` raster over the slide: a pixel takes the class of the
    polygon holding its centre (even-odd across a polygon's rings, so holes stay out; later features
    drawn over earlier ones), the rest the background class (the one holding label 0).

    Centre sampling with half-open spans: an edge on a pixel border (a tile border, say) leaves
    the pixels beyond it out, exactly as a label raster drawn at this resolution would."""
    background = [name for name, values in sampling.pixel_mapping.items() if 0 in values]
    if not background:
        raise ValueError(f"{where}: vector annotations leave unannotated pixels at label 0, which "
                         "masks.pixel_mapping does not declare; add e.g. background: 0")
    height, width = int(shape[0]), int(shape[1])
    labels = np.zeros((height, width), np.uint8)
    scale = np.array([width / slide_dimensions[0], height / slide_dimensions[1]])
    for s in shapes:
        if s.name not in sampling.pixel_mapping:
            raise ValueError(f"{where}: an annotation's class {s.name!r} is not in masks.pixel_mapping "
                             f"(declared: {sorted(sampling.pixel_mapping)}); declare it or rename it")
        value = sampling.pixel_mapping[s.name][0]
        for rings in s.polygons:
            _fill(labels, [r * scale for r in rings if len(r) >= 3], value)
    return labels


def _fill(labels: np.ndarray, rings: list[np.ndarray], value: int) -> None:
    """Set the pixels whose centres lie inside ``rings`` (even-odd, mask px) to ``value``."""
    if not rings:
        return
    a = np.concatenate([r for r in rings])
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    flat = a[:, 1] == b[:, 1]
    a, b = a[~flat], b[~flat]
    if not len(a):
        return
    height, width = labels.shape
    top, bottom = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    first = max(0, int(np.ceil(top.min() - 0.5)))
    last = min(height - 1, int(np.ceil(bottom.max() - 0.5)) - 1)
    slope = (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    for row in range(first, last + 1):
        yc = row + 0.5
        hit = (top <= yc) & (yc < bottom)   # half-open in y: a vertex on the centre line counts once
        if not hit.any():
            continue
        xs = np.sort(a[hit, 0] + (yc - a[hit, 1]) * slope[hit])
        starts = np.clip(np.ceil(xs[0::2] - 0.5), 0, width).astype(np.int64)
        ends = np.clip(np.ceil(xs[1::2] - 0.5), 0, width).astype(np.int64)
        for x0, x1 in zip(starts, ends):
            if x1 > x0:
                labels[row, x0:x1] = value


def class_masks(labels: np.ndarray, sampling: MaskSampling) -> dict[str, np.ndarray]:
    """One 255 / 0 mask per declared class (the union of its values)."""
    return {name: np.where(np.isin(labels, values), 255, 0).astype(np.uint8)
            for name, values in sampling.pixel_mapping.items()}


def union_mask(masks: dict[str, np.ndarray], classes: tuple[str, ...]) -> np.ndarray:
    """The sampled classes together (never the declared-only ones, which could be the whole slide)."""
    out = np.zeros_like(masks[classes[0]])
    for name in classes:
        out[masks[name] > 0] = 255
    return out


@dataclass
class Bags:
    """A slide's tiles once each (``xy``, row-major as a `TileList` keeps them), each class's coverage of
    them, and which bag holds which: what a plan carries to embed once and split by class."""

    xy: np.ndarray            # (n, 2) int64 level-0
    coverage: np.ndarray      # (n, C) float32: each sampled class's share of each tile
    member: np.ndarray        # (n, B) bool: tile i is in bag b
    classes: tuple[str, ...]
    bags: tuple[str, ...]
    fraction: np.ndarray      # (n,) float32: the highest coverage among the classes whose bags hold the tile


def merge_bags(per_class: dict[str, np.ndarray], coverage_of, sampling: MaskSampling) -> Bags:
    """Each class's tile positions into one list of unique tiles with the coverage table and the bags."""
    classes = sampling.classes
    nonempty = [per_class[c] for c in classes if len(per_class[c])]
    xy = np.unique(np.concatenate(nonempty), axis=0) if nonempty else np.empty((0, 2), np.int64)
    xy = xy[np.lexsort((xy[:, 0], xy[:, 1]))].astype(np.int64)
    coverage = np.stack([coverage_of(c, xy) for c in classes], axis=1).astype(np.float32) if classes else \
        np.empty((len(xy), 0), np.float32)
    member = np.zeros((len(xy), len(classes)), bool)
    index = {tuple(p): i for i, p in enumerate(xy.tolist())}
    for j, c in enumerate(classes):
        for p in per_class[c].tolist():
            member[index[tuple(p)], j] = True
    coverage = coverage.reshape(len(xy), len(classes))
    fraction = np.where(member, coverage, 0).max(axis=1, initial=0).astype(np.float32)   # (hs2p's merged fraction)
    if sampling.output_mode == "merged":
        member = member.any(axis=1, keepdims=True)
    return Bags(xy, coverage, member, classes, sampling.bags, fraction)


def bag_indices(plan, bag: str) -> np.ndarray:
    """Plan indices of the tiles in ``bag`` (all tiles for a plan without classes and bag 'tissue')."""
    names = list(plan.meta.get("bags") or [])
    if not names:
        if bag != "tissue":
            raise KeyError(bag)
        return np.arange(plan.num_tiles)
    return np.flatnonzero(plan.member[:, names.index(bag)])


def plan_bags(plan) -> tuple[str, ...]:
    """The bags a plan has: its classes (or 'merged'), else ('tissue',)."""
    return tuple(plan.meta.get("bags") or ("tissue",))


def bags_of(slide, plan) -> list:
    """A slide's result (an `EmbeddedSlide` of every planned tile) as its bags, in the plan's bag order."""
    if plan is None or getattr(plan, "member", None) is None:
        return [slide]
    return [slide.bag(bag, bag_indices(plan, bag)) for bag in plan_bags(plan)]


def bag_plan(plan, bag: str):
    """One bag's tiles as a plan of their own (its class's coverage as the fractions, its threshold):
    what hs2p's per-class coordinate files hold (``tiles/<class>/<id>.coordinates.npz``)."""
    index = bag_indices(plan, bag)
    classes = list(plan.meta.get("classes") or ())
    fraction = plan.class_coverage[index, classes.index(bag)] if bag in classes else plan.fraction[index]
    threshold = (plan.meta.get("config", {}).get("masks") or {}).get("min_coverage", {}).get(bag, 0.0)
    meta = {**plan.meta, "annotation": None if bag in ("tissue", "merged") else bag,
            "output_mode": plan.meta.get("output_mode"),
            "selection_strategy": f"{plan.meta.get('strategy', 'joint')}_sampling"}
    return dataclasses.replace(plan, xy=plan.xy[index], fraction=fraction, class_coverage=None, member=None,
                               meta=meta, tissue_threshold=float(threshold))
