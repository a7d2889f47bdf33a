"""OME-Zarr (OME-NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) as a slide, on disk and at a URL (the HTTP
and S3 servers of tests/test_remote.py, on 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.inputs import fingerprint
from slide2vec_dask.slide import open_slide
from slide2vec_dask.testing.servers import RangeServer, S3Server

FACTORS = (1, 2, 4)


def write_ngff(path, image: np.ndarray, version: str, unit: str = "micrometer", spacing: float = 0.5):
    """An OME-NGFF multiscale image as the specification lays it out (c, y, x; scale transforms),
    written with zarr itself: 0.4 as Zarr v2 (``.zattrs``), 0.5 as Zarr v3 (``zarr.json``, under "ome")."""
    import zarr

    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    datasets = []
    for i, f in enumerate(FACTORS):
        level = np.ascontiguousarray(np.moveaxis(image[::f, ::f], -1, 0))
        array = root.create_array(str(i), shape=level.shape, dtype="uint8", chunks=(3, 256, 256))
        array[...] = level
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, spacing * f, spacing * f]}]})
    multiscale = {"name": "slide", "axes": [{"name": "c", "type": "channel"},
                                            {"name": "y", "type": "space", "unit": unit},
                                            {"name": "x", "type": "space", "unit": unit}], "datasets": datasets}
    if version == "0.4":
        root.attrs["multiscales"] = [{**multiscale, "version": "0.4"}]
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    return path


@pytest.fixture(scope="module")
def image():
    return testing.tissue_image(1536, 1792, [(256, 256, 1280, 1536)], seed=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, image):
    folder = tmp_path_factory.mktemp("ngff")
    write_ngff(folder / "v04.ome.zarr", image, "0.4")
    write_ngff(folder / "v05.ome.zarr", image, "0.5")
    write_ngff(folder / "mm.ome.zarr", image, "0.5", unit="millimeter", spacing=0.0005)
    return folder


@pytest.mark.parametrize("name", ["v04.ome.zarr", "v05.ome.zarr", "mm.ome.zarr"])
def test_levels_spacing_and_pixels_come_from_the_multiscales(folder, image, name):
    with open_slide(folder / name) as slide:
        assert (slide.backend, slide.vendor) == ("omezarr", "ome-zarr")
        assert slide.level_shapes == [(1536 // f, 1792 // f) for f in FACTORS]
        assert slide.spacing == pytest.approx(0.5) and slide.level_downsamples == list(map(float, FACTORS))
        for level, f in enumerate(FACTORS):
            h, w = slide.level_shapes[level]
            np.testing.assert_array_equal(slide.read_level(level, 0, 0, h, w), image[::f, ::f])
        np.testing.assert_array_equal(slide.read_level(0, 100, 1700, 50, 200)[:, 92:], 255)   # past the edge


def test_read_in_place_over_http_and_s3(folder, image):
    pytest.importorskip("s3fs")
    http = RangeServer(folder)
    s3 = S3Server()
    try:
        client = s3.client()
        client.create_bucket(Bucket="ngff")
        for path in (folder / "v05.ome.zarr").rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "ngff", f"v05.ome.zarr/{path.relative_to(folder / 'v05.ome.zarr')}")
        local = open_slide(folder / "v05.ome.zarr")
        for url, options in ((f"{http.url}/v04.ome.zarr", None), (f"{http.url}/v05.ome.zarr", None),
                             ("s3://ngff/v05.ome.zarr", s3.storage_options)):
            with open_slide(url, storage_options=options) as slide:
                assert slide.backend == "omezarr" and slide.level_shapes == local.level_shapes
                for level, (h, w) in enumerate(slide.level_shapes):
                    np.testing.assert_array_equal(slide.read_level(level, 0, 0, h, w),
                                                  local.read_level(level, 0, 0, h, w))
        url = "s3://ngff/v05.ome.zarr"
        from slide2vec_dask.slide.remote import RemotePath

        assert fingerprint(RemotePath(url, s3.storage_options)) == fingerprint(RemotePath(url, s3.storage_options))
        with pytest.raises(FileNotFoundError):
            open_slide(f"{http.url}/missing.ome.zarr")
    finally:
        http.stop()
        s3.stop()


def test_pipeline_over_an_ome_zarr_url_gives_the_local_store(folder, tmp_path):
    import torch
    import xarray as xr

    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()),
                              name="mean-rgb", feature_dim=12)
    config = PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5)
    http = RangeServer(folder)
    try:
        stores = {}
        for kind, path in (("local", folder / "v04.ome.zarr"), ("http", f"{http.url}/v04.ome.zarr")):
            result = Pipeline(model, config, ExecutionOptions(output_dir=tmp_path / kind, num_workers=2)).run(
                slides=[{"sample_id": "slide", "image_path": str(path)}])
            assert [o.status for o in result.outcomes] == ["success"]
            stores[kind] = xr.open_zarr(result.store_path, group="tiles/slide")
        assert stores["http"].sizes == stores["local"].sizes and stores["local"].sizes["tile"] > 0
        np.testing.assert_array_equal(stores["http"].embedding.values, stores["local"].embedding.values)
    finally:
        http.stop()
