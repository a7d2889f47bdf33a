"""Hostile and careless configuration, met the way users meet it: YAML files run by the CLI in a
subprocess (a hang is caught by its timeout), config objects and checkpoints through the Python API.

Every refusal must be quick, name the file / field, and say what to do.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing

TIMM = "vit_tiny_patch16_224"
# Nine levels of ten aliases, all inside one value: a few hundred bytes of YAML whose repr is 10**9 items.
BOMB = "[" + ", ".join([f"&l1 [{', '.join(['x'] * 10)}]"]
                       + [f"&l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(2, 10)]) + "]"
VALID = textwrap.dedent("""\
    manifest: slides.csv
    model: {timm: vit_tiny_patch16_224}
    execution:
      output_dir: out
    """)


def cli(*args, cwd=None, timeout=30) -> subprocess.CompletedProcess:
    """The console script as a user runs it; a hang fails the test at ``timeout``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text)
    return path


# -- 1. alias bombs -----------------------------------------------------------------------------
def bomb_config(field: str) -> str:
    """A valid config but for ``field`` (dotted), whose value is the bomb."""
    section, *rest = field.split(".")
    value = f"{{{rest[1]}: {BOMB}}}" if len(rest) == 2 else BOMB
    return VALID + f"{section}:\n  {rest[0]}: {value}\n" if section != "execution" else \
        VALID + f"  {rest[0]}: {value}\n"


@pytest.mark.parametrize("field", ["execution.batch_size", "preprocessing.segmentation.sthresh"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, field):
    """A billion-laughs value once hung the CLI (memory +77 MB/s) while an error message built its repr."""
    config = write(tmp_path, bomb_config(field))
    result = cli("run", config, timeout=20)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "alias" in result.stderr and str(config) in result.stderr
    assert len(result.stderr) < 1000


BOMB_SCRIPT = textwrap.dedent("""\
    from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
    level = ["x"] * 10
    for _ in range(8):
        level = [level] * 10          # shared, so cheap to build: 10**9 items when printed
    cases = [(ExecutionOptions, {"batch_size": level}), (ExecutionOptions, {"overwrite": level}),
             (ExecutionOptions, {"precision": level}), (ExecutionOptions, {"output_dir": level}),
             (ExecutionOptions, {"output_format": level}), (ExecutionOptions, {"scheduler_address": level}),
             (PreprocessingConfig, {"tissue_threshold": level}), (PreprocessingConfig, {"segmentation": level}),
             (PreprocessingConfig, {"segmentation": {"sthresh": level}}),
             (PreprocessingConfig, {"filtering": {"filter_white": level}})]
    for cls, kwargs in cases:
        try:
            cls(**kwargs)
        except ValueError as exc:
            print(len(str(exc)), str(exc)[:80])
        else:
            raise SystemExit(f"accepted {kwargs.keys()}")
    """)


def test_the_python_api_shows_a_huge_value_briefly(tmp_path):
    """Config errors show a bounded repr of the value: a shared nested list of 10**9 items must
    not be printed in full (each message stays short, and comes at once)."""
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr[-2000:]
    lengths = [int(line.split()[0]) for line in result.stdout.splitlines()]
    assert len(lengths) == 10 and max(lengths) < 400, result.stdout


# -- 2. duplicate keys --------------------------------------------------------------------------
@pytest.mark.parametrize("text, key", [
    (VALID + "  overwrite: false\n  overwrite: true\n", "overwrite"),
    (VALID + "execution:\n  overwrite: true\n", "execution"),
    ("preprocessing:\n  segmentation: {method: otsu, method: hsv}\n" + VALID, "method"),
])
def test_duplicate_keys_are_refused_naming_the_key_and_lines(tmp_path, text, key):
    """YAML's last-wins would silently drop the first ``overwrite: false``."""
    config = write(tmp_path, text)
    result = cli("run", config, "--print-config")
    assert result.returncode == 2, result.stdout
    assert f"duplicate key {key!r}" in result.stderr and str(config) in result.stderr
    assert "line" in result.stderr


# -- 3. booleans --------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["no", "yes", "on", "off", "No"])
def test_yaml_1_1_booleans_are_refused_like_the_python_api(tmp_path, spelling):
    """``overwrite: no`` was read as False by YAML 1.1, while ExecutionOptions(overwrite="no") is refused."""
    with pytest.raises(ValueError, match="true or false"):
        ExecutionOptions(overwrite=spelling)
    config = write(tmp_path, VALID + f"  overwrite: {spelling}\n")
    result = cli("run", config)
    assert result.returncode == 2
    assert "overwrite must be true or false" in result.stderr and repr(spelling) in result.stderr
    override = cli("run", write(tmp_path, VALID), f"execution.overwrite={spelling}")
    assert override.returncode == 2 and "overwrite must be true or false" in override.stderr


def test_true_and_false_stay_booleans(tmp_path):
    config = write(tmp_path, VALID + "  overwrite: True\n  save_latents: false\n")
    result = cli("run", config, "execution.channels_last=FALSE", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "overwrite: true" in result.stdout and "save_latents: false" in result.stdout
    assert "channels_last: false" in result.stdout


# -- 4. --print-config validates ----------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("execution.batch_size=0", "batch_size must be an integer"),
    ("preprocessing.segmentation.sthresh=999", "segmentation.sthresh must be an integer"),
    ("model.tile_size_px=-3", "model.tile_size_px must be a positive integer"),
    ("execution.output_dir=null", "execution.output_dir is required"),
])
def test_print_config_refuses_what_run_refuses(tmp_path, override, message):
    """--print-config printed invalid values with exit 0; it now fails as `run` does."""
    config = write(tmp_path, VALID)
    shown = cli("run", config, override, "--print-config")
    ran = cli("run", config, override)
    assert shown.returncode == ran.returncode == 2, shown.stdout
    assert message in shown.stderr and shown.stderr == ran.stderr and shown.stdout == ""


# -- 5. export destinations ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished run of one small slide (an in-process cluster, a pooled linear model)."""
    import torch
    from distributed import Client, LocalCluster

    folder = tmp_path_factory.mktemp("finished")
    slide = testing.write_svs(folder / "s.svs", testing.tissue_image(1024, 1024, [(0, 0, 1024, 1024)], seed=2),
                              mpp=0.5, downsamples=(1, 4))
    torch.manual_seed(0)
    model = Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                                                  torch.nn.Linear(12, 4)), name="tiny-linear")
    out = folder / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        with Client(c, set_as_default=False) as client:
            result = Pipeline(model, PreprocessingConfig(), ExecutionOptions(output_dir=out), client=client).run(
                slides=[{"sample_id": "s", "image_path": str(slide)}])
    assert [o.status for o in result.outcomes] == ["success"]
    return out


def test_export_to_a_file_is_one_line_and_exit_3(finished_run, tmp_path):
    """`export --dest FILE` printed a 40-line traceback with exit 1; `run` says it in one line, exit 3."""
    dest = tmp_path / "a_file"
    dest.write_text("not a folder")
    result = cli("export", finished_run, "--format", "npz", "--dest", dest, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert str(dest) in result.stderr and "not a folder" in result.stderr
    inside = cli("export", finished_run, "--format", "npz", "--dest", dest / "sub", timeout=60)
    assert inside.returncode == 3 and "Traceback" not in inside.stderr, inside.stderr


# -- 6. refused checkpoints ---------------------------------------------------------------------
class _Getcwd:
    """Pickles as a call of os.getcwd: what a checkpoint that runs code looks like (harmless here)."""

    def __reduce__(self):
        return (os.getcwd, ())


def _embed_error(checkpoint: Path, slide: Path) -> str:
    with pytest.raises(ValueError) as info:
        Model.from_timm(TIMM, checkpoint_path=checkpoint).embed_slide(slide)
    return str(info.value)


def test_a_pickle_checkpoint_is_refused_in_our_words(tmp_path, syn_svs):
    """torch's message advises weights_only=False (running the file's code), cut mid-sentence."""
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "hook": _Getcwd()}, path)
    message = _embed_error(path, syn_svs)
    assert str(path) in message and "weights-only" in message and "safetensors" in message
    assert "weights_only" not in message and "set to `False`" not in message
    assert "getcwd" in message and message.endswith(".")   # whole sentences, not cut mid-way


def test_a_pickle_named_safetensors_says_so(tmp_path, syn_svs):
    """A pickle renamed .safetensors surfaced as a bare SafetensorError (header too large)."""
    import torch

    zipped, legacy = tmp_path / "zip.safetensors", tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, zipped)
    legacy.write_bytes(pickle.dumps({"w": [0.0, 1.0]}))
    for path in (zipped, legacy):
        message = _embed_error(path, syn_svs)
        assert f"{path} is not a safetensors file" in message and "pickle" in message
