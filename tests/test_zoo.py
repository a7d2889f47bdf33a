"""The zoo's house and its newer presets: one weights record, a registry that lists itself,
strict loading of each published layout, and tables that cannot drift from the registry.

Nothing downloads: architectures are counted on the ``meta`` device, weights are random
checkpoints in each publisher's key layout (`slide2vec_dask.testing.checkpoints`), loaded
through ``checkpoint_path`` and through a pre-filled, offline Hugging Face cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slide2vec_dask import Model
from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.encoders import catalog
from slide2vec_dask.encoders.hub import WeightsUnavailableError
from slide2vec_dask.encoders.presets import TILE_PRESETS, get_tile_preset
from slide2vec_dask.encoders.registry import get_preset, list_models, preset_modules
from slide2vec_dask.encoders.weights import Weights
from slide2vec_dask.testing import checkpoints as ck
from test_presets import PUBLISHED

ROOT = Path(__file__).resolve().parents[1]

# slide2vec 7.1.4 (PyPI), slide2vec/encoders/models/*.py: every register_encoder name.
SLIDE2VEC_TILE = {
    "conch", "conchv15", "dinov2-vitb14", "dinov3-vitb16", "genbio-pathfm", "gigapath", "gpfm", "hibou-b", "hibou-l",
    "h-optimus-0", "h-optimus-1", "h0-mini", "isight", "lunit", "mettle", "midnight", "mstar", "musk", "phikon",
    "phikonv2", "prost40m", "uni", "uni2", "virchow", "virchow2", "phaet", "mascaret", "rudolfv2", "rudolfv2-b",
    "rudolfv2-s"}
SLIDE2VEC_SLIDE = {"gigapath-slide", "prism", "prism2", "titan", "moozy-slide"}
SLIDE2VEC_PATIENT = {"moozy"}
# What docs/models.md says is left out (its "Left out, and why" section), no more and no less.
LEFT_OUT = {"genbio-pathfm", "rudolfv2", "rudolfv2-b", "rudolfv2-s", "phaet", "mascaret", "prost40m", "musk",
            "prism2"}
TINY = dict(embed_dim=48, depth=2, num_heads=2)


# -- coverage ----------------------------------------------------------------------------------
def test_slide2vec_names_are_covered_or_documented_as_left_out():
    assert len(SLIDE2VEC_TILE) == 30 and len(SLIDE2VEC_SLIDE) == 5
    have = set(list_models())
    assert SLIDE2VEC_TILE - have == LEFT_OUT - {"prism2"}
    assert SLIDE2VEC_SLIDE - have == {"prism2"} and SLIDE2VEC_PATIENT <= have
    assert {"resnet50", "ctranspath", "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14"} <= have
    left_out = (ROOT / "docs" / "models.md").read_text().split("## Left out, and why", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\*\*`([a-z0-9-]+)`\*\*", left_out))
    assert named == LEFT_OUT


# -- published architectures, on the meta device ------------------------------------------------
@pytest.mark.parametrize("name", [p.name for p in TILE_PRESETS if p.arch is not None])
def test_parameter_count_and_output_dims(name):
    """Every timm-built tile preset, wrappers included (Mettle's head, the ResNet pooler); sources in PUBLISHED."""
    preset = get_tile_preset(name)
    count, dims = PUBLISHED[name]
    with torch.device("meta"):
        assert sum(p.numel() for p in preset.create_architecture().parameters()) == count
        for variant, dim in dims.items():
            out = preset.create_module(variant)(torch.empty(2, 3, preset.tile_size_px, preset.tile_size_px))
            assert tuple(out.shape) == (2, dim), variant
    assert dict(preset.outputs) == dims and catalog.count_parameters(name) == count
    assert [get_preset(name)(output_variant=v).feature_dim for v in dims] == list(dims.values())


# -- the weights record ---------------------------------------------------------------------------
def test_weights_record_resolves_a_file_or_the_hub_with_one_cache_key_rule(tmp_path, offline_hf, monkeypatch):
    weights = Weights("org/model", ("model.safetensors", "pytorch_model.bin"), gated=True, licence="MIT")
    with pytest.raises(FileNotFoundError, match=r"preset 'p': checkpoint not found"):
        weights.with_checkpoint("p", tmp_path / "nope.bin")
    local = tmp_path / "w.bin"
    local.write_bytes(b"x")
    on_disk = weights.with_checkpoint("p", local)
    assert on_disk.resolve("p") == local.resolve() and on_disk.info()["checkpoint_path"] == str(local.resolve())

    # The hub: the second file name, pinned to a revision, from an offline cache under HF_HOME.
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    pinned = Weights("org/model", ("model.safetensors", "pytorch_model.bin"), revision=commit)
    cached = ck.fill_hf_cache(offline_hf, "org/model", "pytorch_model.bin", local, commit=commit)
    assert pinned.resolve("p") == cached
    with pytest.raises(WeightsUnavailableError, match=r"preset 'p'.*HF_HUB_OFFLINE=1"):
        Weights("org/model", ("pytorch_model.bin",), revision="0" * 40).resolve("p")

    # What reaches huggingface_hub: the environment as it is now.
    import huggingface_hub

    seen = {}

    def fake(repo_id, filename, **kwargs):
        seen.update(kwargs, repo_id=repo_id, filename=filename)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    pinned.resolve("p")
    assert (seen["revision"], seen["token"], seen["local_files_only"]) == (commit, "hf_abc", False)
    assert seen["cache_dir"] == os.path.join(str(offline_hf), "hub")

    # One key rule: equal records give equal keys; source, variant, revision or config change it.
    key = weights.cache_key("p", "cls", 1)
    assert key == Weights("org/model", ("model.safetensors", "pytorch_model.bin")).cache_key("p", "cls", 1)
    assert key.startswith("p:cls:hf://org/model:")
    others = {on_disk.cache_key("p", "cls", 1), weights.cache_key("p", "mean", 1), pinned.cache_key("p", "cls", 1),
              weights.cache_key("p", "cls", 2)}
    assert len(others | {key}) == 5


def test_registry_lists_the_preset_modules_from_the_package():
    folder = ROOT / "slide2vec_dask" / "encoders" / "aggregators"
    public = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert preset_modules() == ["slide2vec_dask.encoders.presets"] + [
        f"slide2vec_dask.encoders.aggregators.{m}" for m in public]
    for name in list_models():
        assert get_preset(name).__module__ in preset_modules(), name


# -- Mettle: timm trunk + the refine head, both from model.safetensors -----------------------------
def mettle_reference(state: dict, preset, x: torch.Tensor, variant: str) -> torch.Tensor:
    """Independently: timm's trunk holding backbone.*, then the head's formula written out."""
    import timm

    trunk = timm.create_model(preset.arch, pretrained=False, **preset.timm_kwargs())
    trunk.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    with torch.no_grad():
        tokens = trunk.eval().forward_features(x)
    h = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    cls = tokens[:, 0]
    mix = F.linear(F.gelu(F.linear(cls, h["mix.0.weight"], h["mix.0.bias"])), h["mix.2.weight"], h["mix.2.bias"])
    shift = F.linear(F.gelu(F.linear(cls, h["shift.0.weight"], h["shift.0.bias"])), h["shift.2.weight"],
                     h["shift.2.bias"])
    refined = cls + shift
    for k in range(h["P"].shape[0]):
        refined = refined + mix[:, k : k + 1] * (cls @ h["P"][k] @ h["Q"][k].T)
    if variant == "cls":
        return refined
    return torch.cat([refined, tokens[:, trunk.num_prefix_tokens:].mean(1)], dim=-1)


def test_mettle_loads_its_published_layout_by_path_and_from_the_offline_hub(tmp_path, offline_hf):
    preset = get_tile_preset("mettle").with_kwargs(**TINY)
    preset = preset.replace(outputs=(("cls_patch_mean", 96), ("cls", 48)))
    path, state = ck.tile_checkpoint(preset, tmp_path / "model.safetensors", seed=2)
    assert {k.split(".", 1)[0] for k in state} == {"backbone", "head"} and "head.P" in state
    ck.fill_hf_cache(offline_hf, preset.hub_id, "model.safetensors", path)
    x = torch.randn(2, 3, 224, 224)
    for source in (path, None):
        for variant in preset.output_variants:
            module = preset.spec(checkpoint_path=source, output_variant=variant).build()
            with torch.no_grad():
                got = module(x)
            torch.testing.assert_close(got, mettle_reference(state, preset, x, variant), atol=1e-5, rtol=1e-5)


# -- CLAM's truncated ResNet-50: the full ImageNet file, stages 1-3 read ---------------------------
def truncated_torchvision(state: dict):
    """torchvision's ResNet-50 holding the published file (strictly: the same layout), cut after layer3."""
    import torchvision

    net = torchvision.models.resnet50()
    net.load_state_dict(state, strict=True)
    net.eval()
    return lambda x: net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))).mean((2, 3))


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    from safetensors.torch import load_file

    path, _ = ck.tile_checkpoint("resnet50", tmp_path_factory.mktemp("resnet50") / "model.safetensors", seed=5)
    return path, load_file(str(path))


def test_resnet50_loads_the_full_imagenet_file_by_path_and_from_the_offline_hub(resnet_file, offline_hf):
    path, published = resnet_file
    assert any(k.startswith("layer4.") for k in published) and "fc.weight" in published
    ck.fill_hf_cache(offline_hf, "timm/resnet50.tv_in1k", "model.safetensors", path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = truncated_torchvision(published)(x)
        for source in (path, None):
            module = get_preset("resnet50")(checkpoint_path=source).build()
            torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith(("layer4.", "fc.")) for k in module.state_dict())


def test_resnet50_end_to_end_equals_torchvision_on_openslide_tiles(resnet_file, tmp_path):
    import openslide

    from slide2vec_dask import testing

    path, published = resnet_file
    image = testing.tissue_image(896, 896, [(0, 0, 448, 448)], seed=4)  # 2 x 2 tiles of tissue
    slide = testing.write_svs(tmp_path / "slide.svs", image, mpp=0.5, downsamples=(1, 4), quality=92)
    model = Model.from_preset("resnet50", checkpoint_path=path)
    emb = model.embed_slide(slide, preprocessing=PreprocessingConfig(segmentation={"mthresh": 0},   # (a_t 0: hs2p's
                                                                       tissue_threshold=0.5,          # a_t = 4 drops
                                                                       filtering={"a_t": 0}),         # 4 tiles)
                            execution=ExecutionOptions(num_workers=1, batch_size=4))
    assert emb.tile_embeddings.shape == (4, 1024)
    with openslide.OpenSlide(str(slide)) as osr:
        tiles = np.stack([np.asarray(osr.read_region((int(x), int(y)), 0, (224, 224)))[..., :3]
                          for x, y in zip(emb.x, emb.y)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        expected = truncated_torchvision(published)(x)
    assert expected.abs().max() > 1  # a real signal, not all zeros
    torch.testing.assert_close(emb.tile_embeddings, expected, atol=1e-4, rtol=0)


# -- wrong weights are an error that names the preset ----------------------------------------------
def test_wrong_layout_dtype_or_shape_is_refused_naming_the_preset(tmp_path):
    from safetensors.torch import save_file

    kaiko = get_tile_preset("kaiko-vits16").with_kwargs(**TINY).replace(outputs=(("cls", 48),))
    path, state = ck.tile_checkpoint(kaiko, tmp_path / "kaiko.safetensors")
    # dtype: an integer tensor where the model holds floats
    bad = {**state, "blocks.0.norm1.weight": torch.ones(48, dtype=torch.int64)}
    save_file(bad, str(tmp_path / "int.safetensors"))
    with pytest.raises(ValueError, match=r"preset 'kaiko-vits16'.*1 dtype mismatch.*blocks\.0\.norm1\.weight"):
        kaiko.spec(checkpoint_path=tmp_path / "int.safetensors").build()
    # layout: Mettle's trunk saved bare (no backbone./head. prefixes)
    mettle = get_tile_preset("mettle").with_kwargs(**TINY).replace(outputs=(("cls_patch_mean", 96), ("cls", 48)))
    _, mstate = ck.tile_checkpoint(mettle, tmp_path / "m.safetensors")
    save_file({k[len("backbone."):]: v for k, v in mstate.items() if k.startswith("backbone.")},
              str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match=r"preset 'mettle' \(slideflow-labs/Mettle\).*missing .*unexpected"):
        mettle.spec(checkpoint_path=tmp_path / "bare.safetensors").build()
    # another model's file: a ViT into the ResNet, and a re-wrapped DINOv2 into GPFM
    with pytest.raises(ValueError, match=r"preset 'resnet50' \(timm/resnet50\.tv_in1k\).*does not fit"):
        get_preset("resnet50")(checkpoint_path=path).build()
    gpfm = get_tile_preset("gpfm").with_kwargs(**TINY).replace(outputs=(("cls", 48),))
    _, gstate = ck.tile_checkpoint(gpfm, tmp_path / "g.safetensors")
    torch.save({"teacher": {"backbone." + k: v for k, v in gstate.items()}}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"preset 'gpfm' \(majiabo/GPFM\).*GPFM\.pth"):
        gpfm.spec(checkpoint_path=tmp_path / "wrapped.pth").build()


# -- the tables ------------------------------------------------------------------------------------
def test_readme_and_docs_tables_agree_with_the_registry():
    rows = catalog.describe_all()
    table = catalog.markdown_table(rows)
    for doc in catalog.DOCUMENTS:
        text = (ROOT / doc).read_text()
        block = text.split(catalog.START, 1)[1].split(catalog.END, 1)[0].strip()
        assert block == table, f"{doc} is stale: python -m slide2vec_dask.encoders.catalog --write"
    # and the rows say what the presets say (names once each, counts as published)
    names = re.findall(r"^\| `([a-z0-9.-]+)` \|", table, re.M)
    assert names == list_models()
    for row in rows:
        if row["name"] in PUBLISHED:
            assert row["parameters"] == PUBLISHED[row["name"]][0]
            assert row["outputs"] == PUBLISHED[row["name"]][1]
    assert catalog.main(["--root", str(ROOT)]) == 0


def test_models_verbose_prints_every_column(capsys):
    from slide2vec_dask.cli import main

    assert main(["models", "-v", "--level", "tile"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == set(list_models("tile"))
    assert lines["mettle"][:6] == ["mettle", "tile", "3072", "cls_patch_mean=3072,cls=1536", "1,136,353,296", "0.5"]
    assert lines["mettle"][6:10] == ["224", "slideflow-labs/Mettle", "no", "CC-BY-NC-ND-4.0"]
    assert lines["dinov3-vitb16"][5:7] == ["any", "256"]


# -- CTransPath (CHIEF's weights): current timm Swin vs the timm 0.5 fork the weights were made with --
class OldConvStem(torch.nn.Module):
    """CTransPath's stem for timm 0.5's Swin (tokens out, ``B, N, C``), as TRIDENT's ctran.py defines it."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, flatten=True):
        super().__init__()
        side = img_size[0] if isinstance(img_size, tuple) else img_size
        self.img_size, self.patch_size = (side, side), (patch_size, patch_size)
        self.grid_size = (side // patch_size, side // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        c = embed_dim // 8
        nn = torch.nn
        self.proj = nn.Sequential(nn.Conv2d(in_chans, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                  nn.Conv2d(2 * c, embed_dim, 1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def test_ctranspath_loads_chiefs_file_and_matches_the_timm_fork_it_was_made_with(tmp_path, offline_hf):
    timm_ctp = pytest.importorskip("timm_ctp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        official = timm_ctp.create_model("swin_tiny_patch4_window7_224", embed_layer=OldConvStem, pretrained=False)
    official.head = torch.nn.Identity()
    state = ck.random_state(official, seed=7)
    for key, value in official.state_dict().items():  # computed buffers stay as the model made them
        if key.endswith(("relative_position_index", "attn_mask")):
            state[key] = value
    official.load_state_dict(state, strict=True)
    assert "layers.0.downsample.reduction.weight" in state and "layers.0.blocks.1.attn_mask" in state
    published = tmp_path / "CHIEF_CTransPath.pth"
    torch.save({"model": state}, published)  # the file's format: {"model": state_dict}, attn masks included
    ck.fill_hf_cache(offline_hf, "MahmoodLab/hest-bench", "fm_v1/ctranspath/CHIEF_CTransPath.pth", published,
                     repo_type="dataset")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = official.eval()(x)
        assert expected.shape == (2, 768)
        for source in (published, None):
            module = get_preset("ctranspath")(checkpoint_path=source).build()
            torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    # a checkpoint with a stage missing is refused by name
    del state["layers.3.blocks.1.mlp.fc2.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"preset 'ctranspath'.*missing 1 key.*layers\.3\.blocks\.1\.mlp\.fc2"):
        get_preset("ctranspath")(checkpoint_path=tmp_path / "broken.pth").build()


def test_ctranspath_random_checkpoint_in_the_published_layout_loads(tmp_path):
    path, state = ck.tile_checkpoint("ctranspath", tmp_path / "CHIEF_CTransPath.pth", seed=1)
    stored = torch.load(path, weights_only=True)["model"]
    assert "layers.0.downsample.reduction.weight" in stored and "layers.3.downsample.norm.weight" not in stored
    module = get_preset("ctranspath")(checkpoint_path=path).build()
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in state.items()}


# -- iSight: a training checkpoint holding a transformers CLIPModel, read for its vision tower ---------
def isight_file(state: dict, seed: int = 3) -> dict:
    """``ISightEncoder`` keys -> the released file: transformers CLIP names under ``patch_encoder.``, q/k/v
    split, ``post_layernorm``, a text tower, CLAM heads and optimizer state beside them (all unread)."""
    gen = torch.Generator().manual_seed(seed)
    vision = "patch_encoder.vision_model."
    out = {}
    for key, value in state.items():
        if key.startswith("visual_token_projection."):
            out[key] = value
            continue
        rest = key[len("trunk."):]
        if rest == "cls_token":
            out[vision + "embeddings.class_embedding"] = value.reshape(-1)
        elif rest == "pos_embed":
            out[vision + "embeddings.position_embedding.weight"] = value[0]
        elif rest == "patch_embed.proj.weight":
            out[vision + "embeddings.patch_embedding.weight"] = value
        elif rest.startswith("norm_pre."):
            out[vision + "pre_layrnorm." + rest.split(".")[-1]] = value
        else:
            _, i, sub = rest.split(".", 2)
            layer = f"{vision}encoder.layers.{i}."
            name, kind = sub.rsplit(".", 1)
            if name == "attn.qkv":
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[layer + f"self_attn.{part}_proj.{kind}"] = chunk.clone()
            else:
                hf = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                      "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[name]
                out[layer + f"{hf}.{kind}"] = value
    d = state["visual_token_projection.weight"].shape[0]
    extra = {vision + "post_layernorm.weight": (d,), vision + "post_layernorm.bias": (d,),
             "patch_encoder.text_model.embeddings.token_embedding.weight": (50, 16),
             "patch_encoder.visual_projection.weight": (8, d), "patch_encoder.logit_scale": (),
             "attention_net.0.weight": (4, d), "classifiers.0.weight": (2, d)}
    out.update({k: torch.randn(shape, generator=gen) for k, shape in extra.items()})
    return {"epoch": 3, "model_state_dict": out, "optimizer_state_dict": {"state": {}, "param_groups": []}}


def test_isight_reads_the_vision_tower_of_its_training_checkpoint(tmp_path, offline_hf):
    import timm

    preset = get_tile_preset("isight").with_kwargs(**TINY).replace(outputs=(("token_mean", 48), ("cls", 48)))
    with torch.device("meta"):
        arch = preset.create_architecture()
    state = ck.random_state(arch, seed=4)
    path = tmp_path / "iSight_model_checkpoint.pth"
    torch.save(isight_file(state), path)
    ck.fill_hf_cache(offline_hf, "nirschl-lab/iSight", "checkpoints/iSight_model_checkpoint.pth", path)

    trunk = timm.create_model(preset.arch, pretrained=False, **preset.timm_kwargs())
    trunk.load_state_dict({k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")})
    x = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        tokens = F.linear(trunk.eval().forward_features(x), state["visual_token_projection.weight"],
                          state["visual_token_projection.bias"])
        assert tokens.shape == (2, 1 + 24 * 24, 48)
        expected = {"token_mean": tokens.mean(1), "cls": tokens[:, 0]}
        for source in (path, None):
            for variant in preset.output_variants:
                module = preset.spec(checkpoint_path=source, output_variant=variant).build()
                torch.testing.assert_close(module(x), expected[variant], atol=1e-5, rtol=1e-5)
    # a vision layer missing from the file is refused by name
    broken = isight_file(state)
    del broken["model_state_dict"]["patch_encoder.vision_model.encoder.layers.1.mlp.fc2.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"preset 'isight' \(nirschl-lab/iSight\).*missing 1 key.*blocks\.1\.mlp\.fc2"):
        preset.spec(checkpoint_path=tmp_path / "broken.pth").build()
