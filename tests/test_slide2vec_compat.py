"""slide2vec 7.x users move over unchanged (issue 27): its call shapes, names, files and YAML configs.

Each test is one shape a 7.x script or config uses; the behaviour asserted is 7.1.4's (its
sdist's api.py / artifacts.py / default.yaml), not our own output.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import slide2vec_dask
from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
from slide2vec_dask.compat import slide2vec_config as s2v
from slide2vec_dask.results import EmbeddedSlides
from slide2vec_dask.tiling.plan import annotation_sampling

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}

PLUGIN = '''
import torch
from slide2vec_dask.encoders import TimmTileEncoder, register_encoder


@register_encoder("compat-tiny", encode_dim=192, input_size=224, supported_spacing_um=0.5, precision="fp32",
                  source="random", patch_size=16)
class CompatTiny(TimmTileEncoder):
    def __init__(self, *, output_variant=None):
        torch.manual_seed(0)
        super().__init__("vit_tiny_patch16_224", output_variant=output_variant, pretrained=False)
'''


@pytest.fixture(scope="module")
def plugin():
    """A user's TimmTileEncoder subclass registered by name (slide2vec 7.x's plug-in API)."""
    from slide2vec_dask.testing.registry import isolated_encoder_registry

    # (later test modules see the package's registry, as a fresh process does)
    with isolated_encoder_registry():
        namespace: dict = {}
        exec(compile(PLUGIN, "compat_plugin", "exec"), namespace)
        yield Model(name="compat-tiny", device="cpu")


# -- names ---------------------------------------------------------------------------------------
def test_7x_names_are_exported():
    for name in ("TileEmbeddingArtifact", "SlideEmbeddingArtifact", "HierarchicalEmbeddingArtifact",
                 "PatientEmbeddingArtifact", "register_encoder", "TileEncoder", "TimmTileEncoder",
                 "TorchTileEncoder", "MISSING_FIELD"):
        assert getattr(slide2vec_dask, name) is not None, name


def test_conch_alias_names_the_conchv15_preset():
    assert Model(name="conchv1.5").name == "conchv15"
    assert Model.from_preset("CONCH-v1.5").name == "conchv15"


# -- Model --------------------------------------------------------------------------------------
def test_model_by_name_with_device_auto_and_output_variant():
    model = Model(name="lunit", device="auto", output_variant=None, allow_non_recommended_settings=False)
    assert model.name == "lunit" and model.device is None
    assert Model.from_preset("lunit", device="auto").device is None
    with pytest.raises(ValueError, match="device"):
        Model(name="lunit", device="tpu")


def test_recommended_settings_guard():
    """A spacing / tile size / precision the publisher does not recommend is an error unless allowed."""
    strict = Model(name="lunit")
    ex = ExecutionOptions().with_gpus(1)
    with pytest.raises(ValueError, match=r"requested_spacing_um=1 .*allow_non_recommended_settings"):
        strict.check_recommended(PreprocessingConfig(requested_spacing_um=1.0), ex)
    with pytest.raises(ValueError, match=r"requested_tile_size_px=256"):
        strict.check_recommended(PreprocessingConfig(requested_tile_size_px=256), ex)
    with pytest.raises(ValueError, match=r"precision=fp16 \(recommended: fp32\)"):
        strict.check_recommended(PreprocessingConfig(), ex.replace(precision="fp16"))
    strict.check_recommended(PreprocessingConfig(), ex)    # the recommended settings pass
    Model(name="lunit", device="cpu").check_recommended(PreprocessingConfig(), ex.replace(precision="fp16"))
    loose = Model(name="lunit", allow_non_recommended_settings=True)
    loose.check_recommended(PreprocessingConfig(requested_spacing_um=1.0), ex)   # a warning, no error


def test_7x_reading_knobs(caplog):
    assert PreprocessingConfig(save_tiles=True).on_the_fly is False   # tiles/<id>.tiles.tar, embedded from there
    with caplog.at_level(logging.WARNING, logger="slide2vec_dask"):
        PreprocessingConfig(jpeg_backend="pil", num_cucim_workers=4)
        assert not caplog.records
        PreprocessingConfig(jpeg_backend="turbojpeg", gpu_decode=True)
    assert [r.getMessage().split(")")[0] for r in caplog.records] == ["PreprocessingConfig(jpeg_backend='turbojpeg'"]
    # 7.x keeps gpu_decode in PreprocessingConfig: it asks for the same decoder as ExecutionOptions.gpu_decode
    # (here, with no GPU, that is the CPU decoder and a warning saying so)
    from slide2vec_dask.dataflow.blocks import EmbedSettings

    with pytest.warns(RuntimeWarning, match="gpu_decode=True, but this run has no GPU"):
        assert EmbedSettings.of(ExecutionOptions(), None, PreprocessingConfig(gpu_decode=True)).gpu_decode is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EmbedSettings.of(ExecutionOptions(), None, PreprocessingConfig()).gpu_decode is False
    ex = ExecutionOptions(num_gpus=2)
    assert ex.resolved_num_gpus() == 2 and ex.with_output_dir("o").output_dir == Path("o")


def test_num_gpus_zero_is_an_error_as_in_7x():
    with pytest.raises(ValueError, match="num_gpus must be at least 1.*device='cpu'"):
        ExecutionOptions(num_gpus=0)
    assert ExecutionOptions(num_workers_per_gpu=3).num_workers == 3
    assert ExecutionOptions(output_dtype="fp16").output_dtype == "fp16"
    with pytest.raises(ValueError, match="output_dtype"):
        ExecutionOptions(output_dtype="bf16")


def test_7x_preprocessing_sections_fold_into_our_fields():
    config = PreprocessingConfig(
        tiling={"requested_spacing_um": 0.5, "requested_tile_size_px": 224, "tolerance": 0.07, "overlap": 0.0,
                "backend": "openslide", "mask_backend": "auto"},
        segmentation={"method": "hsv", "downsample": 64, "sthresh": 8, "sthresh_up": 255, "mthresh": 7, "close": 4},
        filter={"ref_tile_size": 224, "a_t": 4, "a_h": 2, "filter_white": False},
        preview={"save_mask_preview": False, "save_tiling_preview": False, "downsample": 32},
        masks={"pixel_mapping": {"background": 0, "tissue": 1}, "min_coverage": {"tissue": 0.25}})
    assert (config.requested_spacing_um, config.requested_tile_size_px, config.backend) == (0.5, 224, "openslide")
    assert config.filtering["a_t"] == 4 and config.tissue_threshold == 0.25
    # classes beyond background / tissue: annotation bags (tests/test_annotations.py), not the tissue threshold
    annotated = PreprocessingConfig(masks={"pixel_mapping": {"background": 0, "tissue": 1, "tumor": 2},
                                           "min_coverage": {"tumor": 0.5}})
    assert annotated.tissue_threshold == PreprocessingConfig().tissue_threshold
    assert annotation_sampling(annotated).classes == ("tumor",)
    assert PreprocessingConfig(segmentation={"sthresh_up": 200}).segmentation["sthresh_up"] == 200
    with pytest.raises(ValueError, match="segmentation.sthreshold=8: unknown key"):
        PreprocessingConfig(segmentation={"sthreshold": 8})


# -- call shapes ---------------------------------------------------------------------------------
def test_signatures_take_7x_positional_order():
    assert list(inspect.signature(Pipeline.run).parameters)[1:3] == ["slides", "manifest_path"]
    assert list(inspect.signature(Model.embed_patient).parameters)[1:3] == ["slides", "patient_id"]
    assert list(inspect.signature(Model.embed_patients).parameters)[1:3] == ["slides", "patient_id_map"]
    assert list(inspect.signature(Model.embed_tiles).parameters)[1:3] == ["slides", "tiling_results"]
    assert "preprocessing" in inspect.signature(Model.aggregate_tiles).parameters
    assert "on_slide_persisted" in inspect.signature(Pipeline.run_with_coordinates).parameters


def test_embed_slides_iterates_in_order_and_indexes_by_sample_id(tiny, syn_svs, tmp_path):
    result = tiny.embed_slides([{"sample_id": "b", "image_path": syn_svs}, {"sample_id": "a", "image_path": syn_svs}],
                               preprocessing=PreprocessingConfig(**EXACT))
    assert isinstance(result, EmbeddedSlides)
    assert [s.sample_id for s in result] == ["b", "a"] and result[0].sample_id == "b"
    assert result.keys() == ["b", "a"] and "a" in result and "c" not in result
    bag = result["a"]["tissue"]
    assert bag.sample_id == "a" and bag.annotation == "tissue" and bag.tile_embeddings.shape[1] == 192
    for sid in result:   # 7.x's ``for sid in result: result[sid][...]``
        assert result[sid]["tissue"].sample_id in ("a", "b")
    assert {k: list(v) for k, v in result.items()} == {"b": ["tissue"], "a": ["tissue"]}
    assert bag.encoder_input_size_px == 224 and bag.transform["normalize"]["mean"]
    assert tiny.embed_slide(syn_svs, annotation="tissue", preprocessing=PreprocessingConfig(**EXACT)).annotation == "tissue"
    with pytest.raises(ValueError, match="no 'tumor' annotation bag"):
        tiny.embed_slide(syn_svs, annotation="tumor", preprocessing=PreprocessingConfig(**EXACT))


def test_hierarchical_tile_embeddings_are_regions_tiles_dim(tiny, syn_svs):
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(region_tile_multiple=4, **EXACT))
    r, t, d = emb.tile_embeddings.shape
    assert (t, d) == (16, 192) and len(emb.x) == r


def test_output_dtype_fp16_reaches_results(tiny, syn_svs):
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT),
                           execution=ExecutionOptions(output_dtype="fp16"))
    assert emb.tile_embeddings.dtype == torch.float16


def test_pipeline_run_positional_slides_files_and_callbacks(plugin, syn_svs, tmp_path):
    """Pipeline.run(slides) with a registered plug-in on the embedded Dask cluster's workers; slide2vec's files."""
    seen = []
    result = Pipeline(plugin, PreprocessingConfig(**EXACT),
                      execution=ExecutionOptions(output_dir=tmp_path, output_format="pt")).run(
        [{"sample_id": "s1", "image_path": syn_svs}], on_slide_persisted=seen.append)
    assert result.num_failed == 0
    art = result.tile_artifacts[0]
    assert seen == [art]
    assert art.path == tmp_path / "tile_embeddings" / "s1.pt" and art.format == "pt"
    assert art.metadata_path == tmp_path / "tile_embeddings" / "s1.meta.json" and art.feature_dim == 192
    assert art.annotation is None
    meta = art.metadata
    assert meta["artifact_type"] == "tile_embeddings" and meta["encoder_name"] == "compat-tiny"
    assert meta["encoder_level"] == "tile" and meta["feature_dtype"] == "fp32" and meta["num_tiles"] == art.num_tiles
    coords = np.load(meta["coordinates_npz_path"])
    assert sorted(coords.files) == ["tile_index", "tissue_fractions", "x", "y"] and len(coords["x"]) == art.num_tiles
    assert json.loads(Path(meta["coordinates_meta_path"]).read_text())["tiling"]["requested_tile_size_px"] == 224
    assert torch.load(art.path, weights_only=True).shape == (art.num_tiles, 192)
    # the identity recorded is what the model makes now; another precision differs
    assert plugin.pooled_identity_differences(meta, preprocessing=PreprocessingConfig(**EXACT)) == {}
    changed = plugin.pooled_identity_differences(meta, preprocessing=PreprocessingConfig(**EXACT),
                                                 execution=ExecutionOptions(precision="fp16"))
    assert set(changed) >= {"precision", "feature_dtype"}
    missing = plugin.pooled_identity_differences({}, preprocessing=PreprocessingConfig(**EXACT))
    assert missing["encoder_name"][0] is slide2vec_dask.MISSING_FIELD
    rows = (tmp_path / "process_list.csv").read_text().splitlines()
    assert "feature_status" in rows[0] and "tile_embeddings/s1.pt" in rows[1]
    # a rerun with another feature identity is refused, not mixed into the store
    with pytest.raises(ValueError, match="feature_identity"):
        Pipeline(plugin, PreprocessingConfig(**EXACT),
                 execution=ExecutionOptions(output_dir=tmp_path, output_format="pt", output_dtype="fp16")).run(
            [{"sample_id": "s1", "image_path": syn_svs}])


def test_embed_tiles_takes_tiling_results(plugin, syn_svs, tmp_path):
    first = Pipeline(plugin, PreprocessingConfig(**EXACT),
                     execution=ExecutionOptions(output_dir=tmp_path / "a", output_format="pt")).run(
        [{"sample_id": "s1", "image_path": syn_svs}])
    coords = json.loads(first.tile_artifacts[0].metadata_path.read_text())["coordinates_npz_path"]
    seen = []
    arts = plugin.embed_tiles([{"sample_id": "s1", "image_path": syn_svs}], [{"coordinates_npz_path": coords}],
                              execution=ExecutionOptions(output_dir=tmp_path / "b", output_format="npz"),
                              on_slide_persisted=seen.append)
    assert [a.sample_id for a in seen] == ["s1"] and arts[0].format == "npz"
    with np.load(arts[0].path) as npz:
        np.testing.assert_allclose(npz["features"], torch.load(first.tile_artifacts[0].path).numpy(), atol=1e-5)


# -- YAML and the command line ---------------------------------------------------------------------
def slide2vec_yaml(tmp_path: Path, csv: Path, **extra: str) -> Path:
    text = textwrap.dedent(f"""\
        csv: {csv}
        output_dir: {tmp_path / 'out'}
        seed: 0
        model:
          name: compat-tiny
          batch_size: 16
        tiling:
          jpeg_backend: pil
          params:
            requested_spacing_um: 0.5
          seg_params:
            mthresh: 0
          masks:
            pixel_mapping: {{background: 0, tissue: 1}}
            min_coverage: {{background: null, tissue: 0.5}}
          preview:
            save_mask_preview: false
            save_tiling_preview: false
        speed:
          num_cucim_workers: 4
        wandb:
          enable: false
        """)
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    path = tmp_path / "s2v.yaml"
    path.write_text(text)
    return path


def test_slide2vec_config_maps_onto_our_options(tmp_path, caplog):
    cfg, user = s2v.load(slide2vec_yaml(tmp_path, tmp_path / "s.csv"), ["model.batch_size=8"])
    assert cfg["tiling"]["filter_params"]["ref_tile_size"] is None   # ${tiling.params.requested_tile_size_px}
    with caplog.at_level(logging.WARNING, logger="slide2vec_dask"):
        said = s2v.warn_ignored(user)
    assert said == ["wandb", "speed.num_cucim_workers", "tiling.jpeg_backend"]
    assert len([r for r in caplog.records if "wandb" in r.getMessage()]) == 1
    prep = s2v.preprocessing(cfg)
    assert prep.tissue_threshold == 0.5 and prep.filtering["a_t"] == 4 and prep.requested_spacing_um == 0.5
    ex = s2v.execution(cfg, tmp_path / "out", run_on_cpu=True)
    assert ex.batch_size == 8 and ex.num_gpus == 0 and ex.precision == "fp32" and ex.output_format == ("pt",)
    with pytest.raises(s2v.Slide2vecConfigError, match=r"unknown key 'model.batchsize' \(did you mean 'model.batch_size'\?\)"):
        s2v.load(slide2vec_yaml(tmp_path, tmp_path / "s.csv"), ["model.batchsize=8"])
    folder = s2v.run_folder({"output_dir": "o", "resume": False}, skip_datetime=False)
    assert folder.parent == Path("o") and len(folder.name) == len("2026-01-01_10_00")


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "run_s2v.py"
    script.write_text(PLUGIN + "\nif __name__ == '__main__':\n    import sys\n    from slide2vec_dask.cli import main\n"
                      "    sys.exit(main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_slide2vec_yaml_runs_through_our_cli(syn_svs, tmp_path):
    csv = tmp_path / "slides.csv"
    csv.write_text(f"sample_id,image_path\nsyn,{syn_svs}\n")
    config = slide2vec_yaml(tmp_path, csv)
    done = run_cli(tmp_path, str(config), "--skip-datetime", "--run-on-cpu", "model.batch_size=8")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("is accepted and ignored") == 3, done.stderr
    out = tmp_path / "out"
    for name in ("config.yaml", "process_list.csv", "tile_embeddings/syn.pt", "tile_embeddings/syn.meta.json",
                 "tiles/syn.coordinates.npz", "tiles/syn.coordinates.meta.json", "embeddings.zarr"):
        assert (out / name).exists(), name
    saved = (out / "config.yaml").read_text()
    assert "batch_size: 8" in saved and "name: compat-tiny" in saved
    typo = run_cli(tmp_path, str(config), "--skip-datetime", "tiling.params.tolerence=0.1")
    assert typo.returncode == 2 and "did you mean 'tiling.params.tolerance'" in typo.stderr


def test_tiling_only_writes_coordinates_and_no_embeddings(syn_svs, tmp_path):
    csv = tmp_path / "slides.csv"
    csv.write_text(f"sample_id,image_path\nsyn,{syn_svs}\n")
    done = run_cli(tmp_path, str(slide2vec_yaml(tmp_path, csv)), "--skip-datetime", "--tiling-only")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    with np.load(out / "tiles" / "syn.coordinates.npz") as coords:
        assert len(coords["x"]) > 0
    assert not (out / "tile_embeddings").exists()
    import csv as csv_module

    row = next(csv_module.DictReader((out / "process_list.csv").open()))
    assert Path(row["coordinates_npz_path"]) == out / "tiles" / "syn.coordinates.npz"
    assert row["tiling_status"] == "success" and int(row["num_tiles"]) == len(np.load(out / "tiles" / "syn.coordinates.npz")["x"])


def test_run_command_takes_either_kind_of_config(tmp_path):
    from slide2vec_dask.cli import _slide2vec_file

    ours = tmp_path / "ours.yaml"
    ours.write_text("manifest: s.csv\nmodel: {preset: lunit}\nexecution: {output_dir: out}\n")
    assert _slide2vec_file(slide2vec_yaml(tmp_path, tmp_path / "s.csv")) and not _slide2vec_file(ours)


PROVIDERS = '''
import importlib.metadata, warnings

class EP:
    def __init__(self, name, value, fn):
        self.name, self.value, self.fn = name, value, fn
    def load(self):
        return self.fn

class EPs(list):
    def select(self, *, group):
        return self if group == "slide2vec_dask.encoders" else EPs()

def good():
    from slide2vec_dask.encoders import register_encoder
    register_encoder("from-provider", encode_dim=3, input_size=224, supported_spacing_um=0.5, precision="fp32")(Three)

def broken():
    from slide2vec_dask.encoders import register_encoder
    register_encoder("half-registered", encode_dim=3, input_size=224, supported_spacing_um=0.5, precision="fp32")(Three)
    raise RuntimeError("provider setup failed")

importlib.metadata.entry_points = lambda **kw: EPs([EP("b-broken", "b:f", broken), EP("a-good", "a:f", good)])
from slide2vec_dask import Model, list_encoder_provider_diagnostics, list_models
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    names = list_models()
assert "from-provider" in names and "half-registered" not in names, names
assert [str(w.message) for w in caught] == ["Skipped Encoder provider 'b-broken': RuntimeError: provider setup failed"]
(d,) = list_encoder_provider_diagnostics()
assert (d.provider_key, d.provider, d.exception_type) == ("b-broken", "b:f", "RuntimeError")
assert Model(name="from-provider", device="cpu").feature_dim == 3
try:
    Model(name="half-registered")
except KeyError as exc:
    assert "b-broken" in str(exc) and "Available:" in str(exc)
else:
    raise AssertionError("a rolled-back name resolved")
print("ok")
'''

THREE = '''
import torch
from slide2vec_dask.encoders import TileEncoder

class Three(TileEncoder):
    def __init__(self, *, output_variant=None):
        self._device = torch.device("cpu")
    encode_dim = property(lambda self: 3)
    device = property(lambda self: self._device)
    def to(self, device):
        return self
    def get_transform(self):
        return lambda image: image
    def encode_tiles(self, batch):
        return batch.flatten(1)[:, :3]
'''


def test_installed_providers_are_all_or_nothing_and_reported():
    script = THREE + PROVIDERS
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
