"""Annotation-aware bags: slide2vec 7.x's ``masks`` (classes of a label mask, or of QuPath /
GeoJSON annotations), sampled as hs2p samples them.

hs2p 6.1.0 runs in its own environment (``tests/peers/setup-hs2p.sh``) through
``tests/peers/make_hs2p.py annotate`` on the same slide and label mask; without it the
comparison skips, naming the script.  The slide is the tifffile pyramid of
test_hs2p_tiling (several tissue regions, edges, holes); the classes are rectangles on it
(one with a hole, one edge inside a tile row), written as label rasters at other
resolutions and bit depths, and as the same polygons in QuPath's GeoJSON export.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from test_hs2p_tiling import MAKE_HS2P, SPACING, TILE, _clean_env, hs2p_python, synthetic_image  # noqa: F401 (a fixture)

from slide2vec_dask import PreprocessingConfig, testing
from slide2vec_dask.slide import open_slide
from slide2vec_dask.tiling.annotations import bag_indices, parse_masks, plan_bags
from slide2vec_dask.tiling.plan import plan_slide
from slide2vec_dask.tiling.tile_list import load_plan

H, W = 2992, 4096   # the tifffile slide (test_hs2p_tiling's image cut to whole 16 px)
MAPPING = {"background": 0, "tumor": 1, "stroma": 2, "necrosis": 3}
COVERAGE = {"tumor": 0.5, "stroma": 0.25, "necrosis": 0.1}
# class -> polygons, each [outer, holes...] as (x0, y0, x1, y1) level-0 rectangles on 16 px
SHAPES = {
    "tumor": [[(0, 0, 1104, 704)]],
    "stroma": [[(1504, 896, 2896, 2096), (1808, 1200, 2208, 1504)]],
    "necrosis": [[(3008, 400, 3696, 1008)], [(3312, 2304, 4096, 2992)]],
}


def label_raster(downsample: int, dtype=np.uint8) -> np.ndarray:
    out = np.zeros((H // downsample, W // downsample), dtype)
    for name, polygons in SHAPES.items():
        for outer, *holes in polygons:
            x0, y0, x1, y1 = (v // downsample for v in outer)
            out[y0:y1, x0:x1] = MAPPING[name]
            for hx0, hy0, hx1, hy1 in holes:
                out[hy0 // downsample:hy1 // downsample, hx0 // downsample:hx1 // downsample] = 0
    return out


def ring(x0, y0, x1, y1) -> list:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def qupath_geojson(path: Path) -> Path:
    """The classes as QuPath 0.5 exports annotations (FeatureCollection, classification.name)."""
    features = []
    for name, polygons in SHAPES.items():
        for outer, *holes in polygons:
            features.append({"type": "Feature", "id": f"{name}-{len(features)}",
                             "geometry": {"type": "Polygon", "coordinates": [ring(*outer), *[ring(*h) for h in holes]]},
                             "properties": {"objectType": "annotation",
                                            "classification": {"name": name, "color": [200, 0, 0]}}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    image = synthetic_image()[:H, :W]
    return testing.write_tiff(tmp_path_factory.mktemp("slide") / "slide.tif", image, spacing_um=SPACING,
                              downsamples=(1, 4, 16), compression="zlib")


@pytest.fixture(scope="module")
def masks(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("masks")
    tifffile.imwrite(d / "labels8.tif", label_raster(16))                       # the segmentation level's size
    tifffile.imwrite(d / "labels16.tif", label_raster(8, np.uint16))            # finer, 16 bit
    cv2.imwrite(str(d / "labels.png"), label_raster(4))                        # finer still, PNG
    tifffile.imwrite(d / "labels4.tif", label_raster(4))                        # (the PNG's pixels, for hs2p)
    return {"tif8": d / "labels8.tif", "tif16": d / "labels16.tif", "png": d / "labels.png",
            "png-for-hs2p": d / "labels4.tif",
            "geojson": qupath_geojson(d / "annotations.geojson")}


def config(**masks) -> PreprocessingConfig:
    return PreprocessingConfig(requested_spacing_um=SPACING, requested_tile_size_px=TILE,
                               masks={"pixel_mapping": MAPPING, "min_coverage": COVERAGE, **masks})


def bags(slide_path: Path, mask: Path, **masks) -> dict[str, dict[tuple[int, int], float]]:
    """Each bag's tiles {(x, y): its class's coverage} (merged: the highest of the classes keeping it)."""
    with open_slide(slide_path) as s:
        plan = plan_slide(s, config(**masks), spacing_um=SPACING, tile_size_px=TILE, sample_id="s",
                          mask_path=mask).grid
    classes = plan.meta["classes"]
    out = {}
    for bag in plan_bags(plan):
        idx = bag_indices(plan, bag)
        cov = plan.fraction[idx] if bag == "merged" else plan.class_coverage[idx, classes.index(bag)]
        out[bag] = {(int(x), int(y)): float(c) for (x, y), c in zip(plan.xy[idx], cov)}
    return out


def hs2p_bags(python: Path, slide_path: Path, mask: Path, out: Path, **masks) -> dict:
    settings = {"spacing": SPACING, "tile_size": TILE, "backend": "tifffile", "mask_backend": "tifffile",
                "masks": {"pixel_mapping": MAPPING, "min_coverage": COVERAGE, **masks}}
    result = subprocess.run([str(python), str(MAKE_HS2P), "annotate", str(slide_path), str(mask), str(out),
                             json.dumps(settings)], capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    return {bag: {(x, y): f for x, y, f in zip(r["x"], r["y"], r["tissue_fractions"])} for bag, r in theirs.items()}


@pytest.mark.slow   # (hs2p in its own venv, per case)
@pytest.mark.parametrize("mask, strategy, output_mode", [
    ("tif8", "joint", "per_annotation"), ("tif16", "independent", "per_annotation"), ("png", "joint", "merged")])
def test_bags_are_hs2ps(hs2p_python, slide, masks, tmp_path, mask, strategy, output_mode):
    ours = bags(slide, masks[mask], strategy=strategy, output_mode=output_mode)
    theirs = hs2p_bags(hs2p_python, slide, masks.get(f"{mask}-for-hs2p", masks[mask]), tmp_path, strategy=strategy, output_mode=output_mode)
    assert sorted(ours) == sorted(theirs)
    for bag in theirs:
        assert sorted(ours[bag]) == sorted(theirs[bag]), f"{bag}: {len(ours[bag])} tiles, hs2p {len(theirs[bag])}"
        assert ours[bag] == pytest.approx(theirs[bag], abs=1e-6)
    assert all(ours.values()), "every bag has tiles (so the comparison tested each class)"


def test_geojson_and_label_tiff_give_the_same_bags(slide, masks):
    raster = bags(slide, masks["tif8"])
    vector = bags(slide, masks["geojson"])
    assert raster == vector
    assert set(raster) == {"tumor", "stroma", "necrosis"} and all(raster.values())
    # a plain GeoJSON (class in a 'class' property, a bare list of features) reads the same
    plain = json.loads(masks["geojson"].read_text())["features"]
    for f in plain:
        f["properties"] = {"class": f["properties"]["classification"]["name"]}
    path = masks["geojson"].with_name("plain.json")
    path.write_text(json.dumps(plain))
    assert bags(slide, path) == raster


def test_coverage_is_exact_at_tile_borders(slide, masks):
    """The necrosis rectangle ends at y = 1008: tiles of its last row are covered over an exact share."""
    got = bags(slide, masks["geojson"], min_coverage={"necrosis": 0.0})["necrosis"]
    with open_slide(slide) as s:
        tile_lv0 = round(TILE * SPACING / s.spacing)
    edge = {(x, y): c for (x, y), c in got.items() if 400 <= y < 1008 < y + tile_lv0 and x + tile_lv0 <= 3696}
    assert edge, "the rectangle's bottom edge runs through a row of tiles"
    for (x, y), c in edge.items():   # (the tiles start on 16 px, the mask's pixel: the share is exact)
        assert c == pytest.approx((1008 - y) / tile_lv0, abs=1e-6)
        assert 0 < c < 1


def test_plan_with_bags_saves_and_loads(slide, masks, tmp_path):
    with open_slide(slide) as s:
        plan = plan_slide(s, config(), spacing_um=SPACING, tile_size_px=TILE, sample_id="s",
                          mask_path=masks["tif8"]).grid
    plan.save(tmp_path / "s.npz")
    again = load_plan(tmp_path / "s.npz")
    assert again.matches(plan) and np.array_equal(again.class_coverage, plan.class_coverage)
    assert plan_bags(again) == ("tumor", "stroma", "necrosis")


@pytest.mark.parametrize("masks, message", [
    ({"pixel_mapping": {"a": 1, "b": 1}, "min_coverage": {"a": 0.1}}, "both claim label value 1"),
    ({"pixel_mapping": {"a": 300}, "min_coverage": {"a": 0.1}}, "outside the label range"),
    ({"pixel_mapping": {"a": 1}, "min_coverage": {"b": 0.1}}, "does not declare"),
    ({"pixel_mapping": {"a": 1}, "min_coverage": {"a": 1.5}}, r"in \[0, 1\]"),
    ({"pixel_mapping": {"a/b": 1}, "min_coverage": {"a/b": 0.1}}, "safe folder name"),
    ({"pixel_mapping": {"merged": 1}, "min_coverage": {"merged": 0.1}}, "reserved"),
    ({"pixel_mapping": {"a": 1}, "min_coverage": {"a": 0.1}, "strategy": "greedy"}, "masks.strategy"),
    ({"pixel_mapping": {"a": 1}, "min_coverage": {"a": 0.1}, "output_mode": "x"}, "masks.output_mode"),
    ({"pixel_mapping": {"a": 1, "b": 2}, "min_coverage": {"a": 0.1}, "colors": {"a": [1, 2, 3]}}, "colors"),
    ({"pixel_mapping": {"a": 1}, "min_coverage": {"a": 0.1}, "extra": 1}, "unknown key"),
])
def test_masks_are_validated_as_hs2p_validates_them(masks, message):
    with pytest.raises(ValueError, match=message):
        PreprocessingConfig(masks=masks)


def test_tissue_only_masks_stay_tissue_tiling():
    cfg = PreprocessingConfig(masks={"pixel_mapping": {"background": 0, "tissue": 1},
                                     "min_coverage": {"background": None, "tissue": 0.3}})
    assert cfg.tissue_threshold == 0.3 and parse_masks(cfg.masks).tissue_only
    # slide2vec's null-to-drop idiom: a class whose value is None is removed
    s = parse_masks({"pixel_mapping": {"background": 0, "tissue": None, "tumor": 1},
                     "min_coverage": {"tissue": 0.1, "tumor": 0.2}})
    assert s.classes == ("tumor",) and not s.tissue_only


def test_bad_annotations_name_the_file(slide, masks, tmp_path):
    undeclared = tmp_path / "undeclared.tif"
    tifffile.imwrite(undeclared, label_raster(16) * 2)   # values 2, 4, 6
    with open_slide(slide) as s:
        with pytest.raises(ValueError, match=r"undeclared.tif.*\[4, 6\]"):
            plan_slide(s, config(), spacing_um=SPACING, tile_size_px=TILE, sample_id="s", mask_path=undeclared)
        unknown = tmp_path / "unknown.geojson"
        unknown.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(
            0, 0, 10, 10)]}, "properties": {"classification": {"name": "Immune cells"}}}]))
        with pytest.raises(ValueError, match="'Immune cells' is not in masks.pixel_mapping"):
            plan_slide(s, config(), spacing_um=SPACING, tile_size_px=TILE, sample_id="s", mask_path=unknown)
        with pytest.raises(ValueError, match="needs the slide's annotations"):
            plan_slide(s, config(), spacing_um=SPACING, tile_size_px=TILE, sample_id="s")


# -- the API: embed_slide(annotation=...), embed_slides(annotations=...), EmbeddedSlide.annotation ----
@pytest.fixture(scope="module")
def mean_rgb():
    import torch

    from slide2vec_dask import Model

    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Model.from_module(pool, name="mean-rgb", mean=(0, 0, 0), std=(1, 1, 1), spacing_um=SPACING,
                             tile_size_px=TILE)


def test_embed_slides_gives_a_bag_per_class(mean_rgb, slide, masks):
    from slide2vec_dask import ExecutionOptions

    item = {"sample_id": "s", "image_path": slide, "mask_path": masks["geojson"]}
    result = mean_rgb.embed_slides([item], preprocessing=config(), execution=ExecutionOptions(num_workers=1))
    want = bags(slide, masks["geojson"])
    assert set(result["s"]) == {"tumor", "stroma", "necrosis"}
    whole = {}
    for name, bag in result["s"].items():
        assert bag.annotation == name
        assert {(int(x), int(y)) for x, y in zip(bag.x, bag.y)} == set(want[name])
        assert bag.tile_embeddings.shape == (len(want[name]), 3)
        ds = bag.to_xarray()
        assert list(ds["class"].values) == ["tumor", "stroma", "necrosis"]
        np.testing.assert_allclose(ds.coverage.sel({"class": name}).values,
                                   [want[name][(int(x), int(y))] for x, y in zip(bag.x, bag.y)], atol=1e-6)
        for x, y, e in zip(bag.x, bag.y, bag.tile_embeddings.numpy()):
            whole.setdefault((int(x), int(y)), e)
            np.testing.assert_array_equal(whole[(int(x), int(y))], e)   # a tile in two bags: one embedding
    only = mean_rgb.embed_slides([item], annotations=["tumor"], preprocessing=config(),
                                 execution=ExecutionOptions(num_workers=1))
    assert list(only["s"]) == ["tumor"]
    tumor = mean_rgb.embed_slide(slide, mask_path=masks["geojson"], sample_id="s", annotation="tumor",
                                 preprocessing=config(), execution=ExecutionOptions(num_workers=1))
    assert tumor.annotation == "tumor" and tumor.num_tiles == len(want["tumor"])
    with pytest.raises(ValueError, match="pass annotation=... to pick one"):
        mean_rgb.embed_slide(slide, mask_path=masks["geojson"], preprocessing=config(),
                             execution=ExecutionOptions(num_workers=1))
    with pytest.raises(ValueError, match="no 'lymph' annotation bag"):
        mean_rgb.embed_slide(slide, mask_path=masks["geojson"], annotation="lymph", preprocessing=config(),
                             execution=ExecutionOptions(num_workers=1))


def test_pipeline_writes_bags_in_the_store_and_slide2vecs_class_folders(mean_rgb, slide, masks, tmp_path):
    import csv

    import torch
    import xarray as xr

    from slide2vec_dask import ExecutionOptions, Pipeline

    out = tmp_path / "run"
    run = Pipeline(mean_rgb, config(), ExecutionOptions(output_dir=out, output_format=("pt", "geojson"),
                                                        num_workers=1)).run(
        slides=[{"sample_id": "s", "image_path": slide, "mask_path": masks["tif8"]}])
    assert run.num_failed == 0
    want = bags(slide, masks["tif8"])
    ds = xr.open_zarr(run.store_path, group="tiles/s")
    assert list(ds["class"].values) == ["tumor", "stroma", "necrosis"] and ds.coverage.dims == ("tile", "class")
    assert list(ds["bag"].values) == ["tumor", "stroma", "necrosis"] and ds.in_bag.dims == ("tile", "bag")
    assert ds.sizes["tile"] == len(set().union(*want.values()))   # each tile once
    memory = mean_rgb.embed_slides([{"sample_id": "s", "image_path": slide, "mask_path": masks["tif8"]}],
                                   preprocessing=config(), execution=ExecutionOptions(num_workers=1))["s"]
    with open(run.process_list_path) as f:
        rows = {r["annotation"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"tumor", "stroma", "necrosis"}
    for name in ("tumor", "stroma", "necrosis"):
        inside = ds.in_bag.sel(bag=name).values
        xy = {(int(x), int(y)) for x, y in zip(ds.x.values[inside], ds.y.values[inside])}
        assert xy == set(want[name])
        pt = out / "tile_embeddings" / name / "s.pt"
        coords = np.load(out / "tiles" / name / "s.coordinates.npz")
        assert [(int(x), int(y)) for x, y in zip(coords["x"], coords["y"])] == \
            [(int(x), int(y)) for x, y in zip(memory[name].x, memory[name].y)]
        np.testing.assert_allclose(coords["tissue_fractions"], [want[name][(int(x), int(y))]
                                                                for x, y in zip(coords["x"], coords["y"])], atol=1e-6)
        np.testing.assert_allclose(torch.load(pt).numpy(), memory[name].tile_embeddings.numpy(), atol=1e-6)
        assert json.loads(pt.with_suffix(".meta.json").read_text())["annotation"] == name
        assert rows[name]["num_tiles"] == str(len(want[name])) and rows[name]["feature_path"] == str(pt)
    assert not (out / "tile_embeddings" / "s.pt").exists()
    # the GeoJSON export draws the sampled classes' annotations as the slide's tissue
    from slide2vec_dask.exporters.geojson import tissue_polygons
    from slide2vec_dask.exporters._base import TileSource
    from slide2vec_dask.store import EmbeddingStore

    polygons, drawn = tissue_polygons(TileSource.open(EmbeddingStore(out), "s"))
    assert drawn not in ("tile grid", "none")
    assert sorted(len(rings) for rings in polygons) == [1, 1, 1, 2]   # 4 rectangles, the stroma's with its hole
    # the QC gallery: each bag's count on the card, its tiles outlined in its colour on the picture
    from PIL import Image

    from slide2vec_dask.qc.images import PALETTE, image_name, render, tiling_layers

    page = (out / "qc" / "index.html").read_text()
    for i, name in enumerate(("tumor", "stroma", "necrosis")):
        assert f"rgb{PALETTE[i]}\"></span>{name}: {len(want[name])}" in page
    assert Image.open(out / "qc" / image_name("s")).size[0] >= 512
    plan = load_plan(out / "coordinates" / "s.npz")
    layers = tiling_layers(plan)
    assert [(layer.name, layer.color, len(layer.boxes)) for layer in layers] == \
        [(name, PALETTE[i], len(want[name])) for i, name in enumerate(("tumor", "stroma", "necrosis"))]
    drawn = render(np.full((374, 512, 3), 255, np.uint8), 8.0, layers).astype(int)
    for color in PALETTE[:3]:   # each bag's outlines are on the picture (a tile in two bags shows both)
        assert (np.abs(drawn - np.array(color)).sum(axis=-1) == 0).sum() > 100, f"no outlines in {color}"


def test_tiling_only_writes_hs2ps_coordinate_files_per_class(hs2p_python, mean_rgb, slide, masks, tmp_path):
    import csv

    from slide2vec_dask import ExecutionOptions, Pipeline

    out = tmp_path / "run"
    run = Pipeline(mean_rgb, config(), ExecutionOptions(output_dir=out, num_workers=1)).run(
        slides=[{"sample_id": "s", "image_path": slide, "mask_path": masks["tif8"]}], tiling_only=True)
    assert run.num_failed == 0
    want = bags(slide, masks["tif8"])
    with open(run.process_list_path) as f:
        rows = {r["annotation"]: r for r in csv.DictReader(f)}
    for name in ("tumor", "stroma", "necrosis"):
        npz, meta = out / "tiles" / name / "s.coordinates.npz", out / "tiles" / name / "s.coordinates.meta.json"
        loaded = subprocess.run([str(hs2p_python), str(MAKE_HS2P), "load", str(npz), str(meta)], capture_output=True,
                                text=True, env=_clean_env(), timeout=300)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        theirs = json.loads(loaded.stdout.strip().splitlines()[-1])
        got = {(x, y): f for x, y, f in zip(theirs["x"], theirs["y"], theirs["tissue_fractions"])}
        assert got == pytest.approx(want[name], abs=1e-6)
        assert json.loads(meta.read_text())["artifact"]["annotation"] == name
        assert rows[name]["coordinates_npz_path"] == str(npz) and rows[name]["num_tiles"] == str(len(want[name]))
