"""The examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow   # (a plain-script run; the cohort quickstart, the README's command, stays in the default suite)
def test_local_quickstart(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "local_quickstart.py"), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "synthetic: " in done.stdout and "embeddings (" in done.stdout
    assert (tmp_path / "preview" / "tiling" / "synthetic.png").exists()
    assert (tmp_path / "coordinates" / "synthetic.npz").exists()


def test_import_is_fast_and_light():
    code = ("import sys, time; t = time.perf_counter(); import slide2vec_dask; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'dask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 2.0
    assert out[1:] == ["False", "False"]  # heavy libraries load on first use, not at import


def test_xarray_analysis(tmp_path, syn_svs, vit_tiny_checkpoint):
    """A real tiny run, then the example on its store: means and the PC1 map, checked with plain zarr/numpy."""
    import json

    import numpy as np
    import zarr
    from distributed import Client, LocalCluster
    from PIL import Image

    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing

    small = testing.write_svs(tmp_path / "small.svs",
                              testing.tissue_image(1344, 1792, [(224, 224, 1120, 1344)], seed=3), downsamples=(1, 4))
    out = tmp_path / "run"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        result = Pipeline(Model.from_timm("vit_tiny_patch16_224", checkpoint_path=vit_tiny_checkpoint),
                          PreprocessingConfig(tissue_threshold=0.5, segmentation={"mthresh": 0}),
                          ExecutionOptions(output_dir=out, batch_size=16), client=client
                          ).run(slides=[{"image_path": syn_svs, "sample_id": "syn"},
                                        {"image_path": small, "sample_id": "small"}])
    assert result.num_failed == 0

    png = tmp_path / "pc1.png"
    done = subprocess.run([sys.executable, str(EXAMPLES / "xarray_analysis.py"), str(out), "--sample-id", "small",
                           "--png", str(png), "--width", "400"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "2 slides: small, syn"
    assert "dask.array" in lines[1] and "not computed yet" in lines[1] and "numpy.ndarray" in lines[2]

    group = zarr.open_group(str(out / "embeddings.zarr"), mode="r")["tiles/small"]
    emb, x, y = group["embedding"][:], group["x"][:], group["y"][:]
    assert emb.shape == (20, 192)  # 4 x 5 tiles of tissue; ViT-Ti features
    printed = json.loads(next(l for l in lines if l.startswith("small mean embedding")).split(": ", 1)[1])
    np.testing.assert_allclose(printed, emb.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)

    # PC1's share of the variance, from the covariance's eigenvalues (not an SVD).
    eig = np.linalg.eigvalsh(np.cov(emb.astype(np.float64), rowvar=False))
    share = float(next(l for l in lines if "PC1 explains" in l).split("explains ")[1].split()[0])
    assert abs(share - eig[-1] / eig.sum()) < 1e-6

    tile = int(group.attrs["tile_size_lv0"])
    height = round(400 * (y.max() + tile - y.min()) / (x.max() + tile - x.min()))
    assert height == 320  # tissue 1120 x 896 px
    with Image.open(png) as image:
        assert image.size == (400, height)
        pixels = np.asarray(image.convert("RGB"))
    # Tiles at the two ends of PC1 are drawn in opposite colours: red (positive) and blue (negative).
    assert (pixels[..., 0] > pixels[..., 2] + 10).any() and (pixels[..., 2] > pixels[..., 0] + 10).any()


def test_kubernetes_example_compiles_and_parses_arguments():
    path = EXAMPLES / "kubernetes_cluster.py"
    subprocess.run([sys.executable, "-m", "py_compile", str(path)], check=True)
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--image" in done.stdout and "--gpu-workers" in done.stdout


def test_cohort_quickstart_runs_as_a_plain_script(tmp_path):
    """The README's first command: a top-level script (no main guard) on the embedded local cluster."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "cohort_quickstart.py"), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "5 succeeded, 0 skipped, 0 failed" in done.stdout
    assert "case-4: success, 0 tiles" in done.stdout                      # no tissue is not an error
    assert "slides ['case-0', 'case-1', 'case-2', 'case-3', 'case-4']" in done.stdout
    assert " - INFO - " not in done.stderr
    again = subprocess.run([sys.executable, str(EXAMPLES / "cohort_quickstart.py"), str(tmp_path / "slides.csv"),
                            "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 succeeded, 5 skipped, 0 failed" in again.stdout
