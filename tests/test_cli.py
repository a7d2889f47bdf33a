"""The command line, run as users run it: a separate process, exit codes, messages.

Three commands run the full pipeline (each starts a local Dask cluster for a
few seconds): a YAML run with overrides, the same run again (all skipped),
and `embed` on a manifest with a corrupt slide.  Everything else stops
before any work starts and takes a fraction of a second.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from slide2vec_dask import testing

REPO = Path(__file__).resolve().parents[1]
TIMM = "vit_tiny_patch16_224"


def cli(*args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """A folder with a small 1536 px slide (about 9 tissue tiles) and a corrupt one."""
    folder = tmp_path_factory.mktemp("cli_slides")
    image = testing.tissue_image(1536, 1536, [(448, 448, 1120, 1120)], seed=3)
    testing.write_svs(folder / "good.svs", image, mpp=0.5, downsamples=(1, 4))
    (folder / "bad.svs").write_bytes(np.random.default_rng(0).bytes(30_000))
    return folder


def write_config(folder: Path, manifest: str = "slides.csv", **sections) -> Path:
    """A YAML config in ``folder`` whose paths are relative to it."""
    import yaml

    cfg = {"manifest": manifest, "model": {"timm": TIMM},
           "preprocessing": {"tissue_threshold": 0.2, "segmentation": {"method": "hsv"}},
           "execution": {"output_dir": "out", "batch_size": 16}}
    cfg.update(sections)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- packaging and light import --------------------------------------------------------
def test_console_script_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["slide2vec-dask"] == "slide2vec_dask.cli:main"
    assert any(dep.replace(" ", "").lower().startswith("pyyaml>=6") for dep in project["dependencies"])
    from slide2vec_dask.cli import main

    assert callable(main)


def test_import_is_light():
    code = ("import sys, slide2vec_dask.cli; heavy = [m for m in ('torch', 'timm', 'dask', 'distributed', 'yaml') "
            "if m in sys.modules]; assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command, expected", [
    ((), ["run", "embed", "models", "exit codes"]),
    (("run",), ["CONFIG.yaml", "key=value", "--print-config", "execution.batch_size=64", "preset:", "exit codes"]),
    (("embed",), ["--manifest", "--model", "--timm", "--output", "--scheduler", "--checkpoint", "--batch-size",
                  "--num-gpus", "--precision", "--spacing", "--tile-size", "--overwrite", "exit codes"]),
    (("models",), ["--level", "--verbose"]),
])
def test_help(command, expected):
    result = cli(*command, "--help")
    assert result.returncode == 0, output(result)
    shown = " ".join(result.stdout.split())   # (argparse wraps the epilog wherever its width falls)
    for text in expected:
        assert text in shown, f"{text!r} missing from {' '.join(command)} --help"


def test_no_command_is_a_usage_error():
    result = cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.slow   # (six CLI processes)
def test_models_lists_presets():
    result = cli("models")
    assert result.returncode == 0, output(result)
    names = result.stdout.split()
    assert "lunit" in names and "uni" in names
    tiles = cli("models", "--level", "tile").stdout.split()
    assert "lunit" in tiles and "titan" not in tiles
    assert cli("models", "--level", "slide").stdout.split() == ["gigapath-slide", "moozy-slide", "prism", "titan"]
    assert cli("models", "--level", "patient").stdout.split() == ["moozy"]
    assert sorted(names) == sorted(tiles + ["gigapath-slide", "moozy-slide", "prism", "titan", "moozy"])
    verbose = cli("models", "-v")
    lines = [line.split() for line in verbose.stdout.splitlines()]
    assert verbose.returncode == 0 and any(line[:3] == ["lunit", "tile", "384"] for line in lines)
    assert any(line[:3] == ["moozy", "patient", "768"] for line in lines)
    bad = cli("models", "--level", "organ")
    assert bad.returncode == 2 and "organ" in bad.stderr and "Traceback" not in bad.stderr


# -- configuration: parsed, checked and resolved before anything runs ---------------------
def test_print_config_resolves_paths_and_types_overrides(tmp_path):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    config = write_config(cfg_dir, manifest="../data/slides.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("run", config, "execution.batch_size=64", "preprocessing.segmentation.method=otsu",
                 "execution.overwrite=true", "execution.num_workers=null", "preprocessing.requested_spacing_um=1e-0",
                 "--print-config", cwd=elsewhere)
    assert result.returncode == 0, output(result)
    import yaml

    cfg = yaml.safe_load(result.stdout)
    assert Path(cfg["manifest"]).resolve() == (tmp_path / "data" / "slides.csv").resolve()
    assert Path(cfg["execution"]["output_dir"]).resolve() == (cfg_dir / "out").resolve()
    assert cfg["execution"]["batch_size"] == 64 and cfg["execution"]["overwrite"] is True
    assert cfg["execution"]["num_workers"] is None
    assert cfg["preprocessing"]["requested_spacing_um"] == 1.0
    assert cfg["preprocessing"]["segmentation"] == {"method": "otsu"}
    assert cfg["preprocessing"]["tissue_threshold"] == 0.2


def test_parse_value():
    from slide2vec_dask.cli import parse_value

    assert parse_value("64") == 64 and parse_value("0.5") == 0.5 and parse_value("1e-3") == 0.001
    assert parse_value("true") is True and parse_value("null") is None and parse_value("") is None
    assert parse_value("otsu") == "otsu" and parse_value("tcp://scheduler:8786") == "tcp://scheduler:8786"
    assert parse_value("nan") == "nan"


@pytest.mark.parametrize("override, named, valid", [
    ("execution.batchsize=64", "execution.batchsize", "batch_size"),
    ("preprocessing.segmentation.methd=otsu", "preprocessing.segmentation.methd", "sthresh"),
    ("exec.batch_size=64", "exec", "execution"),
    ("batch_size", "batch_size", "key=value"),
])
def test_bad_override_is_a_usage_error(tmp_path, override, named, valid):
    result = cli("run", write_config(tmp_path), override)
    assert result.returncode == 2, output(result)
    assert named in result.stderr and valid in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_keys_follow_the_model_kind(tmp_path):
    (tmp_path / "slides.csv").write_text("sample_id,image_path\ns1,s1.svs\n")
    config = write_config(tmp_path)
    # Switching a timm config to a preset leaves its timm-only spacing behind: named, with the preset way.
    result = cli("run", config, "model.spacing_um=0.25", "model.timm=null", "model.preset=lunit")
    assert result.returncode == 2, output(result)
    assert "model.spacing_um" in result.stderr and "requested_spacing_um" in result.stderr


@pytest.mark.parametrize("sections, named", [
    ({"modle": {"timm": TIMM}}, "modle"),
    ({"execution": {"output_dir": "out", "batch": 4}}, "execution.batch"),
    ({"model": {"timm": TIMM, "preset": "lunit"}}, "exactly one of"),
    ({"model": {"preset": "lunitt"}}, "lunitt"),
    ({"preprocessing": {"tissue_threshold": 2}}, "tissue_threshold"),
    ({"execution": {"batch_size": 8}}, "output_dir"),
])
def test_bad_config_is_a_usage_error(tmp_path, sections, named):
    (tmp_path / "slides.csv").write_text("sample_id,image_path\ns1,s1.svs\n")
    result = cli("run", write_config(tmp_path, **sections))
    assert result.returncode == 2, output(result)
    assert named in result.stderr and "Traceback" not in result.stderr


def test_missing_files_are_usage_errors(tmp_path):
    missing = tmp_path / "nowhere" / "slides.csv"
    result = cli("embed", "--manifest", missing, "--timm", TIMM, "--output", tmp_path / "out")
    assert result.returncode == 2, output(result)
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    result = cli("run", write_config(tmp_path), "manifest=other.csv", cwd=tmp_path)
    assert result.returncode == 2 and "other.csv" in result.stderr

    result = cli("run", tmp_path / "absent.yaml")
    assert result.returncode == 2 and "absent.yaml" in result.stderr


def test_embed_argument_errors(tmp_path):
    result = cli("embed", "--manifest", "m.csv", "--output", "out")  # neither --model nor --timm
    assert result.returncode == 2 and "--model" in result.stderr
    result = cli("embed", "--manifest", "m.csv", "--output", "out", "--model", "lunit", "--timm", TIMM)
    assert result.returncode == 2 and "not allowed" in result.stderr
    result = cli("embed", "--manifest", "m.csv", "--output", "out", "--timm", TIMM, "--precision", "fp8")
    assert result.returncode == 2 and "fp8" in result.stderr


# -- full runs ------------------------------------------------------------------------
def read_process_list(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["sample_id"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_run_config_then_rerun_skips(tmp_path, slides):
    import zarr

    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    (cfg_dir / "slides.csv").write_text(f"sample_id,image_path\ngood,{slides / 'good.svs'}\n")
    config = write_config(cfg_dir)
    elsewhere = tmp_path / "elsewhere"  # relative paths follow the config file, not the current folder
    elsewhere.mkdir()

    result = cli("run", config, "execution.batch_size=8", "preprocessing.segmentation.method=otsu",
                 cwd=elsewhere, timeout=300)
    assert result.returncode == 0, output(result)
    assert "1 succeeded, 0 skipped, 0 failed" in result.stdout
    store = cfg_dir / "out" / "embeddings.zarr"
    assert store.is_dir() and not (elsewhere / "out").exists()
    assert "process_list.csv" in result.stdout
    # the run report's lines end the output (issue 25), and the QC gallery is there (issue 22)
    assert f"report: {cfg_dir / 'out' / 'run_report.json'}" in result.stdout and "slides 1 done" in result.stdout
    assert (cfg_dir / "out" / "qc" / "index.html").is_file()
    rows = read_process_list(cfg_dir / "out" / "process_list.csv")
    assert rows["good"]["status"] == "success" and int(rows["good"]["num_tiles"]) > 0
    root = zarr.open_group(str(store), mode="r")
    run = root.attrs["run"]
    assert run["encoder"] == TIMM
    assert run["tiling"]["segmentation"]["method"] == "otsu"   # the override
    assert run["tiling"]["tissue_threshold"] == 0.2            # the file
    embedding = root["tiles/good/embedding"]
    assert embedding.shape == (int(rows["good"]["num_tiles"]), 192)

    again = cli("run", config, "preprocessing.segmentation.method=otsu", cwd=elsewhere, timeout=300)
    assert again.returncode == 0, output(again)
    assert "0 succeeded, 1 skipped, 0 failed" in again.stdout


@pytest.mark.slow
def test_embed_with_a_corrupt_slide_exits_1(tmp_path, slides):
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"sample_id,image_path\ngood,{slides / 'good.svs'}\nbroken,{slides / 'bad.svs'}\n")
    out = tmp_path / "out"
    result = cli("embed", "--manifest", manifest, "--timm", TIMM, "--output", out, "--batch-size", "16",
                 "--num-gpus", "0", timeout=300)
    assert result.returncode == 1, output(result)
    summary = [line for line in result.stdout.splitlines() if "succeeded" in line]
    assert len(summary) == 1 and "1 succeeded, 0 skipped, 1 failed" in summary[0]
    assert str(out / "process_list.csv") in summary[0]
    assert "broken" in result.stderr and "UnreadableSlideError" in result.stderr
    rows = read_process_list(out / "process_list.csv")
    assert rows["good"]["status"] == "success" and rows["broken"]["status"] == "failed"
    assert (out / "embeddings.zarr").is_dir()


def test_cluster_settings_are_checked_before_any_work(tmp_path, slides):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"sample_id,image_path\ngood,{slides / 'good.svs'}\n")
    slides = manifest
    config = write_config(tmp_path, manifest=str(slides), cluster={"kind": "slurm", "k8s": {"image": "x"}})
    bad_kind = cli("run", str(config), "--cluster", "moon")
    assert bad_kind.returncode == 2 and "local, slurm, k8s or a scheduler address" in bad_kind.stderr
    mismatch = cli("run", str(config))
    assert mismatch.returncode == 2 and "cluster options for ['k8s']" in mismatch.stderr
    (tmp_path / "other").mkdir()
    unknown = cli("run", str(write_config(tmp_path / "other", manifest=str(slides), cluster={"kinds": "slurm"})))
    assert unknown.returncode == 2 and "did you mean 'kind'" in unknown.stderr
    bad_option = cli("run", str(config), "cluster.k8s=null", "cluster.slurm.gpu_jobz=2")
    assert bad_option.returncode == 2 and "gpu_jobz" in bad_option.stderr
    assert not (tmp_path / "out").exists()
