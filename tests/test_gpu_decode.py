"""``ExecutionOptions(gpu_decode=True)``: JPEG tiles decoded on the GPU (issue 25).

Here (no CUDA) the option falls back to the CPU decoder with a warning, and
the parts that do not need a GPU -- the compressed tiles a block reads, their
assembly into the block and the tile cut on a tensor -- are checked by
decoding the same streams with torchvision's CPU decoder.  The pixel-equality
test on the GPU itself runs where CUDA is present and skips cleanly elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slide2vec_dask import ExecutionOptions, Model, testing
from slide2vec_dask.dataflow import gpu_decode
from slide2vec_dask.dataflow.blocks import cut_tiles
from slide2vec_dask.slide import open_slide
from slide2vec_dask.dataflow.sources import SlideRef

from conftest import SYN_RECTS, SYN_SHAPE


def _model() -> Model:
    return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                             name="mean-rgb", feature_dim=3, spacing_um=0.5, tile_size_px=224)


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    image = testing.tissue_image(*SYN_SHAPE, SYN_RECTS, seed=1)
    return testing.write_svs(tmp_path_factory.mktemp("gpu-decode") / "s.svs", image[:1792, :2240], mpp=0.5,
                             downsamples=(1, 4), quality=90)


def test_without_a_gpu_it_falls_back_to_the_cpu_with_a_warning(svs):
    plain = _model().embed_slide(svs)
    with pytest.warns(RuntimeWarning, match="gpu_decode=True, but this run has no GPU.*decoded on the CPU"):
        decoded = _model().embed_slide(svs, execution=ExecutionOptions(gpu_decode=True))
    assert decoded.num_tiles == plain.num_tiles > 0
    assert torch.equal(decoded.tile_embeddings, plain.tile_embeddings)


@pytest.fixture(scope="module")
def ycbcr_tiff(tmp_path_factory):
    """tifffile's default JPEG: YCbCr 4:2:0 (the SVS above holds RGB inside its JPEG, as Aperio's do)."""
    image = testing.tissue_image(*SYN_SHAPE, SYN_RECTS, seed=1)
    return testing.write_tiff(tmp_path_factory.mktemp("gpu-decode") / "ycbcr.tif", image[:1792, :2240],
                              spacing_um=0.5)


@pytest.mark.parametrize("window", [(0, 0, 896, 896), (100, 300, 700, 1000), (1500, 2000, 292, 240)])
@pytest.mark.parametrize("kind", ["svs", "ycbcr_tiff"])
def test_a_block_of_compressed_tiles_assembles_to_the_readers_pixels(kind, window, request):
    """The streams, their places and the white of the edges, decoded by torchvision on the CPU."""
    slide = open_slide(request.getfixturevalue(kind))
    ref = SlideRef.of(slide)
    y, x, h, w = window
    block = gpu_decode.jpeg_block(ref, 0, y, x, h, w)
    assert block is not None and block.streams and all(s[:2] == b"\xff\xd8" for s in block.streams)
    pixels = gpu_decode.decode_block(block, "cpu")   # (the first block of the level is checked, too)
    assert pixels is not None and tuple(pixels.shape) == (h, w, 3)
    cpu = slide.read_level(0, y, x, h, w)
    diff = np.abs(pixels.numpy().astype(int) - cpu.astype(int))
    assert diff.mean() <= gpu_decode.MAX_MEAN_DIFF and np.percentile(diff, 99.9) <= gpu_decode.MAX_P999_DIFF


def test_tiles_are_cut_on_a_tensor_as_on_an_array():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = rng.random((3, 4)) > 0.4
    assert np.array_equal(gpu_decode.cut_tiles(torch.from_numpy(pixels), mask, 32).numpy(), cut_tiles(pixels, mask, 32))
    corners = np.array([[0, 5], [40, 90], [64, 0]])
    assert np.array_equal(gpu_decode.cut_tiles(torch.from_numpy(pixels), corners, 32).numpy(),
                          cut_tiles(pixels, corners, 32))


def test_levels_that_are_not_tiled_jpeg_are_left_to_the_cpu(tmp_path):
    image = testing.tissue_image(1024, 1024, [(0, 0, 512, 512)], seed=2)
    path = testing.write_tiff(tmp_path / "plain.tif", image, spacing_um=0.5, compression="zlib")
    ref = SlideRef.of(open_slide(path))
    assert gpu_decode.jpeg_block(ref, 0, 0, 0, 512, 512) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG): runs on the GPU machine")
def test_on_the_gpu_the_pixels_and_embeddings_match_the_cpu_decoder(svs):
    slide = open_slide(svs)
    ref = SlideRef.of(slide)
    h, w = slide.level_shapes[0]
    for y in range(0, h, 896):
        for x in range(0, w, 896):
            bh, bw = min(896, h - y), min(896, w - x)
            block = gpu_decode.jpeg_block(ref, 0, y, x, bh, bw)
            pixels = gpu_decode.decode_block(block, "cuda:0")
            assert pixels is not None and pixels.device.type == "cuda"
            diff = np.abs(pixels.cpu().numpy().astype(int) - slide.read_level(0, y, x, bh, bw).astype(int))
            assert diff.mean() <= gpu_decode.MAX_MEAN_DIFF and np.percentile(diff, 99.9) <= gpu_decode.MAX_P999_DIFF
    plain = _model().embed_slide(svs, execution=ExecutionOptions(num_gpus=1))
    decoded = _model().embed_slide(svs, execution=ExecutionOptions(num_gpus=1, gpu_decode=True))
    assert torch.allclose(decoded.tile_embeddings, plain.tile_embeddings, atol=2.0)   # mean RGB, 0-255 scale
