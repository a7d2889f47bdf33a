"""`Model.dense_identity_differences` on sidecars our dense embed methods really wrote, and user
encoder classes (slide2vec 7.x's plug-in API) that make dense grids and slide embeddings.

slide2vec 7.1.4's own tests of the same API run from its sdist (tests/peers/run-slide2vec-suite.sh,
``test_dense_identity_api.py``); these read the sidecars from disk as a downstream cache would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slide2vec_dask import (MISSING_FIELD, DenseImageOptions, DenseOptions, ExecutionOptions, ImageSpec, Model,
                            PreprocessingConfig, SlideRegions)
from slide2vec_dask.encoders import SlideEncoder, TileEncoder, register_encoder
from slide2vec_dask.testing.registry import isolated_encoder_registry

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
FP32 = dict(precision="fp32", output_dtype="fp32")
GEOMETRY = ("target_size", "patch_size", "encoded_size", "pad", "grid_shape")


@pytest.fixture(scope="module")
def vit():
    return Model.from_timm("vit_tiny_patch16_224", dynamic_img_size=True, device="cpu")


def _sidecar(artifact) -> dict:
    """The sidecar as a downstream cache reads it: the JSON file next to the grid."""
    return json.loads(artifact.metadata_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(vit, syn_svs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense-identity")
    regions = DenseOptions(spacing_um=0.5, target_size=224)
    (region,) = vit.embed_regions_dense([SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(0, 0)])],
                                        dense=regions, execution=ExecutionOptions(output_dir=out, **FP32))
    images = DenseImageOptions(target_size=224)
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    (image,) = vit.embed_images_dense([ImageSpec(sample_id="img", image_path=pixels)], dense=images,
                                      execution=ExecutionOptions(output_dir=out, **FP32))
    return {"regions": (_sidecar(region), regions), "images": (_sidecar(image), images), "out": out}


@pytest.mark.parametrize("path", ["regions", "images"])
def test_a_sidecar_on_disk_proves_the_request_that_wrote_it(vit, written, path):
    sidecar, dense = written[path]
    execution = ExecutionOptions(**FP32)
    assert vit.dense_identity_differences(sidecar["compatibility"], dense=dense, execution=execution) == {}
    assert vit.dense_identity_differences(sidecar, dense=dense, execution=execution) == {}   # the whole sidecar


@pytest.mark.parametrize("path", ["regions", "images"])
def test_another_request_is_reported_field_by_field(vit, written, path):
    sidecar, dense = written[path]
    other = dataclass_replace(dense, window_size=112, pad_mode="replicate")
    differences = vit.dense_identity_differences(sidecar, dense=other, execution=ExecutionOptions(precision="fp32"))
    assert differences == {"window_size": (None, 112), "pad_mode": ("reflect", "replicate")}
    fp16 = vit.dense_identity_differences(sidecar, dense=dense, execution=ExecutionOptions(precision="fp16"))
    assert fp16 == {"precision": ("fp32", "fp16"), "dtype": ("float32", "float16")}


def test_a_region_sidecar_does_not_prove_an_image_request(vit, written):
    """An image request is compared with its geometry, which a region's record does not hold."""
    sidecar, _ = written["regions"]
    differences = vit.dense_identity_differences(sidecar, dense=DenseImageOptions(target_size=224),
                                                 execution=ExecutionOptions(**FP32))
    assert set(differences) == set(GEOMETRY)
    assert all(old is MISSING_FIELD for old, _ in differences.values())
    assert differences["grid_shape"][1] == [14, 14]


def test_the_comparison_raises_as_extraction_and_writes_nothing(vit, written, syn_svs):
    out = written["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    sidecar, dense = written["regions"]
    bad = dataclass_replace(dense, feature_kind="tokens")
    with pytest.raises(ValueError) as extraction:
        vit.embed_regions_dense([SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(0, 0)])],
                                dense=bad, execution=ExecutionOptions(output_dir=out, **FP32))
    with pytest.raises(ValueError) as comparison:
        vit.dense_identity_differences(sidecar, dense=bad)
    assert str(comparison.value) == str(extraction.value) and "unknown feature_kind 'tokens'" in str(extraction.value)
    with pytest.raises(TypeError, match="DenseOptions or DenseImageOptions"):
        vit.dense_identity_differences(sidecar, dense=PreprocessingConfig())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def dataclass_replace(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)


# -- user encoder classes: a dense tile encoder and a slide encoder over it ------------------------------
class PatchMean(TileEncoder):
    """Each 8 x 8 patch's mean colour (normalised): a grid anyone can compute by hand."""

    built = 0

    def __init__(self, *, output_variant=None):
        type(self).built += 1
        self._device = torch.device("cpu")

    @property
    def encode_dim(self):
        return 3

    @property
    def device(self):
        return self._device

    def to(self, device):
        self._device = torch.device(device)
        return self

    def get_transform(self):
        from torchvision.transforms import v2

        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])])

    def encode_tiles(self, batch):
        return batch.mean(dim=(-1, -2))

    def encode_tiles_dense(self, batch):
        return F.avg_pool2d(batch, kernel_size=8)


class WeightedSlide(SlideEncoder):
    """Tile features weighted by their x coordinate: the slide stage sees features and coordinates."""

    built = 0

    def __init__(self, *, output_variant=None):
        type(self).built += 1

    @property
    def encode_dim(self):
        return 3

    @property
    def device(self):
        return torch.device("cpu")

    def to(self, device):
        return self

    def encode_slide(self, tile_features, coordinates=None, *, tile_size_lv0=None):
        weights = (coordinates[:, 0].float() / float(tile_size_lv0) + 1.0)[:, None]
        return (tile_features * weights).sum(dim=0) / weights.sum()


@pytest.fixture
def plugins():
    with isolated_encoder_registry():
        PatchMean.built = WeightedSlide.built = 0
        register_encoder("test-patch-mean", encode_dim=3, input_size=32, patch_size=8,
                         supports_variable_input_size=True, supported_spacing_um=0.5, precision="fp32")(PatchMean)
        register_encoder("test-weighted-slide", level="slide", tile_encoder="test-patch-mean", encode_dim=3,
                         supported_spacing_um=0.5, precision="fp32")(WeightedSlide)
        yield


def test_a_registered_dense_encoder_makes_its_grid_and_loads_once(plugins):
    model = Model.from_preset("test-patch-mean", device="cpu")
    assert PatchMean.built == 0 and model.feature_dim == 3          # declared: nothing loaded
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    dense = DenseImageOptions(target_size=(32, 48))
    grids = [a.load() for a in model.embed_images_dense(list(pixels), dense=dense)]
    again = model.embed_images_dense(list(pixels[:1]), dense=dense)[0].load()
    expected = F.avg_pool2d((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25, 8)
    torch.testing.assert_close(torch.stack(grids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected[0], atol=1e-5, rtol=1e-5)
    assert PatchMean.built == 1                                      # the model's backend, reused
    with pytest.raises(ValueError, match="does not implement encode_tiles_dense_prenorm"):
        model.embed_images_dense(list(pixels), dense=dataclass_replace(dense, feature_kind="patch_features_prenorm"))


def test_a_registered_slide_encoder_pools_its_tile_encoders_features(plugins, syn_svs):
    model = Model.from_preset("test-weighted-slide", device="cpu")
    assert model.level == "slide" and model.tile_spec.name == "test-patch-mean" and WeightedSlide.built == 0
    config = PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=32, **EXACT)
    emb = model.embed_slide(syn_svs, preprocessing=config)
    assert emb.num_tiles > 1 and emb.tile_embeddings.shape == (emb.num_tiles, 3)
    weights = torch.from_numpy(emb.x / emb.tile_size_lv0 + 1.0).float()[:, None]
    expected = (emb.tile_embeddings * weights).sum(0) / weights.sum()
    torch.testing.assert_close(emb.slide_embedding.float(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dense outputs come from a tile-level encoder"):
        model.dense_identity_differences({}, dense=DenseOptions(spacing_um=0.5, target_size=32))


def test_registered_dense_and_slide_encoders_run_on_a_dask_cluster(syn_svs, tmp_path):
    """The classes travel to the worker processes by value (they are local here) and each builds its own."""
    from distributed import LocalCluster

    with isolated_encoder_registry():
        class LocalPatchMean(PatchMean):   # defined here: cloudpickle sends it by value
            pass

        class LocalWeightedSlide(WeightedSlide):
            pass

        register_encoder("test-local-patch-mean", encode_dim=3, input_size=32, patch_size=8,
                         supports_variable_input_size=True, supported_spacing_um=0.5, precision="fp32")(LocalPatchMean)
        register_encoder("test-local-slide", level="slide", tile_encoder="test-local-patch-mean", encode_dim=3,
                         supported_spacing_um=0.5, precision="fp32")(LocalWeightedSlide)
        slide_model = Model.from_preset("test-local-slide", device="cpu")
        config = PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=32, **EXACT)
        local_slide = slide_model.embed_slide(syn_svs, preprocessing=config).slide_embedding
        model = Model.from_preset("test-local-patch-mean", device="cpu")
        regions = [SlideRegions(sample_id="syn", image_path=syn_svs, coordinates=[(448, 448), (2240, 2240)])]
        dense = DenseOptions(spacing_um=0.5, target_size=64, window_size=32, overlap=0.5)
        local = model.embed_regions_dense(regions, dense=dense)
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
            remote = model.embed_regions_dense(regions, dense=dense, execution=ExecutionOptions(
                scheduler_address=cluster.scheduler_address, output_dir=tmp_path, **FP32))
            remote_slide = slide_model.embed_slide(syn_svs, preprocessing=config, execution=ExecutionOptions(
                scheduler_address=cluster.scheduler_address)).slide_embedding
        torch.testing.assert_close(remote_slide, local_slide, atol=1e-6, rtol=0)
        for a, b in zip(local, remote):
            torch.testing.assert_close(b.load(), a.load(), atol=1e-6, rtol=0)
            assert model.dense_identity_differences(_sidecar(b), dense=dense, execution=ExecutionOptions(**FP32)) == {}
        assert remote[0].load().shape == (3, 8, 8)
