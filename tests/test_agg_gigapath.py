"""gigapath-slide: Prov-GigaPath's LongNet slide encoder, checked against independent computations.

* parameter count and segment lengths: the numbers the official demo notebook prints;
* dilated attention: a naive masked softmax over the union of each branch's keys, written
  from LongNet's definition (no gather/scatter), and torch's own SDPA in the dense case;
* the layer stack and the ``encoder.*`` key names: Microsoft's torchscale ``Encoder``
  (``pip install --no-deps torchscale==0.3.0 fairscale``; skipped when it is missing);
* positions: the official MAE sin-cos table and ``coords_to_pos``, re-implemented here;
* the whole model, every output variant: a float64 reference forward pass.

Nothing downloads: weights are random checkpoints in the official file format.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slide2vec_dask.encoders.aggregators import gigapath as gp
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.aggregators.longnet import (
    CenterCropped,
    dilated_attention,
    sincos_position_embedding,
    softmax_attention,
)
from slide2vec_dask.encoders.hub import WeightsUnavailableError
from slide2vec_dask.encoders.registry import get_preset, list_models
from slide2vec_dask.testing import checkpoints as ck

# Published, demo/run_gigapath.ipynb (prov-gigapath/prov-gigapath), output of
# load_tile_slide_encoder():  "segment_length:  [1024, 5792, 32768, 185363, 1048576]",
# "Number of trainable LongNet parameters:  85148160", "Slide encoder param # 86330880".
PUBLISHED_SEGMENTS = (1024, 5792, 32768, 185363, 1048576)
PUBLISHED_LONGNET_PARAMS = 85_148_160
PUBLISHED_PARAMS = 86_330_880
VARIANTS = ("cls", "mean", "last_layer_cls", "layer11_mean")
# a narrow twin of the published model: same depth, heads, dilations and segments, 64-d
SMALL = dict(in_dim=48, dim=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread is faster than two on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- independent references ------------------------------------------------------
def official_pos_rows(dim: int, ngrids: int, flat: np.ndarray) -> np.ndarray:
    """Rows ``flat`` of MAE's get_2d_sincos_pos_embed(dim, ngrids) (without the CLS row), float32."""
    grid_h = np.arange(ngrids, dtype=np.float32)
    grid_w = np.arange(ngrids, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)[:, flat]  # w first

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1).astype(np.float32)


def naive_dilated_attention(q, k, v, segments, dilations):
    """Softmax over the union of the branches' key sets, from LongNet's definition.

    Branch (s, r): segments of min(s, L) tokens (the last padded with zero tokens), each
    padded with zero tokens to a multiple of r; head group g of r attends, from the query
    tokens at offset = g (mod r), to the key slots at offset = g (mod r) of its segment.
    """
    length, heads, d = q.shape
    logits, values = [], []
    for seg, dil in zip(segments, dilations):
        s = min(seg, length)
        n = -(-length // s)
        slots = -(-s // dil) * dil
        assert n == 1 or s % dil == 0, "the official code misaligns this case; not modelled here"
        slot = torch.arange(slots)
        token = torch.arange(n)[:, None] * s + slot[None]                  # (n, slots)
        real = (slot[None] < s) & (token < length)
        keys = torch.where(real[..., None, None], k[token.clamp(max=length - 1)], 0.0)
        vals = torch.where(real[..., None, None], v[token.clamp(max=length - 1)], 0.0)
        p = torch.arange(length)
        group = torch.arange(heads) // (heads // dil)                       # head -> group
        query_in = (p % s)[:, None] % dil == group[None]                    # (L, H)
        slot_in = slot[:, None] % dil == group[None]                        # (slots, H)
        mask = query_in[:, None, :] & slot_in[None]                         # (L, slots, H)
        lg = torch.einsum("lhd,lshd->lsh", q, keys[p // s]) * d ** -0.5
        logits.append(lg.masked_fill(~mask, float("-inf")))
        values.append(vals[p // s])
    weights = torch.softmax(torch.cat(logits, 1), dim=1)
    return torch.einsum("lsh,lshd->lhd", weights, torch.cat(values, 1))


def reference_embeddings(state, features, coords_05, *, heads, segments, dilations, ngrids=1000,
                         dtype=torch.float64):
    """The official LongNetViT forward (eval) and its four readouts, from the state dict alone."""
    P = {k: v.to(dtype) for k, v in state.items()}

    def lin(x, name):
        return F.linear(x, P[name + ".weight"], P[name + ".bias"])

    def ln(x, name, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], P[name + ".weight"], P[name + ".bias"], eps)

    x = lin(features.to(dtype), "patch_embed.proj")
    cell = np.floor(coords_05 / 256.0).astype(np.int64)                       # official coords_to_pos
    pos = official_pos_rows(x.shape[-1], ngrids, cell[:, 0] * ngrids + cell[:, 1])
    x = torch.cat([P["cls_token"][0], x + torch.from_numpy(pos).to(dtype)])   # CLS position row is 0
    length, dim = x.shape
    states = [x]
    depth = 1 + max(int(k.split(".")[2]) for k in P if k.startswith("encoder.layers."))
    for i in range(depth):
        pre = f"encoder.layers.{i}."
        h = ln(x, pre + "self_attn_layer_norm")
        q, k, v = (lin(h, pre + f"self_attn.{n}_proj").view(length, heads, dim // heads) for n in "qkv")
        a = naive_dilated_attention(q, k, v, segments, dilations).reshape(length, dim)
        x = x + lin(ln(a, pre + "self_attn.inner_attn_ln"), pre + "self_attn.out_proj")
        h = F.gelu(lin(ln(x, pre + "final_layer_norm"), pre + "ffn.fc1"))
        x = x + lin(ln(h, pre + "ffn.ffn_layernorm"), pre + "ffn.fc2")
        states.append(x)
    final = ln(x, "encoder.layer_norm")

    def norm(t):
        return ln(t, "norm", 1e-6)

    out = {"cls": norm(final[0]), "mean": norm(final[1:].mean(0)), "last_layer_cls": norm(states[-1][0])}
    if depth >= 11:
        out["layer11_mean"] = norm(states[11][1:].mean(0))
    return out


def random_state(model, seed=0):
    """Every tensor random (LayerNorm weights near 1), so a mis-wired one shows."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in model.state_dict().items():
        noise = torch.randn(t.shape, generator=gen)
        if key.endswith("weight") and t.ndim == 1:
            state[key] = 1 + 0.1 * noise
        elif key.endswith("weight"):
            state[key] = noise / t.shape[1] ** 0.5
        else:
            state[key] = 0.1 * noise
    return state


def small_model(variant="cls", seed=0, **overrides):
    model = gp.create_architecture(variant, **{**SMALL, **overrides}).eval()
    state = random_state(model, seed)
    model.load_state_dict(state)
    return model, state


def tissue_grid(n_cols=9, n_rows=6, keep=0.8, seed=0):
    """Row-major (col, row) grid cells of a ragged tissue region."""
    rng = np.random.default_rng(seed)
    cells = [(c, r) for r in range(n_rows) for c in range(n_cols) if rng.random() < keep]
    return np.array(cells, dtype=np.int64) + np.array([3, 5])


# -- published numbers and the preset ---------------------------------------------
def test_published_parameter_count_and_segments_on_meta():
    with torch.device("meta"):
        model = gp.create_architecture()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS
    assert sum(p.numel() for p in model.encoder.parameters()) == PUBLISHED_LONGNET_PARAMS
    assert model.norm.normalized_shape == (768,)
    assert model.patch_embed.proj.in_features == 1536
    assert gp.official_segment_lengths() == PUBLISHED_SEGMENTS == gp.SEGMENT_LENGTHS
    assert model.encoder.layers[0].self_attn.segment_lengths == PUBLISHED_SEGMENTS
    assert model.encoder.layers[0].self_attn.dilations == (1, 2, 4, 8, 16)
    # LayerNorm eps: partial(nn.LayerNorm, eps=1e-6) for the model's norm, torchscale's 1e-5 inside
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 12 * 4 + 2 and model.norm.eps == 1e-6
    assert all(m.eps == 1e-5 for m in norms if m is not model.norm)


def test_preset_spec_chains_gigapath_tiles_at_256px_half_micron():
    assert "gigapath-slide" in list_models("slide")
    spec = get_preset("gigapath-slide")()
    plain = get_preset("gigapath")()
    assert isinstance(spec, AggregatorSpec) and spec.level == "slide" and spec.feature_dim == 768
    assert spec.latent_dim is None and spec.info["output_variant"] == "cls"
    tile = spec.tile_encoder
    # official pipeline: 256-px tiles at 0.5 µm/px, Resize(256) + CenterCrop(224), ImageNet stats
    assert (tile.name, tile.feature_dim, tile.tile_size_px, tile.spacing_um) == ("gigapath", 1536, 256, 0.5)
    assert (spec.tile_size_px, spec.spacing_um) == (256, 0.5)
    assert (tile.mean, tile.std) == (plain.mean, plain.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert tile.build == gp.CenterCropBuilder(plain.build, 224)
    assert tile.key != plain.key
    # deterministic keys (workers share a module), distinct per variant and weights
    again = get_preset("gigapath-slide")()
    assert spec.key == again.key and spec.tile_encoder.key == again.tile_encoder.key
    keys = {get_preset("gigapath-slide")(output_variant=v).key for v in VARIANTS}
    assert len(keys) == len(VARIANTS)
    assert pickle.loads(pickle.dumps(spec)).key == spec.key


def test_preset_options_and_their_errors(tmp_path):
    tile_ckpt = tmp_path / "pytorch_model.bin"
    torch.save({}, tile_ckpt)
    slide_ckpt = tmp_path / "slide_encoder.pth"
    torch.save({"model": {}}, slide_ckpt)
    spec = get_preset("gigapath-slide")(checkpoint_path=slide_ckpt, output_variant="mean",
                                        tile_checkpoint_path=tile_ckpt)
    assert spec.info["checkpoint_path"] == str(slide_ckpt.resolve())
    assert spec.tile_encoder.info["checkpoint_path"] == str(tile_ckpt.resolve())
    assert spec.build == gp.GigaPathSlideBuilder("mean", str(slide_ckpt.resolve()))
    assert spec.key != get_preset("gigapath-slide")(output_variant="mean").key
    with pytest.raises(ValueError, match=r"no output_variant 'pooled'.*'cls', 'mean', 'last_layer_cls'"):
        get_preset("gigapath-slide")(output_variant="pooled")
    with pytest.raises(FileNotFoundError, match="gigapath-slide"):
        get_preset("gigapath-slide")(checkpoint_path=tmp_path / "missing.pth")


def test_center_crop_is_torchvisions(tmp_path):
    from torchvision.transforms.functional import center_crop

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.flatten(1)[:, :5]

    x = torch.randn(2, 3, 256, 256)
    module = CenterCropped(Recorder(), 224)
    assert module(x).shape == (2, 5)
    assert torch.equal(seen[0], center_crop(x, [224, 224]))
    with pytest.raises(ValueError, match="smaller than the 224-px centre crop"):
        module(torch.randn(1, 3, 200, 200))


def test_offline_without_weights_says_what_to_do(offline_hf):
    spec = get_preset("gigapath-slide")()
    with pytest.raises(WeightsUnavailableError) as info:
        spec.build()
    msg = str(info.value)
    for part in ("preset 'gigapath-slide'", "prov-gigapath/prov-gigapath", "slide_encoder.pth",
                 "HF_HUB_OFFLINE=1", "checkpoint_path="):
        assert part in msg, (part, msg)


def test_wrong_checkpoint_is_refused_by_key(tmp_path):
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": {"decoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"missing 247 key\(s\).*unexpected 1 key\(s\), e.g. \['decoder.weight'\]"):
        get_preset("gigapath-slide")(checkpoint_path=path).build()


# -- dilated attention ---------------------------------------------------------------
@pytest.mark.parametrize("length, heads, d, segments, dilations", [
    (37, 16, 4, PUBLISHED_SEGMENTS, (1, 2, 4, 8, 16)),  # one segment, groups padded with zero tokens
    (50, 8, 4, (8, 16, 64), (1, 2, 4)),                 # several segments, sequence padded
    (23, 4, 3, (4, 6, 1000), (1, 2, 4)),                # segments and groups padded
])
def test_dilated_attention_equals_naive_union_softmax(length, heads, d, segments, dilations):
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(length, heads, d, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    ours = dilated_attention(q[None], k[None], v[None], segments, dilations)[0]
    ref = naive_dilated_attention(q, k, v, segments, dilations)
    torch.testing.assert_close(ours.double(), ref, atol=2e-6, rtol=1e-5)


def test_one_dense_branch_is_sdpa_and_duplicated_branches_change_nothing():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 70, 8, 16, generator=gen) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(dilated_attention(q, k, v, (4096,), (1,)), sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dilated_attention(q, k, v, (4096, 70), (1, 1)), sdpa, atol=1e-5, rtol=1e-5)


def test_softmax_attention_chunks_are_exact():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, 33, 8, generator=gen) for _ in range(3))
    whole_out, whole_lse = softmax_attention(q, k, v, 0.3)
    scores = q @ k.transpose(1, 2) * 0.3
    torch.testing.assert_close(whole_lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(whole_out, torch.softmax(scores, -1) @ v)
    for budget in (1, 40, 33 * 33 * 2 + 5):   # query chunks, one group at a time; several groups
        out, lse = softmax_attention(q, k, v, 0.3, max_scores=budget)
        torch.testing.assert_close(out, whole_out)
        torch.testing.assert_close(lse, whole_lse)


# -- positions -----------------------------------------------------------------------
@pytest.mark.parametrize("dim", [64, 768])
def test_position_embedding_is_the_official_table(dim):
    grid = torch.tensor([[0, 0], [0, 1], [1, 0], [7, 3], [999, 998], [512, 17]])
    flat = (grid[:, 0] * 1000 + grid[:, 1]).numpy()
    ref = official_pos_rows(dim, 1000, flat)
    torch.testing.assert_close(sincos_position_embedding(grid, dim), torch.from_numpy(ref), atol=1e-6, rtol=0)


def test_coordinates_are_tile_grid_cells_at_any_level0_resolution():
    model, _ = small_model()
    cells = torch.from_numpy(tissue_grid())
    feats = torch.randn(len(cells), SMALL["in_dim"], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        at_05 = model.encode_slide(feats, cells * 256, 256).embedding      # a 0.5 µm/px scan
        at_025 = model.encode_slide(feats, cells * 512, 512).embedding     # a 0.25 µm/px scan
        drift = model.encode_slide(feats, torch.round(cells * 511.6).long(), 512).embedding  # downsample 3.9984
        swapped = model.encode_slide(feats, cells[[1, 0, *range(2, len(cells))]] * 256, 256).embedding
    assert at_05.shape == (64,) and at_05.dtype == torch.float32
    torch.testing.assert_close(at_05, at_025, rtol=0, atol=0)
    torch.testing.assert_close(at_05, drift, rtol=0, atol=0)
    assert not torch.allclose(at_05, swapped, atol=1e-3)   # positions are used


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_autocast_stays_close_to_fp32(dtype):
    # the runtime's GPU default (fp16 autocast, as the official pipeline); attention itself runs in fp32
    model, _ = small_model("mean")
    cells = torch.from_numpy(tissue_grid(seed=10))
    feats = torch.randn(len(cells), SMALL["in_dim"], generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        ref = model.encode_slide(feats, cells * 256, 256).embedding
        with torch.autocast("cpu", dtype=dtype):
            half = model.encode_slide(feats, cells * 256, 256).embedding
    assert half.dtype == torch.float32
    assert F.cosine_similarity(half, ref, dim=0) > 0.9999


def test_encode_slide_refuses_bad_inputs():
    model, _ = small_model()
    feats = torch.randn(2, SMALL["in_dim"])
    with pytest.raises(ValueError, match="spans 1001 tiles along an axis; the model's positions cover 1000"):
        model.encode_slide(feats, torch.tensor([[0, 0], [1000 * 256, 0]]), 256)
    with pytest.raises(ValueError, match="non-negative"):
        model.encode_slide(feats, torch.tensor([[0, -256], [0, 0]]), 256)
    with pytest.raises(ValueError, match="at least one tile"):
        model.encode_slide(feats[:0], torch.zeros(0, 2, dtype=torch.long), 256)
    with pytest.raises(ValueError, match="48-d"):
        model.encode_slide(torch.randn(2, 47), torch.zeros(2, 2, dtype=torch.long), 256)
    with pytest.raises(ValueError, match=r"\(N, 2\) coords"):
        model.encode_slide(feats, torch.zeros(3, 2, dtype=torch.long), 256)
    with pytest.raises(ValueError, match="tile_size_lv0 must be positive"):
        model.encode_slide(feats, torch.zeros(2, 2, dtype=torch.long), 0)


# -- whole model ---------------------------------------------------------------------
@pytest.mark.parametrize("segments, dilations", [(PUBLISHED_SEGMENTS, (1, 2, 4, 8, 16)),
                                                 ((8, 16, 64), (1, 2, 4))])
def test_every_variant_matches_the_reference_forward(segments, dilations):
    cells = tissue_grid(seed=4)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(len(cells), SMALL["in_dim"], generator=gen)
    coords = torch.from_numpy(cells * 512)  # level 0 at 0.25 µm/px: 512 px per 256-px tile at 0.5 µm/px
    _, state = small_model(segment_lengths=segments, dilations=dilations)
    ref = reference_embeddings(state, feats, cells * 256.0, heads=16, segments=segments, dilations=dilations)
    assert set(ref) == set(VARIANTS)
    for variant in VARIANTS:
        model, _ = small_model(variant, segment_lengths=segments, dilations=dilations)
        with torch.inference_mode():
            ours = model.encode_slide(feats, coords, 512).embedding
        torch.testing.assert_close(ours.double(), ref[variant], atol=2e-5, rtol=2e-5, msg=variant)
    assert not torch.allclose(ref["cls"], ref["mean"]) and not torch.allclose(ref["cls"], ref["last_layer_cls"])


def test_layer_stack_and_keys_match_torchscale():
    pytest.importorskip("fairscale")
    pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig
    from torchscale.architecture.encoder import Encoder

    # official key names: torchscale's Encoder for LongNet_12_layers_768_dim, under "encoder."
    config = dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=16)
    with torch.device("meta"):
        official = Encoder(EncoderConfig(**config)).state_dict()
        ours = gp.create_architecture().state_dict()
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "norm.weight", "norm.bias",
                *(f"encoder.{k}" for k in official)}
    assert set(ours) == expected
    assert all(tuple(ours[f"encoder.{k}"].shape) == tuple(v.shape) for k, v in official.items())

    # numerics: with one dense branch, dilated attention is torchscale's (dense) attention
    model, state = small_model(segment_lengths=(1 << 20,), dilations=(1,))
    ts = Encoder(EncoderConfig(**{**config, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 256})).eval()
    ts.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}, strict=True)
    cells = tissue_grid(seed=6)
    feats = torch.randn(len(cells), SMALL["in_dim"], generator=torch.Generator().manual_seed(7))
    x = F.linear(feats, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"])
    x = x + torch.from_numpy(official_pos_rows(64, 1000, cells[:, 0] * 1000 + cells[:, 1]))
    x = torch.cat([state["cls_token"][0], x])[None]
    with torch.inference_mode():
        out = ts(src_tokens=None, token_embeddings=x, return_all_hiddens=True)

        def norm(t):
            return F.layer_norm(t, (64,), state["norm.weight"], state["norm.bias"], 1e-6)

        expected = {"cls": norm(out["encoder_out"][0, 0]), "mean": norm(out["encoder_out"][0, 1:].mean(0)),
                    "last_layer_cls": norm(out["encoder_states"][-1][0, 0]),
                    "layer11_mean": norm(out["encoder_states"][11][0, 1:].mean(0))}
        for variant in VARIANTS:
            model.readout = type(model.readout)(*gp.OUTPUT_VARIANTS[variant])
            got = model.encode_slide(feats, torch.from_numpy(cells * 256), 256).embedding
            torch.testing.assert_close(got, expected[variant], atol=5e-5, rtol=5e-5, msg=variant)


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    return ck.gigapath_slide_checkpoint(tmp_path_factory.mktemp("gigapath") / "slide_encoder.pth", seed=3)


def test_random_official_checkpoint_loads_through_the_preset(official_checkpoint):
    raw = torch.load(official_checkpoint, map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]  # the official create_model reads torch.load(path)["model"]
    state = raw["model"]
    with torch.device("meta"):
        meta = gp.create_architecture().state_dict()
    assert list(state) == list(meta) and all(state[k].shape == meta[k].shape for k in meta)
    assert sum(t.numel() for t in state.values()) == PUBLISHED_PARAMS

    spec = get_preset("gigapath-slide")(checkpoint_path=official_checkpoint)
    module = spec.build()
    assert module.readout == (None, True, "cls") and not module.training
    cells = tissue_grid(n_cols=7, n_rows=5, seed=8)
    feats = torch.randn(len(cells), 1536, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        enc = module.encode_slide(feats, torch.from_numpy(cells * 512), 512)
    assert enc.latents is None and enc.embedding.shape == (768,)
    ref = reference_embeddings(state, feats, cells * 256.0, heads=16, segments=PUBLISHED_SEGMENTS,
                               dilations=(1, 2, 4, 8, 16), dtype=torch.float32)
    torch.testing.assert_close(enc.embedding, ref["cls"], atol=2e-4, rtol=2e-4)
    # LayerNorms are random too (not ones/zeros), so a swapped LayerNorm key would show
    assert not torch.equal(state["encoder.layers.3.ffn.ffn_layernorm.weight"], torch.ones(3072))
    assert state["encoder.layers.3.ffn.ffn_layernorm.weight"].mean().item() == pytest.approx(1, abs=0.02)


def test_builder_is_picklable_and_equal_by_value(official_checkpoint):
    builder = gp.GigaPathSlideBuilder("layer11_mean", str(official_checkpoint))
    clone = pickle.loads(pickle.dumps(builder))
    assert clone == builder and dataclasses.is_dataclass(clone)
    assert clone().readout == (11, False, "mean")


def test_weights_load_from_an_offline_hub_cache(official_checkpoint, offline_hf):
    ck.fill_hf_cache(offline_hf, "prov-gigapath/prov-gigapath", "slide_encoder.pth", official_checkpoint, link=True)
    cached = get_preset("gigapath-slide")().build()
    state = torch.load(official_checkpoint, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(v, state[k]) for k, v in cached.state_dict().items())
