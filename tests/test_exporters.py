"""Exports: every format read back with the library its consumers use, compared with the store.

The store is read with plain xarray / zarr (independent of the exporters); each
export with h5py, anndata, torch, json (and spatialdata / wsidata where they are
installed).  Slides are written at 0.25 µm/px and embedded at 0.5, so level-0
pixels, read-level pixels and micrometres all differ and a wrong unit shows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from test_hs2p_tiling import MAKE_HS2P, _clean_env, hs2p_python  # noqa: F401  (a fixture)

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, export, testing

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5, "grid": "slide"}   # (the tile-grid fallback below needs one grid)
MPP = 0.25
SHAPES = {"a": (1792, 2240, [(448, 448, 1344, 1792)]), "b": (1344, 1792, [(0, 0, 896, 896), (896, 896, 1344, 1792)]),
          "c": (1792, 1792, [(448, 0, 1792, 1344)])}
ALL = ["trident-h5", "clam-h5", "stamp-h5", "anndata", "spatialdata", "geojson", "pt", "npz"]


def linear_model():
    """A small seeded module: the same weights (same spec key) in every process that builds it."""
    import torch

    from slide2vec_dask import Model

    torch.manual_seed(0)
    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                 torch.nn.Linear(48, 16)), name="pooled-linear")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-slides")
    rows = []
    for i, (sid, (h, w, rects)) in enumerate(SHAPES.items()):
        path = testing.write_svs(folder / f"{sid}.svs", testing.tissue_image(h, w, rects, seed=10 + i), mpp=MPP,
                                 downsamples=(1, 2, 4))
        rows.append({"sample_id": sid, "image_path": str(path)})
    return rows


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c:
        with Client(c, set_as_default=False) as client:
            yield client


@pytest.fixture(scope="module")
def run(slides, cluster, tmp_path_factory):
    """One finished run with no exports asked for."""
    out = tmp_path_factory.mktemp("export-run")
    result = Pipeline(linear_model(), PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out),
                      client=cluster).run(slides=slides)
    assert [o.status for o in result.outcomes] == ["success"] * 3
    return out


def stored(out: Path, sid: str) -> xr.Dataset:
    return xr.open_zarr(out / "embeddings.zarr", group=f"tiles/{sid}").load()


def level0_size(slide: str) -> tuple[int, int]:
    import openslide

    with openslide.OpenSlide(slide) as osr:
        return osr.dimensions


# -- each format, read back --------------------------------------------------------------------------
def test_trident_and_clam_h5_match_the_store(run, slides, tmp_path):
    h5py = pytest.importorskip("h5py")
    import torch

    export(run, ["trident-h5", "clam-h5"], dest=tmp_path)
    for slide in slides:
        sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
        assert ds.sizes["tile"] > 0
        xy = np.stack([ds.x.values, ds.y.values], axis=1)
        trident = tmp_path / "trident" / "20x_224px_0px_overlap" / "features_pooled-linear" / f"{sid}.h5"
        clam = tmp_path / "clam" / "pooled-linear" / "h5_files" / f"{sid}.h5"
        for path in (trident, clam):
            with h5py.File(path, "r") as f:
                assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
                np.testing.assert_array_equal(f["features"][:], ds.embedding.values)
                np.testing.assert_array_equal(f["coords"][:], xy)
                a = dict(f["coords"].attrs)
                assert (a["patch_size"], a["patch_size_level0"], a["overlap"], a["name"]) == (224, 448, 0, sid)
                assert a["level0_magnification"] == 40 and a["target_magnification"] == 20   # 0.25 and 0.5 µm/px
                assert (a["level0_width"], a["level0_height"]) == level0_size(slide["image_path"])
                assert f["features"].attrs["encoder"] == "pooled-linear" and f["features"].attrs["name"] == sid
        with h5py.File(clam, "r") as f:
            assert f["coords"].attrs["patch_level"] == 1   # 0.5 µm/px is level 1 of a 0.25 µm/px slide
        pt = torch.load(tmp_path / "clam" / "pooled-linear" / "pt_files" / f"{sid}.pt", weights_only=True)
        np.testing.assert_array_equal(pt.numpy(), ds.embedding.values)


def test_stamp_h5_coordinates_are_micrometres(run, slides, tmp_path):
    h5py = pytest.importorskip("h5py")
    export(run, "stamp-h5", dest=tmp_path)
    for slide in slides:
        sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
        with h5py.File(tmp_path / "stamp" / "pooled-linear" / f"{sid}.h5", "r") as f:
            np.testing.assert_array_equal(f["feats"][:], ds.embedding.values)
            um = np.stack([ds.x.values, ds.y.values], axis=1) * MPP    # level-0 px x level-0 spacing
            np.testing.assert_array_equal(f["coords"][:], um)
            a = dict(f.attrs)
            assert a["unit"] == "um" and a["feat_type"] == "tile" and a["extractor"] == "pooled-linear"
            assert a["tile_size_um"] == 448 * MPP == 112 and a["tile_size_px"] == 224
            assert "stamp_version" not in a
            # STAMP's own arithmetic: mpp = tile_size_um / tile_size_px
            assert a["tile_size_um"] / a["tile_size_px"] == 0.5


def test_anndata_matches_the_store(run, slides, tmp_path):
    ad = pytest.importorskip("anndata")
    export(run, "anndata", dest=tmp_path)
    for slide in slides:
        sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
        adata = ad.read_h5ad(tmp_path / "anndata" / "pooled-linear" / f"{sid}.h5ad")
        assert adata.shape == ds.embedding.shape
        np.testing.assert_array_equal(np.asarray(adata.X), ds.embedding.values)
        np.testing.assert_array_equal(adata.obs["tile_id"].to_numpy(), np.arange(ds.sizes["tile"]))
        np.testing.assert_array_equal(adata.obs["x"].to_numpy(), ds.x.values)
        np.testing.assert_array_equal(adata.obs["y"].to_numpy(), ds.y.values)
        np.testing.assert_array_equal(adata.obsm["spatial"], np.stack([ds.x.values, ds.y.values], axis=1))
        np.testing.assert_array_equal(adata.obs["tissue_fraction"].to_numpy(), ds.tissue_fraction.values)
        assert adata.uns["tile_spec"]["base_downsample"] * adata.uns["tile_spec"]["height"] == 448
        assert dict(adata.uns["spatialdata_attrs"]) == {"region": "tiles", "region_key": "library_id",
                                                        "instance_key": "tile_id"}


def _ragged_squares(group) -> np.ndarray:
    """(N, 5, 2) rings of a format-0.1 polygon shapes element, decoded by hand from its arrays."""
    coords, rings, polys = group["coords"][:], group["offset0"][:], group["offset1"][:]
    assert np.array_equal(polys, np.arange(len(polys)))   # one ring per polygon
    return np.stack([coords[rings[i] : rings[i + 1]] for i in range(len(rings) - 1)]) if len(rings) > 1 else \
        np.zeros((0, 5, 2))


def test_spatialdata_layout_matches_the_store(run, slides, tmp_path):
    ad = pytest.importorskip("anndata")
    import zarr

    export(run, "spatialdata", dest=tmp_path)
    for slide in slides:
        sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
        root = zarr.open_group(str(tmp_path / "spatialdata" / f"{sid}.zarr"), mode="r")
        assert root.attrs["spatialdata_attrs"]["version"] == "0.2"
        assert root.attrs["tile_spec"]["tiles"]["mpp"] == 0.5
        squares = _ragged_squares(root["shapes/tiles"])
        x, y = ds.x.values.astype(float), ds.y.values.astype(float)
        np.testing.assert_array_equal(squares.min(axis=1), np.stack([x, y], axis=1))
        np.testing.assert_array_equal(squares.max(axis=1), np.stack([x + 448, y + 448], axis=1))
        np.testing.assert_array_equal(root["shapes/tiles/Index"][:], np.arange(ds.sizes["tile"]))
        table = ad.io.read_elem(root["tables/pooled-linear_tiles"])
        np.testing.assert_array_equal(np.asarray(table.X), ds.embedding.values)
        np.testing.assert_array_equal(table.obs["tile_id"].to_numpy(), np.arange(ds.sizes["tile"]))
        linkage = dict(root["tables/pooled-linear_tiles"].attrs)
        assert (linkage["region"], linkage["region_key"], linkage["instance_key"]) == ("tiles", "library_id", "tile_id")


def test_spatialdata_wsidata_and_lazyslide_open_the_export(run, slides, tmp_path):
    """The consumers themselves, where installed (not in the test extra: spatialdata pins an older
    Dask; checked with spatialdata 0.7.3, wsidata 0.12.0, lazyslide 0.13.0 in a separate environment)."""
    sd = pytest.importorskip("spatialdata")
    export(run, "spatialdata", dest=tmp_path)
    slide = slides[0]
    sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
    sdata = sd.read_zarr(tmp_path / "spatialdata" / f"{sid}.zarr")
    bounds = sdata.shapes["tiles"].geometry.bounds.to_numpy()
    np.testing.assert_array_equal(bounds[:, :2], np.stack([ds.x.values, ds.y.values], axis=1))
    np.testing.assert_array_equal(bounds[:, 2:] - bounds[:, :2], 448)
    np.testing.assert_array_equal(np.asarray(sdata.tables["pooled-linear_tiles"].X), ds.embedding.values)
    assert sd.models.get_table_keys(sdata.tables["pooled-linear_tiles"]) == ("tiles", "library_id", "tile_id")
    wsidata = pytest.importorskip("wsidata")
    wsi = wsidata.open_wsi(slide["image_path"], store=str(tmp_path / "spatialdata" / f"{sid}.zarr"))
    spec = wsi.tile_spec("tiles")
    assert (spec.height, spec.base_height, spec.ops_level, spec.mpp) == (224, 448, 1, 0.5)
    assert wsi.tables["pooled-linear_tiles"].shape == ds.embedding.shape
    assert len(wsi.shapes["tiles"]) == ds.sizes["tile"]
    zs = pytest.importorskip("lazyslide")
    wsi = zs.open_wsi(slide["image_path"], store=str(tmp_path / "spatialdata" / f"{sid}.zarr"))
    zs.tl.feature_aggregation(wsi, feature_key="pooled-linear", encoder="mean")   # finds {model}_tiles itself
    np.testing.assert_allclose(np.asarray(wsi["pooled-linear_tiles"].varm["agg_slide"]).ravel(),
                               ds.embedding.values.mean(axis=0), rtol=1e-6)


def _inside(px: float, py: float, rings) -> bool:
    """Even-odd rule over every ring of a polygon (outer and holes)."""
    inside = False
    for ring in rings:
        for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
            if (y0 > py) != (y1 > py) and px < x0 + (py - y0) * (x1 - x0) / (y1 - y0):
                inside = not inside
    return inside


def _drawn(polygons, shape, step):
    """Which cells of a (rows, cols) grid of ``step``-px cells the polygons cover, at each cell centre."""
    return np.array([[any(_inside((c + 0.5) * step, (r + 0.5) * step, p) for p in polygons)
                      for c in range(shape[1])] for r in range(shape[0])])


def test_geojson_tiles_and_tissue(run, slides, tmp_path):
    export(run, "geojson", dest=tmp_path)
    for slide in slides:
        sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
        doc = json.loads((tmp_path / "geojson" / f"{sid}.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and doc["properties"]["tissue_drawn_from"] == "tissue mask"
        tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
        assert [t["properties"]["tile_id"] for t in tiles] == list(range(ds.sizes["tile"]))
        for t, x, y in zip(tiles, ds.x.values, ds.y.values):
            assert t["geometry"]["coordinates"] == [[[x, y], [x + 448, y], [x + 448, y + 448], [x, y + 448], [x, y]]]
        # Tissue: the slide's tissue rectangles exactly (they are aligned to the 64x segmentation
        # pixels), checked at the centre of every segmentation pixel.
        polygons = [f["geometry"]["coordinates"] for f in doc["features"]
                    if f["properties"]["objectType"] == "annotation"]
        h, w, rects = SHAPES[sid]
        expected = testing.tissue_mask(h // 64, w // 64, [tuple(v // 64 for v in r) for r in rects])
        np.testing.assert_array_equal(_drawn(polygons, expected.shape, 64), expected)
        assert len(polygons) == len(rects)   # b's two rectangles touch at a corner only: two pieces


def test_geojson_tissue_falls_back_to_the_tile_grid(run, slides, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    moved = Path(slides[0]["image_path"]).with_suffix(".moved")
    os.rename(slides[0]["image_path"], moved)
    try:
        export(out, "geojson", samples=["a"])
    finally:
        os.rename(moved, slides[0]["image_path"])
    doc = json.loads((out / "geojson" / "a.geojson").read_text())
    assert doc["properties"]["tissue_drawn_from"] == "tile grid"
    with np.load(out / "coordinates" / "a.npz") as plan:
        tissue = plan["tissue_fraction"] > 0
    polygons = [f["geometry"]["coordinates"] for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    np.testing.assert_array_equal(_drawn(polygons, tissue.shape, 448), tissue)   # one cell = one 448-px tile


def test_outline_of_random_masks():
    from slide2vec_dask.exporters._outline import outline

    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random((rng.integers(1, 10), rng.integers(1, 10))) < rng.random()
        polygons = outline(mask)
        drawn = np.array([[sum(_inside(c + 0.5, r + 0.5, p) for p in polygons) for c in range(mask.shape[1])]
                          for r in range(mask.shape[0])])
        np.testing.assert_array_equal(drawn, mask.astype(int))   # every tissue cell in exactly one polygon
        for p in polygons:
            for ring in p:
                assert ring[0] == ring[-1] and len(set(ring[:-1])) == len(ring) - 1   # closed, simple


def test_pt_and_npz_match_the_store(run, slides, tmp_path):
    import torch

    export(run, ["pt", "npz"], dest=tmp_path)
    for slide in slides:
        sid, ds = slide["sample_id"], stored(run, slide["sample_id"])
        np.testing.assert_array_equal(np.load(tmp_path / "tile_embeddings" / f"{sid}.npz")["features"],
                                      ds.embedding.values)
        pt = torch.load(tmp_path / "tile_embeddings" / f"{sid}.pt", weights_only=True)
        np.testing.assert_array_equal(pt.numpy(), ds.embedding.values)
        meta = json.loads((tmp_path / "tile_embeddings" / f"{sid}.meta.json").read_text())
        with np.load(meta["coordinates_npz_path"]) as coords:   # slide2vec's coordinates file, row for row
            assert coords["x"].tolist() == ds.x.values.tolist() and coords["y"].tolist() == ds.y.values.tolist()



def test_pt_coordinates_are_the_tilings_files_in_embedded_order(hs2p_python, run, tmp_path):
    """One writer (tiling/coordinate_files.py): the export's coordinates meta states the run's settings
    from its saved plan, or, with the plan gone, the geometry from the tile attrs; hs2p's loader reads both."""
    import shutil

    export(run, "npz", dest=tmp_path / "with-plan")
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(moved / "coordinates")   # a store moved away from its saved plans
    export(moved, "npz", dest=tmp_path / "without-plan")
    sid = "a"
    metas = {}
    for name in ("with-plan", "without-plan"):
        tiles = tmp_path / name / "tiles"
        metas[name] = json.loads((tiles / f"{sid}.coordinates.meta.json").read_text())
        done = subprocess.run([str(hs2p_python), str(MAKE_HS2P), "load", str(tiles / f"{sid}.coordinates.npz"),
                               str(tiles / f"{sid}.coordinates.meta.json")], capture_output=True, text=True,
                              env=_clean_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        loaded = json.loads(done.stdout.strip().splitlines()[-1])
        ds = stored(run, sid)
        assert (loaded["x"], loaded["y"]) == (ds.x.values.tolist(), ds.y.values.tolist())   # the embedded order
    with_plan, without = metas["with-plan"], metas["without-plan"]
    assert with_plan["artifact"]["tile_order"] == without["artifact"]["tile_order"] == "as_embedded"
    unknown = {"min_tissue_fraction", "tolerance"}   # settings the tile attrs do not record: None, not made up
    assert {k: v for k, v in with_plan["tiling"].items() if k not in unknown} == {
        k: v for k, v in without["tiling"].items() if k not in unknown}   # the tile attrs state the plan's geometry
    assert with_plan["tiling"]["min_tissue_fraction"] == 0.5 and all(without["tiling"][k] is None for k in unknown)
    assert with_plan["segmentation"]["mthresh"] == 0 and with_plan["segmentation"]["seg_level"] is not None
    assert without["segmentation"]["mthresh"] is None   # unknown without the plan: not made up



def test_a_slide_without_tiles_exports_no_coordinates_npz(cluster, tmp_path):
    """As hs2p: a slide without tiles has a coordinates meta and no npz; its export is still current."""
    blank = testing.write_tiff(tmp_path / "blank.tif", testing.tissue_image(600, 600, []), spacing_um=MPP,
                               downsamples=(1,), compression="zlib")
    out = tmp_path / "run"
    result = Pipeline(linear_model(), PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out, output_format="npz"),
                      client=cluster).run(slides=[{"sample_id": "b", "image_path": str(blank)}])
    assert [(o.status, o.num_tiles) for o in result.outcomes] == [("success", 0)]
    meta = json.loads((out / "tile_embeddings" / "b.meta.json").read_text())
    assert meta["coordinates_npz_path"] is None and not (out / "tiles" / "b.coordinates.npz").exists()
    assert json.loads((out / "tiles" / "b.coordinates.meta.json").read_text())["tiling"]["n_tiles"] == 0
    written = (out / "tile_embeddings" / "b.npz").stat().st_mtime_ns
    assert export(out, "npz") == [out / "tile_embeddings" / f for f in ("b.npz", "b.meta.json")] + [
        out / "tiles" / "b.coordinates.meta.json"]
    assert (out / "tile_embeddings" / "b.npz").stat().st_mtime_ns == written   # current: not rewritten


# -- the up-to-date rule, errors -----------------------------------------------------------------------
def test_current_files_are_skipped_deleted_and_stale_ones_rewritten(slides, cluster, tmp_path):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "run"
    one = slides[:1]
    Pipeline(linear_model(), PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out), client=cluster).run(
        slides=one)
    (path,) = export(out, "stamp-h5")
    first = path.stat().st_mtime_ns
    assert export(out, "stamp-h5") == [path] and path.stat().st_mtime_ns == first   # current: not rewritten
    path.unlink()
    export(out, "stamp-h5")
    assert path.exists()
    second = path.stat().st_mtime_ns
    # The slide re-embedded into the same store (a new group, same metadata): its export is stale.
    Pipeline(linear_model(), PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out, overwrite=True),
             client=cluster).run(slides=one)
    export(out, "stamp-h5")
    assert path.stat().st_mtime_ns != second
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["feats"][:], stored(out, "a").embedding.values)


def test_bad_names_and_missing_extras_are_clear(run, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="output_format must be one of"):
        ExecutionOptions(output_format=["pt", "h5"])
    with pytest.raises(ValueError, match="unknown output format"):
        export(run, "parquet")
    with pytest.raises(ValueError, match="not in the store"):
        export(run, "pt", samples=["nope"])
    (tmp_path / "geojson").write_text("a file where the folder goes")
    with pytest.raises(RuntimeError, match="a: writing its geojson export .*a.geojson failed"):
        export(run, "geojson", dest=tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"slide2vec-dask\[h5\]"):
        export(run, "trident-h5")
    with pytest.raises(ImportError, match=r"slide2vec-dask\[h5\]"):   # before any slide is opened
        Pipeline(linear_model(), execution=ExecutionOptions(output_dir=run, output_format=["stamp-h5"]))


def test_cli_export(run, tmp_path):
    from slide2vec_dask.cli import main

    assert main(["export", str(run), "--format", "geojson", "--format", "npz", "--dest", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "geojson").glob("*.geojson")) == ["a.geojson", "b.geojson",
                                                                               "c.geojson"]
    assert sorted(p.name for p in (tmp_path / "tile_embeddings").glob("*.npz")) == ["a.npz", "b.npz", "c.npz"]
    assert main(["export", str(tmp_path / "nothing"), "--format", "pt"]) == 2


# -- the pipeline ------------------------------------------------------------------------------------
def test_rerun_writes_newly_asked_formats_without_embedding(run, slides, tmp_path, monkeypatch):
    """Reruns make what is missing: complete slides get the exports asked for now, from the store."""
    pytest.importorskip("h5py")
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    tiles = out / "embeddings.zarr" / "tiles" / "a" / "zarr.json"
    before = (tiles.stat().st_mtime_ns, json.loads(tiles.read_text())["attributes"]["build_id"])

    from slide2vec_dask.clusters import local as clusters

    def no_cluster(*args, **kwargs):
        raise AssertionError("a rerun with nothing to embed started a cluster")

    monkeypatch.setattr(clusters, "start_local_cluster", no_cluster)
    result = Pipeline(linear_model(), PreprocessingConfig(**EXACT),
                      ExecutionOptions(output_dir=out, output_format=["pt", "trident-h5"])).run(slides=slides)
    assert [o.status for o in result.outcomes] == ["skipped"] * 3
    assert (tiles.stat().st_mtime_ns, json.loads(tiles.read_text())["attributes"]["build_id"]) == before
    for slide in slides:
        sid = slide["sample_id"]
        assert (out / "tile_embeddings" / f"{sid}.pt").exists()
        assert (out / "trident" / "20x_224px_0px_overlap" / "features_pooled-linear" / f"{sid}.h5").exists()
    assert {a.sample_id: a.flat_path for a in result.tile_artifacts}["b"] == out / "tile_embeddings" / "b.pt"
    # A deleted export comes back on the next rerun, still without embedding anything.
    (out / "tile_embeddings" / "b.pt").unlink()
    Pipeline(linear_model(), PreprocessingConfig(**EXACT),
             ExecutionOptions(output_dir=out, output_format=["pt", "trident-h5"])).run(slides=slides)
    assert (out / "tile_embeddings" / "b.pt").exists()
    # Everything current: the rerun only reads, and still names the files (its own process list and run
    # report excepted: every run writes those, a rerun's report is the rerun's).
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "embeddings.zarr" not in p.parts
               and p.name not in ("process_list.csv", "run_report.json", "run_report.md")}
    root = (out / "embeddings.zarr" / "zarr.json").stat().st_mtime_ns
    third = Pipeline(linear_model(), PreprocessingConfig(**EXACT),
                     ExecutionOptions(output_dir=out, output_format=["pt", "trident-h5"])).run(slides=slides)
    assert {a.sample_id: a.flat_path for a in third.tile_artifacts}["b"] == out / "tile_embeddings" / "b.pt"
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert (out / "embeddings.zarr" / "zarr.json").stat().st_mtime_ns == root   # the store was not even opened for writing


def test_a_run_writes_both_formats_as_slides_finish(slides, tmp_path):
    h5py = pytest.importorskip("h5py")
    ad = pytest.importorskip("anndata")
    import zarr

    out = tmp_path / "run"
    result = Pipeline(linear_model(), PreprocessingConfig(**EXACT),
                      ExecutionOptions(output_dir=out, output_format=["trident-h5", "spatialdata"], num_workers=1,
                                       prefetch_factor=1)).run(slides=slides)
    assert [o.status for o in result.outcomes] == ["success"] * 3
    published = {}
    for slide in slides:
        sid, ds = slide["sample_id"], stored(out, slide["sample_id"])
        h5 = out / "trident" / "20x_224px_0px_overlap" / "features_pooled-linear" / f"{sid}.h5"
        zarr_dir = out / "spatialdata" / f"{sid}.zarr"
        # The finalising worker reported them: they were written with the slide, not after the run.
        assert {str(h5), str(zarr_dir)} <= set(next(o for o in result.outcomes if o.sample_id == sid).flat_paths)
        with h5py.File(h5, "r") as f:
            np.testing.assert_array_equal(f["features"][:], ds.embedding.values)
        table = ad.io.read_elem(zarr.open_group(str(zarr_dir), mode="r")["tables/pooled-linear_tiles"])
        np.testing.assert_array_equal(np.asarray(table.X), ds.embedding.values)
        published[sid] = (h5.stat().st_mtime, (out / "embeddings.zarr" / "tiles" / sid / "zarr.json").stat().st_mtime)
    # One slide at a time: the first slide's export exists before the last slide is published.
    first, last = min(published.values(), key=lambda t: t[1]), max(published.values(), key=lambda t: t[1])
    assert first[0] <= last[1]


KILLED_RUN = textwrap.dedent("""
    import sys
    import torch
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    if __name__ == "__main__":
        torch.manual_seed(0)
        model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                      torch.nn.Linear(48, 16)), name="pooled-linear")
        config = PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5, grid="slide")
        Pipeline(model, config, ExecutionOptions(output_dir=sys.argv[1], batch_size=2, num_workers=1, prefetch_factor=1,
                                                 output_format=["trident-h5", "spatialdata"])).run(manifest_path=sys.argv[2])
""")


def test_killed_run_leaves_no_partial_export_and_rerun_completes(slides, tmp_path):
    h5py = pytest.importorskip("h5py")
    ad = pytest.importorskip("anndata")
    import zarr

    ids = [f"s{i}" for i in range(8)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path\n" + "\n".join(f"{s},{slides[i % 3]['image_path']}"
                                                             for i, s in enumerate(ids)) + "\n")
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "killed"
    h5_dir = out / "trident" / "20x_224px_0px_overlap" / "features_pooled-linear"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(manifest)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sd_dir = out / "spatialdata"

    def writing() -> bool:
        """A SpatialData export being written: its temporary, or its final name not yet recorded."""
        try:
            names = {p.name for p in sd_dir.iterdir()}
        except FileNotFoundError:
            return False
        return any(n.endswith(".tmp") or n.endswith(".zarr") and f".{n}.source.json" not in names for n in names)

    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not writing():
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    def check(sid: str) -> None:
        """Whatever carries a final name is complete and equal to the store."""
        ds = stored(out, sid)
        h5, zarr_dir = h5_dir / f"{sid}.h5", out / "spatialdata" / f"{sid}.zarr"
        if h5.exists():
            with h5py.File(h5, "r") as f:
                np.testing.assert_array_equal(f["features"][:], ds.embedding.values)
        if zarr_dir.exists():
            table = ad.io.read_elem(zarr.open_group(str(zarr_dir), mode="r")["tables/pooled-linear_tiles"])
            np.testing.assert_array_equal(np.asarray(table.X), ds.embedding.values)

    finished = {p.name for p in (out / "embeddings.zarr" / "tiles").iterdir() if (p / "zarr.json").exists()}
    assert finished < set(ids)
    for sid in ids:
        if sid in finished:
            check(sid)
        else:
            assert not (h5_dir / f"{sid}.h5").exists() and not (out / "spatialdata" / f"{sid}.zarr").exists()
    # Temporaries are hidden names, never the final one.
    assert all(p.name.startswith(".") for p in h5_dir.iterdir() if not p.name.endswith(".h5"))

    resumed = Pipeline(linear_model(), PreprocessingConfig(**EXACT),
                       ExecutionOptions(output_dir=out, output_format=["trident-h5", "spatialdata"])).run(
        manifest_path=manifest)
    assert all(o.status in ("success", "skipped") for o in resumed.outcomes)
    for sid in ids:
        assert (h5_dir / f"{sid}.h5").exists() and (out / "spatialdata" / f"{sid}.zarr").exists()
        check(sid)
    assert not [p for p in h5_dir.iterdir() if p.name.endswith(".tmp")]   # a dead writer's temporaries swept


def test_slide_and_patient_rows_where_the_format_has_a_place(run, tmp_path):
    """Rows written by the store's own worker-side call, as a slide / patient model's tasks do."""
    h5py = pytest.importorskip("h5py")
    import shutil

    from slide2vec_dask.store import EmbeddingStore

    out = tmp_path / "run"
    shutil.copytree(run, out)
    store = EmbeddingStore(out)
    rng = np.random.default_rng(3)
    slide_rows = {sid: rng.standard_normal(32).astype(np.float32) for sid in ("a", "b")}
    for sid, vec in slide_rows.items():
        store.write_row("slide", sid, vec, None, {"model": "mean-slide"})
    patient = rng.standard_normal(32).astype(np.float32)
    store.write_row("patient", "p1", patient, None, {"model": "mean-patient", "sample_ids": ["a", "b"]})
    paths = export(out, ["trident-h5", "stamp-h5", "npz", "geojson"], samples=["a", "b"])
    for sid, vec in slide_rows.items():
        with h5py.File(out / "trident" / "20x_224px_0px_overlap" / "slide_features_mean-slide" / f"{sid}.h5") as f:
            assert f["features"].shape == (32,)
            np.testing.assert_array_equal(f["features"][:], vec)
        with h5py.File(out / "stamp" / "mean-slide" / "slide" / f"{sid}.h5") as f:
            np.testing.assert_array_equal(f["feats"][:], vec)
            assert f.attrs["feat_type"] == "slide"
        np.testing.assert_array_equal(np.load(out / "slide_embeddings" / f"{sid}.npz")["features"], vec)
    with h5py.File(out / "stamp" / "mean-patient" / "patient" / "p1.h5") as f:
        np.testing.assert_array_equal(f["feats"][:], patient)
        assert f.attrs["feat_type"] == "patient"
    np.testing.assert_array_equal(np.load(out / "patient_embeddings" / "p1.npz")["features"], patient)
    assert not (out / "geojson" / "c.geojson").exists()   # only the samples asked for
    assert not any("trident" in p.parts and "p1" in p.name for p in paths)   # TRIDENT has no patients


def test_temporaries_of_dead_writers_are_swept(run, tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    folder = tmp_path / "geojson"
    folder.mkdir()
    left = folder / f".a.geojson.{host}-{int(dead.stdout)}-0123abcd.tmp"           # a killed writer's
    mine = folder / f".b.geojson.{host}-{os.getpid()}-0123abcd.tmp"                  # a live writer's
    other = folder / f".c.geojson.another-host-{int(dead.stdout)}-0123abcd.tmp"     # not ours to judge
    for p in (left, mine, other):
        p.write_text("{")
    export(run, "geojson", dest=tmp_path)
    assert not left.exists() and mine.exists() and other.exists()
    assert json.loads((folder / "a.geojson").read_text())["type"] == "FeatureCollection"


KILLED_FLAT_EXPORT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import torch
    import slide2vec_dask

    out, dest, fmt, marker = sys.argv[1:5]

    def stalled(save):
        def write(*args, **kwargs):
            save(*args, **kwargs)              # the bytes go to the temporary name...
            open(marker, "w").close()          # ...and the writer stops there, before its rename
            time.sleep(120)
        return write

    torch.save, np.savez = stalled(torch.save), stalled(np.savez)
    slide2vec_dask.export(out, fmt, samples=["a"], dest=dest)
""")


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_a_killed_flat_export_leaves_no_temporary_after_the_next(run, tmp_path, fmt):
    """pt / npz write through the shared atomic writer, so the sweep knows a dead writer's temporary."""
    script, marker, dest = tmp_path / "export.py", tmp_path / "writing", tmp_path / "dest"
    script.write_text(KILLED_FLAT_EXPORT)
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(dest), fmt, str(marker)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not marker.exists():
        time.sleep(0.01)
    assert proc.poll() is None and marker.exists(), "the export ended before it could be killed mid-write"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = dest / "tile_embeddings"
    assert [p for p in folder.iterdir() if p.name.endswith(".tmp")], "killed mid-write: a temporary is left"
    assert not (folder / f"a.{fmt}").exists()

    export(run, fmt, samples=["a"], dest=dest)
    assert not [p.name for p in dest.rglob("*") if p.name.endswith(".tmp")]
    emb = stored(run, "a").embedding.values
    if fmt == "npz":
        np.testing.assert_array_equal(np.load(folder / "a.npz")["features"], emb)
    else:
        import torch

        np.testing.assert_array_equal(torch.load(folder / "a.pt", weights_only=True).numpy(), emb)


# -- a format is one module ------------------------------------------------------------------------
TOY_FORMAT = textwrap.dedent('''
    """A toy format: a slide's tile embeddings as text, one tile a line."""
    from pathlib import Path

    import numpy as np

    from slide2vec_dask.exporters._base import atomic
    from slide2vec_dask.exporters.registry import ExportFormat

    FORMAT = ExportFormat("toy", roots=("toy",))


    def tile_files(src, dest):
        return [Path(dest) / "toy" / f"{src.sample_id}.txt"]


    def write_tiles(src, files):
        atomic(files[0], lambda tmp: np.savetxt(tmp, src.features()))


    def row_files(src, dest):
        return []
''')


def add_format_module(monkeypatch, request, folder: Path, name: str, text: str) -> None:
    """``text`` as module ``name`` of the exporters package: a folder of it on the package's path."""
    import importlib

    import slide2vec_dask.exporters as package

    folder.mkdir()
    (folder / f"{name}.py").write_text(text)
    importlib.invalidate_caches()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    request.addfinalizer(lambda: sys.modules.pop(f"slide2vec_dask.exporters.{name}", None))


def test_a_new_format_is_one_module(run, slides, cluster, tmp_path, monkeypatch, request):
    import socket

    from slide2vec_dask import config, exporters
    from slide2vec_dask.cli import main

    assert "toy" not in config.OUTPUT_FORMATS
    with pytest.raises(ValueError, match="output_format must be one of"):
        ExecutionOptions(output_format="toy")
    add_format_module(monkeypatch, request, tmp_path / "plugins", "toy", TOY_FORMAT)
    assert "toy" in config.OUTPUT_FORMATS and "toy" in exporters.FORMATS

    def check(folder: Path, sid: str) -> None:
        np.testing.assert_array_equal(np.loadtxt(folder / f"{sid}.txt", ndmin=2).astype(np.float32),
                                      stored(run, sid).embedding.values)

    # A run asked for it: every slide's file written as the slide finished, named in its outcome.
    out = tmp_path / "run"
    result = Pipeline(linear_model(), PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out,
                      output_format=("toy",)), client=cluster).run(slides=slides)
    assert [o.status for o in result.outcomes] == ["success"] * 3
    for o in result.outcomes:
        assert str(out / "toy" / f"{o.sample_id}.txt") in o.flat_paths
        np.testing.assert_array_equal(np.loadtxt(out / "toy" / f"{o.sample_id}.txt", ndmin=2).astype(np.float32),
                                      stored(out, o.sample_id).embedding.values)
        assert json.loads((out / "toy" / f".{o.sample_id}.txt.source.json").read_text())["format"] == "toy"

    # export() of a finished run, and the sweep walks the folder the format declared.
    dest = tmp_path / "exported"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = dest / "toy" / f".a.txt.{socket.gethostname()}-{int(dead.stdout)}-0123abcd.tmp"
    left.parent.mkdir(parents=True)
    left.write_text("half")
    assert sorted(p.name for p in export(run, "toy", dest=dest)) == ["a.txt", "b.txt", "c.txt"]
    for slide in slides:
        check(dest / "toy", slide["sample_id"])
    assert not left.exists()
    # The command line offers it too.
    assert main(["export", str(run), "--format", "toy", "--dest", str(tmp_path / "cli")]) == 0
    check(tmp_path / "cli" / "toy", "b")


def test_a_format_declared_twice_is_refused(tmp_path, monkeypatch, request):
    from slide2vec_dask.exporters import registry

    twin = TOY_FORMAT.replace('ExportFormat("toy"', 'ExportFormat("pt"')
    add_format_module(monkeypatch, request, tmp_path / "plugins", "twin", twin)
    with pytest.raises(ValueError, match="'pt' is declared twice"):
        registry.names()


def test_every_format_writes_only_under_the_folders_it_declares(run, tmp_path):
    from slide2vec_dask.exporters import registry

    assert sorted(registry.names()) == sorted(ALL)
    for fmt in registry.formats().values():
        try:
            for module in fmt.requires:
                fmt.need(module)
        except ImportError:
            continue
        dest = tmp_path / fmt.name
        paths = export(run, fmt.name, dest=dest)
        assert paths and all(p.relative_to(dest).parts[0] in fmt.roots for p in paths), (fmt.name, paths)
        assert {p.relative_to(dest).parts[0] for p in dest.iterdir()} <= set(fmt.roots)
