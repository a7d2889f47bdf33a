"""Dense token grids, CLS attention and image embeddings (issue 21), against the bare timm models.

The references are timm's own modules with the same random weights, run by hand:
their ``forward_features`` tokens, and the softmax matrix timm's *unfused* attention
branch forms (``fused_attn=False``, caught where it enters ``attn_drop``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slide2vec_dask import (DenseImageOptions, DenseOptions, ExecutionOptions, ImageSpec, Model,
                            PreprocessingConfig, SlideRegions)
from slide2vec_dask.encoders.presets import get_tile_preset
from slide2vec_dask.testing import checkpoints as ck

TINY = dict(embed_dim=48, depth=2, num_heads=2)
EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
# presets with a token grid of every kind: plain ViT, registers + SwiGLU, SwiGLU + CLS ++ mean, RoPE (Eva)
PREFIX = {"uni": 1, "uni2": 9, "virchow2": 5, "dinov3-vitb16": 5, "h0-mini": 5}   # CLS + registers
VIT_PRESETS = list(PREFIX)


def _pixels(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _normalized(pixels, mean, std):
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    return (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """name -> (Model with a random checkpoint in the published layout, the bare timm module holding it)."""
    made = {}
    for name in VIT_PRESETS:
        preset = get_tile_preset(name).with_kwargs(**TINY)
        preset = preset.replace(outputs=tuple((v, 96 if v in ("cls_mean", "cls_patch_mean") else 48)
                                              for v, _ in preset.outputs))
        path, state = ck.tile_checkpoint(preset, tmp_path_factory.mktemp(name) / "model.safetensors", seed=3)
        bare = preset.create_architecture(runtime=True)
        bare.load_state_dict(state, strict=True)
        made[name] = (Model(preset.spec(checkpoint_path=path)), bare.eval())
    return made


@pytest.fixture(scope="module")
def vits():
    """A random ViT-S/16 (seeded) as a Model, and the same weights as a bare timm module."""
    model = Model.from_timm("vit_small_patch16_224", dynamic_img_size=True)
    bare = model.spec.build().eval()
    return model, bare


# -- the grid ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VIT_PRESETS)
def test_patch_features_are_the_bare_models_tokens(twins, name):
    model, bare = twins[name]
    pixels = _pixels(2, 224, 224)
    grids = model.embed_images_dense([ImageSpec(sample_id=f"i{k}", image_path=p) for k, p in enumerate(pixels)],
                                     dense=DenseImageOptions(target_size=224, spacing_um=None))
    patch = bare.patch_embed.patch_size[0]
    with torch.no_grad():
        tokens = bare.forward_features(_normalized(pixels, model.tile_spec.mean, model.tile_spec.std))
    npt = bare.num_prefix_tokens
    assert npt == PREFIX[name]
    for k, artifact in enumerate(grids):
        grid = artifact.load()
        assert grid.shape == (48, 224 // patch, 224 // patch)
        want = tokens[k, npt:].T.reshape(48, 224 // patch, 224 // patch)
        torch.testing.assert_close(grid, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dinov3-vitb16", "virchow2", "h0-mini"])
def test_grid_mean_is_the_pooled_patch_mean(twins, name):
    """The presets that publish a mean of patch tokens: the grid's spatial mean is that output."""
    model, _ = twins[name]
    size = model.tile_spec.tile_size_px   # (embed_images resizes to it; dinov3's is 256)
    pixels = _pixels(3, size, size, seed=1)
    pooled = torch.stack([a.load() for a in model.embed_images(list(pixels))])
    grids = torch.stack([a.load() for a in model.embed_images_dense(
        list(pixels), dense=DenseImageOptions(target_size=size, spacing_um=None))])
    mean = grids.mean(dim=(2, 3))
    torch.testing.assert_close(pooled[:, -48:], mean, atol=1e-5, rtol=1e-4)


def test_prenorm_is_the_last_blocks_output(twins):
    model, bare = twins["uni2"]
    pixels = _pixels(1, 224, 224, seed=2)
    caught = {}
    bare.blocks[-1].register_forward_hook(lambda m, a, out: caught.__setitem__("last", out))
    with torch.no_grad():
        bare.forward_features(_normalized(pixels, model.tile_spec.mean, model.tile_spec.std))
    grid = model.embed_images_dense(list(pixels), dense=DenseImageOptions(
        target_size=224, spacing_um=None, feature_kind="patch_features_prenorm"))[0].load()
    want = caught["last"][0, bare.num_prefix_tokens:].T.reshape(48, 16, 16)
    torch.testing.assert_close(grid, want, atol=1e-5, rtol=1e-5)
    post = model.embed_images_dense(list(pixels), dense=DenseImageOptions(target_size=224, spacing_um=None))[0].load()
    assert not torch.allclose(grid, post, atol=1e-3)


# -- attention -----------------------------------------------------------------------------------------
def _unfused_attention(bare, x, block):
    """The softmax matrix timm's unfused branch forms in ``block``: ``(B, heads, N, N)``."""
    attn = bare.blocks[block].attn
    caught = {}
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: caught.__setitem__("p", a[0]))
    try:
        with torch.no_grad():
            bare.forward_features(x)
    finally:
        handle.remove()
        attn.fused_attn = True
    return caught["p"]


@pytest.mark.parametrize("name", ["uni2", "dinov3-vitb16"])
@pytest.mark.parametrize("registers", [False, True])
def test_cls_attention_is_timms_unfused_attention(twins, name, registers):
    model, bare = twins[name]
    pixels = _pixels(2, 224, 224, seed=4)
    x = _normalized(pixels, model.tile_spec.mean, model.tile_spec.std)
    grids = torch.stack([a.load() for a in model.embed_images_dense(list(pixels), dense=DenseImageOptions(
        target_size=224, spacing_um=None, feature_kind="cls_attention", attention_blocks=(0, -1),
        attention_include_registers=registers))])
    npt, heads, g = bare.num_prefix_tokens, 2, 224 // bare.patch_embed.patch_size[0]
    queries = npt if registers else 1
    assert grids.shape == (2, 2 * queries * heads, g, g)
    for i, block in enumerate((0, 1)):
        probs = _unfused_attention(bare, x, block)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
        want = probs[:, :, :queries, npt:].permute(0, 2, 1, 3).reshape(2, queries * heads, g, g)
        got = grids[:, i * queries * heads : (i + 1) * queries * heads]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        # with the prefix keys the maps left out, each query's row sums to 1
        rows = got.flatten(2).sum(-1) + probs[:, :, :queries, :npt].sum(-1).permute(0, 2, 1).reshape(2, -1)
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


# -- geometry: padding and windows -------------------------------------------------------------------------
@pytest.mark.parametrize("pad_mode,value", [("reflect", None), ("replicate", None), ("constant", 0.7), ("zero", None)])
def test_padding_is_bottom_right_in_the_chosen_mode(vits, pad_mode, value):
    model, bare = vits
    pixels = _pixels(1, 200, 216, seed=5)
    grid = model.embed_images_dense(list(pixels), dense=DenseImageOptions(
        target_size=(200, 216), spacing_um=None, pad_mode=pad_mode, image_pad_value=value))[0]
    assert grid.grid_shape == (13, 14) and grid.metadata["encoded_size"] == [208, 224]
    x = _normalized(pixels, model.tile_spec.mean, model.tile_spec.std)
    if pad_mode in ("constant", "zero"):
        x = F.pad(x, (0, 8, 0, 8), mode="constant", value=value or 0.0)
    else:
        x = F.pad(x, (0, 8, 0, 8), mode=pad_mode)
    with torch.no_grad():
        tokens = bare.forward_features(x)
    torch.testing.assert_close(grid.load(), tokens[0, 1:].T.reshape(384, 13, 14), atol=1e-5, rtol=1e-5)


def test_a_trunk_built_for_one_size_takes_another(tmp_path):
    """A ViT built without dynamic_img_size (lunit's ViT-S/8): grids at 160 px are timm's dynamic-size
    forward of the same weights, and its pooled output at 224 px is left as it was."""
    import timm

    model = Model.from_timm("vit_small_patch8_224")
    pixels = _pixels(1, 160, 160, seed=10)
    before = model.embed_images(list(_pixels(1, 224, 224, seed=11)))[0].load()
    grid = model.embed_images_dense(list(pixels), dense=DenseImageOptions(target_size=160))[0].load()
    ref = timm.create_model("vit_small_patch8_224", num_classes=0, dynamic_img_size=True)
    ref.load_state_dict(model.spec.build().state_dict())
    with torch.no_grad():
        tokens = ref.eval().forward_features(_normalized(pixels, model.tile_spec.mean, model.tile_spec.std))
    torch.testing.assert_close(grid, tokens[0, 1:].T.reshape(384, 20, 20), atol=1e-5, rtol=1e-5)
    after = model.embed_images(list(_pixels(1, 224, 224, seed=11)))[0].load()
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_windows_without_overlap_are_each_windows_own_forward(vits):
    """A 448 px image in 224 px windows, overlap 0: each quarter of the grid is that window's forward."""
    model, bare = vits
    pixels = _pixels(1, 448, 448, seed=6)
    grid = model.embed_images_dense(list(pixels), dense=DenseImageOptions(
        target_size=448, spacing_um=None, window_size=224, overlap=0.0))[0].load()
    x = _normalized(pixels, model.tile_spec.mean, model.tile_spec.std)
    assert grid.shape == (384, 28, 28)
    for r in (0, 1):
        for c in (0, 1):
            with torch.no_grad():
                tokens = bare.forward_features(x[:, :, r * 224 : (r + 1) * 224, c * 224 : (c + 1) * 224])
            torch.testing.assert_close(grid[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14],
                                       tokens[0, 1:].T.reshape(384, 14, 14), atol=1e-5, rtol=1e-5)
    whole = model.embed_images_dense(list(pixels), dense=DenseImageOptions(target_size=448, spacing_um=None))[0]
    one_window = model.embed_images_dense(list(pixels), dense=DenseImageOptions(
        target_size=448, spacing_um=None, window_size=512))[0]
    torch.testing.assert_close(one_window.load(), whole.load(), atol=0, rtol=0)


def test_overlapping_windows_blend_to_a_weighted_mean(vits):
    """Overlap 0.5 on 320 px with 224 px windows: starts 0 and 96 (flush), raised-cosine weights."""
    model, bare = vits
    pixels = _pixels(1, 320, 224, seed=7)
    grid = model.embed_images_dense(list(pixels), dense=DenseImageOptions(
        target_size=(320, 224), spacing_um=None, window_size=224, overlap=0.5))[0].load()
    x = _normalized(pixels, model.tile_spec.mean, model.tile_spec.std)
    with torch.no_grad():
        top = bare.forward_features(x[:, :, 0:224])[0, 1:].T.reshape(384, 14, 14)
        bottom = bare.forward_features(x[:, :, 96:320])[0, 1:].T.reshape(384, 14, 14)
    w = 0.5 - 0.5 * torch.cos(2 * torch.pi * torch.arange(1, 15) / 15)
    acc = torch.zeros(384, 20, 14)
    total = torch.zeros(20, 1)
    acc[:, 0:14] += top * w.view(14, 1)
    acc[:, 6:20] += bottom * w.view(14, 1)
    total[0:14] += w.view(14, 1)
    total[6:20] += w.view(14, 1)
    torch.testing.assert_close(grid, acc / total, atol=1e-5, rtol=1e-5)


# -- images and regions from slides -------------------------------------------------------------------------
def test_embed_images_of_a_slide_tile_is_embed_slides_embedding(tiny, syn_svs):
    from slide2vec_dask import open_slide

    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
    slide = open_slide(syn_svs)
    picks = [0, 7, emb.num_tiles - 1]
    tiles = [slide.read_level(0, int(emb.y[i]), int(emb.x[i]), 224, 224) for i in picks]
    got = torch.stack([a.load() for a in tiny.embed_images(tiles)])
    torch.testing.assert_close(got, emb.tile_embeddings[picks], atol=1e-5, rtol=0)


def test_regions_read_at_spacing_are_the_tiles_grid(vits, syn_svs, tmp_path):
    """A region at 1.0 µm/px on a 0.5 / 2.0 µm/px pyramid: 448 level-0 px area-averaged to 224."""
    from slide2vec_dask import open_slide

    model, bare = vits
    xy = [(448, 448), (2240, 2464)]
    arts = model.embed_regions_dense([SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=xy)],
                                     dense=DenseOptions(spacing_um=1.0, target_size=224),
                                     execution=ExecutionOptions(output_dir=tmp_path))
    slide = open_slide(syn_svs)
    for (x, y), a in zip(xy, arts):
        assert a.path == tmp_path / "dense_embeddings" / "syn" / f"{x}_{y}.pt" and (a.x, a.y) == (x, y)
        meta = json.loads(a.metadata_path.read_text())
        assert meta["read_level"] == 0 and meta["tile_size_lv0"] == 448 and meta["grid_shape"] == [14, 14]
        region = slide.read_level(0, y, x, 448, 448).reshape(224, 2, 224, 2, 3).astype(np.float64).mean((1, 3))
        pixels = np.round(region).astype(np.uint8)[None]
        with torch.no_grad():
            tokens = bare.forward_features(_normalized(pixels, model.tile_spec.mean, model.tile_spec.std))
        payload = torch.load(a.path, weights_only=True)
        torch.testing.assert_close(payload, tokens[0, 1:].T.reshape(384, 14, 14), atol=1e-5, rtol=1e-5)


def test_regions_resume_per_roi_and_redo_on_a_new_request(vits, syn_svs, tmp_path):
    model, _ = vits
    run = ExecutionOptions(output_dir=tmp_path, batch_size=2)
    regions = [SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(0, 0), (224, 0), (448, 0)],
                            annotation="tumor")]
    first = model.embed_regions_dense(regions, dense=DenseOptions(spacing_um=0.5, target_size=224), execution=run)
    assert first[0].path.parent == tmp_path / "dense_embeddings" / "tumor" / "syn"
    stamps = [a.path.stat().st_mtime_ns for a in first]
    first[1].metadata_path.unlink()   # an interrupted ROI: its payload without its sidecar
    again = model.embed_regions_dense(regions, dense=DenseOptions(spacing_um=0.5, target_size=224), execution=run)
    now = [a.path.stat().st_mtime_ns for a in again]
    assert now[0] == stamps[0] and now[2] == stamps[2] and now[1] != stamps[1]
    other = model.embed_regions_dense(regions, dense=DenseOptions(spacing_um=0.5, target_size=224,
                                                                  feature_kind="cls_attention"), execution=run)
    assert all(a.path.stat().st_mtime_ns != s for a, s in zip(other, now)) and other[0].feature_dim == 6


def test_image_files_png_and_resume(vits, tmp_path):
    from PIL import Image

    model, _ = vits
    pixels = _pixels(2, 224, 224, seed=8)
    paths = []
    for k, p in enumerate(pixels):
        paths.append(tmp_path / f"img{k}.png")
        Image.fromarray(p).save(paths[-1])
    run = ExecutionOptions(output_dir=tmp_path / "out")
    arts = model.embed_images([ImageSpec(sample_id=f"img{k}", image_path=p) for k, p in enumerate(paths)],
                              execution=run)
    assert [a.path.name for a in arts] == ["img0.pt", "img1.pt"] and arts[0].path.parent.name == "image_embeddings"
    in_memory = model.embed_images(list(pixels))
    for a, b in zip(arts, in_memory):
        torch.testing.assert_close(torch.load(a.path, weights_only=True), b.load(), atol=0, rtol=0)
    stamp = arts[0].path.stat().st_mtime_ns
    assert model.embed_images(paths, execution=run)[0].path.stat().st_mtime_ns == stamp
    dense = model.embed_images_dense([ImageSpec(sample_id="img0", image_path=paths[0], spacing_at_level_0=0.5)],
                                     dense=DenseImageOptions(target_size=224, spacing_um=0.5), execution=run)
    assert dense[0].path == tmp_path / "out" / "dense_image_embeddings" / "img0.pt"
    assert json.loads(dense[0].metadata_path.read_text())["grid_shape"] == [14, 14]


def test_numpy_pil_and_torch_pixels_are_the_same_image(vits):
    from PIL import Image

    model, _ = vits
    pixels = _pixels(1, 224, 224, seed=12)[0]
    given = [pixels, Image.fromarray(pixels), torch.from_numpy(pixels).permute(2, 0, 1),
             torch.from_numpy(pixels).float() / 255.0]
    out = model.embed_images(given)
    assert [a.sample_id for a in out] == [f"image_{k:06d}" for k in range(4)]
    for a in out[1:]:
        torch.testing.assert_close(a.load(), out[0].load(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="image_000000: an image must be"):
        model.embed_images([np.zeros((224, 224, 5), np.uint8)])


def test_prepare_dense_encoder_matches_embed_images_dense(vits):
    model, _ = vits
    options = DenseImageOptions(target_size=200, spacing_um=None, window_size=112, overlap=0.25)
    kit = model.prepare_dense_encoder(dense=options)
    assert kit.geometry.encoded_size == (208, 208) and kit.geometry.crop_box == (0, 0, 200, 200)
    pixels = _pixels(2, 200, 200, seed=9)
    batch = torch.stack([kit.preprocessor()(torch.from_numpy(p).permute(2, 0, 1)) for p in pixels])
    live = kit.encode(batch)
    stored = torch.stack([a.load() for a in model.embed_images_dense(list(pixels), dense=options)])
    torch.testing.assert_close(live, stored, atol=1e-5, rtol=1e-5)


# -- bad input, named ---------------------------------------------------------------------------------------
def test_region_outside_the_slide_is_named(vits, syn_svs):
    model, _ = vits
    with pytest.raises(ValueError, match=r"syn: region at level-0 \(x, y\) = \(4400, 0\) lies outside"):
        model.embed_regions_dense([SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(0, 0), (4400, 0)])],
                                  dense=DenseOptions(spacing_um=0.5, target_size=224))


def test_image_without_spacing_is_named(vits, tmp_path):
    from PIL import Image

    model, _ = vits
    Image.fromarray(_pixels(1, 224, 224)[0]).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a: the image records no pixel spacing.*spacing_at_level_0"):
        model.embed_images_dense([tmp_path / "a.png"], dense=DenseImageOptions(target_size=224, spacing_um=0.5))
    with pytest.raises(ValueError, match=r"b: the image is 112 x 112 px .* target_size"):
        model.embed_images_dense([ImageSpec(sample_id="b", image_path=_pixels(1, 224, 224)[0], spacing_at_level_0=0.5)],
                                 dense=DenseImageOptions(target_size=224, spacing_um=1.0))


@pytest.mark.parametrize("name", ["resnet50", "ctranspath"])
def test_presets_without_a_token_grid_are_refused_by_name(name):
    model = Model.from_preset(name, checkpoint_path=__file__)   # never loaded: refused from the architecture
    with pytest.raises(ValueError, match=rf"'{name}' .*has no patch-token grid"):
        model.embed_images_dense([_pixels(1, 224, 224)[0]], dense=DenseImageOptions(target_size=224, spacing_um=None))


def test_unknown_feature_kind_and_bad_options_are_named_where_used(vits, syn_svs):
    """Options are checked where they are used (slide2vec 7.1.4: ``dataclasses.replace`` may build a bad one)."""
    model, _ = vits
    regions = [SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(0, 0)])]
    bad = DenseImageOptions(target_size=224, feature_kind="tokens")   # made: not yet checked
    with pytest.raises(ValueError, match="unknown feature_kind 'tokens'"):
        model.embed_images_dense([_pixels(1, 224, 224)[0]], dense=bad)
    with pytest.raises(ValueError, match="unknown pad_mode"):
        model.embed_regions_dense(regions, dense=DenseOptions(spacing_um=0.5, target_size=224, pad_mode="wrap"))
    with pytest.raises(ValueError, match="overlap"):
        model.embed_regions_dense(regions, dense=DenseOptions(spacing_um=0.5, target_size=224, window_size=112,
                                                              overlap=1.0))
    with pytest.raises(ValueError, match="DenseOptions.spacing_um"):
        model.embed_regions_dense(regions, dense=DenseOptions(spacing_um=-1.0, target_size=224))
    with pytest.raises(ValueError, match="sample_id"):
        ImageSpec(sample_id="a/b", image_path="x.png")


def test_options_that_cannot_act_here_are_refused(vits):
    model, _ = vits
    with pytest.raises(ValueError, match="output_format=.*'npz'.*\\.pt files"):
        model.embed_images([_pixels(1, 224, 224)[0]], execution=ExecutionOptions(output_format="npz"))
    with pytest.raises(ValueError, match="save_dense"):
        model.embed_images_dense([_pixels(1, 224, 224)[0]], dense=DenseImageOptions(target_size=224),
                                 execution=ExecutionOptions(save_dense=True))


def test_attention_block_out_of_range_is_named(vits):
    model, _ = vits
    with pytest.raises(ValueError, match="block 12 is out of range.*12 blocks"):
        model.embed_images_dense([_pixels(1, 224, 224)[0]], dense=DenseImageOptions(
            target_size=224, spacing_um=None, feature_kind="cls_attention", attention_blocks=(12,)))


# -- the whole slide: every tissue tile's grid in the Pipeline store ---------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_pipeline_keeps_every_tiles_grid_in_the_store(tiny, syn_svs, vit_tiny_checkpoint, tmp_path, dtype):
    from conftest import openslide_tiles, reference_embeddings
    from slide2vec_dask import Pipeline, open_embeddings

    result = Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(
        output_dir=tmp_path, save_dense=True, dense_dtype=dtype)).run(slides=[syn_svs])
    assert result.num_failed == 0
    tree = open_embeddings(tmp_path)
    tiles, dense = tree["tiles/synthetic"].to_dataset(), tree["dense/synthetic"].to_dataset()
    assert dense.embedding.dims == ("tile", "token_y", "token_x", "feature")
    assert dense.embedding.shape == (tiles.sizes["tile"], 14, 14, 192)
    assert dense.embedding.encoding["chunks"] == (1, 14, 14, 192)   # a tile's grid is one read
    assert str(dense.embedding.dtype) == ("float16" if dtype == "fp16" else "float32")
    np.testing.assert_array_equal(dense.x.values, tiles.x.values)
    np.testing.assert_array_equal(dense.y.values, tiles.y.values)
    picks = [0, 5, tiles.sizes["tile"] - 1]
    pixels = openslide_tiles(syn_svs, tiles.x.values[picks], tiles.y.values[picks], 224)
    import timm
    from safetensors.torch import load_file

    bare = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    bare.load_state_dict(load_file(str(vit_tiny_checkpoint)))
    with torch.no_grad():
        tokens = bare.eval().forward_features(_normalized(pixels, tiny.spec.mean, tiny.spec.std))
    want = tokens[:, 1:].reshape(3, 14, 14, 192)
    got = torch.from_numpy(dense.embedding.values[picks].astype(np.float32))
    torch.testing.assert_close(got, want, atol=1e-5 if dtype == "fp32" else 2e-2, rtol=0 if dtype == "fp32" else 1e-2)
    # the pooled rows of the same forward are the bare model's CLS (unchanged by keeping the grids)
    torch.testing.assert_close(torch.from_numpy(tiles.embedding.values[picks]),
                               reference_embeddings(vit_tiny_checkpoint, pixels, tiny.spec.mean, tiny.spec.std),
                               atol=1e-5, rtol=0)


def test_save_dense_is_refused_where_it_cannot_act(tiny, syn_svs, tmp_path):
    from slide2vec_dask import Pipeline

    with pytest.raises(ValueError, match="save_dense=True.*Pipeline.run"):
        tiny.embed_slide(syn_svs, execution=ExecutionOptions(save_dense=True))
    cnn = Model.from_preset("resnet50", checkpoint_path=__file__)
    with pytest.raises(ValueError, match="'resnet50' .*has no patch-token grid"):
        Pipeline(cnn, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp_path, save_dense=True)).run(
            slides=[syn_svs])
    Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp_path / "a")).run(slides=[syn_svs])
    with pytest.raises(ValueError, match="other settings.*dense"):   # a store made without grids is not topped up
        Pipeline(tiny, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp_path / "a", save_dense=True)).run(
            slides=[syn_svs])


def test_regions_on_a_dask_cluster_are_the_local_ones(vits, syn_svs, tmp_path):
    from distributed import LocalCluster

    model, _ = vits
    regions = [SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(448, 448), (2240, 2240), (896, 672)])]
    dense = DenseOptions(spacing_um=0.5, target_size=224, feature_kind="cls_attention")
    local = model.embed_regions_dense(regions, dense=dense)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        remote = model.embed_regions_dense(regions, dense=dense, execution=ExecutionOptions(
            scheduler_address=cluster.scheduler_address, output_dir=tmp_path, batch_size=2))
    assert [a.path.name for a in remote] == ["448_448.pt", "2240_2240.pt", "896_672.pt"]
    for a, b in zip(local, remote):
        torch.testing.assert_close(b.load(), a.load(), atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dense_quickstart_example_runs_as_written(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "dense_quickstart.py"
    done = subprocess.run([sys.executable, str(example), "--output-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "embed_regions_dense: [('out/dense_embeddings/slide/224_224.pt', (384, 28, 28))" in done.stdout
    assert "embed_images_dense: out/dense_image_embeddings/a.pt (6, 14, 14)" in done.stdout
    assert "save_dense: {'tile':" in done.stdout and "float16" in done.stdout
    assert (tmp_path / "out" / "image_embeddings" / "a.pt").exists()
