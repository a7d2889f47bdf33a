"""Which plan a slide gets, and how a fresh one is made.

`plan_for` is the one place that decides: the tiles of an archive
(``read_tiles_from``), saved coordinates (ours or a peer's:
``read_coordinates_from``), this run's own plan from an earlier attempt
(``resume``), or a fresh plan (`plan_slide`: tissue on a thumbnail, the grid
laid over it) -- each checked against the slide and the request.  Every
run's output keeps the plans it used (``<output_dir>/coordinates/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slide2vec_dask.inputs import SlideInput, current_fingerprints, fingerprint, slide_fingerprints, why_stale
from slide2vec_dask.slide import Slide, open_slide
from slide2vec_dask.tiling.annotations import MaskSampling, class_masks, merge_bags, parse_masks, read_labels, \
    union_mask
from slide2vec_dask.tiling.contours import Contours, contour_tiles, coverage, detect_contours, kept_tissue, \
    min_contour_area, tile_stride
from slide2vec_dask.tiling.grid import TileGrid, choose_level
from slide2vec_dask.tiling.masks import check_budget, read_mask_file, seg_level, segment_level
from slide2vec_dask.tiling.peers import archive_plan, coordinates_file, is_own_plan, peer_coordinates
from slide2vec_dask.tiling.preview import save_mask_preview, save_tiling_preview
from slide2vec_dask.tiling.tile_list import TileList, check_inside, load_plan
from slide2vec_dask.tiling.tile_qc import filter_tiles
from slide2vec_dask.tissue import LEARNED_METHODS
from slide2vec_dask.tissue.run import learned_tissue_mask, mask_file, remove_artifacts, save_mask, uses_model

if TYPE_CHECKING:   # tiling reads a config's fields and never builds one; `config` sits above the
    # store and the exporters (it checks output formats against them), which sit above tiling.
    from slide2vec_dask.config import PreprocessingConfig


@dataclass
class Plan:
    """A slide's tiles (`grid`: a `TileGrid`, or a `TileList` of free positions) and its previews."""

    grid: Any
    mask_preview_path: Path | None = None
    tiling_preview_path: Path | None = None
    learned_mask: np.ndarray | None = None   # a model's mask (learned methods): saved next to the plan


def resolve_request(spec, config: PreprocessingConfig, strict: bool = True) -> tuple[float | None, int]:
    """Spacing and tile size to tile at: the config's, else the model's own contract (the one
    place they are derived).  ``strict``: a spacing neither gives is an error, else None."""
    spacing = config.requested_spacing_um if config.requested_spacing_um is not None else spec.spacing_um
    if spacing is None and strict:
        raise ValueError(f"model {spec.name!r} has no native spacing; set PreprocessingConfig(requested_spacing_um=...)")
    return spacing, config.requested_tile_size_px or spec.tile_size_px


def plan_for(item: SlideInput, spec, config: PreprocessingConfig, output_dir: str | Path | None) -> tuple[Any, Plan]:
    """The slide (None when its tiles come from an archive) and its plan, saved under ``output_dir``."""
    spacing, tile = resolve_request(spec, config)
    out = Path(output_dir) if output_dir is not None else None
    if config.read_tiles_from is not None:
        _no_regions(item, config, tile, f"the tile archive in {config.read_tiles_from}")
        slide, plan = None, Plan(archive_plan(Path(config.read_tiles_from), item.sample_id, spacing, tile))
        plan.grid.meta["tiles_fingerprint"] = fingerprint(plan.grid.archive)
    else:
        slide = open_slide(item.image_path, backend=config.backend, spacing_at_level_0=item.spacing_at_level_0)
        saved = _saved_plan(item, config, out, slide, spacing, tile)
        if saved is not None:
            _check_plan(saved, slide, spacing, tile, item, config)
            plan = Plan(saved)
        else:
            plan = plan_slide(slide, config, spacing_um=spacing, tile_size_px=tile, sample_id=item.sample_id,
                              mask_path=item.mask_path, preview_dir=None if out is None else out / "preview")
        # which files the plan (and so every result made from it) describes
        plan.grid.meta.update(slide_fingerprints(item.image_path, item.mask_path))
    if out is not None:  # every run's output holds the plans it used
        plan.grid.save(out / "coordinates" / f"{item.sample_id}.npz")
        if plan.learned_mask is not None:
            save_mask(plan.learned_mask, mask_file(out / "coordinates" / f"{item.sample_id}.npz"))
    return slide, plan


def slide_attrs(slide) -> dict[str, Any]:
    """What a slide's outputs (its tile group, its archive's meta) state about the file it was read from."""
    return {"level0_height": int(slide.level_shapes[0][0]), "level0_width": int(slide.level_shapes[0][1]),
            "backend": slide.backend, "level_downsamples": [float(d) for d in slide.level_downsamples]}


def writes_archive(config: PreprocessingConfig, plan) -> bool:
    """``on_the_fly=False``: the run writes the tiles it reads to an archive (unless they come from one)."""
    return not config.on_the_fly and getattr(plan, "archive", None) is None


def why_no_tiles(plan) -> str:
    """A plan with no tiles: why, in the words its slide's outcome row gives."""
    if plan.layout == "free" and (plan.meta.get("coordinates_from") or plan.meta.get("tiles_from")):
        return "no tiles: the coordinates given list none"
    if plan.layout == "grid" and 0 in plan.shape:
        return f"no tiles: the slide is smaller than one tile ({plan.read_tile_size_px} px at read level {plan.level})"
    filtering = plan.meta.get("config", {}).get("filtering", {})
    if plan.meta.get("num_contours") == 0 and filtering.get("a_t"):
        return (f"no tiles: no tissue piece larger than filtering['a_t'] = {filtering['a_t']:g} reference tiles was "
                "found (smaller pieces are dropped, as hs2p does; see PreprocessingConfig segmentation / filtering)")
    return "no tiles: no tissue found (see PreprocessingConfig segmentation / tissue_threshold)"


def _no_regions(item: SlideInput, config: PreprocessingConfig, tile: int, where: str) -> None:
    if config.region_multiple(tile) is not None:
        raise ValueError(f"{item.sample_id}: hierarchical mode (region_tile_multiple / requested_region_size_px) "
                         f"needs tiles on one grid, and {where} places them freely (a grid per tissue region, "
                         "as hs2p, CLAM and TRIDENT tile); drop the region options or tile the slide here")


def _saved_plan(item: SlideInput, config: PreprocessingConfig, out: Path | None, slide, spacing: float, tile: int):
    if config.read_coordinates_from is not None:
        path = coordinates_file(Path(config.read_coordinates_from), item.sample_id)
        if not path.exists():
            raise FileNotFoundError(f"{item.sample_id}: no saved coordinates at {path} (read_coordinates_from)")
        if not is_own_plan(path):   # hs2p / slide2vec, CLAM or TRIDENT coordinates
            _no_regions(item, config, tile, f"the coordinates in {path}")
            return peer_coordinates(path, item.sample_id, slide, spacing, tile, config.spacing_tolerance)
        grid = load_plan(path)
        stale = why_stale(grid.meta, current_fingerprints(item.image_path, item.mask_path))
        if stale:
            raise ValueError(f"{item.sample_id}: the saved coordinates {path} do not fit: {stale}; plan the "
                             "slide again (drop read_coordinates_from for it)")
        return grid
    if config.resume and out is not None:
        path = out / "coordinates" / f"{item.sample_id}.npz"
        if path.exists():
            grid = load_plan(path)
            same = (grid.meta.get("config") == selection_config(config)
                    and grid.meta.get("image_path") == str(item.image_path)
                    and grid.meta.get("mask_path") == (None if item.mask_path is None else str(item.mask_path))
                    and why_stale(grid.meta, current_fingerprints(item.image_path, item.mask_path)) is None)
            return grid if same else None   # a plan of another file is never laid over this one's pixels
    return None


def _check_plan(grid, slide, spacing: float, tile: int, item: SlideInput, config: PreprocessingConfig) -> None:
    problems = []
    if abs(grid.requested_spacing_um - spacing) > 1e-9 or grid.requested_tile_size_px != tile:
        problems.append(f"it was made for {grid.requested_tile_size_px} px at {grid.requested_spacing_um} µm/px, "
                        f"this run asks for {tile} px at {spacing} µm/px")
    if grid.region_tile_multiple != config.region_multiple(tile):
        problems.append(f"its regions are {grid.region_tile_multiple} tiles wide, this run asks for "
                        f"{config.region_multiple(tile)}")
    if grid.level >= slide.level_count:
        problems.append(f"it reads level {grid.level}, the slide has {slide.level_count}")
    elif grid.layout == "grid":
        lh, lw = slide.level_shapes[grid.level]
        if grid.shape[0] * grid.read_tile_size_px > lh or grid.shape[1] * grid.read_tile_size_px > lw:
            problems.append("its grid does not fit this slide's dimensions")
    else:   # a saved list of free positions: none wholly outside this slide
        height, width = slide.level_shapes[0]
        check_inside(grid.xy, grid.tile_size_lv0, int(width), int(height), f"{item.sample_id}: saved coordinates")
    if problems:
        raise ValueError(f"{item.sample_id}: saved coordinates do not fit: " + "; ".join(problems))


def plan_slide(slide: Slide, config: PreprocessingConfig, *, spacing_um: float, tile_size_px: int,
               sample_id: str, mask_path: str | Path | None = None,
               preview_dir: str | Path | None = None) -> Plan:
    """Find the tissue contours (as hs2p does) and lay the tiles over them.

    ``config.grid_for(tile)`` says how: ``"contours"``, hs2p's grid per tissue contour (a
    `TileList`); ``"slide"``, one grid over the whole slide from its corner (a `TileGrid`,
    what hierarchical regions need).  ``spacing_um`` / ``tile_size_px`` are the resolved
    request (config or model).
    """
    choice = choose_level(slide.level_spacings, slide.level_downsamples, spacing_um, tile_size_px,
                          config.spacing_tolerance, sample=sample_id)
    filt = config.filtering
    sampling = annotation_sampling(config)
    if sampling is not None:
        return plan_annotated(slide, config, sampling, choice, spacing_um=spacing_um, tile_size_px=tile_size_px,
                              sample_id=sample_id, mask_path=mask_path, preview_dir=preview_dir)
    tissue = find_tissue(slide, config.segmentation, filt, spacing_um=spacing_um, tile_size_px=tile_size_px,
                         tolerance=config.spacing_tolerance, mask_path=mask_path, sample_id=sample_id)
    geometry = dict(level=choice.level, level_downsample=float(slide.level_downsamples[choice.level]),
                    slide_spacing_um=float(slide.spacing), read_spacing_um=float(choice.read_spacing_um),
                    requested_spacing_um=float(spacing_um), requested_tile_size_px=int(tile_size_px),
                    read_tile_size_px=int(choice.read_tile_size_px), tile_size_lv0=int(choice.tile_size_lv0))
    meta = {"sample_id": sample_id, "image_path": str(slide.path),
            "mask_path": None if mask_path is None else str(mask_path), "config": selection_config(config),
            "seg_level": tissue.level, "num_contours": len(tissue.contours)}

    def pixel_qc(xy: np.ndarray) -> np.ndarray:
        return filter_tiles(slide, xy, filt, requested_tile_size_px=tile_size_px, requested_spacing_um=spacing_um,
                            tolerance=config.spacing_tolerance)

    if config.grid_for(tile_size_px) == "contours":
        step = tile_stride(choice.read_tile_size_px, choice.tile_size_lv0, config.overlap)
        xy, fraction = contour_tiles(tissue.contours, tile_size_lv0=choice.tile_size_lv0, step_lv0=step,
                                     tissue_threshold=config.tissue_threshold)
        passed = pixel_qc(xy)
        grid = TileList(**geometry, xy=xy[passed], fraction=fraction[passed],
                        meta={**meta, "step_px_lv0": step, "overlap": config.overlap},
                        tissue_threshold=config.tissue_threshold)
    else:
        lh, lw = slide.level_shapes[choice.level]
        rows, cols = lh // choice.read_tile_size_px, lw // choice.read_tile_size_px
        ry, rx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lattice = np.round(np.stack([rx.ravel(), ry.ravel()], axis=1).astype(np.float64)
                           * choice.read_tile_size_px * geometry["level_downsample"]).astype(np.int64)
        kept_tissue_mask = kept_tissue(tissue.contours)
        fraction = coverage(lattice, kept_tissue_mask, choice.tile_size_lv0, slide.dimensions,
                            (kept_tissue_mask.shape[1], kept_tissue_mask.shape[0]), (0, 0))
        keep = fraction >= config.tissue_threshold
        keep[keep] = pixel_qc(lattice[keep])
        grid = TileGrid(**geometry, tissue_threshold=config.tissue_threshold,
                        tissue_fraction=fraction.reshape(rows, cols), keep=keep.reshape(rows, cols), meta=meta,
                        region_tile_multiple=config.region_multiple(tile_size_px))
    plan = Plan(grid, learned_mask=kept_tissue(tissue.contours) > 0 if uses_model(config.segmentation) else None)
    prev = config.preview
    if prev["save_mask_preview"] or prev["save_tiling_preview"]:
        if preview_dir is None:
            raise ValueError(f"{sample_id}: previews were requested but no output_dir is set; "
                             "pass ExecutionOptions(output_dir=...) to say where they go")
        image = slide.thumbnail(prev["downsample"])
        if prev["save_mask_preview"]:
            plan.mask_preview_path = save_mask_preview(image, kept_tissue(tissue.contours) > 0,
                                                       Path(preview_dir) / "mask" / f"{sample_id}.png")
        if prev["save_tiling_preview"]:
            plan.tiling_preview_path = save_tiling_preview(
                image, grid, slide.level_shapes[0], Path(preview_dir) / "tiling" / f"{sample_id}.png")
    return plan


@dataclass
class Tissue:
    """A slide's segmentation: the mask (at pyramid ``level``) and the contours kept on it."""

    level: int
    contours: Contours


def find_tissue(slide: Slide, seg: dict, filt: dict, *, spacing_um: float, tile_size_px: int, tolerance: float,
                mask_path: str | Path | None = None, sample_id: str = "") -> Tissue:
    """The tissue mask on the level nearest the segmentation downsample (segmented, or read from
    ``mask_path``) and its contours above ``a_t`` reference tiles, as hs2p finds them."""
    level = seg_level(slide.level_downsamples, seg["downsample"])
    if mask_path is not None:
        check_budget(slide, level, sample_id)
        mask = read_mask_file(mask_path, slide.level_shapes[level], sample=sample_id)
    elif seg["method"] in LEARNED_METHODS:   # hest, grandqc, sam2: slide2vec_dask.tissue
        mask = learned_tissue_mask(slide, seg, slide.level_shapes[level], sample_id).astype(np.uint8) * 255
    else:
        mask = segment_level(slide, level, seg, sample=sample_id)
    if seg["artifacts"] is not None:   # GrandQC's artefacts removed from any method's mask
        mask = np.where(remove_artifacts(slide, seg, mask > 0, sample_id), mask, 0).astype(mask.dtype)
    ref = filt["ref_tile_size"] if filt["ref_tile_size"] is not None else tile_size_px
    min_area = min_contour_area(mask.shape, slide.dimensions, a_t=filt["a_t"], ref_tile_size_px=ref,
                                requested_spacing_um=spacing_um, spacings=slide.level_spacings,
                                tolerance=tolerance)
    return Tissue(level, detect_contours(mask, slide.dimensions, min_area))


def contours_on(mask: np.ndarray, slide: Slide, filt: dict, *, spacing_um: float, tile_size_px: int,
                tolerance: float) -> Contours:
    """A mask's pieces above ``a_t`` reference tiles (hs2p's contour filter; `find_tissue`'s last step,
    for annotation masks)."""
    ref = filt["ref_tile_size"] if filt["ref_tile_size"] is not None else tile_size_px
    min_area = min_contour_area(mask.shape, slide.dimensions, a_t=filt["a_t"], ref_tile_size_px=ref,
                                requested_spacing_um=spacing_um, spacings=slide.level_spacings,
                                tolerance=tolerance)
    return detect_contours(mask, slide.dimensions, min_area)


def annotation_sampling(config: PreprocessingConfig) -> MaskSampling | None:
    """The config's annotation sampling (``masks`` with classes), None for plain tissue tiling."""
    sampling = parse_masks(config.masks)
    return None if sampling is None or sampling.tissue_only else sampling


def plan_annotated(slide: Slide, config: PreprocessingConfig, sampling: MaskSampling, choice, *, spacing_um: float,
                   tile_size_px: int, sample_id: str, mask_path, preview_dir) -> Plan:
    """One plan of every sampled tile, with each class's coverage and bag, as hs2p samples annotations:
    ``joint``, the union of the sampled classes tiled once (its contours, its tile filters), each class
    keeping the tiles it covers at least ``min_coverage``; ``independent``, each class tiled alone."""
    if mask_path is None:
        raise ValueError(f"{sample_id}: masks samples annotation classes {list(sampling.classes)}, which needs the "
                         "slide's annotations: give the slide a mask_path (a label TIFF / PNG or a GeoJSON)")
    if config.grid_for(tile_size_px) != "contours":
        raise ValueError(f"{sample_id}: annotation sampling (masks) lays hs2p's grid per annotated region; "
                         "drop grid='slide' and the hierarchical region options")
    filt = config.filtering
    level = seg_level(slide.level_downsamples, config.segmentation["downsample"])
    check_budget(slide, level, sample_id)
    shape = slide.level_shapes[level]
    labels = read_labels(mask_path, shape, slide.dimensions, sampling, sample=sample_id)
    masks = class_masks(labels, sampling)
    step = tile_stride(choice.read_tile_size_px, choice.tile_size_lv0, config.overlap)
    size = (shape[1], shape[0])

    def tiles_on(mask: np.ndarray, threshold: float) -> np.ndarray:
        contours = contours_on(mask, slide, filt, spacing_um=spacing_um, tile_size_px=tile_size_px,
                               tolerance=config.spacing_tolerance)
        xy, _ = contour_tiles(contours, tile_size_lv0=choice.tile_size_lv0, step_lv0=step, tissue_threshold=threshold)
        return xy[filter_tiles(slide, xy, filt, requested_tile_size_px=tile_size_px, requested_spacing_um=spacing_um,
                               tolerance=config.spacing_tolerance)]

    def coverage_of(name: str, xy: np.ndarray) -> np.ndarray:
        return coverage(xy, masks[name], choice.tile_size_lv0, slide.dimensions, size, (0, 0))

    if not sampling.classes:
        per_class = {}
    elif sampling.strategy == "joint":
        base = tiles_on(union_mask(masks, sampling.classes), 0.0)
        per_class = {c: base[coverage_of(c, base) >= sampling.min_coverage[c]] for c in sampling.classes}
    else:
        per_class = {c: tiles_on(masks[c], sampling.min_coverage[c]) for c in sampling.classes}
    bags = merge_bags(per_class, coverage_of, sampling)
    meta = {"sample_id": sample_id, "image_path": str(slide.path), "mask_path": str(mask_path),
            "config": selection_config(config), "seg_level": level, "step_px_lv0": step, "overlap": config.overlap,
            "classes": list(bags.classes), "bags": list(bags.bags), "strategy": sampling.strategy,
            "output_mode": sampling.output_mode,
            "colors": None if sampling.colors is None else {k: None if v is None else list(v)
                                                            for k, v in sampling.colors.items()},
            "bag_tiles": {b: int(n) for b, n in zip(bags.bags, bags.member.sum(axis=0).tolist())}}
    grid = TileList(level=choice.level, level_downsample=float(slide.level_downsamples[choice.level]),
                    slide_spacing_um=float(slide.spacing), read_spacing_um=float(choice.read_spacing_um),
                    requested_spacing_um=float(spacing_um), requested_tile_size_px=int(tile_size_px),
                    read_tile_size_px=int(choice.read_tile_size_px), tile_size_lv0=int(choice.tile_size_lv0),
                    xy=bags.xy, fraction=bags.fraction, meta=meta, tissue_threshold=0.0,
                    class_coverage=bags.coverage, member=bags.member)
    plan = Plan(grid)
    prev = config.preview
    if prev["save_mask_preview"] or prev["save_tiling_preview"]:
        if preview_dir is None:
            raise ValueError(f"{sample_id}: previews were requested but no output_dir is set; "
                             "pass ExecutionOptions(output_dir=...) to say where they go")
        image = slide.thumbnail(prev["downsample"])
        if prev["save_mask_preview"]:
            plan.mask_preview_path = save_mask_preview(image, union_mask(masks, sampling.classes) > 0
                                                       if sampling.classes else labels > 0,
                                                       Path(preview_dir) / "mask" / f"{sample_id}.png")
        if prev["save_tiling_preview"]:
            plan.tiling_preview_path = save_tiling_preview(
                image, grid, slide.level_shapes[0], Path(preview_dir) / "tiling" / f"{sample_id}.png")
    return plan


def tissue_mask(slide: Slide, segmentation: dict, filtering: dict, *, spacing_um: float,
                mask_path: str | Path | None = None, sample_id: str = "",
                tile_size_px: int | None = None, spacing_tolerance: float = 0.05,
                masks: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(level image, bool tissue mask) at the segmentation level: the tissue a plan was laid over
    (inside kept contours, less their holes; with annotation ``masks``, the sampled classes'
    annotations).  One function, so an export can redraw the very mask a saved plan was made from."""
    if tile_size_px is None and filtering.get("ref_tile_size") is None:
        raise ValueError(f"{sample_id or slide.path}: the tile size is needed to know the area filter's "
                         "reference tile (filtering['ref_tile_size'] follows it)")
    sampling = parse_masks(masks)
    if sampling is not None and not sampling.tissue_only and mask_path is not None:
        level = seg_level(slide.level_downsamples, segmentation["downsample"])
        check_budget(slide, level, sample_id)
        labels = read_labels(mask_path, slide.level_shapes[level], slide.dimensions, sampling, sample=sample_id)
        union = union_mask(class_masks(labels, sampling), sampling.classes) if sampling.classes else labels * 0
        return labels, union > 0
    tissue = find_tissue(slide, segmentation, filtering, spacing_um=spacing_um, tile_size_px=tile_size_px,
                         tolerance=spacing_tolerance, mask_path=mask_path, sample_id=sample_id)
    return tissue.contours.mask, kept_tissue(tissue.contours) > 0


def selection_config(config: PreprocessingConfig) -> dict:
    """The config fields that decide which tiles are kept (what makes a saved plan reusable)."""
    sampling = annotation_sampling(config)
    return {**({} if sampling is None else {"masks": sampling.record()}),
        "backend": config.backend,
        "tissue_threshold": config.tissue_threshold,
        "segmentation": dict(config.segmentation),
        "filtering": dict(config.filtering),
        "spacing_tolerance": config.spacing_tolerance,
        "overlap": config.overlap,
        "grid": config.grid,
        "region_tile_multiple": config.region_tile_multiple,
        "requested_region_size_px": config.requested_region_size_px,
    }
