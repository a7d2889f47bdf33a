"""TITAN (slide) and CONCH v1.5 (its tile encoder): published sizes, the official grid / ALiBi /
pooling recipe against independent re-derivations, and weight loading through the real paths.

Nothing is downloaded: weights are random checkpoints in the hub's key layout, written here.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slide2vec_dask.encoders.aggregators import titan as T
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.hub import WeightsUnavailableError
from slide2vec_dask.encoders.preset_builder import PresetBuilder
from slide2vec_dask.encoders.presets import get_tile_preset
from slide2vec_dask.encoders.registry import get_preset, list_models
from slide2vec_dask.tiling.grid import choose_level
from slide2vec_dask.testing import checkpoints as ck

# TITAN's vision tower, from vision_config of MahmoodLab/TITAN's config.json (6 x 768, 12 heads,
# MLP patch embed 768 -> 768, CoCa poolers of 128 and 1 queries, proj 768 x 768): 48,539,904.
# Cross-check with a published number: LazySlide's model registry gives TITAN (vision + text, the
# whole hub model) param_size "158.9M" = 48,539,904 + 110,327,040 (open_clip text tower of
# text_config) = 158,866,944.
TITAN_VISION_PARAMS = 48_539_904
TITAN_TOTAL_PARAMS = 158_866_944
# CONCH v1.5: no parameter count is published on its card; its trunk is a ViT-L/16 with LayerScale,
# whose published count is UNI's 303.35M (303,350,784, as asserted in test_presets.py), plus the
# attentional pooler (query 768, ln_k 2 x 1024, ln_q 2 x 768, to_q 768^2, to_kv 1536 x 1024,
# to_out 768^2 = 2,756,864) and ln_contrast (1,536), all from conch_config.
VIT_L16_PARAMS = 303_350_784
CONCH_V15_PARAMS = VIT_L16_PARAMS + 2_756_864 + 1_536
# ALiBi slopes for 12 heads, by hand: 2^-1 ... 2^-8, then every other slope of 16 heads (2^-0.5k).
SLOPES_12 = [2.0**-k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(4)]


@pytest.fixture(scope="module")
def titan_file(tmp_path_factory):
    return ck.titan_checkpoint(tmp_path_factory.mktemp("titan"), seed=0)


@pytest.fixture(scope="module")
def titan_state(titan_file):
    from safetensors.torch import load_file

    return load_file(str(titan_file))


@pytest.fixture(scope="module")
def encoder(titan_file):
    return T.TitanBuilder(str(titan_file))()


# -- published sizes -------------------------------------------------------------------
def test_published_parameter_counts_on_meta():
    with torch.device("meta"):
        vision = T.TitanSlideEncoder()
        conch = get_tile_preset("conchv15").create_architecture()
        conch_run = get_tile_preset("conchv15").create_architecture(runtime=True)
    assert sum(p.numel() for p in vision.parameters()) == TITAN_VISION_PARAMS
    text = sum(math.prod(s) for s in ck._titan_text_shapes().values())
    assert TITAN_VISION_PARAMS + text == TITAN_TOTAL_PARAMS and round(TITAN_TOTAL_PARAMS / 1e6, 1) == 158.9
    assert sum(p.numel() for p in conch.parameters()) == CONCH_V15_PARAMS
    assert sum(p.numel() for p in conch.trunk.parameters()) == VIT_L16_PARAMS
    # published on a 14 x 14 grid, run on 28 x 28 (448 px)
    assert conch.trunk.pos_embed.shape == (1, 1 + 14 * 14, 1024)
    assert conch_run.trunk.pos_embed.shape == (1, 1 + 28 * 28, 1024)
    with torch.device("meta"), torch.no_grad():
        assert conch_run(torch.empty(2, 3, 448, 448)).shape == (2, 768)


def test_random_checkpoint_has_the_official_layout(titan_state):
    assert sum(v.numel() for v in titan_state.values()) == TITAN_TOTAL_PARAMS
    assert {k.split(".", 1)[0] for k in titan_state} == {"vision_encoder", "text_encoder"}
    for key in ("vision_encoder.blocks.modules_list.5.attn.qkv.weight", "vision_encoder.patch_embed.0.weight",
                "vision_encoder.attn_pool.attn.in_proj_weight", "vision_encoder.attn_pool_contrastive.query",
                "vision_encoder.proj", "text_encoder.cls_emb"):
        assert key in titan_state
    assert titan_state["vision_encoder.attn_pool.query"].shape == (128, 768)
    assert titan_state["vision_encoder.attn_pool_contrastive.query"].shape == (1, 768)
    assert not any("pos_embed" in k for k in titan_state if k.startswith("vision_encoder."))  # ALiBi only


# -- grid placement ------------------------------------------------------------------------
def test_alibi_slopes_match_the_closed_form():
    assert T.alibi_slopes(12) == pytest.approx(SLOPES_12, rel=1e-15)
    assert T.alibi_slopes(8) == [2.0**-k for k in range(1, 9)]
    assert T.alibi_slopes(16) == pytest.approx([2.0 ** (-0.5 * k) for k in range(1, 17)], rel=1e-15)


def test_grid_cells_match_coordinates_computed_by_hand():
    p = 512
    coords = torch.tensor([[1536, 1024], [512, 0], [512, 512], [2148, 1324]])
    # offset (512, 0); cells floor((x - 512) / 512), floor(y / 512)
    cells, shape = T.tile_cells(coords, p)
    assert cells.tolist() == [[2, 2], [0, 0], [0, 1], [3, 2]] and shape == (4, 3)
    feats = torch.arange(4 * 3, dtype=torch.float32).view(4, 3) + 1
    tokens, kept = T.grid_tokens(feats, coords, p)
    # x-major order: cell index gx * 3 + gy = 8, 0, 1, 11 -> tiles 1, 2, 0, 3
    assert kept.tolist() == [[0, 0], [0, 1], [2, 2], [3, 2]]
    assert torch.equal(tokens, feats[[1, 2, 0, 3]])


def test_grid_sums_shared_cells_and_drops_all_zero_cells():
    p = 512
    coords = torch.tensor([[0, 0], [100, 200], [512, 0], [0, 512], [512, 512], [600, 600]])
    feats = torch.tensor([[1.0, 2.0], [10.0, 20.0], [0.0, 0.0], [3.0, -1.0], [5.0, 5.0], [-5.0, -5.0]])
    tokens, cells = T.grid_tokens(feats, coords, p)
    # (0,0): tiles 0 + 1 summed; (1,0): an all-zero tile is background; (1,1): 5 - 5 = 0, background too
    assert cells.tolist() == [[0, 0], [0, 1]]
    assert tokens.tolist() == [[11.0, 22.0], [3.0, -1.0]]


def dense_reference_grid(features, coords, p):
    """TITAN's preprocess_features as an algorithm: dense zero grid, index_add_, mask = any nonzero."""
    g = torch.floor_divide(coords - coords.min(0).values, p)
    nx, ny = (g.max(0).values + 1).tolist()
    grid = torch.zeros(nx, ny, features.shape[1])
    grid.view(-1, features.shape[1]).index_add_(0, g[:, 0] * ny + g[:, 1], features)
    grid = grid.permute(2, 0, 1)
    mask = (grid != 0).any(0)
    xs, ys = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    return grid.flatten(1).T[mask.flatten()], np.stack([xs[mask.numpy()], ys[mask.numpy()]], axis=1)


def reference_bias(points, slopes):
    """TITAN's get_alibi: float64 Euclidean distances, float32 ``dist * slope * -1``, zero CLS row/column."""
    d = np.sqrt((((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)))
    n = len(points)
    bias = torch.zeros(len(slopes), n + 1, n + 1)
    bias[:, 1:, 1:] = torch.tensor(d, dtype=torch.float32) * torch.tensor(slopes).view(-1, 1, 1) * -1
    return bias


def sparse_slide(seed=0, n=60, p=1024, zero=3):
    """Tiles on a ragged 40x slide grid (holes, an off-grid origin), one all-zero feature."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(9 * 11, generator=g)[:n]
    coords = torch.stack([cells % 9, cells // 9], 1) * p + torch.tensor([3 * p + 17, 5 * p + 250])
    coords = coords[torch.argsort(coords[:, 1] * 10**6 + coords[:, 0])]  # row-major, as the tiler gives
    feats = torch.randn(n, 768, generator=g)
    feats[zero] = 0
    return feats, coords, p


def test_grid_tokens_match_the_dense_official_grid():
    feats, coords, p = sparse_slide()
    tokens, cells = T.grid_tokens(feats, coords, p)
    ref_tokens, ref_points = dense_reference_grid(feats, coords, p)
    assert len(tokens) == len(feats) - 1
    assert torch.equal(tokens, ref_tokens) and cells.tolist() == ref_points.tolist()


def test_alibi_bias_matches_a_naive_formula():
    cells = torch.tensor([[0, 0], [0, 3], [2, 1], [5, 4], [1, 1]])
    slopes = torch.tensor(SLOPES_12)
    full = T.alibi_bias_rows(cells, slice(0, 6), slopes, torch.float32)
    naive = torch.zeros(12, 6, 6)
    for h in range(12):
        for i in range(1, 6):
            for j in range(1, 6):
                naive[h, i, j] = -SLOPES_12[h] * math.dist(cells[i - 1].tolist(), cells[j - 1].tolist())
    torch.testing.assert_close(full, naive, rtol=1e-6, atol=0)
    torch.testing.assert_close(full, reference_bias(cells.numpy(), SLOPES_12), rtol=0, atol=0)
    blocks = [T.alibi_bias_rows(cells, slice(s, s + 2), slopes, torch.float32) for s in range(0, 6, 2)]
    assert torch.equal(torch.cat(blocks, dim=1), full)


# -- the forward pass against a dense re-derivation -----------------------------------------
def reference_titan(sd, tokens, bias):
    """TITAN's forward written out with explicit dense softmax attention, from the raw tensors."""
    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    x = torch.cat([sd["cls_token"][0], F.gelu(lin(tokens, "patch_embed.0"))])
    n = len(x)
    for i in range(6):
        p = f"blocks.modules_list.{i}."
        q, k, v = lin(ln(x, p + "norm1", 1e-6), p + "attn.qkv").view(n, 3, 12, 64).permute(1, 2, 0, 3)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0 + bias, dim=-1) @ v
        x = x + lin(att.transpose(0, 1).reshape(n, 768), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    x = ln(x, "norm", 1e-6)

    def pool(prefix):
        q, kv = ln(sd[prefix + "query"], prefix + "ln_q", 1e-5), ln(x, prefix + "ln_k", 1e-5)
        w, b = sd[prefix + "attn.in_proj_weight"].split(768), sd[prefix + "attn.in_proj_bias"].split(768)
        qq, kk, vv = (t @ wi.T + bi for t, wi, bi in zip((q, kv, kv), w, b))
        heads = [torch.softmax(qq[:, h] @ kk[:, h].T / math.sqrt(96), -1) @ vv[:, h]
                 for h in (slice(96 * i, 96 * (i + 1)) for i in range(8))]
        return torch.cat(heads, dim=1) @ sd[prefix + "attn.out_proj.weight"].T + sd[prefix + "attn.out_proj.bias"]

    return pool("attn_pool_contrastive.")[0], pool("attn_pool.")


def test_encoding_matches_a_dense_reference(encoder, titan_state):
    feats, coords, p = sparse_slide(seed=1, n=48)
    sd = T.vision_state_dict(titan_state, "test")
    tokens, points = dense_reference_grid(feats, coords, p)
    want, want_latents = reference_titan(sd, tokens, reference_bias(points, SLOPES_12))
    encoder.max_bias_elements = 12 * 49 * 7  # attention over 7-row query blocks
    try:
        with torch.inference_mode():
            got = encoder.encode_slide(feats, coords, p)
            shuffled = torch.randperm(len(feats), generator=torch.Generator().manual_seed(2))
            again = encoder.encode_slide(feats[shuffled], coords[shuffled], p)
    finally:
        encoder.max_bias_elements = T.MAX_BIAS_ELEMENTS
    assert got.embedding.shape == (768,) and got.embedding.dtype == torch.float32
    assert got.latents.shape == (128, 768)
    torch.testing.assert_close(got.embedding, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.latents, want_latents, rtol=1e-4, atol=1e-4)
    # tokens follow the grid, not the input order
    torch.testing.assert_close(again.embedding, got.embedding, rtol=1e-5, atol=1e-5)
    # the grid unit is tile_size_lv0: twice the stride puts neighbours in one cell and changes the result
    with torch.inference_mode():
        coarse = encoder.encode_slide(feats, coords, 2 * p)
    assert not torch.allclose(coarse.embedding, got.embedding, atol=1e-3)


def test_proj_variant_is_the_embedding_times_proj(titan_file, encoder, titan_state):
    feats, coords, p = sparse_slide(seed=3, n=20)
    proj = T.TitanBuilder(str(titan_file), "proj")()
    with torch.inference_mode():
        base = encoder.encode_slide(feats, coords, p).embedding
        got = proj.encode_slide(feats, coords, p).embedding
    torch.testing.assert_close(got, base @ titan_state["vision_encoder.proj"], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused(encoder):
    with pytest.raises(ValueError, match="at least one tile"):
        encoder.encode_slide(torch.zeros(0, 768), torch.zeros(0, 2, dtype=torch.long), 512)
    with pytest.raises(ValueError, match="all zero"):
        encoder.encode_slide(torch.zeros(3, 768), torch.tensor([[0, 0], [512, 0], [0, 512]]), 512)
    with pytest.raises(ValueError, match="coords"):
        encoder.encode_slide(torch.ones(3, 768), torch.zeros(2, 2, dtype=torch.long), 512)
    with pytest.raises(ValueError, match="tile_size_lv0"):
        encoder.encode_slide(torch.ones(1, 768), torch.zeros(1, 2, dtype=torch.long), 0)


# -- weights ----------------------------------------------------------------------------------
def test_loads_the_vision_subset_strictly(encoder, titan_state):
    own = encoder.state_dict()
    assert set(own) == {k[len("vision_encoder."):] for k in titan_state if k.startswith("vision_encoder.")}
    assert all(torch.equal(v, titan_state["vision_encoder." + k]) for k, v in own.items())
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])


def test_checkpoint_mismatches_are_named(monkeypatch, titan_state, tmp_path):
    path = tmp_path / "model.safetensors"
    path.touch()

    def load_with(state):
        monkeypatch.setattr(T, "read_state_dict", lambda p, what: state)
        return T.TitanBuilder(str(path))()

    missing = {k: v for k, v in titan_state.items() if k != "vision_encoder.proj"}
    with pytest.raises(ValueError, match=r"missing 1 key.*'proj'"):
        load_with(missing)
    with pytest.raises(ValueError, match=r"unexpected 1 key.*'pos_embed'"):
        load_with({**titan_state, "vision_encoder.pos_embed": torch.zeros(1, 197, 768)})
    with pytest.raises(ValueError, match="no vision_encoder"):
        load_with({k: v for k, v in titan_state.items() if k.startswith("text_encoder.")})
    bare = {k[len("vision_encoder."):]: v for k, v in titan_state.items() if k.startswith("vision_encoder.")}
    assert isinstance(load_with(bare), T.TitanSlideEncoder)  # an extracted vision state dict loads as is


def test_offline_hub_raises_weights_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsUnavailableError, match=r"model.safetensors.*MahmoodLab/TITAN"):
        get_preset("titan")().build()
    with pytest.raises(WeightsUnavailableError, match=r"conch_v1_5_pytorch_model.bin.*MahmoodLab/TITAN"):
        get_preset("conchv15")().build()


# -- the preset ---------------------------------------------------------------------------------
def test_spec_chains_conch_v15_at_the_official_tile_recipe():
    spec = get_preset("titan")()
    assert isinstance(spec, AggregatorSpec) and spec.level == "slide" and "titan" in list_models("slide")
    assert (spec.feature_dim, spec.latent_dim, spec.default_precision) == (768, 768, "fp16")
    tile = spec.tile_encoder
    assert tile.name == "conchv15" and tile.feature_dim == 768 and "conchv15" in list_models("tile")
    assert tile.mean == (0.485, 0.456, 0.406) and spec.tile_size_px == 448
    assert spec.spacing_um == pytest.approx(0.5 * 512 / 448)
    # 512 px at 20x, resized to 448: read at the 0.5 µm level of a 40x pyramid, 1024 level-0 px per tile
    choice = choose_level([0.25, 0.5, 1.0], [1.0, 2.0, 4.0], spec.spacing_um, spec.tile_size_px, 0.05)
    assert (choice.level, choice.read_tile_size_px, choice.tile_size_lv0) == (1, 512, 1024)
    key = lambda **kw: get_preset("titan")(**kw).key  # noqa: E731
    assert key() == key(output_variant="default") != key(output_variant="proj")
    assert pickle.loads(pickle.dumps(spec.build)) == spec.build
    with pytest.raises(ValueError, match="no output_variant 'cls'"):
        get_preset("titan")(output_variant="cls")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        get_preset("titan")(checkpoint_path="/nonexistent/model.safetensors")


# -- CONCH v1.5 -----------------------------------------------------------------------------------
def reference_conch_v15(state, image, depth):
    """TITAN's conch_v1_5 forward: 224-grid trunk, interpolate_pos_encoding at run time, einsum pooler."""
    import timm

    trunk = timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-6,
                              num_classes=0, depth=depth)
    trunk.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("trunk.")})
    trunk.eval()
    x = trunk.patch_embed.proj(image).flatten(2).transpose(1, 2)  # the conv, at any input size
    pos = trunk.pos_embed
    side, grid = 14, image.shape[-2] // 16
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2),
                              scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), mode="bicubic")
    assert patch_pos.shape[-2:] == (grid, grid)
    pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    x = torch.cat([trunk.cls_token.expand(len(x), -1, -1), x], dim=1) + pos
    x = trunk.norm(trunk.blocks(x))

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], state[name + ".weight"], state[name + ".bias"])

    q = ln(state["attn_pool_contrast.query"], "attn_pool_contrast.ln_q") @ state["attn_pool_contrast.to_q.weight"].T
    k, v = (ln(x, "attn_pool_contrast.ln_k") @ state["attn_pool_contrast.to_kv.weight"].T).chunk(2, dim=-1)
    q, k, v = q.view(1, 8, 96), k.view(len(x), -1, 8, 96), v.view(len(x), -1, 8, 96)
    sim = torch.einsum("qhd,bkhd->bhqk", q, k) * 96**-0.5
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(len(x), 1, 768) @ state["attn_pool_contrast.to_out.weight"].T
    return ln(out[:, 0], "ln_contrast")


def test_conch_v15_loads_the_official_layout_and_matches_the_official_forward(tmp_path):
    path = ck.conchv15_checkpoint(tmp_path / "conch_v1_5_pytorch_model.bin", seed=0, depth=1)
    state = torch.load(path, weights_only=True)
    assert state["trunk.pos_embed"].shape == (1, 197, 1024)
    assert state["attn_pool_contrast.to_kv.weight"].shape == (1536, 1024)
    preset = get_tile_preset("conchv15").with_kwargs(depth=1)
    model = PresetBuilder(preset, "default", str(path))()
    image = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(image)
        want = reference_conch_v15(state, image, depth=1)
    assert got.shape == (2, 768)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a checkpoint already on the run-time grid loads unchanged
    resaved = tmp_path / "runtime_grid.bin"
    torch.save(model.state_dict(), resaved)
    again = PresetBuilder(preset, "default", str(resaved))()
    assert torch.equal(again.trunk.pos_embed, model.trunk.pos_embed)
    broken = tmp_path / "broken.bin"
    torch.save({k: v for k, v in state.items() if not k.startswith("ln_contrast.")}, broken)
    with pytest.raises(ValueError, match=r"missing 2 key.*ln_contrast"):
        PresetBuilder(preset, "default", str(broken))()


def test_weights_load_from_an_offline_hub_cache(titan_file, encoder, offline_hf):
    ck.fill_hf_cache(offline_hf, "MahmoodLab/TITAN", "model.safetensors", titan_file, link=True)
    cached = get_preset("titan")().build()  # no checkpoint_path: the hub cache, offline
    own = encoder.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in cached.state_dict().items())
