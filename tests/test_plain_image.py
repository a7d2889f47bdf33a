"""PNG / JPEG images as slides and as label masks (the ``pil`` backend, `slide/plain_image.py`).

Compared with hs2p's own PIL reader where it installs: the same PNG slide and PNG mask tiled by
hs2p 6.1.0 (``backend="pil"``, ``spacing_at_level_0``) and by our ``tiling_only`` give the same tiles.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_hs2p_tiling import MAKE_HS2P, _clean_env, hs2p_python  # noqa: F401  (a fixture)

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.slide import plain_image, registry
from slide2vec_dask.slide.base import MissingSpacingError, UnreadableSlideError
from slide2vec_dask.slide.open import open_slide
from slide2vec_dask.tiling.masks import read_mask_file


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)


def test_png_slide_reads_its_pixels_and_its_resolution(image, tmp_path):
    path = tmp_path / "s.png"
    Image.fromarray(image).save(path, dpi=(50_800, 50_800))   # 0.5 µm/px
    slide = open_slide(path)
    assert slide.backend == "pil" and slide.level_shapes == [(300, 400)] and slide.spacing == pytest.approx(0.5)
    assert (slide.read_level(0, 10, 20, 50, 60) == image[10:60, 20:80]).all()
    edge = slide.read_level(0, 290, 390, 20, 20)   # past the edge: white, as every backend
    assert (edge[:10, :10] == image[290:, 390:]).all() and (edge[10:, :] == 255).all()
    again = pickle.loads(pickle.dumps(slide))   # workers re-open it by path
    assert (again.read_level(0, 0, 0, 300, 400) == image).all()
    assert registry.choose(path)[0].name == "pil"


def test_grey_alpha_and_jpeg_images_read_as_rgb(image, tmp_path):
    rgba = np.dstack([image, np.full(image.shape[:2], 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(image[..., 0]).save(tmp_path / "g.png")
    Image.fromarray(image).save(tmp_path / "j.jpg", quality=100, subsampling=0)
    assert (open_slide(tmp_path / "a.png", spacing_at_level_0=1).read_level(0, 0, 0, 300, 400) == image).all()
    grey = open_slide(tmp_path / "g.png", spacing_at_level_0=1).read_level(0, 0, 0, 300, 400)
    assert (grey == image[..., :1]).all()
    jpeg = open_slide(tmp_path / "j.jpg", spacing_at_level_0=1, backend="pil")
    assert jpeg.vendor == "jpeg" and np.abs(jpeg.read_level(0, 0, 0, 300, 400).astype(int) - image).mean() < 3


def test_a_spacing_is_needed_where_the_file_has_none(image, tmp_path):
    Image.fromarray(image).save(tmp_path / "plain.png")              # no pHYs
    Image.fromarray(image).save(tmp_path / "screen.png", dpi=(72, 72))   # a screen's placeholder: 353 µm/px
    for name in ("plain.png", "screen.png"):
        with pytest.raises(MissingSpacingError, match=f"{name}.*spacing_at_level_0"):
            open_slide(tmp_path / name)
    assert open_slide(tmp_path / "plain.png", spacing_at_level_0=0.25).spacing == 0.25


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width`` x ``height`` (CRC fixed, so only the size lies)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8   # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [10_000, 1_000_000])   # over our limit; over Pillow's bomb error too
def test_a_huge_header_is_refused_before_decoding(side, tmp_path):
    assert side * side > plain_image.MAX_PIXELS
    path = _png_claiming(tmp_path / "huge.png", side, side)
    with pytest.raises(UnreadableSlideError, match="huge.png.*(pyramidal TIFF)"):
        open_slide(path, spacing_at_level_0=0.5)
    with pytest.raises(ValueError, match="huge.png"):
        read_mask_file(path, (10, 10), sample="s")


def test_a_truncated_png_fails_naming_the_file(image, tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(image).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UnreadableSlideError, match="cut.png.*complete"):
        open_slide(path, spacing_at_level_0=0.5).read_level(0, 0, 0, 10, 10)


def test_label_masks_as_png(tmp_path):
    labels = np.zeros((30, 40), np.uint8)
    labels[:15, :20] = 1
    Image.fromarray(labels).save(tmp_path / "m.png")
    mask = read_mask_file(tmp_path / "m.png", (60, 80))
    assert mask.shape == (60, 80) and (mask[:30, :40] == 255).all() and mask[30:].max() == 0 and mask[:, 40:].max() == 0
    rgba = np.dstack([np.repeat(labels[..., None], 3, axis=2), np.full((30, 40), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")   # an opaque alpha is no tissue
    assert (read_mask_file(tmp_path / "rgba.png", (60, 80)) == mask).all()


@pytest.mark.slow   # two runs and two hs2p subprocesses: ~40 s on a busy 2-core machine
def test_hs2p_tiles_a_png_slide_and_mask_as_we_do(hs2p_python, tmp_path):
    slide = tmp_path / "slide.png"
    Image.fromarray(testing.tissue_image(1200, 1500, [(100, 150, 900, 1300)])).save(slide)
    labels = np.zeros((300, 375), np.uint8)
    labels[20:250, 30:300] = 1
    Image.fromarray(labels).save(tmp_path / "mask.png")
    weights = tmp_path / "garbage.safetensors"
    weights.write_bytes(b"not a checkpoint" * 64)   # tiling_only loads no model
    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=weights, spacing_um=0.5, tile_size_px=224)
    for mask in (None, tmp_path / "mask.png"):
        out = tmp_path / ("masked" if mask else "segmented")
        item = {"sample_id": "png", "image_path": str(slide), "spacing_at_level_0": 0.5,
                **({"mask_path": str(mask)} if mask else {})}
        result = Pipeline(model, PreprocessingConfig(segmentation={"downsample": 1}),
                          ExecutionOptions(output_dir=out)).run(slides=[item], tiling_only=True)
        assert result.num_failed == 0 and result.outcomes[0].num_tiles > 0
        settings = {"backend": "pil", "spacing_at_level_0": 0.5, "segmentation": {"downsample": 1},
                    **({"mask_path": str(mask)} if mask else {})}
        done = subprocess.run([str(hs2p_python), str(MAKE_HS2P), "tile", str(slide), "png", str(tmp_path / "hs2p"),
                               json.dumps(settings)], capture_output=True, text=True, env=_clean_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        with np.load(out / "tiles" / "png.coordinates.npz") as ours:
            assert (ours["x"].tolist(), ours["y"].tolist()) == (theirs["x"], theirs["y"]), mask
            assert np.allclose(ours["tissue_fractions"], theirs["tissue_fractions"], atol=1e-6)
        assert theirs["meta"]["provenance"]["backend"] == "pil"
