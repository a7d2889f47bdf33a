"""slide2vec 7.1.4 itself against us: a user's script (tests/peers/slide2vec_user_dense.py) with
``embed_images``, ``embed_regions_dense`` and ``embed_images_dense`` run twice, once in slide2vec's
own venv and once with the import changed to slide2vec_dask, on the same random-weight ViT-S/16,
slide and images; every ``.pt`` file equal (<= 1e-5), and the sidecars agreeing on the geometry.

Needs slide2vec 7.1.4 in its own venv: ``tests/peers/setup-slide2vec.sh`` (-> /tmp/slide2vec-peer,
or set SLIDE2VEC_PYTHON); skipped, naming the script, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "peers" / "slide2vec_user_dense.py"
SETUP = "tests/peers/setup-slide2vec.sh"
SAME = ("feature_dim", "grid_shape", "target_size", "patch_size", "encoded_size", "pad", "feature_kind",
        "pad_mode", "window_size", "overlap", "attention_blocks", "attention_include_registers", "x", "y",
        "sample_id", "annotation", "dtype", "artifact_type")
#: The request-wide identity both record under ``compatibility`` (the encoder's name and code differ by
#: construction: a registered class there, Model.from_timm here); image grids add their geometry.
IDENTITY = ("output_variant", "precision", "pad_mode", "image_pad_value", "window_size", "overlap", "feature_kind",
            "attention_blocks", "attention_include_registers", "dtype", "transform")
IMAGE_IDENTITY = IDENTITY + ("target_size", "patch_size", "encoded_size", "pad", "grid_shape")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]   # two runs of nine calls, each its own process


@pytest.fixture(scope="module")
def peer_python() -> str:
    python = os.environ.get("SLIDE2VEC_PYTHON", "/tmp/slide2vec-peer/bin/python")
    if not Path(python).exists():
        pytest.skip(f"slide2vec 7.1.4 not installed ({python} missing): run {SETUP}, or set SLIDE2VEC_PYTHON")
    probe = subprocess.run([python, "-c", "import slide2vec"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"{python} does not import slide2vec ({probe.stderr.strip().splitlines()[-1:]}): run {SETUP}")
    return python


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, syn_svs, syn_image):
    import timm
    from PIL import Image

    root = tmp_path_factory.mktemp("dense_peer")
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict(),
               root / "weights.pt")
    images = root / "images"
    images.mkdir()
    for k in range(3):
        Image.fromarray(syn_image[448 + 224 * k : 672 + 224 * k, 448:672]).save(images / f"im{k}.png")
    return root, syn_svs


def _run(python: str, library: str, root: Path, slide: Path) -> Path:
    out = root / library
    env = {**os.environ, "PYTHONPATH": str(REPO)} if library == "slide2vec_dask" else \
        {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([python, str(SCRIPT), library, str(root / "weights.pt"), str(slide), str(root / "images"),
                           str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=root)
    assert done.returncode == 0, f"{library}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


def test_user_script_gives_slide2vecs_files(peer_python, inputs):
    root, slide = inputs
    theirs = _run(peer_python, "slide2vec", root, slide)
    ours = _run(sys.executable, "slide2vec_dask", root, slide)
    payloads = sorted(p.relative_to(theirs) for p in theirs.rglob("*.pt"))
    assert payloads == sorted(p.relative_to(ours) for p in ours.rglob("*.pt"))
    kinds = {p.parts[0] for p in payloads}
    assert kinds == {"images", "grid", "padded", "prenorm", "attention", "windows", "dense_images",
                     "dense_images_windows", "dense_images_attention"}
    assert any("tumor" in p.parts for p in payloads)
    for rel in payloads:
        a, b = torch.load(theirs / rel, weights_only=True), torch.load(ours / rel, weights_only=True)
        assert a.shape == b.shape and a.dtype == b.dtype, rel
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=lambda m: f"{rel}: {m}")
        if rel.parts[0] != "images":
            meta = rel.with_name(rel.name[:-3] + ".meta.json")
            mine, peer = (json.loads((root_ / meta).read_text()) for root_ in (ours, theirs))
            assert {k: mine.get(k) for k in SAME if k in peer} == {k: peer[k] for k in SAME if k in peer}, rel
            fields = IMAGE_IDENTITY if rel.parts[0].startswith("dense_images") else IDENTITY
            assert set(fields) <= set(peer["compatibility"]), rel
            assert {k: mine["compatibility"].get(k) for k in fields} == {k: peer["compatibility"][k] for k in fields}, rel
    grid = torch.load(ours / "windows" / "dense_embeddings" / "syn" / "448_448.pt", weights_only=True)
    assert grid.shape == (384, 28, 28) and np.isfinite(grid.numpy()).all()
