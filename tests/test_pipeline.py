"""Pipeline: manifest in, one Zarr store out, on a real LocalCluster; failures isolated; resumable."""

from __future__ import annotations

import csv
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

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, open_embeddings, read_manifest
from slide2vec_dask import testing

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with Client(c, set_as_default=False) as client:
            yield client


@pytest.fixture(scope="module")
def slides(tmp_path_factory, syn_svs):
    folder = tmp_path_factory.mktemp("manifest")
    testing.write_svs(folder / "small.svs", testing.tissue_image(1344, 1792, [(224, 224, 1120, 1344)], seed=3),
                      downsamples=(1, 4))
    testing.write_svs(folder / "blank.svs", testing.tissue_image(1024, 1024, []), downsamples=(1,))
    corrupt = folder / "corrupt.svs"
    corrupt.write_bytes(os.urandom(5000))
    manifest = folder / "slides.csv"
    manifest.write_text(f"sample_id,image_path\nsyn,{syn_svs}\nsmall,small.svs\ncorrupt,corrupt.svs\n"
                        "blank,blank.svs\n")
    return manifest


def read_rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {r["sample_id"]: r for r in csv.DictReader(f)}


# -- manifests -------------------------------------------------------------------------------
@pytest.mark.parametrize("body,message", [
    ("id,image_path\na,x.svs\n", "missing column"),
    ("sample_id,image_path\na,x.svs\n,y.svs\n", ":3: empty sample_id"),
    ("sample_id,image_path\na,x.svs\na,y.svs\n", ":3: duplicate sample_id 'a' \\(first at .*:2\\)"),
    ("sample_id,image_path\n../x,x.svs\n", ":2: sample_id '../x' is not safe"),
    ("sample_id,image_path\na/b,x.svs\n", "is not safe"),
    ("sample_id,image_path\n\"a\x01b\",x.svs\n", "is not safe"),
    ("sample_id,image_path\na,\n", ":2: empty image_path"),
    ("sample_id,image_path,spacing_at_level_0\na,x.svs,-1\n", ":2: spacing_at_level_0 must be a positive"),
])
def test_manifest_errors_name_the_line(tmp_path, body, message):
    path = tmp_path / "m.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        read_manifest(path)


def test_manifest_resolves_relative_paths_and_optional_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("sample_id,image_path,mask_path,spacing_at_level_0,patient_id\na,s/a.svs,m.tif,0.25,p1\n")
    (row,) = read_manifest(path)
    assert row == {"sample_id": "a", "image_path": tmp_path / "s/a.svs", "mask_path": tmp_path / "m.tif",
                   "spacing_at_level_0": 0.25, "patient_id": "p1"}


def test_pipeline_needs_an_output_dir(tiny):
    with pytest.raises(ValueError, match="output_dir"):
        Pipeline(tiny)


# -- the run -----------------------------------------------------------------------------------
def test_run_writes_one_store_and_isolates_the_corrupt_slide(tiny, slides, cluster, tmp_path, syn_svs):
    out = tmp_path / "run"
    pipeline = Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out, output_format="npz"),
                        client=cluster)
    result = pipeline.run(manifest_path=slides)

    rows = read_rows(result.process_list_path)
    assert rows["corrupt"]["status"] == "failed" and rows["corrupt"]["error_type"] == "UnreadableSlideError"
    assert "corrupt.svs" in rows["corrupt"]["error"]
    assert rows["syn"]["status"] == rows["small"]["status"] == "success"
    # No tissue is not an error: the slide succeeds with zero tiles.
    assert rows["blank"]["status"] == "success" and rows["blank"]["num_tiles"] == "0"
    assert xr.open_zarr(result.store_path, group="tiles/blank").sizes["tile"] == 0
    assert result.num_failed == 1 and {a.sample_id for a in result.tile_artifacts} == {"syn", "small", "blank"}

    # The store opens with plain xarray and matches embed_slide row for row.
    for sample, path in (("syn", syn_svs), ("small", slides.parent / "small.svs")):
        ds = xr.open_zarr(result.store_path, group=f"tiles/{sample}")
        expected = tiny.embed_slide(path, preprocessing=PreprocessingConfig(**EXACT))
        assert ds.attrs["complete"] is True and ds.attrs["num_tiles"] == expected.num_tiles
        assert ds.embedding.dims == ("tile", "feature") and "x" in ds.coords
        np.testing.assert_array_equal(ds.x.values, expected.x)
        np.testing.assert_array_equal(ds.y.values, expected.y)
        np.testing.assert_allclose(ds.embedding.values, expected.tile_embeddings.numpy(), atol=1e-5)
        assert int(rows[sample]["num_tiles"]) == expected.num_tiles
        flat = np.load(out / "tile_embeddings" / f"{sample}.npz")
        np.testing.assert_array_equal(flat["features"], ds.embedding.values)

    tree = open_embeddings(out)
    assert set(tree["tiles"].children) == {"syn", "small", "blank"}
    assert "_staging" not in tree.children
    assert tree.attrs["run"]["encoder"] == "vit_tiny_patch16_224"
    lazy = open_embeddings(out, chunks={})["tiles/syn"]["embedding"]
    assert lazy.chunks is not None and hasattr(lazy.data, "dask")
    np.testing.assert_array_equal(lazy.values, tree["tiles/syn"]["embedding"].values)



BAD_SLIDES_RUN = """
import sys, torch
from slide2vec_dask import ExecutionOptions, Model, Pipeline
model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                          name="mean-rgb", feature_dim=3)
result = Pipeline(model, execution=ExecutionOptions(output_dir=sys.argv[2], num_workers=2)).run(
    manifest_path=sys.argv[1])
print("failed", result.num_failed)
"""


def _damaged_copy(src: Path, dest: Path) -> Path:
    """``src`` with the level-0 tiles' JPEG data overwritten: it opens and plans, its blocks cannot be decoded."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        rng = np.random.default_rng(0)
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            data[offset + count // 4 : offset + count] = rng.integers(0, 256, count - count // 4, np.uint8).tobytes()
    dest.write_bytes(bytes(data))
    return dest


def test_expected_slide_failures_print_no_worker_tracebacks(tmp_path):
    """Missing, corrupt, no spacing, damaged tiles: four failed rows, and no distributed
    "Compute Failed" block per failed task on stderr (the tasks return these failures)."""
    image = testing.tissue_image(512, 512, [(0, 0, 512, 512)])
    good = testing.write_svs(tmp_path / "good.svs", image, downsamples=(1, 4), tile_size=256)
    (tmp_path / "corrupt.svs").write_bytes(os.urandom(5000))
    testing.write_tiff(tmp_path / "nospacing.tif", image)
    _damaged_copy(good, tmp_path / "damaged.svs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path\ngood,good.svs\nmissing,missing.svs\ncorrupt,corrupt.svs\n"
                        "nospacing,nospacing.tif\ndamaged,damaged.svs\n")
    script = tmp_path / "run.py"
    script.write_text(BAD_SLIDES_RUN)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(manifest), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "failed 4" in proc.stdout
    rows = read_rows(out / "process_list.csv")
    assert {s: r["error_type"] for s, r in rows.items() if r["status"] == "failed"} == {
        "missing": "FileNotFoundError", "corrupt": "UnreadableSlideError", "nospacing": "MissingSpacingError",
        "damaged": "UnreadableSlideError"}
    assert rows["good"]["status"] == "success"
    assert "Compute Failed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

def test_rerun_of_a_finished_run_does_no_work(tiny, slides, tmp_path):
    from distributed import Client, LocalCluster

    from slide2vec_dask.dataflow import worker

    out = tmp_path / "run"
    config, execution = PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out)
    smaller = slides.parent / "two.csv"
    smaller.write_text("sample_id,image_path\nsmall,small.svs\n")
    first = Pipeline(tiny, config, execution).run(manifest_path=smaller)   # the default local cluster
    assert read_rows(first.process_list_path)["small"]["status"] == "success"
    before = (out / "embeddings.zarr" / "tiles" / "small" / "embedding" / "zarr.json").stat().st_mtime_ns
    with LocalCluster(n_workers=1, processes=True, dashboard_address=None) as c, Client(c) as client:
        again = Pipeline(tiny, config, execution, client=client).run(manifest_path=smaller)
        loaded = client.run(worker.loaded_encoder_keys)
    assert read_rows(again.process_list_path)["small"]["status"] == "skipped"
    assert again.num_skipped == 1 and [a.sample_id for a in again.tile_artifacts] == ["small"]
    assert not any(loaded.values())  # no model was ever built: no embedding work
    assert (out / "embeddings.zarr" / "tiles" / "small" / "embedding" / "zarr.json").stat().st_mtime_ns == before


def test_other_settings_in_the_same_dir_need_overwrite(tiny, slides, cluster, tmp_path):
    out = tmp_path / "run"
    smaller = slides.parent / "two.csv"
    smaller.write_text("sample_id,image_path\nsmall,small.svs\n")
    Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out), client=cluster).run(
        manifest_path=smaller)
    changed = PreprocessingConfig(tissue_threshold=0.9)
    with pytest.raises(ValueError, match="other settings.*overwrite=True"):
        Pipeline(tiny, changed, ExecutionOptions(output_dir=out), client=cluster).run(manifest_path=smaller)
    redone = Pipeline(tiny, changed, ExecutionOptions(output_dir=out, overwrite=True), client=cluster).run(
        manifest_path=smaller)
    assert read_rows(redone.process_list_path)["small"]["status"] == "success"


def test_run_with_coordinates_reuses_the_plans(tiny, slides, cluster, tmp_path):
    first = tmp_path / "first"
    smaller = slides.parent / "two.csv"
    smaller.write_text("sample_id,image_path\nsmall,small.svs\n")
    Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=first), client=cluster).run(
        manifest_path=smaller)
    # A stricter threshold would keep fewer tiles; the saved plan wins.
    second = Pipeline(tiny, PreprocessingConfig(tissue_threshold=1.0, segmentation={"mthresh": 0}),
                      ExecutionOptions(output_dir=tmp_path / "second"), client=cluster)
    result = second.run_with_coordinates(first / "coordinates")
    a = xr.open_zarr(first / "embeddings.zarr", group="tiles/small")
    b = xr.open_zarr(result.store_path, group="tiles/small")
    np.testing.assert_array_equal(a.x.values, b.x.values)
    np.testing.assert_allclose(a.embedding.values, b.embedding.values, atol=1e-5)


KILLED_RUN = textwrap.dedent("""
    import sys
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    if __name__ == "__main__":
        model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=sys.argv[1])
        config = PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5)
        Pipeline(model, config, ExecutionOptions(output_dir=sys.argv[2], batch_size=4, num_workers=1,
                                                 prefetch_factor=1)).run(manifest_path=sys.argv[3])
""")


def test_killed_run_leaves_an_open_store_a_true_process_list_and_resumes(tiny, slides, tmp_path,
                                                                         vit_tiny_checkpoint, syn_svs):
    """A client killed mid-run (with its scheduler and workers, as a crashed node):

    the store opens with `open_embeddings` and holds exactly the finished slides,
    `process_list.csv` already lists the slides finished before the kill, and a
    rerun completes to the same store as a clean run.
    """
    ids = ["small", "syn", "syn2", "syn3", "syn4"]
    rows = [f"small,{slides.parent / 'small.svs'}"] + [f"{s},{syn_svs}" for s in ids[1:]]
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path\n" + "\n".join(rows) + "\n")
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(vit_tiny_checkpoint), str(out), str(manifest)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process_list = out / "process_list.csv"
    staging = out / ".slide2vec-work" / "staging"
    deadline = time.time() + 240

    def finished_before_kill():
        try:
            return {s for s, r in read_rows(process_list).items() if r["status"] == "success"}
        except (OSError, KeyError):
            return set()

    while proc.poll() is None and time.time() < deadline and not (
            finished_before_kill() and staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)     # the client, its scheduler and its workers: a crashed node
    proc.wait()
    listed = finished_before_kill()
    assert listed and len(listed) < len(ids)

    tree = open_embeddings(out)
    in_store = set(tree["tiles"].children)
    assert listed <= in_store < set(ids)
    assert all(k in ("tiles",) for k in tree.children)   # no work in progress in the user's view

    execution = ExecutionOptions(output_dir=out, batch_size=4)
    resumed = Pipeline(tiny, PreprocessingConfig(**EXACT), execution).run(manifest_path=manifest)
    clean = Pipeline(tiny, PreprocessingConfig(**EXACT), execution.replace(output_dir=tmp_path / "clean")).run(
        manifest_path=manifest)
    outcome = {o.sample_id: o.status for o in resumed.outcomes}
    assert all(outcome[s] == "skipped" for s in in_store)
    assert all(outcome[s] == "success" for s in set(ids) - in_store)
    for sample in ids:
        a = xr.open_zarr(resumed.store_path, group=f"tiles/{sample}")
        b = xr.open_zarr(clean.store_path, group=f"tiles/{sample}")
        assert a.sizes == b.sizes
        np.testing.assert_array_equal(a.x.values, b.x.values)
        np.testing.assert_array_equal(a.y.values, b.y.values)
        np.testing.assert_allclose(a.embedding.values, b.embedding.values, atol=1e-5)
    assert not (out / ".slide2vec-work").exists()


def test_hierarchical_run_writes_regions(tiny, slides, cluster, tmp_path, syn_svs):
    config = PreprocessingConfig(region_tile_multiple=4, **EXACT)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"sample_id,image_path\nsyn,{syn_svs}\n")
    result = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "run", output_format="pt"),
                      client=cluster).run(manifest_path=manifest)
    expected = tiny.embed_slide(syn_svs, preprocessing=config)
    ds = xr.open_zarr(result.store_path, group="regions/syn")
    assert ds.embedding.dims == ("region", "tile_in_region", "feature")
    assert ds.attrs["complete"] is True and ds.attrs["region_tile_multiple"] == 4
    np.testing.assert_allclose(ds.embedding.values, expected.hierarchical_embeddings.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ds.tile_mask.values, expected.tile_mask)
    np.testing.assert_array_equal(ds.region_y.values, expected.region_y)
    (artifact,) = result.hierarchical_artifacts
    assert artifact.group == "regions/syn" and artifact.num_regions == len(expected.region_x)
    import torch

    saved = torch.load(artifact.flat_path, weights_only=True)
    np.testing.assert_array_equal(saved.numpy(), ds.embedding.values)
    tiles = xr.open_zarr(result.store_path, group="tiles/syn")
    # the store keeps the kept tiles flat too: the regions' sub-tiles under tile_mask, row for row
    kept = expected.hierarchical_embeddings[torch.from_numpy(expected.tile_mask)].numpy()
    np.testing.assert_allclose(np.sort(tiles.embedding.values, axis=0), np.sort(kept, axis=0), atol=1e-5)


def test_blocks_in_flight_grow_as_workers_join(tiny, tmp_path):
    """A cluster that starts with one thread: more blocks go out once workers join.

    Workers are added when the first embedding task starts.  Had the window been
    fixed at the start (1 thread x prefetch 1), no two embedding tasks could ever
    overlap; the task stream shows they do once the workers are there.
    """
    import threading

    from distributed import Client, LocalCluster, get_task_stream

    slide = testing.write_svs(tmp_path / "s.svs", testing.tissue_image(2240, 2240, [(0, 0, 2240, 2240)], seed=5),
                              downsamples=(1, 4))
    config = PreprocessingConfig(**EXACT, use_supertiles=False)   # one tile per block: many small blocks
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:

        def scale_when_embedding_starts():
            while not any("embed-" in str(k) for keys in client.processing().values() for k in keys):
                time.sleep(0.02)
            cluster.scale(3)

        threading.Thread(target=scale_when_embedding_starts, daemon=True).start()
        with get_task_stream(client) as stream:
            run = Pipeline(tiny, config, ExecutionOptions(output_dir=tmp_path / "run", prefetch_factor=1),
                           client=client).run(slides=[{"sample_id": "s", "image_path": str(slide)}])
        workers = len(client.nthreads())
    assert run.num_failed == 0 and run.tile_artifacts[0].num_tiles == 100
    spans = [(s["start"], s["stop"]) for t in stream.data if "embed-" in str(t["key"])
             for s in t["startstops"] if s["action"] == "compute"]
    assert len(spans) == 100
    most = max(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)
    assert workers == 3 and most >= 2, f"at most {most} embedding task(s) ran at once"


def test_a_from_module_model_resumes_into_its_store(slides, tmp_path):
    """The same module built again (a script run twice) is the same encoder: its rerun skips, not refuses."""
    import torch

    from slide2vec_dask import Model

    def build():
        torch.manual_seed(0)
        return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                     torch.nn.Linear(48, 8)), name="pooled-linear")

    slide = [{"sample_id": "small", "image_path": str(slides.parent / "small.svs")}]
    execution = ExecutionOptions(output_dir=tmp_path / "run")
    first = Pipeline(build(), PreprocessingConfig(**EXACT), execution).run(slides=slide)
    again = Pipeline(build(), PreprocessingConfig(**EXACT), execution).run(slides=slide)
    assert [o.status for o in first.outcomes] == ["success"] and [o.status for o in again.outcomes] == ["skipped"]
    torch.manual_seed(1)
    other = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                                  torch.nn.Linear(48, 8)), name="pooled-linear")
    with pytest.raises(ValueError, match="encoder_key"):   # other weights under the same name: not mixed in
        Pipeline(other, PreprocessingConfig(**EXACT), execution).run(slides=slide)
