"""The tile-encoder model zoo: published architectures, real weight loading, clear errors.

Nothing here downloads: architectures are built on the ``meta`` device, and
weights are tiny random checkpoints written by the tests themselves, loaded
through the real paths (``checkpoint_path`` and an offline Hugging Face
cache laid out on disk).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from slide2vec_dask import Model
from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.encoders.hub import WeightsUnavailableError
from slide2vec_dask.encoders.key_layouts import resample_pos_embed
from slide2vec_dask.encoders.pooling import TokenPooler
from slide2vec_dask.encoders.presets import TILE_PRESETS, get_tile_preset
from slide2vec_dask.encoders.registry import get_preset, list_models
from slide2vec_dask.testing import checkpoints as ck

# Published parameter counts (timm architecture, exactly as built from each model card's
# kwargs) and output dims.  Sources: the model cards / hub configs and their papers;
# second opinions from LazySlide's registry (param_size) and TRIDENT's encoder table.
PUBLISHED = {
    # ViT-S/8 DINO (Lunit, Kang et al. 2023): 21.67M; CLS 384.
    "lunit": (21_670_272, {"cls": 384}),
    # ViT-L/16 UNI: 303.35M (card: ViT-L/16, 1024-d).
    "uni": (303_350_784, {"cls": 1024}),
    # UNI2-h: 681.39M ("681M", 24 blocks x 1536, SwiGLU, 8 registers); CLS 1536.
    "uni2": (681_394_176, {"cls": 1536}),
    # Virchow ViT-H/14 SwiGLU: 631.23M ("632M"); CLS ++ mean(patches) 2560, CLS 1280.
    "virchow": (631_229_184, {"cls_mean": 2560, "cls": 1280}),
    # Virchow2: Virchow + 4 registers (4 x 1280 tokens, 4 more positions): 631.24M.
    "virchow2": (631_239_424, {"cls_mean": 2560, "cls": 1280}),
    # H-optimus-0 / -1: ViT-g/14, 4 registers: 1.135B ("1.1B"); CLS 1536.
    "h-optimus-0": (1_134_774_272, {"cls": 1536}),
    "h-optimus-1": (1_134_774_272, {"cls": 1536}),
    # H0-mini: ViT-B/14, SwiGLU, 4 registers: 85.74M ("86M"); CLS ++ mean 1536 (card), CLS 768.
    "h0-mini": (85_739_520, {"cls_mean": 1536, "cls": 768}),
    # Prov-GigaPath tile encoder: ViT-g (40 x 1536, 16 px patches): 1.135B ("1.13B"); 1536.
    "gigapath": (1_134_953_984, {"cls": 1536}),
    # Phikon ViT-B/16 (transformers ViTModel without pooler): 85.80M; CLS 768.
    "phikon": (85_798_656, {"cls": 768}),
    # Phikon-v2 ViT-L/16 DINOv2: 303.35M (transformers Dinov2Model: 303.35M + 1,024 mask token); 1024.
    "phikonv2": (303_350_784, {"cls": 1024}),
    # Hibou-B ViT-B/14 SwiGLU + 4 registers: 85.74M (transformers: + 768 mask token + 768 CLS
    # position, folded into the CLS token here) = 85,741,056 ("85.7M").
    "hibou-b": (85_739_520, {"cls": 768}),
    # Hibou-L ViT-L/14 SwiGLU (hidden 2736) + 4 registers: 303.66M (transformers: 303,659,264, "303.7M").
    "hibou-l": (303_657_216, {"cls": 1024}),
    # Midnight-12k ViT-g/14 DINOv2 on a 518 px grid: 1.136B (transformers: + 1,536 mask token,
    # "1.14B"); CLS ++ mean 3072, CLS 1536.
    "midnight": (1_136_479_232, {"cls_mean": 3072, "cls": 1536}),
    # DINOv2 ViT-B/14 (timm vit_base_patch14_dinov2.lvd142m): 86.58M; CLS 768.
    "dinov2-vitb14": (86_579_712, {"cls": 768}),
    # DINOv3 ViT-B/16 (Simeoni et al. 2025, "ViT-B/16 distilled, 86M"; timm vit_base_patch16_dinov3):
    # 85.64M; slide2vec 7.1.4 encoders/models/dinov3.py: patch_mean (default) and cls, both 768.
    "dinov3-vitb16": (85_641_216, {"patch_mean": 768, "cls": 768}),
    # GPFM (Ma et al. 2024; slide2vec gpfm.py: ViT-L/14 DINOv2 at 224 px, LayerScale): 303.23M ("ViT-L"); 1024.
    "gpfm": (303_227_904, {"cls": 1024}),
    # mSTAR (Wang et al. 2024; card: ViT-L/16; slide2vec mstar.py: init_values 1e-5): 303.35M as UNI; 1024.
    "mstar": (303_350_784, {"cls": 1024}),
    # Mettle (slideflow-labs/Mettle; slide2vec mettle.py): H-optimus-0's ViT-g/14 reg4 (1,134,774,272)
    # + MettleRefineHead(1536, atoms 16, rank 8, hidden 256) = 2*16*1536*8 + (1536*256+256 + 256*16+16)
    # + (1536*256+256 + 256*1536+1536) = 1,579,024; cls_patch_mean 3072 (default), cls 1536.
    "mettle": (1_136_353_296, {"cls_patch_mean": 3072, "cls": 1536}),
    # CLAM's truncated ResNet-50 (Lu et al. 2021, resnet_custom.py: layers 1-3 + avgpool, 1024-d; TRIDENT
    # resnet50: timm resnet50.tv_in1k, out_indices=[3]): conv1..layer3 of torchvision's ResNet-50 = 8.54M.
    "resnet50": (8_543_296, {"mean": 1024}),
    # CTransPath (Wang et al. 2022, MedIA: Swin-T with a conv stem, 27.5M; TRIDENT ctran.py; CHIEF's
    # tile encoder): 27,520,038; the pooled 768-d output.
    "ctranspath": (27_520_038, {"mean": 768}),
    # iSight (Huang et al., arXiv:2602.04063; slide2vec isight.py): CLIP ViT-L/14-336's vision tower
    # (timm vit_large_patch14_clip_quickgelu_336 without the final LayerNorm: 303,505,408; transformers'
    # CLIPVisionModel 303,507,456 with it) + visual_token_projection 1024x1024+1024; both outputs 1024.
    "isight": (304_555_008, {"token_mean": 1024, "cls": 1024}),
    # kaiko.ai (Aben et al. 2024, "Towards large-scale training of pathology foundation models"; TRIDENT
    # kaiko-*: timm vit_*_224 / vit_large_patch14_reg4_dinov2 at 518): ViT-S/16 21.67M, ViT-S/8 21.67M,
    # ViT-B/16 85.80M, ViT-B/8 85.81M, ViT-L/14 304.37M; CLS 384 / 384 / 768 / 768 / 1024.
    "kaiko-vits16": (21_665_664, {"cls": 384}),
    "kaiko-vits8": (21_670_272, {"cls": 384}),
    "kaiko-vitb16": (85_798_656, {"cls": 768}),
    "kaiko-vitb8": (85_807_872, {"cls": 768}),
    "kaiko-vitl14": (304_370_688, {"cls": 1024}),
}
VIT_LAYOUTS = ("timm", "hf_vit", "hf_dinov2")
TIMM_PRESETS = [p.name for p in TILE_PRESETS if p.arch is not None and p.layout in VIT_LAYOUTS]
REGISTERS = {"uni2": 8, "virchow2": 4, "h-optimus-0": 4, "h-optimus-1": 4, "h0-mini": 4, "hibou-b": 4, "hibou-l": 4,
             "dinov3-vitb16": 4, "kaiko-vitl14": 4}
COMMIT = ck.HUB_COMMIT


def meta_model(preset, runtime=False):
    with torch.device("meta"):
        return preset.create_architecture(runtime=runtime)


# -- registry ---------------------------------------------------------------------
def test_list_models_lists_every_preset_by_level():
    names = sorted(p.name for p in TILE_PRESETS)
    slide, patient = ["gigapath-slide", "moozy-slide", "prism", "titan"], ["moozy"]
    assert list_models() == sorted(names + slide + patient)
    assert list_models("tile") == names
    assert list_models("slide") == slide
    assert list_models("patient") == patient
    assert set(PUBLISHED) | {"conch", "conchv15"} == set(names)
    with pytest.raises(ValueError, match="level must be one of"):
        list_models("region")


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model preset 'virchow3'.*'virchow2'"):
        get_preset("virchow3")
    with pytest.raises(ValueError, match=r"'h-optimus-1'"):
        Model.from_preset("h-optimus-2")
    assert get_preset("UNI") is get_preset("uni")


# -- published architectures, on the meta device -----------------------------------------
@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_published_architecture(name):
    preset = get_tile_preset(name)
    count, dims = PUBLISHED[name]
    model = meta_model(preset)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.num_prefix_tokens == 1 + REGISTERS.get(name, 0)
    assert dict(preset.outputs) == dims and preset.default_variant == next(iter(dims))
    runtime = model if preset.pos_embed_interp is None else meta_model(preset, runtime=True)
    assert runtime.patch_embed.grid_size == (preset.tile_size_px // runtime.patch_embed.patch_size[0],) * 2
    for variant, dim in dims.items():
        with torch.device("meta"), torch.no_grad():
            out = TokenPooler(runtime, variant)(torch.empty(2, 3, preset.tile_size_px, preset.tile_size_px))
        assert tuple(out.shape) == (2, dim)
        spec = get_preset(name)(output_variant=variant)
        assert spec.feature_dim == dim and spec.level == "tile" and spec.tile_size_px == preset.tile_size_px
    with pytest.raises(ValueError, match=r"has no output_variant 'avg'.*choose one of"):
        get_preset(name)(output_variant="avg")


def test_runtime_grid_differs_from_the_published_one_only_in_positions():
    # Midnight is published on a 518 px grid and run at 224 px, as its card does.
    preset = get_tile_preset("midnight")
    published, runtime = meta_model(preset), meta_model(preset, runtime=True)
    assert published.pos_embed.shape == (1, 1 + 37 * 37, 1536)
    assert runtime.pos_embed.shape == (1, 1 + 16 * 16, 1536)
    rest = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if k != "pos_embed"}  # noqa: E731
    assert rest(published) == rest(runtime)


def test_spec_fields_and_key():
    spec = Model.from_preset("virchow2").spec
    assert (spec.name, spec.feature_dim, spec.spacing_um, spec.tile_size_px) == ("virchow2", 2560, 0.5, 224)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.default_precision == "fp16"
    assert spec.info["hub_id"] == "paige-ai/Virchow2" and spec.info["gated"] is True
    assert spec.info["licence"] == "CC-BY-NC-ND-4.0" and spec.info["output_variant"] == "cls_mean"
    assert Model.from_preset("virchow2", output_variant="cls").feature_dim == 1280
    h0 = Model.from_preset("h-optimus-0").spec
    assert h0.mean == (0.707223, 0.578729, 0.703617) and h0.std == (0.211883, 0.230117, 0.177517)
    assert Model.from_preset("midnight").spec.mean == (0.5, 0.5, 0.5)
    assert Model.from_preset("uni2").spec.default_precision == "bf16"
    # One key per distinct configuration, stable across constructions and processes.
    key = lambda **kw: get_preset("virchow2")(**kw).key  # noqa: E731
    assert key() == key() == key(output_variant="cls_mean")
    assert len({key(), key(output_variant="cls"), get_preset("virchow")().key}) == 3
    builder = pickle.loads(pickle.dumps(spec.build))
    assert builder == spec.build


def test_natural_image_control_has_no_native_spacing():
    from slide2vec_dask.tiling.plan import resolve_request

    spec = Model.from_preset("dinov2-vitb14").spec
    assert spec.spacing_um is None
    with pytest.raises(ValueError, match="requested_spacing_um"):
        resolve_request(spec, PreprocessingConfig())
    assert resolve_request(spec, PreprocessingConfig(requested_spacing_um=1.0)) == (1.0, 224)


def test_conch_needs_its_package():
    spec = Model.from_preset("conch").spec  # construction needs nothing
    assert (spec.feature_dim, spec.tile_size_px, spec.info["hub_id"]) == (512, 448, "MahmoodLab/CONCH")
    try:
        import conch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"`conch` package.*pip install git\+https://github.com/mahmoodlab/CONCH.git"):
            spec.build()
    else:  # pragma: no cover - only where CONCH is installed
        pytest.skip("conch is installed; its weights are gated and not available offline here")


def test_checkpoint_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="preset 'uni'"):
        Model.from_preset("uni", checkpoint_path=tmp_path / "nope.bin")


# -- weights: tiny twins with the official key layout -------------------------------------
TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny_preset(name):
    preset = get_tile_preset(name).with_kwargs(**TINY)
    dims = tuple((v, TINY["embed_dim"] * (2 if v in ("cls_mean", "cls_patch_mean") else 1)) for v, _ in preset.outputs)
    return preset.replace(outputs=dims)


def random_state(model, seed=0):
    """Every tensor random (no near-identity layer scales), so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in model.state_dict().items()}


def timm_to_hf(state, layout, no_embed_class, seed=1):
    """The transformers on-disk layout of a timm state dict (independent inverse of the loader)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    cls = state["cls_token"]
    pos = state["pos_embed"]
    if no_embed_class:  # transformers keeps a CLS position; timm folds it into the token
        cls_pos = torch.randn(cls.shape, generator=g)
        cls, pos = cls - cls_pos, torch.cat([cls_pos, pos], dim=1)
    out["embeddings.cls_token"] = cls
    out["embeddings.position_embeddings"] = pos
    out["embeddings.mask_token"] = torch.zeros(1, cls.shape[-1])
    if "reg_token" in state:
        out["embeddings.register_tokens"] = state["reg_token"]
    out["embeddings.patch_embeddings.projection.weight"] = state["patch_embed.proj.weight"]
    out["embeddings.patch_embeddings.projection.bias"] = state["patch_embed.proj.bias"]
    names = ({"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"} if layout == "hf_vit" else
             {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
              "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"})
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        _, i, rest = key.split(".", 2)
        base = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[base + f"attention.attention.{name}.{kind}"] = part.clone()
        elif rest.startswith("mlp.fc") and layout == "hf_dinov2":
            sub, kind = rest.rsplit(".", 1)
            swiglu = state[f"blocks.{i}.mlp.fc1.weight"].shape[0] == 2 * state[f"blocks.{i}.mlp.fc2.weight"].shape[1]
            hf = {"mlp.fc1": "mlp.weights_in", "mlp.fc2": "mlp.weights_out"}[sub] if swiglu else sub
            out[base + f"{hf}.{kind}"] = value
        elif rest in names:
            out[base + names[rest]] = value
        else:
            sub, kind = rest.rsplit(".", 1)
            out[base + f"{names[sub]}.{kind}"] = value
    out["layernorm.weight"], out["layernorm.bias"] = state["norm.weight"], state["norm.bias"]
    if layout == "hf_vit":
        d = cls.shape[-1]
        out["pooler.dense.weight"], out["pooler.dense.bias"] = torch.zeros(d, d), torch.zeros(d)
    return out


def published_file(preset, state, tmp_path, suffix):
    """``state`` (timm layout) written as the preset's published checkpoint would be."""
    if preset.layout != "timm":
        # among these presets, those with registers are the ones whose timm twin folds the CLS position
        state = timm_to_hf(state, preset.layout, no_embed_class="reg_token" in state)
    path = tmp_path / f"{preset.name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def reference_model(preset, state):
    """The bare timm model (runtime grid) holding ``state``: what a preset must reproduce."""
    model = preset.create_architecture(runtime=True)
    if preset.pos_embed_interp is not None:
        state = resample_pos_embed(state, model, preset.pos_embed_interp)
    model.load_state_dict(state)
    return model.eval()


def pooled(model, x, variant):
    with torch.no_grad():
        tokens = model.forward_features(x)
    cls = tokens[:, 0]
    if variant == "cls":
        return cls
    if variant == "patch_mean":
        return tokens[:, model.num_prefix_tokens:].mean(1)
    return torch.cat([cls, tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1)


fill_hf_cache = ck.fill_hf_cache


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_tiny_checkpoint_loads_through_every_path(name, tmp_path, offline_hf):
    preset = tiny_preset(name)
    state = random_state(meta_model(preset))
    ref = reference_model(preset, state)
    x = torch.randn(2, 3, preset.tile_size_px, preset.tile_size_px)

    # checkpoint_path (.safetensors, weights-only .pth), and the offline hub cache holding the
    # last of the preset's file names (so the loader falls back past the first).
    ckpts = [published_file(preset, state, tmp_path, suffix) for suffix in (".safetensors", ".pth")]
    hub_file = preset.hub_files[-1]
    (tmp_path / "hub_src").mkdir()
    fill_hf_cache(offline_hf, preset.hub_id, hub_file,
                  published_file(preset, state, tmp_path / "hub_src", Path(hub_file).suffix))
    assert len({preset.spec(checkpoint_path=c).key for c in ckpts} | {preset.spec().key}) == 3

    runs = [(source, preset.default_variant) for source in ckpts]
    runs += [(None, variant) for variant in preset.output_variants]  # every variant from the hub cache
    for source, variant in runs:
        expected = pooled(ref, x, variant)
        assert expected.shape == (2, preset.feature_dim(variant))
        module = preset.spec(checkpoint_path=source, output_variant=variant).build()
        with torch.no_grad():
            got = module(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                                   msg=f"{name} {variant} from {source or 'the hub cache'}")

    # The wrapper keeps the official (timm) keys: no "model." prefix, and it reloads them.
    assert set(module.state_dict()) == set(ref.state_dict())
    twin = TokenPooler(copy.deepcopy(ref), module.pooling).eval()
    twin.load_state_dict({k: v + 1 for k, v in module.state_dict().items()})
    twin.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), module(x))


def test_offline_without_cache_names_preset_hub_and_remedy(offline_hf):
    model = Model.from_preset("virchow2")  # construction needs no weights
    with pytest.raises(WeightsUnavailableError) as info:
        model.spec.build()
    msg = str(info.value)
    for part in ("preset 'virchow2'", "paige-ai/Virchow2", "HF_HUB_OFFLINE=1", "hf download paige-ai/Virchow2",
                 "accept the licence at https://huggingface.co/paige-ai/Virchow2", "checkpoint_path=",
                 str(offline_hf / "hub")):
        assert part in msg, (part, msg)


def test_gated_repo_error_is_explained(monkeypatch, offline_hf):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, filename, **kwargs):
        import httpx2

        response = httpx2.Response(403, request=httpx2.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise GatedRepoError("Access to this model is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(WeightsUnavailableError, match=r"preset 'uni'.*MahmoodLab/UNI is gated.*"
                                                      r"accept the licence at https://huggingface.co/MahmoodLab/UNI.*"
                                                      r"hf auth login.*checkpoint_path="):
        Model.from_preset("uni").spec.build()


def test_hub_lookup_reads_the_environment_at_call_time(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from slide2vec_dask.encoders.hub import fetch_hub_file

    calls = []

    def fake(repo_id, filename, **kwargs):  # a repo without model.safetensors
        calls.append((filename, kwargs))
        if filename == "model.safetensors":
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = fetch_hub_file("h0-mini", "bioptimus/H0-mini", ("model.safetensors", "pytorch_model.bin"))
    assert path == tmp_path / "pytorch_model.bin" and [c[0] for c in calls] == ["model.safetensors",
                                                                               "pytorch_model.bin"]
    kwargs = calls[-1][1]
    assert kwargs["cache_dir"] == str(tmp_path / "home" / "hub") and kwargs["token"] == "hf_secret"
    assert kwargs["local_files_only"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    fetch_hub_file("h0-mini", "bioptimus/H0-mini", ("pytorch_model.bin",))
    assert calls[-1][1]["local_files_only"] is True and calls[-1][1]["cache_dir"] == str(tmp_path / "cache")


def test_checkpoint_with_wrong_keys_or_shapes_is_refused(tmp_path):
    preset = tiny_preset("uni")
    state = random_state(meta_model(preset))
    renamed = {("blocks.0.attn.qkvx.weight" if k == "blocks.0.attn.qkv.weight" else k): v for k, v in state.items()}
    path = published_file(preset, renamed, tmp_path, ".safetensors")
    with pytest.raises(ValueError, match=r"preset 'uni' \(MahmoodLab/UNI\).*does not fit.*missing 1 key.*"
                                         r"blocks.0.attn.qkv.weight.*unexpected 1 key.*huggingface.co/MahmoodLab/UNI"):
        preset.spec(checkpoint_path=path).build()
    # Another model's checkpoint: UNI's tiny twin into H-optimus-0's tiny twin.
    with pytest.raises(ValueError, match=r"preset 'h-optimus-0'.*shape mismatch"):
        tiny_preset("h-optimus-0").spec(checkpoint_path=path).build()
    # A transformers-layout checkpoint with a layer missing.
    phikon = tiny_preset("phikon")
    hf = timm_to_hf(random_state(meta_model(phikon)), "hf_vit", False)
    del hf["encoder.layer.1.output.dense.weight"]
    path = tmp_path / "phikon.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    with pytest.raises(ValueError, match=r"preset 'phikon' \(owkin/phikon\).*missing 1 key.*blocks.1.mlp.fc2.weight"
                                         r".*transformers layout"):
        phikon.spec(checkpoint_path=path).build()


# -- against the transformers implementations, where transformers is installed -----------------
def test_transformers_layouts_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    cases = [
        ("phikon", transformers.ViTModel(transformers.ViTConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192, image_size=224,
            patch_size=16, layer_norm_eps=1e-12), add_pooling_layer=False)),
        ("phikonv2", transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=16))),
        # Published on a 518 px grid: transformers interpolates at run time, the preset once at load time.
        ("midnight", transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=518, patch_size=14,
            use_swiglu_ffn=True))),
        ("hibou-b", transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14,
            use_swiglu_ffn=True, num_register_tokens=4))),
    ]
    for name, hf in cases:
        hf.eval()
        for p in hf.parameters():  # random everything, layer scales included
            p.data.normal_(0, 0.2)
        out = tmp_path / name
        hf.save_pretrained(out)
        preset = tiny_preset(name)
        with torch.no_grad():
            tokens = hf(pixel_values=x).last_hidden_state
        cls = tokens[:, 0]
        patches = tokens[:, 1 + REGISTERS.get(name, 0):]
        for variant, _ in preset.outputs:
            expected = cls if variant == "cls" else torch.cat([cls, patches.mean(1)], dim=-1)
            module = preset.spec(checkpoint_path=out / "model.safetensors", output_variant=variant).build()
            with torch.no_grad():
                torch.testing.assert_close(module(x), expected, atol=2e-5, rtol=1e-4, msg=f"{name} {variant}")


# -- end to end: lunit at full size on a synthetic slide ----------------------------------------
def test_lunit_end_to_end_equals_bare_timm(tmp_path):
    import openslide
    import timm
    from safetensors.torch import load_file, save_file

    from slide2vec_dask import testing

    torch.manual_seed(0)
    bare = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0)
    ckpt = tmp_path / "lunit.safetensors"
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(ckpt))

    image = testing.tissue_image(896, 896, [(0, 0, 448, 448)], seed=3)  # 2 x 2 tiles of tissue
    slide = testing.write_svs(tmp_path / "slide.svs", image, mpp=0.5, downsamples=(1, 4), quality=92)

    model = Model.from_preset("lunit", checkpoint_path=ckpt)
    emb = model.embed_slide(slide, preprocessing=PreprocessingConfig(segmentation={"mthresh": 0},   # (a_t 0: hs2p's
                                                                       tissue_threshold=0.5,          # a_t = 4 drops
                                                                       filtering={"a_t": 0}),         # 4 tiles)
                            execution=ExecutionOptions(num_workers=1, batch_size=4))
    assert emb.tile_embeddings.shape == (4, 384) and emb.tile_embeddings.dtype == torch.float32
    assert sorted(zip(emb.y.tolist(), emb.x.tolist())) == [(0, 0), (0, 224), (224, 0), (224, 224)]

    with openslide.OpenSlide(str(slide)) as osr:
        tiles = np.stack([np.asarray(osr.read_region((int(x), int(y)), 0, (224, 224)))[..., :3]
                          for x, y in zip(emb.x, emb.y)])
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    bare.load_state_dict(load_file(str(ckpt)))
    with torch.no_grad():
        expected = bare.eval()(x)
    torch.testing.assert_close(emb.tile_embeddings, expected, atol=1e-4, rtol=0)
