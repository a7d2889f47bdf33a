"""MOOZY presets: ``moozy-slide`` (slide encoder) and ``moozy`` (case transformer).

Nothing downloads: parameter counts are taken on the ``meta`` device and the
weights are random stand-ins for ``moozy.pt`` in its official layout.  The
modules are checked against a naive float64 re-derivation of the published
forward pass (``moozy/models/moozy_slide_encoder.py``, ``case_transformer.py``)
and against grid placements and token caps worked out by hand.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from slide2vec_dask.encoders.aggregators import moozy as mz
from slide2vec_dask.encoders.aggregators._moozy_nn import (
    alibi_slopes,
    grid_tokens,
    token_cap_for_memory,
    vram_token_cap,
)
from slide2vec_dask.encoders.hub import WeightsUnavailableError
from slide2vec_dask.encoders.registry import get_preset, list_models
from slide2vec_dask.testing import checkpoints as ck

STEP = 448  # level-0 tile size of 224 px tiles at 0.5 µm/px on a 0.25 µm/px scan


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return ck.moozy_checkpoint(tmp_path_factory.mktemp("moozy") / "moozy.pt", seed=0)


@pytest.fixture(scope="module")
def slide_encoder(checkpoint):
    return get_preset("moozy-slide")(checkpoint_path=checkpoint).build()


@pytest.fixture(scope="module")
def case_transformer(checkpoint):
    return get_preset("moozy")(checkpoint_path=checkpoint).build()


@pytest.fixture(scope="module")
def small_variant(tmp_path_factory):
    """A 2-layer file with every optional part on (qk-norm, registers, learnable ALiBi, LayerScale)."""
    return ck.moozy_checkpoint(
        tmp_path_factory.mktemp("moozy_small") / "moozy.pt", seed=3,
        slide_config=dict(n_layers=2, qk_norm=True, num_registers=2, learnable_alibi=True, layerscale_enabled=True),
        case_config=dict(num_layers=1, qk_norm=True, num_registers=3))


def layout(seed=0, rows=5, cols=6, holes=7, origin=(10000, 2240), step=STEP):
    """Tiles on a grid with holes, in row-major order: (features, coords)."""
    rng = np.random.default_rng(seed)
    cells = sorted(rng.choice(rows * cols, rows * cols - holes, replace=False))
    coords = np.array([[origin[0] + (c % cols) * step, origin[1] + (c // cols) * step] for c in cells], np.int64)
    feats = rng.standard_normal((len(cells), 384)).astype(np.float32)
    return torch.from_numpy(feats), torch.from_numpy(coords)


def embed(module, feats, coords, step=STEP):
    with torch.inference_mode():
        return module.encode_slide(feats, coords, step).embedding


# -- independent naive forward (float64) ---------------------------------------------------
def _ln(x, sd, p, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[p + "weight"] + sd[p + "bias"]


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _block(x, sd, p, heads, bias):
    n, d = x.shape
    hd = d // heads
    h = _ln(x, sd, p + "norm1.")
    q, k, v = ((h @ sd[p + f"{w}_proj.weight"].T + sd[p + f"{w}_proj.bias"]).reshape(n, heads, hd).transpose(0, 1)
               for w in "qkv")
    if p + "q_norm.weight" in sd:
        q, k = _ln(q, sd, p + "q_norm."), _ln(k, sd, p + "k_norm.")
    scores = q @ k.transpose(1, 2) / math.sqrt(hd) + (0 if bias is None else bias)
    o = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(n, d)
    o = o @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]
    x = x + o * sd.get(p + "ls_attn.gamma", 1)
    m = _gelu(_ln(x, sd, p + "norm2.") @ sd[p + "fc1.weight"].T + sd[p + "fc1.bias"])
    m = m @ sd[p + "fc2.weight"].T + sd[p + "fc2.bias"]
    return x + m * sd.get(p + "ls_mlp.gamma", 1)


def naive_slide(sd, feats, coords, step, heads=12, slopes=None):
    """CLS output with tokens sorted by (y, x), background dropped, ALiBi from tile-unit distances.

    ``slopes`` (positive) default to Press et al.'s fixed ones.
    """
    sd = {k: v.double() for k, v in sd.items()}
    f, c = feats.double().numpy(), coords.numpy()
    keep = [i for i in sorted(range(len(c)), key=lambda i: (c[i, 1], c[i, 0])) if np.any(f[i] != 0)]
    x = _gelu(torch.from_numpy(f[keep]) @ sd["input_proj.0.weight"].T + sd["input_proj.0.bias"])
    regs = sd["register_tokens"][0] if "register_tokens" in sd else torch.zeros(0, x.shape[1], dtype=x.dtype)
    seq = torch.cat([sd["cls_token"][0], regs, x])
    grid = (c[keep] - c[keep].min(0)) / step
    dist = np.sqrt(((grid[:, None] - grid[None]) ** 2).sum(-1))
    slopes = torch.tensor(alibi_slopes_by_hand(heads) if slopes is None else slopes, dtype=torch.float64)
    p = 1 + len(regs)
    bias = torch.zeros(heads, len(seq), len(seq), dtype=torch.float64)
    bias[:, p:, p:] = -slopes[:, None, None] * torch.from_numpy(dist)[None]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        seq = _block(seq, sd, f"blocks.{i}.", heads, bias)
        i += 1
    return _ln(seq, sd, "norm.")[0]


def naive_case(sd, slides, heads=12):
    sd = {k: v.double() for k, v in sd.items()}
    regs = sd["register_tokens"][0] if "register_tokens" in sd else torch.zeros(0, slides.shape[1], dtype=torch.float64)
    seq = torch.cat([sd["case_token"][0], regs, slides.double()])
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        seq = _block(seq, sd, f"blocks.{i}.", heads, None)
        i += 1
    return _ln(seq, sd, "norm.")[0]


def alibi_slopes_by_hand(heads):
    # Press et al.: 2^(-8i/n) for n a power of two; 12 heads = the 8-head set + every other of the 16-head set.
    table = {8: [2.0 ** -i for i in range(1, 9)], 16: [2.0 ** (-i / 2) for i in range(1, 17)]}
    if heads in table:
        return table[heads]
    assert heads == 12
    return table[8] + table[16][0::2][:4]


# -- published architecture -------------------------------------------------------------------
def _block_params(d, f, ls):
    return 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d + (2 * d if ls else 0)


def test_published_parameter_counts_on_meta():
    from slide2vec_dask.encoders.presets import TILE_PRESETS

    slide = sum(p.numel() for p in mz.slide_module(device="meta").parameters())
    case = sum(p.numel() for p in mz.case_module(device="meta").parameters())
    lunit_preset = next(t for t in TILE_PRESETS if t.name == "lunit")
    with torch.device("meta"):
        lunit = sum(p.numel() for p in lunit_preset.create_architecture().parameters())
    # Counted from the published layer list: input projection, CLS + 4 registers + mask token, 6 blocks, final norm.
    assert slide == (384 * 768 + 768) + 6 * 768 + 6 * _block_params(768, 3072, False) + 2 * 768 == 42_829_056
    assert case == 768 + 3 * _block_params(768, 3072, True) + 2 * 768 == 21_270_528
    # README.md ("42.83M slide encoder", "21.67M ViT-S/8"); MODEL_CARD.md (case transformer 21.3M, total 85.77M).
    assert round(slide / 1e6, 2) == 42.83 and round(case / 1e6, 1) == 21.3 and round(lunit / 1e6, 2) == 21.67
    assert round((slide + case + lunit) / 1e6, 2) == 85.77


def test_checkpoint_layout_is_the_official_one(checkpoint):
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert set(payload) == {"teacher_slide_encoder", "case_transformer", "slide_encoder_config",
                            "case_transformer_config"}
    block = ["norm1", "norm2", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    slide = {"input_proj.0.weight", "input_proj.0.bias", "cls_token", "register_tokens", "mask_token",
             "pos_bias.slopes", "norm.weight", "norm.bias"}
    for i in range(6):
        slide |= {f"blocks.{i}.{m}.{w}" for m in block for w in ("weight", "bias")} | {f"blocks.{i}.pos_bias.slopes"}
    case = {"case_token", "norm.weight", "norm.bias"}
    for i in range(3):
        case |= {f"blocks.{i}.{m}.{w}" for m in block for w in ("weight", "bias")}
        case |= {f"blocks.{i}.ls_attn.gamma", f"blocks.{i}.ls_mlp.gamma"}
    assert set(payload["teacher_slide_encoder"]) == slide
    assert set(payload["case_transformer"]) == case
    s, c = payload["teacher_slide_encoder"], payload["case_transformer"]
    assert s["input_proj.0.weight"].shape == (768, 384) and s["register_tokens"].shape == (1, 4, 768)
    assert s["pos_bias.slopes"].shape == (12, 1) and s["blocks.0.fc1.weight"].shape == (3072, 768)
    assert c["case_token"].shape == (1, 1, 768) and c["blocks.2.ls_mlp.gamma"].shape == (768,)
    assert payload["slide_encoder_config"]["n_layers"] == 6 and payload["case_transformer_config"]["num_layers"] == 3


def test_alibi_slopes_match_press_et_al():
    for heads in (8, 12, 16):
        assert alibi_slopes(heads) == pytest.approx(alibi_slopes_by_hand(heads), rel=1e-12)
    module = mz.slide_module(device="meta")
    assert module.blocks[3].pos_bias is module.pos_bias  # one ALiBi shared by all blocks, as published


# -- geometry ---------------------------------------------------------------------------------
def test_grid_placement_by_hand():
    feats = np.ones((6, 384), np.float32)
    feats[4] = 0  # background
    coords = np.array([[700, 200], [500, 300], [610, 190], [500, 200], [800, 300], [705, 195]])
    index, positions = grid_tokens(feats, coords, 100)
    # Snapped to min x = 500, min y = 190; cells (row, col): 0:(0,2) 1:(1,0) 2:(0,1) 3:(0,0) 5:(0,2) -> 5 wins.
    assert index.tolist() == [3, 2, 5, 1]
    assert positions.tolist() == [[500, 190], [600, 190], [700, 190], [500, 290]]
    with pytest.raises(ValueError, match="not on a grid of step 100"):
        grid_tokens(feats[:2], np.array([[0, 0], [130, 0]]), 100)


def test_token_cap_keeps_evenly_spaced_tokens():
    feats = np.ones((10, 384), np.float32)
    coords = np.array([[100 * i, 0] for i in range(10)])[::-1].copy()  # reversed input order
    for cap, expected in ((4, [0, 2, 5, 7]), (3, [0, 3, 6]), (10, list(range(10))), (0, list(range(10)))):
        index, positions = grid_tokens(feats, coords, 100, cap)
        assert (positions[:, 0] // 100).tolist() == expected


def test_official_token_cap_by_gpu_memory():
    # moozy/data/features/token_cap.py INFERENCE_TOKEN_PRESETS, interpolated by hand.
    assert token_cap_for_memory(16) == 12000 and token_cap_for_memory(8) == 6000
    assert token_cap_for_memory(18) == 12750 and token_cap_for_memory(60) == 23250
    assert token_cap_for_memory(160) == round(27000 * math.sqrt(2))
    assert vram_token_cap(torch.device("cpu")) == 0  # the official encode does not cap off-GPU


# -- forward against the naive reference ----------------------------------------------------------
def test_slide_embedding_matches_naive_reference(checkpoint, slide_encoder):
    feats, coords = layout(seed=1)
    feats[5] = 0  # a background tile: dropped
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)["teacher_slide_encoder"]
    got = embed(slide_encoder, feats, coords)
    assert got.shape == (768,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_slide(sd, feats, coords, STEP), atol=2e-5, rtol=1e-5)


def test_case_embedding_matches_naive_reference(checkpoint, case_transformer):
    slides = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)["case_transformer"]
    with torch.inference_mode():
        got = case_transformer.encode_patient(slides)
    assert got.shape == (768,)
    torch.testing.assert_close(got.double(), naive_case(sd, slides), atol=2e-5, rtol=1e-5)


def test_optional_parts_are_built_from_the_checkpoint_config(small_variant):
    se, ct = mz.load_slide_encoder(small_variant, max_tokens=0), mz.load_case_transformer(small_variant)
    payload = torch.load(small_variant, map_location="cpu", weights_only=True)
    feats, coords = layout(seed=2, rows=4, cols=4, holes=3)
    sd = payload["teacher_slide_encoder"]
    slopes = (-sd["pos_bias.slopes"][:, 0]).tolist()  # learnable: the stored values, not the initial ones
    assert slopes != pytest.approx(alibi_slopes_by_hand(12))
    torch.testing.assert_close(embed(se, feats, coords).double(),
                               naive_slide(sd, feats, coords, STEP, slopes=slopes), atol=2e-5, rtol=1e-5)
    slides = torch.randn(2, 768, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = ct.encode_patient(slides)
    torch.testing.assert_close(got.double(), naive_case(payload["case_transformer"], slides), atol=2e-5, rtol=1e-5)
    assert isinstance(se.pos_bias.slopes, torch.nn.Parameter) and se.register_tokens.shape == (1, 2, 768)


# -- invariances the official model has, and lacks ----------------------------------------------
def test_slide_embedding_invariances(slide_encoder):
    feats, coords = layout(seed=4)
    base = embed(slide_encoder, feats, coords)
    perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))
    same = {
        "shuffled rows": (feats[perm], coords[perm], STEP),
        "translated": (feats, coords + torch.tensor([3 * STEP, 7 * STEP]), STEP),
        "twice the tile size": (feats, coords * 2, 2 * STEP),
        "transposed layout": (feats, coords.flip(1), STEP),  # Euclidean ALiBi sees only distances
        "plus a background tile": (torch.cat([feats, torch.zeros(1, 384)]),
                                   torch.cat([coords, coords[:1] - torch.tensor([[2 * STEP, STEP]])]), STEP),
    }
    for what, (f, c, step) in same.items():
        torch.testing.assert_close(embed(slide_encoder, f, c, step), base, atol=2e-5, rtol=1e-5, msg=what)
    moved = coords.clone()
    moved[0] -= 40 * STEP  # same tiles, different geometry
    assert (embed(slide_encoder, feats, moved) - base).abs().max() > 1e-3


def test_token_cap_embeds_the_hand_picked_tiles(checkpoint):
    feats, coords = layout(seed=5, rows=2, cols=5, holes=0)  # 10 tiles, already row-major
    capped = embed(mz.load_slide_encoder(checkpoint, max_tokens=4), feats, coords)
    keep = [0, 2, 5, 7]  # floor(i * 10 / 4)
    uncapped = mz.load_slide_encoder(checkpoint, max_tokens=0)
    torch.testing.assert_close(capped, embed(uncapped, feats[keep], coords[keep]), atol=1e-5, rtol=1e-5)
    assert (capped - embed(uncapped, feats, coords)).abs().max() > 1e-3


def test_patient_embedding_ignores_slide_order_only(case_transformer):
    a, b, c = torch.randn(3, 768, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        abc = case_transformer.encode_patient(torch.stack([a, b, c]))
        cab = case_transformer.encode_patient(torch.stack([c, a, b]))
        aabc = case_transformer.encode_patient(torch.stack([a, a, b, c]))
        single = case_transformer.encode_patient(a[None])
    torch.testing.assert_close(abc, cab, atol=2e-5, rtol=1e-5)  # no slide positions
    assert (aabc - abc).abs().max() > 1e-3  # attention, not a set function: a repeated slide weighs more
    assert (single - a).abs().max() > 1e-2  # one slide still goes through the transformer
    with pytest.raises(ValueError, match="slide embeddings"):
        case_transformer.encode_patient(torch.zeros(0, 768))


def test_bf16_autocast_builds_the_bias_in_the_query_dtype(slide_encoder):
    feats, coords = layout(seed=6, rows=3, cols=3, holes=1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = slide_encoder.input_proj(feats[None])
        assert slide_encoder._query_dtype(torch.cat([slide_encoder.cls_token, x], 1)) == torch.bfloat16
        low = slide_encoder.encode_slide(feats, coords, STEP).embedding
    full = embed(slide_encoder, feats, coords)
    assert torch.nn.functional.cosine_similarity(low.float(), full, dim=0) > 0.98


# -- presets, loading, errors --------------------------------------------------------------------
def test_specs(checkpoint):
    assert "moozy-slide" in list_models("slide") and "moozy" in list_models("patient")
    slide = get_preset("moozy-slide")(checkpoint_path=checkpoint)
    patient = get_preset("moozy")(checkpoint_path=checkpoint)
    assert (slide.level, slide.feature_dim, slide.default_precision) == ("slide", 768, "fp32")
    tile = slide.tile_encoder
    assert (tile.name, tile.feature_dim, tile.spacing_um, tile.tile_size_px) == ("lunit", 384, 0.5, 224)
    assert (patient.level, patient.feature_dim) == ("patient", 768)
    assert patient.slide_encoder.key == slide.key and patient.tile_encoder.key == tile.key
    assert patient.build.checkpoint_path == slide.build.checkpoint_path == str(checkpoint.resolve())
    assert get_preset("moozy")(checkpoint_path=checkpoint).key == patient.key != slide.key
    assert get_preset("moozy-slide")().key != slide.key
    clone = pickle.loads(pickle.dumps(patient))
    assert clone.key == patient.key and clone.build == patient.build
    with pytest.raises(ValueError, match="one output"):
        get_preset("moozy")(output_variant="mean")
    with pytest.raises(FileNotFoundError):
        get_preset("moozy-slide")(checkpoint_path=checkpoint.parent / "absent.pt")
    with pytest.raises(ValueError, match="max_tokens"):
        mz.MoozyBuilder("slide", None, -1)


def test_without_checkpoint_it_fetches_from_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for name in ("moozy-slide", "moozy"):
        with pytest.raises(WeightsUnavailableError, match=rf"preset '{name}'.*moozy\.pt.*AtlasAnalyticsLab/MOOZY"):
            get_preset(name)().build()


def test_strict_loading_names_what_does_not_fit(small_variant, tmp_path):
    payload = torch.load(small_variant, map_location="cpu", weights_only=True)
    del payload["teacher_slide_encoder"]["blocks.0.fc1.weight"]
    payload["case_transformer"]["head.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(ValueError, match=r"teacher_slide_encoder.*missing 1 key.*blocks\.0\.fc1\.weight"):
        mz.load_slide_encoder(bad)
    with pytest.raises(ValueError, match=r"case_transformer.*unexpected 1 key.*head\.weight"):
        mz.load_case_transformer(bad)
    flat = tmp_path / "flat.pt"
    torch.save({"cls_token": torch.zeros(1, 1, 768)}, flat)
    with pytest.raises(ValueError, match="not the official MOOZY file"):
        mz.load_slide_encoder(flat)
    slide = payload["teacher_slide_encoder"]
    slide["blocks.1.pos_bias.slopes"] = slide["pos_bias.slopes"] * 2
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="ALiBi slopes of one shared module differ"):
        mz.load_slide_encoder(bad)
    slide["blocks.1.pos_bias.slopes"] = slide["pos_bias.slopes"]
    payload["slide_encoder_config"]["feat_dim"] = 1024
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="384-d lunit input"):
        mz.load_slide_encoder(bad)


def test_weights_load_from_an_offline_hub_cache(checkpoint, offline_hf):
    ck.fill_hf_cache(offline_hf, "AtlasAnalyticsLab/MOOZY", "moozy.pt", checkpoint, link=True)
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for name, entry in (("moozy-slide", "teacher_slide_encoder"), ("moozy", "case_transformer")):
        cached = get_preset(name)().build()
        assert all(torch.equal(v, payload[entry][k]) for k, v in cached.state_dict().items()), name
