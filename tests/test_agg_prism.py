"""PRISM slide preset: published shapes, the official key layout, and the math against a naive reference.

Sources: the model card of https://huggingface.co/paige-ai/Prism (``slide_representations``
returns ``image_embedding`` (1, 1280) and ``image_latents`` (1, 512, 1280); Virchow v1
tile embeddings (1, N, 2560); "Params (M): 558" for the whole vision-language model) and
its remote code (``configuring_prism.py`` PerceiverConfig defaults, ``perceiver.py``).
Nothing here downloads; the full-size model is only built on the ``meta`` device or
loaded from a random checkpoint written here.
"""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slide2vec_dask.encoders.aggregators import prism as P
from slide2vec_dask.encoders.hub import WeightsUnavailableError
from slide2vec_dask.encoders.registry import get_preset, list_models
from slide2vec_dask.testing import checkpoints as ck

# A shallow twin with the same sharing pattern (layers 2.. reuse layer 1's cross block,
# layers 1.. reuse layer 0's self-attention stack) and two cross-attention heads.
TINY = P.PrismConfig(latent_seq=6, latent_dim=16, context_dim=24, mhsa_heads=4, perceiver_depth=4,
                     transformer_depth=2, xattn_heads=2)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# -- published architecture, on the meta device ---------------------------------------------
def test_published_parameter_count_and_output_dims_on_meta():
    with torch.device("meta"):
        model = P.create_prism()
    d, c, L = 1280, 2560, 512 + 1  # latent dim, Virchow cls_mean dim, latent queries (+1 slide query)
    ln = 2 * d
    ff = ln + (d * 2 * d + 2 * d) + (d * d + d)          # GEGLU: Linear(d, 2d) then Linear(d, d)
    cross = ln + d * d + c * 2 * d + d * d + ff          # x_norm, to_q, to_kv, to_out (no biases)
    self_block = ln + 3 * d * d + d * d + ff             # norm, MHA in/out projections (no biases)
    # 2 owned cross blocks (layers 0, 1), one owned stack of 6 self-attention blocks (layer 0).
    expected = L * d + 2 * ln + 2 * cross + 6 * self_block
    assert expected == 99_037_440
    assert sum(p.numel() for p in model.parameters()) == expected  # shared tensors counted once
    assert expected < 558e6  # the card's total includes the BioGPT decoder and contrastive heads
    embedding, latents = model(torch.empty(1, 10, 2560, device="meta"))
    assert tuple(embedding.shape) == (1, 1280) and tuple(latents.shape) == (1, 512, 1280)
    # Sharing as in the official code: 8 layers, 2 cross blocks, 1 self-attention stack.
    layers = model.perceiver.layers
    assert len(layers) == 8 and len(layers[0]["tf"]) == 6
    assert all(layers[i]["xattn"] is layers[1]["xattn"] for i in range(2, 8))
    assert layers[0]["xattn"] is not layers[1]["xattn"]
    assert all(layers[i]["tf"] is layers[0]["tf"] for i in range(1, 8))


def test_spec_chains_virchow_cls_mean_and_is_picklable():
    assert "prism" in list_models(level="slide")
    spec = get_preset("prism")()
    assert (spec.name, spec.level, spec.feature_dim, spec.latent_dim) == ("prism", "slide", 1280, 1280)
    assert spec.default_precision == "fp16"
    tile = spec.tile_encoder
    assert (tile.name, tile.feature_dim, tile.info["output_variant"]) == ("virchow", 2560, "cls_mean")
    assert (spec.spacing_um, spec.tile_size_px) == (0.5, 224)
    assert spec.info["hub_id"] == "paige-ai/Prism" and spec.info["hub_files"] == ["model.safetensors"]
    again = pickle.loads(pickle.dumps(spec))
    assert again.key == spec.key == get_preset("prism")().key
    assert again.build == spec.build
    with pytest.raises(ValueError, match="output_variant"):
        get_preset("prism")(output_variant="cls")


def test_spec_key_follows_the_checkpoint_and_paths_are_checked(tmp_path):
    ckpt = ck.prism_checkpoint(tmp_path / "a" / "model.safetensors", cfg=TINY)
    other = shutil.copy(ckpt, tmp_path / "b.safetensors")
    keys = {get_preset("prism")(checkpoint_path=p).key for p in (None, ckpt, other)}
    assert len(keys) == 3
    assert get_preset("prism")(checkpoint_path=ckpt).info["checkpoint_path"] == str(ckpt.resolve())
    with pytest.raises(FileNotFoundError, match="prism"):
        get_preset("prism")(checkpoint_path=tmp_path / "missing.safetensors")
    tile_ckpt = tmp_path / "virchow.safetensors"
    tile_ckpt.write_bytes(b"x")
    spec = get_preset("prism")(tile_checkpoint_path=tile_ckpt)
    assert spec.tile_encoder.info["checkpoint_path"] == str(tile_ckpt.resolve())
    with pytest.raises(ValueError, match=r"\.safetensors"):
        ck.prism_checkpoint(tmp_path / "model.pt", cfg=TINY)


# -- the math, against a naive reference written from the official formulas --------------------
def naive_prism(state: dict, cfg: P.PrismConfig, tiles: torch.Tensor):
    """PRISM's slide path from the checkpoint's tensors by name, loops and explicit formulas."""

    def norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * state[name + ".weight"] + state[name + ".bias"]

    def linear(x, name, bias=True):
        y = x @ state[name + ".weight"].T
        return y + state[name + ".bias"] if bias else y

    def attention(q, k, v):  # one head: softmax(q k^T / sqrt(d)) v, written out
        scores = q @ k.T / math.sqrt(q.shape[-1])
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        return (weights / weights.sum(-1, keepdim=True)) @ v

    def feed_forward(x, name):
        h = linear(norm(x, name + ".norm"), name + ".net.0")
        value, gate = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2:]
        return linear(value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))), name + ".net.2")

    d, heads_x, heads_s = cfg.latent_dim, cfg.xattn_heads, cfg.mhsa_heads
    x = state["perceiver.latents"]
    for i in range(cfg.perceiver_depth):
        owner = f"perceiver.layers.{min(i, cfg.share_xattn_start_layer)}.xattn"
        q = norm(x, owner + ".xattn.x_norm") @ state[owner + ".xattn.to_q.weight"].T
        kv = tiles @ state[owner + ".xattn.to_kv.weight"].T  # [K | V], heads contiguous inside each
        k, v = kv[:, :d], kv[:, d:]
        hd = d // heads_x
        out = torch.cat([attention(q[:, h * hd:(h + 1) * hd], k[:, h * hd:(h + 1) * hd], v[:, h * hd:(h + 1) * hd])
                         for h in range(heads_x)], dim=1)
        x = x + out @ state[owner + ".xattn.to_out.weight"].T
        x = x + feed_forward(x, owner + ".ff")
        for j in range(cfg.transformer_depth):
            block = f"perceiver.layers.{min(i, cfg.share_tf_start_layer)}.tf.{j}"
            h_in = norm(x, block + ".mhsa.norm")
            wq, wk, wv = state[block + ".mhsa.mha.in_proj_weight"].split(d)
            hd = d // heads_s
            out = torch.cat([attention((h_in @ wq.T)[:, h * hd:(h + 1) * hd], (h_in @ wk.T)[:, h * hd:(h + 1) * hd],
                                       (h_in @ wv.T)[:, h * hd:(h + 1) * hd]) for h in range(heads_s)], dim=1)
            x = x + out @ state[block + ".mhsa.mha.out_proj.weight"].T
            x = x + feed_forward(x, block + ".ff")
    return norm(x[0], "cls_norm"), norm(x[1:], "img_norm")


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    return ck.prism_checkpoint(tmp_path / "model.safetensors", seed=3, cfg=TINY)


def test_forward_equals_naive_reference(tiny_file):
    module = P.load_prism(tiny_file, TINY).double()
    state = {k[len("image_resampler."):]: v.double() for k, v in load_file(str(tiny_file)).items()
             if k.startswith("image_resampler.")}
    tiles = torch.randn(11, TINY.context_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coords = torch.stack([torch.arange(11) % 4, torch.arange(11) // 4], 1) * 224
    with torch.inference_mode():
        got = module.encode_slide(tiles, coords, 224)
    want_embedding, want_latents = naive_prism(state, TINY, tiles)
    assert got.embedding.shape == (TINY.latent_dim,) and got.latents.shape == (TINY.latent_seq, TINY.latent_dim)
    torch.testing.assert_close(got.embedding, want_embedding, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.latents, want_latents, rtol=1e-10, atol=1e-10)
    # The reference really depends on the tiles and on sharing: break either and it differs.
    other_embedding, _ = naive_prism(state, TINY, tiles * 1.5)
    assert not torch.allclose(other_embedding, want_embedding, atol=1e-4)


def test_tiles_are_a_set_coords_do_not_matter(tiny_file):
    module = P.load_prism(tiny_file, TINY)
    tiles = torch.randn(9, TINY.context_dim)
    coords = torch.randint(0, 10_000, (9, 2))
    perm = torch.randperm(9)
    with torch.inference_mode():
        a = module.encode_slide(tiles, coords, 224)
        b = module.encode_slide(tiles[perm], torch.zeros(9, 2, dtype=torch.long), 448)
        c = module.encode_slide(tiles[:5], coords[:5], 224)
    torch.testing.assert_close(a.embedding, b.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.embedding, c.embedding, atol=1e-3)


def test_encode_slide_refuses_wrong_inputs(tiny_file):
    module = P.load_prism(tiny_file, TINY)
    with pytest.raises(ValueError, match=r"\(N, 24\)"):
        module.encode_slide(torch.randn(3, 23), None, 224)
    with pytest.raises(ValueError, match="no tiles"):
        module.encode_slide(torch.randn(0, 24), torch.zeros(0, 2, dtype=torch.long), 224)
    with pytest.raises(ValueError, match="coords"):
        module.encode_slide(torch.randn(3, 24), torch.zeros(4, 2, dtype=torch.long), 224)


def test_bf16_autocast_stays_close_to_fp32(tiny_file):
    module = P.load_prism(tiny_file, TINY)
    tiles = torch.randn(20, TINY.context_dim)
    with torch.inference_mode():
        ref = module.encode_slide(tiles, None, 224).embedding
        with torch.autocast("cpu", torch.bfloat16):
            low = module.encode_slide(tiles, None, 224).embedding
    assert low.shape == ref.shape
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


# -- loading the official file ---------------------------------------------------------------
def test_full_size_random_checkpoint_loads_strictly(tmp_path):
    path = ck.prism_checkpoint(tmp_path / "model.safetensors")
    stored = load_file(str(path))
    # The official layout: one copy per shared tensor under image_resampler., the text heads beside it.
    assert {k for k in stored if not k.startswith("image_resampler.")} == set(P.TEXT_HEADS)
    assert "image_resampler.perceiver.layers.1.xattn.xattn.to_kv.weight" in stored
    assert "image_resampler.perceiver.layers.2.xattn.xattn.to_kv.weight" not in stored
    assert "image_resampler.perceiver.layers.1.tf.0.mhsa.mha.in_proj_weight" not in stored
    spec = get_preset("prism")(checkpoint_path=path)
    module = spec.build()
    assert not module.training
    own = module.state_dict()
    assert len(own) == 573  # every alias of the 87 tensors
    for group in P.shared_groups(module):  # each tensor once; its aliases are the same storage
        assert torch.equal(own[group[0]], stored["image_resampler." + group[0]]), group[0]
        assert {own[key].data_ptr() for key in group} == {own[group[0]].data_ptr()}, group
    assert sum(len(group) for group in P.shared_groups(module)) == len(own)
    layers = module.perceiver.layers
    assert layers[7]["xattn"]["xattn"].to_kv.weight is layers[1]["xattn"]["xattn"].to_kv.weight
    assert layers[5]["tf"][3]["ff"].net[2].weight is layers[0]["tf"][3]["ff"].net[2].weight


def test_checkpoint_with_every_alias_loads(tiny_file, tmp_path):
    ref = P.load_prism(tiny_file, TINY)
    full = {"image_resampler." + k: v.clone() for k, v in ref.state_dict().items()}  # torch.save-style layout
    path = tmp_path / "aliases.pt"
    torch.save(full, path)
    again = P.load_prism(path, TINY)
    tiles = torch.randn(5, TINY.context_dim)
    with torch.inference_mode():
        torch.testing.assert_close(again.encode_slide(tiles, None, 224).embedding,
                                   ref.encode_slide(tiles, None, 224).embedding, rtol=0, atol=0)


def test_checkpoint_mismatches_are_named(tiny_file, tmp_path):
    state = load_file(str(tiny_file))

    def write(name, tensors):
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    missing = {k: v for k, v in state.items() if k != "image_resampler.cls_norm.weight"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\).*cls_norm\.weight"):
        P.load_prism(write("missing.safetensors", missing), TINY)

    extra = {**state, "image_resampler.perceiver.extra": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\).*perceiver\.extra"):
        P.load_prism(write("extra.safetensors", extra), TINY)

    owner = "image_resampler.perceiver.layers.1.xattn.xattn.to_q.weight"
    alias = owner.replace("layers.1.", "layers.3.")
    differ = {**state, alias: state[owner] + 1}
    with pytest.raises(ValueError, match=r"layers\.3\..*layers\.1\..*differ"):
        P.load_prism(write("differ.safetensors", differ), TINY)

    text_only = {k: v for k, v in state.items() if not k.startswith("image_resampler.")}
    with pytest.raises(ValueError, match=r"does not fit PRISM's slide encoder.*missing"):
        P.load_prism(write("text_only.safetensors", text_only), TINY)

    with pytest.raises(ValueError, match=r"shape mismatch"):
        P.load_prism(tiny_file, P.PrismConfig(latent_seq=6, latent_dim=16, context_dim=32, mhsa_heads=4,
                                              perceiver_depth=4, transformer_depth=2, xattn_heads=2))


def test_offline_without_cache_names_the_repo_and_remedy(offline_hf):
    spec = get_preset("prism")()
    with pytest.raises(WeightsUnavailableError) as info:
        spec.build()
    msg = str(info.value)
    for part in ("preset 'prism'", "paige-ai/Prism", "model.safetensors", "HF_HUB_OFFLINE=1",
                 "hf download paige-ai/Prism", "accept the licence"):
        assert part in msg, (part, msg)


def test_weights_come_from_the_hub_cache(offline_hf, tiny_file):
    snapshot = offline_hf / "hub" / "models--paige-ai--Prism" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_file, snapshot / "model.safetensors")
    (offline_hf / "hub" / "models--paige-ai--Prism" / "refs").mkdir()
    (offline_hf / "hub" / "models--paige-ai--Prism" / "refs" / "main").write_text(COMMIT)
    module = P.PrismBuilder(cfg=TINY)()
    ref = P.load_prism(tiny_file, TINY)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)


def test_loaded_module_pickles_with_its_sharing(tiny_file):
    module = P.load_prism(tiny_file, TINY)
    assert type(module) is P.PrismSlideEncoder  # the lazily defined classes are importable by name
    again = pickle.loads(pickle.dumps(module))
    assert again.perceiver.layers[3]["xattn"] is again.perceiver.layers[1]["xattn"]
    assert again.perceiver.layers[2]["tf"] is again.perceiver.layers[0]["tf"]
    tiles = torch.randn(4, TINY.context_dim)
    with torch.inference_mode():
        torch.testing.assert_close(again.encode_slide(tiles, None, 224).latents,
                                   module.encode_slide(tiles, None, 224).latents, rtol=0, atol=0)
