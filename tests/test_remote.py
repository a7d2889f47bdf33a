"""Slides read in place at a URL, against real servers on 127.0.0.1: moto's S3 (server mode) and a
plain HTTP server with byte ranges.  Pixels at every level, a `Pipeline.run` over remote slides,
requests per block, and faults (a missing object, a 403, a truncated object, a server gone
mid-run) that fail their own slide and are finished by a rerun."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.inputs import changed, fingerprint
from slide2vec_dask.slide import open_slide, remote
from slide2vec_dask.slide.base import UnreadableSlideError
from slide2vec_dask.testing.servers import RangeServer, S3Server

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
BUCKET = "slides"


def _write_ome(path: Path, image: np.ndarray) -> Path:
    """An OME-TIFF pyramid in SubIFDs, as tifffile writes it (JPEG tiles, 0.5 µm/px)."""
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        options = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
        tif.write(image, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
                  **options)
        for factor in (2, 4):
            tif.write(image[::factor, ::factor], subfiletype=1, **options)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, syn_image, syn_svs) -> Path:
    """The same slides the servers serve: SVS (ours, and the real CMU-1 when present), a libvips
    pyramid and an OME-TIFF."""
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(syn_svs, folder / "syn.svs")
    testing.write_svs(folder / "small.svs", testing.tissue_image(1344, 1792, [(224, 224, 1120, 1344)], seed=3),
                      downsamples=(1, 4))
    _write_ome(folder / "ome.ome.tif", syn_image[:1536, :2048])
    pyvips = pytest.importorskip("pyvips")
    pyvips.Image.new_from_array(syn_image[:2048, :2560], interpretation="srgb").tiffsave(
        str(folder / "vips.tif"), tile=True, pyramid=True, compression="jpeg", Q=90, tile_width=256,
        tile_height=256, xres=2000.0, yres=2000.0, resunit="cm")
    cmu = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        shutil.copy(cmu, folder / "cmu.svs")
    return folder


@pytest.fixture(scope="module")
def http(folder):
    server = RangeServer(folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(folder):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    server = S3Server()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for path in folder.iterdir():
        client.upload_file(str(path), BUCKET, f"cohort/{path.name}")
    yield server
    server.stop()


def _url(kind: str, http, s3, name: str) -> remote.RemotePath:
    if kind == "http":
        return remote.RemotePath(f"{http.url}/{name}")
    return remote.RemotePath(f"s3://{BUCKET}/cohort/{name}", s3.storage_options)


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with Client(c, set_as_default=False) as client:
            yield client


@pytest.fixture(scope="module")
def mean_rgb():
    import torch

    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()),
                             name="mean-rgb", feature_dim=12)


# -- pixels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["http", "s3"])
@pytest.mark.parametrize("name", ["syn.svs", "cmu.svs", "vips.tif", "ome.ome.tif"])
def test_pixels_at_every_level_equal_the_local_files(kind, name, folder, http, s3):
    if not (folder / name).exists():
        pytest.skip(f"{name} not present")
    local = open_slide(folder / name)
    with open_slide(_url(kind, http, s3, name)) as slide:
        assert slide.backend == "tifffile" and slide.vendor == local.vendor
        assert slide.level_shapes == local.level_shapes and slide.spacing == local.spacing
        assert local.level_count >= (1 if name == "cmu.svs" else 3)
        for level, (h, w) in enumerate(local.level_shapes):
            np.testing.assert_array_equal(slide.read_level(level, 0, 0, h, w), local.read_level(level, 0, 0, h, w))
            # an unaligned window with a white margin past the edge
            np.testing.assert_array_equal(slide.read_level(level, h // 3, w // 5, 300, w),
                                          local.read_level(level, h // 3, w // 5, 300, w))
        np.testing.assert_array_equal(slide.thumbnail(16), local.thumbnail(16))


def test_a_block_costs_a_few_coalesced_requests_and_nothing_reads_a_whole_object(folder, http):
    """A 1024 x 1024 block covers 25-36 tiles in 5-6 rows: at most one request per row of tiles
    (a row's tiles are neighbours in the file), never one per tile."""
    name = "syn.svs"
    start = before = len(http.log)
    slide = open_slide(_url("http", http, None, name))
    header = [r for r in http.log[before:] if r[0] == "GET"]
    assert len(header) <= 3, header    # the size (HEAD), then the header's blocks
    lv = slide._reader._levels[0]
    for y, x in ((0, 0), (1100, 2000), (500, 260)):
        tiles = [(r, c) for r in range(y // lv.seg_h, (y + 1023) // lv.seg_h + 1)
                 for c in range(x // lv.seg_w, (x + 1023) // lv.seg_w + 1)]
        rows = len({r for r, _ in tiles})
        before = len(http.log)
        slide.read_level(0, y, x, 1024, 1024)
        gets = [r for r in http.log[before:] if r[0] == "GET"]
        assert len(tiles) >= 25 and 1 <= len(gets) <= rows, gets
    size = (folder / name).stat().st_size
    ranges = [r for m, n, r in http.log[start:] if m == "GET" and n == name]   # this test's requests
    assert all(r and r.startswith("bytes=") for r in ranges)
    assert max(int(r.split("-")[1]) - int(r[6:].split("-")[0]) + 1 for r in ranges) < size / 2


def test_coalescing_merges_neighbours_only():
    assert remote.coalesce([(0, 10), (10, 5), (100, 10)], max_gap=50) == [(0, 15), (100, 110)]
    assert remote.coalesce([(0, 10), (10, 5), (100, 10)], max_gap=0) == [(0, 15), (100, 110)]
    assert remote.coalesce([(0, 10), (10, 5), (100, 10)], max_gap=90) == [(0, 110)]
    assert remote.coalesce([(0, 10), (20, 10)], max_gap=100, max_span=25) == [(0, 10), (20, 30)]
    assert remote.coalesce([(50, 0), (5, 5)]) == [(5, 10)]


def test_urls_keep_their_options_out_of_sight():
    url = remote.RemotePath("s3://b/k/slide.svs", {"secret": "hunter2"})
    assert str(url) == "s3://b/k/slide.svs" and "hunter2" not in repr(url) and url.stem == "slide"
    import pickle

    again = pickle.loads(pickle.dumps(url))
    assert again == url and again.storage_options == {"secret": "hunter2"}
    assert "hunter2" not in repr(ExecutionOptions(output_dir="out", storage_options={"secret": "hunter2"}))
    assert remote.location("file:///tmp/x.svs") == Path("/tmp/x.svs") and not remote.is_url("C:/x.svs")


def test_formats_only_local_readers_read_are_refused_by_name(folder, http):
    with pytest.raises(UnreadableSlideError, match="reads local files only.*mount"):
        open_slide(f"{http.url}/syn.svs", backend="openslide")
    (folder / "slide.mrxs").write_bytes(b"[GENERAL]\nnot a tiff\n" * 10)
    with pytest.raises(UnreadableSlideError, match="only OpenSlide, vips or cuCIM read.*local"):
        open_slide(f"{http.url}/slide.mrxs")


def test_output_dir_at_a_url_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="atomic renames and an exclusive lock"):
        ExecutionOptions(output_dir="s3://bucket/run")


# -- provenance ------------------------------------------------------------------------------
def test_fingerprint_of_an_object_is_the_files_and_sees_a_replacement(folder, s3):
    url = _url("s3", None, s3, "small.svs")
    local, first = fingerprint(folder / "small.svs"), fingerprint(url)
    assert first["digest"] == local["digest"] and first["size"] == local["size"]
    assert first["version"]["etag"]
    assert changed(first, fingerprint(url)) is None
    # Same size, same first and last 64 KiB, one tile in the middle changed: the ETag says so.
    data = bytearray((folder / "small.svs").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    s3.client().put_object(Bucket=BUCKET, Key="cohort/small-edited.svs", Body=bytes(data))
    s3.client().copy_object(Bucket=BUCKET, Key="cohort/replaced.svs", CopySource=f"{BUCKET}/cohort/small.svs")
    replaced = _url("s3", None, s3, "replaced.svs")
    before = fingerprint(replaced)
    s3.client().put_object(Bucket=BUCKET, Key="cohort/replaced.svs", Body=bytes(data))
    assert "another version" in changed(before, fingerprint(replaced))


# -- Pipeline.run ----------------------------------------------------------------------------
def _manifest(path: Path, rows: dict[str, str]) -> Path:
    path.write_text("sample_id,image_path\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    return path


def _rows(result) -> dict[str, dict]:
    with result.process_list_path.open() as f:
        return {r["sample_id"]: r for r in csv.DictReader(f)}


def _assert_same_tiles(a_store: Path, b_store: Path, samples) -> None:
    for sample in samples:
        a = xr.open_zarr(a_store, group=f"tiles/{sample}")
        b = xr.open_zarr(b_store, group=f"tiles/{sample}")
        assert a.sizes == b.sizes and a.sizes["tile"] > 0
        np.testing.assert_array_equal(a.x.values, b.x.values)
        np.testing.assert_array_equal(a.y.values, b.y.values)
        np.testing.assert_array_equal(a.embedding.values, b.embedding.values)


@pytest.fixture(scope="module")
def local_run(folder, mean_rgb, cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    manifest = _manifest(tmp / "m.csv", {"syn": folder / "syn.svs", "small": folder / "small.svs",
                                         "vips": folder / "vips.tif"})
    return Pipeline(mean_rgb, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp / "out"),
                    client=cluster).run(manifest_path=manifest)


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_pipeline_over_remote_slides_gives_the_local_store(kind, folder, http, s3, local_run, mean_rgb, cluster,
                                                          tmp_path):
    names = {"syn": "syn.svs", "small": "small.svs", "vips": "vips.tif"}
    manifest = _manifest(tmp_path / "m.csv", {k: _url(kind, http, s3, v) for k, v in names.items()})
    options = None if kind == "http" else s3.storage_options
    result = Pipeline(mean_rgb, PreprocessingConfig(**EXACT),
                      ExecutionOptions(output_dir=tmp_path / "out", storage_options=options),
                      client=cluster).run(manifest_path=manifest)
    rows = _rows(result)
    assert {s: r["status"] for s, r in rows.items()} == dict.fromkeys(names, "success")
    assert rows["syn"]["image_path"] == str(_url(kind, http, s3, "syn.svs"))
    _assert_same_tiles(result.store_path, local_run.store_path, names)
    # No credential reached the store or the process list.
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert S3Server.SECRET.encode() not in written
    # Provenance: the object's fingerprint is the local file's (same bytes), with the store's version.
    attrs = xr.open_zarr(result.store_path, group="tiles/syn").attrs
    assert attrs["image_fingerprint"]["digest"] == fingerprint(folder / "syn.svs")["digest"]
    # A rerun with nothing changed does nothing; a replaced object is redone.
    again = Pipeline(mean_rgb, PreprocessingConfig(**EXACT),
                     ExecutionOptions(output_dir=tmp_path / "out", storage_options=options),
                     client=cluster).run(manifest_path=manifest)
    assert {o.status for o in again.outcomes} == {"skipped"}


def test_faults_fail_their_own_slide_and_a_rerun_finishes_them(folder, http, mean_rgb, cluster, local_run,
                                                              tmp_path):
    """A missing object (404), a 403, a truncated object and a server gone mid-run: each its
    own slide's failure with a clear error; put right, a rerun finishes them."""
    served = tmp_path / "served"
    served.mkdir()
    for name in ("syn.svs", "small.svs", "vips.tif"):
        shutil.copy(folder / name, served / name)
    data = (folder / "small.svs").read_bytes()
    (served / "cut.svs").write_bytes(data[: len(data) * 2 // 3])
    server = RangeServer(served)
    try:
        server.forbidden.add("denied.svs")
        shutil.copy(folder / "syn.svs", served / "denied.svs")
        rows = {"good": "syn.svs", "missing": "gone.svs", "denied": "denied.svs", "cut": "cut.svs"}
        manifest = _manifest(tmp_path / "m.csv", {k: f"{server.url}/{v}" for k, v in rows.items()})
        run = Pipeline(mean_rgb, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp_path / "out"),
                       client=cluster)
        first = _rows(run.run(manifest_path=manifest))
        assert first["good"]["status"] == "success"
        assert first["missing"]["status"] == "failed" and first["missing"]["error_type"] == "FileNotFoundError"
        assert "gone.svs: no such object" in first["missing"]["error"]
        assert first["denied"]["status"] == "failed" and first["denied"]["error_type"] == "PermissionError"
        assert "denied.svs: access denied" in first["denied"]["error"]
        assert first["cut"]["status"] == "failed" and "truncated" in first["cut"]["error"]

        # Put right: the object uploaded, access granted, the whole file in place.
        shutil.copy(folder / "small.svs", served / "gone.svs")
        server.forbidden.clear()
        shutil.copy(folder / "small.svs", served / "cut.svs")
        second = run.run(manifest_path=manifest)
        assert {s: r["status"] for s, r in _rows(second).items()} == {
            "good": "skipped", "missing": "success", "denied": "success", "cut": "success"}

        # A server that goes away mid-run: the slides it was serving fail, a rerun finishes them.
        gone = _manifest(tmp_path / "gone.csv", {"syn": f"{server.url}/syn.svs",
                                                 "vips": f"{server.url}/vips.tif"})
        server.stop_after = len(server.log) + 12      # the plans' reads, then a few blocks
        broken = Pipeline(mean_rgb, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp_path / "gone"),
                          client=cluster).run(manifest_path=gone)
        failed = {s: r for s, r in _rows(broken).items() if r["status"] == "failed"}
        assert failed, "the server's stop failed no slide"
        assert all("rerun to retry" in r["error"] or "server" in r["error"] for r in failed.values()), \
            {s: (r["error_type"], r["error"]) for s, r in failed.items()}
        server.stop_after = None
        finished = Pipeline(mean_rgb, PreprocessingConfig(**EXACT),
                            ExecutionOptions(output_dir=tmp_path / "gone"), client=cluster).run(manifest_path=gone)
        assert all(o.status in ("success", "skipped") for o in finished.outcomes)
        _assert_same_tiles(finished.store_path, local_run.store_path, ["syn", "vips"])
    finally:
        server.stop()


def test_s3_server_gone_fails_each_slide_and_a_rerun_after_it_is_back_finishes(folder, mean_rgb, cluster,
                                                                                local_run, tmp_path):
    pytest.importorskip("s3fs")
    server = S3Server()
    server.client().create_bucket(Bucket="gone")
    for name in ("syn.svs", "small.svs"):
        server.client().upload_file(str(folder / name), "gone", name)
    manifest = _manifest(tmp_path / "m.csv", {"syn": "s3://gone/syn.svs", "small": "s3://gone/small.svs",
                                              "missing": "s3://gone/missing.svs"})
    execution = ExecutionOptions(output_dir=tmp_path / "out", storage_options=server.storage_options)
    server.stop()
    try:
        down = _rows(Pipeline(mean_rgb, PreprocessingConfig(**EXACT), execution, client=cluster).run(
            manifest_path=manifest))
        assert {r["status"] for r in down.values()} == {"failed"}
        assert all("s3://gone/" in r["error"] for r in down.values()), down
        server = S3Server(port=server.port)     # moto keeps its objects in the process: the same bucket is back
        up = _rows(Pipeline(mean_rgb, PreprocessingConfig(**EXACT), execution, client=cluster).run(
            manifest_path=manifest))
        assert up["syn"]["status"] == up["small"]["status"] == "success"
        assert up["missing"]["status"] == "failed" and up["missing"]["error_type"] == "FileNotFoundError"
        _assert_same_tiles(tmp_path / "out" / "embeddings.zarr", local_run.store_path, ["syn", "small"])
    finally:
        server.stop()


def test_s3_faults_fail_their_own_slide_and_a_rerun_finishes_them(folder, s3, mean_rgb, cluster, local_run,
                                                                  tmp_path, monkeypatch):
    """On S3: a 403 (moto enforcing credentials it does not know), a missing and a truncated object."""
    import moto.settings

    client = s3.client()
    data = (folder / "small.svs").read_bytes()
    client.put_object(Bucket=BUCKET, Key="faults/small.svs", Body=data[: len(data) // 2])
    manifest = _manifest(tmp_path / "m.csv", {"small": f"s3://{BUCKET}/faults/small.svs",
                                              "syn": f"s3://{BUCKET}/faults/syn.svs"})
    run = Pipeline(mean_rgb, PreprocessingConfig(**EXACT),
                   ExecutionOptions(output_dir=tmp_path / "out", storage_options=s3.storage_options), client=cluster)
    with monkeypatch.context() as m:
        m.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        denied = _rows(run.run(manifest_path=manifest))
    assert {r["error_type"] for r in denied.values()} == {"PermissionError"}
    assert all("access denied" in r["error"] and "faults/" in r["error"] for r in denied.values()), denied
    assert S3Server.SECRET not in (tmp_path / "out" / "process_list.csv").read_text()
    broken = _rows(run.run(manifest_path=manifest))
    assert broken["small"]["status"] == "failed" and "truncated" in broken["small"]["error"]
    assert broken["syn"]["error_type"] == "FileNotFoundError" and "no such object" in broken["syn"]["error"]
    client.upload_file(str(folder / "small.svs"), BUCKET, "faults/small.svs")
    client.upload_file(str(folder / "syn.svs"), BUCKET, "faults/syn.svs")
    fixed = _rows(run.run(manifest_path=manifest))
    assert {r["status"] for r in fixed.values()} == {"success"}
    _assert_same_tiles(tmp_path / "out" / "embeddings.zarr", local_run.store_path, ["syn", "small"])


def test_a_mask_at_a_url_is_read_in_place(folder, http, mean_rgb):
    """mask_path may be a URL too: the same tiles as with the local mask."""
    mask = testing.tissue_mask(1344, 1792, [(0, 0, 672, 1792)])   # the top half only
    testing.write_label_mask(folder / "small.mask.tif", mask)
    config = PreprocessingConfig(**EXACT)
    local = mean_rgb.embed_slide(folder / "small.svs", mask_path=folder / "small.mask.tif", preprocessing=config)
    remote_run = mean_rgb.embed_slide(f"{http.url}/small.svs", mask_path=f"{http.url}/small.mask.tif",
                                      preprocessing=config)
    unmasked = mean_rgb.embed_slide(folder / "small.svs", preprocessing=config)
    assert local.num_tiles > 0 and local.num_tiles != unmasked.num_tiles   # the mask, not the HSV threshold
    np.testing.assert_array_equal(remote_run.y, local.y)
    np.testing.assert_array_equal(remote_run.tile_embeddings.numpy(), local.tile_embeddings.numpy())
    from PIL import Image   # a PNG label mask at a URL (the pil backend's `read_labels`) masks the same tiles

    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8)).save(folder / "small.mask.png")
    png_run = mean_rgb.embed_slide(f"{http.url}/small.svs", mask_path=f"{http.url}/small.mask.png",
                                   preprocessing=config)
    np.testing.assert_array_equal(png_run.x, local.x)
    np.testing.assert_array_equal(png_run.y, local.y)


@pytest.mark.slow
def test_cli_run_over_s3_with_storage_options_in_the_yaml(folder, s3, tmp_path):
    """`slide2vec-dask run` with a manifest of s3:// URLs and execution.storage_options; the secret is
    neither printed (--print-config) nor written."""
    import subprocess
    import sys

    import yaml

    (tmp_path / "slides.csv").write_text(f"sample_id,image_path\nsmall,s3://{BUCKET}/cohort/small.svs\n")
    cfg = {"manifest": "slides.csv", "model": {"timm": "vit_tiny_patch16_224"},
           "preprocessing": {"tissue_threshold": 0.5, "segmentation": {"mthresh": 0}},
           "execution": {"output_dir": "out", "batch_size": 16, "num_workers": 2,
                         "storage_options": s3.storage_options}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=280)

    printed = cli("run", config, "--print-config")
    assert printed.returncode == 0 and S3Server.SECRET not in printed.stdout and "endpoint_url" in printed.stdout
    result = cli("run", config, "--cluster", "local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert S3Server.SECRET not in result.stdout + result.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "process_list.csv").open()))
    assert rows[0]["status"] == "success" and rows[0]["image_path"] == f"s3://{BUCKET}/cohort/small.svs"
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert S3Server.SECRET.encode() not in written


def test_a_cached_remote_slide_notices_a_replaced_object(folder, s3, monkeypatch):
    """A worker keeps its open slides; an object replaced under it is re-parsed, not read with the old header."""
    from slide2vec_dask.slide import base

    client = s3.client()
    client.upload_file(str(folder / "syn.svs"), BUCKET, "swap/slide.svs")
    url = remote.RemotePath(f"s3://{BUCKET}/swap/slide.svs", s3.storage_options)
    first = base.reopen(url, "auto", None)
    assert base.reopen(url, "auto", None) is first and first.level_count == 3
    client.upload_file(str(folder / "small.svs"), BUCKET, "swap/slide.svs")
    monkeypatch.setattr(base, "RECHECK_S", 0.0)
    second = base.reopen(url, "auto", None)
    assert second is not first and second.level_shapes == open_slide(folder / "small.svs").level_shapes
