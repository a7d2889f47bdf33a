"""A DICOM WSI series read from a real DICOMweb server: Orthanc with its DICOMweb plugin, started
by tests/servers/start-orthanc.sh (as .ci/run does), loaded with a wsidicomizer conversion."""

from __future__ import annotations

import csv
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.slide import open_slide

START = "tests/servers/start-orthanc.sh"
EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}


def orthanc_url() -> str | None:
    """The running test Orthanc's URL (start-orthanc.sh writes it), or None."""
    url = os.environ.get("SLIDE2VEC_ORTHANC_URL")
    if url is None:
        where = Path(os.environ.get("SLIDE2VEC_ORTHANC_DIR", "/tmp/slide2vec-orthanc")) / "url"
        url = where.read_text().strip() if where.is_file() else None
    if url is None:
        return None
    try:
        urllib.request.urlopen(f"{url}/system", timeout=2)
    except OSError:
        return None
    return url


@pytest.fixture(scope="module")
def orthanc() -> str:
    url = orthanc_url()
    if url is None:
        pytest.skip(f"no Orthanc with DICOMweb running: start one with {START} (as .ci/run does)")
    return url


@pytest.fixture(scope="module")
def series(orthanc, tmp_path_factory):
    """A three-level slide converted by wsidicomizer, uploaded to Orthanc: (its DICOMweb URL, the folder)."""
    wsidicomizer = pytest.importorskip("wsidicomizer")
    try:
        from opentile.jpeg.jpeg import find_turbojpeg_path

        find_turbojpeg_path()
    except (ImportError, FileNotFoundError) as exc:   # opentile needs the system's libturbojpeg
        pytest.skip(f"wsidicomizer cannot run here: {exc}")
    import pydicom

    tmp = tmp_path_factory.mktemp("dicomweb")
    image = testing.tissue_image(1792, 2240, [(224, 224, 1344, 1792)], seed=11)
    source = testing.write_svs(tmp / "source.svs", image, downsamples=(1, 4, 16), mpp=0.5)
    folder = tmp / "dicom"
    folder.mkdir()
    wsidicomizer.WsiDicomizer.convert(source, folder)
    for path in sorted(folder.iterdir()):
        request = urllib.request.Request(f"{orthanc}/instances", data=path.read_bytes(),
                                         headers={"Content-Type": "application/dicom"})
        assert json.loads(urllib.request.urlopen(request).read())["Status"] in ("Success", "AlreadyStored")
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    url = f"dicomweb+{orthanc}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    return url, folder


def test_levels_spacing_and_pixels_equal_the_series_read_from_files(series):
    from wsidicom import WsiDicom

    url, folder = series
    with open_slide(url) as web, WsiDicom.open(folder) as files:
        local = open_slide(folder)   # OpenSlide's DICOM reader, from the files
        assert (web.backend, web.vendor) == ("dicomweb", "dicom")
        assert web.level_shapes == local.level_shapes and len(web.level_shapes) == 3
        assert web.spacing == pytest.approx(local.spacing) == pytest.approx(0.5)
        for level, (h, w) in enumerate(web.level_shapes):
            pixels = web.read_level(level, 0, 0, h, w)
            np.testing.assert_array_equal(pixels, local.read_level(level, 0, 0, h, w))
            wsi_level = list(files.levels)[level].level
            np.testing.assert_array_equal(pixels, np.asarray(files.read_region((0, 0), wsi_level, (w, h))
                                                             .convert("RGB")))


def test_a_missing_series_and_a_server_gone_are_clear_errors(series, orthanc):
    url, _ = series
    with pytest.raises(FileNotFoundError, match="no such series"):
        open_slide(url.rsplit("/", 1)[0] + "/1.2.3.4.5")
    gone = url.replace(orthanc.rsplit(":", 1)[1], "9")   # port 9 (discard): nothing listens
    with pytest.raises(OSError, match="did not give the series"):
        open_slide(gone, storage_options={"max_attempts": 1})


def test_pipeline_over_a_dicomweb_series_gives_the_local_store(series, orthanc, tmp_path):
    import torch

    url, folder = series
    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()),
                              name="mean-rgb", feature_dim=12)
    config = PreprocessingConfig(**EXACT)

    def run(image_path, out, **extra):
        manifest = tmp_path / f"{out}.csv"
        manifest.write_text("sample_id,image_path\n" + f"slide,{image_path}\n" + "".join(
            f"{k},{v}\n" for k, v in extra.items()))
        execution = ExecutionOptions(output_dir=tmp_path / out, num_workers=2, storage_options={"max_attempts": 1})
        return Pipeline(model, config, execution).run(manifest_path=manifest)

    local = run(folder, "local")
    gone = url.replace(orthanc.rsplit(":", 1)[1], "9")
    remote = run(url, "remote", missing=url.rsplit("/", 1)[0] + "/1.2.3.4.5", unreachable=gone)
    with remote.process_list_path.open() as f:
        rows = {r["sample_id"]: r for r in csv.DictReader(f)}
    assert rows["slide"]["status"] == "success"
    assert rows["missing"]["status"] == "failed" and "no such series" in rows["missing"]["error"]
    assert rows["unreachable"]["status"] == "failed" and "did not give the series" in rows["unreachable"]["error"]
    a = xr.open_zarr(remote.store_path, group="tiles/slide")
    b = xr.open_zarr(local.store_path, group="tiles/slide")
    assert a.sizes == b.sizes and a.sizes["tile"] > 0
    np.testing.assert_array_equal(a.x.values, b.x.values)
    np.testing.assert_array_equal(a.embedding.values, b.embedding.values)
