"""Slide- and patient-level models end to end: Model API, Pipeline, store, errors.

Each preset runs with its full published aggregator (random weights in the
official checkpoint layout, written by the preset module) over a small
stand-in tile encoder of the chained encoder's feature dimension, so the
tile stage stays cheap.  Outputs are compared with the aggregator module
loaded on its own and fed the tile embeddings and coordinates directly.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, testing
from slide2vec_dask.encoders.registry import get_preset
from slide2vec_dask.testing import checkpoints as ck

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
SLIDE_PRESETS = {"gigapath-slide": "gigapath", "titan": "titan", "prism": "prism", "moozy-slide": "moozy"}


class Pooled(torch.nn.Module):
    """A small seeded tile encoder: 8x8 average colours through a fixed projection."""

    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(dim)
        self.pool = torch.nn.AdaptiveAvgPool2d(8)
        self.proj = torch.nn.Linear(3 * 64, dim)

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


def stand_in(name: str) -> Model:
    """A cheap tile encoder with the chained encoder's contract (dim, tile size, spacing)."""
    tile = get_preset(name)().tile_encoder
    return Model.from_module(Pooled(tile.feature_dim), name=f"stand-in-{tile.name}",
                             spacing_um=tile.spacing_um, tile_size_px=tile.tile_size_px,
                             feature_dim=tile.feature_dim)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aggregators")
    made = {}

    def get(module: str) -> Path:
        if module not in made:
            mod = importlib.import_module(f"slide2vec_dask.encoders.aggregators.{module}")
            suffix = {"gigapath": "slide_encoder.pth", "titan": "model.safetensors",
                      "prism": "model.safetensors", "moozy": "moozy.pt"}[module]
            extra = {}
            if module == "prism":
                extra["cfg"] = mod.PrismConfig(**PRISM_TWIN)
            made[module] = ck.RANDOM_CHECKPOINTS[module](folder / f"{module}-{suffix}", **extra)
        return made[module]

    return get


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agg-slides")
    a = testing.write_svs(folder / "a.svs", testing.tissue_image(1792, 2240, [(224, 448, 1344, 1792)], seed=3),
                          downsamples=(1, 4))
    b = testing.write_svs(folder / "b.svs", testing.tissue_image(1344, 1792, [(0, 0, 896, 1344)], seed=4),
                          downsamples=(1, 4))
    blank = testing.write_svs(folder / "blank.svs", testing.tissue_image(896, 896, []), downsamples=(1,))
    return {"a": a, "b": b, "blank": blank}


# PRISM's full resampler costs ~15 s per slide on this CPU whatever the tile count (self-attention
# over 513 latents): its end-to-end run here uses a shallow twin of the same code and key layout.
PRISM_TWIN = dict(latent_seq=16, latent_dim=64, mhsa_heads=4, perceiver_depth=2, transformer_depth=2)


def slide_spec(name: str, checkpoint: Path):
    if name == "prism":
        from slide2vec_dask.encoders.aggregators.prism import PrismConfig, prism_spec

        return prism_spec(checkpoint_path=checkpoint, cfg=PrismConfig(**PRISM_TWIN))
    return get_preset(name)(checkpoint_path=checkpoint)


def slide_model(name: str, checkpoint: Path) -> Model:
    import dataclasses

    return Model(dataclasses.replace(slide_spec(name, checkpoint), tile_encoder=stand_in(name).tile_spec))


def bare_module(name: str, checkpoint: Path):
    return slide_spec(name, checkpoint).build().eval()


def reference_slide_embedding(module, emb) -> np.ndarray:
    coords = torch.from_numpy(np.stack([emb.x, emb.y], axis=1).astype(np.int64))
    with torch.inference_mode():
        out = module.encode_slide(emb.tile_embeddings.float(), coords, int(emb.tile_size_lv0))
    return out.embedding.float().numpy(), (None if out.latents is None else out.latents.float().numpy())


@pytest.mark.parametrize("name", sorted(SLIDE_PRESETS))
def test_slide_preset_embeds_a_slide_end_to_end(name, checkpoints, slides):
    ckpt = checkpoints(SLIDE_PRESETS[name])
    model = slide_model(name, ckpt)
    assert model.level == "slide"
    emb = model.embed_slide(slides["a"], preprocessing=PreprocessingConfig(**EXACT))
    spec = slide_spec(name, ckpt)
    assert emb.num_tiles > 0 and emb.tile_embeddings.shape == (emb.num_tiles, spec.tile_encoder.feature_dim)
    assert emb.slide_embedding.shape == (spec.feature_dim,)
    assert torch.isfinite(emb.slide_embedding).all()
    expected, latents = reference_slide_embedding(bare_module(name, ckpt), emb)
    np.testing.assert_allclose(emb.slide_embedding.numpy(), expected, rtol=1e-4, atol=1e-5)
    if latents is None:
        assert emb.latents is None
    else:
        np.testing.assert_allclose(emb.latents.numpy(), latents, rtol=1e-4, atol=1e-5)


def test_pipeline_with_a_slide_model_writes_the_slides_table(checkpoints, slides, tmp_path):
    ckpt = checkpoints("titan")
    model = Model.from_preset("titan", checkpoint_path=ckpt, tile_encoder=stand_in("titan"))
    config = PreprocessingConfig(**EXACT)
    manifest = [{"sample_id": "a", "image_path": slides["a"]}, {"sample_id": "blank", "image_path": slides["blank"]},
                {"sample_id": "b", "image_path": slides["b"]}]
    run = Pipeline(model, config, ExecutionOptions(output_dir=tmp_path / "run", output_format="pt",
                                                   save_latents=True)).run(slides=manifest)

    # The blank slide fails on its own, with a message that says why; the others finish.
    assert run.num_failed == 1
    assert [a.sample_id for a in run.slide_artifacts] == ["a", "b"]
    table = xr.open_zarr(run.store_path, group="slides")
    assert list(table["sample_id"].values) == ["a", "b"]
    assert table["embedding"].shape == (2, 768) and table["latents"].shape == (2, 128, 768)
    # Tile embeddings were an intermediate: not kept unless asked.
    assert run.tile_artifacts == []
    assert "tiles/a" not in [f"tiles/{k}" for k in xr.open_datatree(run.store_path, engine="zarr")["tiles"].children]
    # The same numbers as the in-memory API, and as the flat files.
    for i, sid in enumerate(["a", "b"]):
        direct = model.embed_slide({"sample_id": sid, "image_path": slides[sid]}, preprocessing=config)
        np.testing.assert_allclose(table["embedding"].values[i], direct.slide_embedding.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(table["latents"].values[i], direct.latents.numpy(), rtol=1e-4, atol=1e-5)
        flat = run.slide_artifacts[i].flat_path
        assert flat == tmp_path / "run" / "slide_embeddings" / f"{sid}.pt"
        np.testing.assert_allclose(torch.load(flat).numpy(), table["embedding"].values[i])
    import csv

    with open(run.process_list_path) as f:
        rows = {r["sample_id"]: r for r in csv.DictReader(f)}
    assert rows["blank"]["status"] == "failed" and "no tiles" in rows["blank"]["error"]
    assert rows["a"]["status"] == "success" and rows["a"]["store_group"] == "slides"

    # A second run does no work and keeps the table.
    again = Pipeline(model, config, ExecutionOptions(output_dir=tmp_path / "run", output_format="pt",
                                                     save_latents=True)).run(slides=manifest[:1] + manifest[2:])
    assert again.num_skipped == 2 and [a.sample_id for a in again.slide_artifacts] == ["a", "b"]


def test_save_tile_embeddings_keeps_the_tile_stage(checkpoints, slides, tmp_path):
    model = Model.from_preset("moozy-slide", checkpoint_path=checkpoints("moozy"), tile_encoder=stand_in("moozy-slide"))
    run = Pipeline(model, PreprocessingConfig(**EXACT),
                   ExecutionOptions(output_dir=tmp_path / "run", save_tile_embeddings=True)).run(slides=[slides["b"]])
    assert [a.sample_id for a in run.tile_artifacts] == ["b"]
    tiles = xr.open_zarr(run.store_path, group="tiles/b")
    assert tiles["embedding"].shape == (run.tile_artifacts[0].num_tiles, 384)
    assert xr.open_zarr(run.store_path, group="slides")["embedding"].shape == (1, 768)


def test_a_rerun_that_asks_for_more_computes_what_is_missing(checkpoints, slides, tmp_path):
    """Tiles and latents not kept by a first run are made by a rerun that asks for them."""
    model = Model.from_preset("titan", checkpoint_path=checkpoints("titan"), tile_encoder=stand_in("titan"))
    config = PreprocessingConfig(**EXACT)
    first = Pipeline(model, config, ExecutionOptions(output_dir=tmp_path / "run")).run(slides=[slides["b"]])
    assert first.tile_artifacts == [] and "latents" not in xr.open_zarr(first.store_path, group="slides")

    more = ExecutionOptions(output_dir=tmp_path / "run", save_tile_embeddings=True, save_latents=True)
    again = Pipeline(model, config, more).run(slides=[slides["b"]])
    assert again.num_skipped == 0 and [a.sample_id for a in again.tile_artifacts] == ["b"]
    direct = model.embed_slide(slides["b"], preprocessing=config)
    tiles = xr.open_zarr(again.store_path, group="tiles/b")
    np.testing.assert_allclose(tiles["embedding"].values, direct.tile_embeddings.numpy(), rtol=1e-4, atol=1e-5)
    table = xr.open_zarr(again.store_path, group="slides")
    np.testing.assert_allclose(table["latents"].values[0], direct.latents.numpy(), rtol=1e-4, atol=1e-5)
    # Now everything asked for is there: nothing to do.
    assert Pipeline(model, config, more).run(slides=[slides["b"]]).num_skipped == 1


def test_embed_tiles_then_aggregate_tiles(checkpoints, slides, tmp_path):
    ckpt = checkpoints("moozy")
    model = Model.from_preset("moozy-slide", checkpoint_path=ckpt, tile_encoder=stand_in("moozy-slide"))
    config = PreprocessingConfig(**EXACT)
    tiles = model.embed_tiles([slides["a"], slides["b"]], output_dir=tmp_path / "t", preprocessing=config)
    assert [t.sample_id for t in tiles] == ["a", "b"]
    # slide2vec 7.x's aggregate_tiles(..., preprocessing=): the settings the tiles were made with, checked
    with pytest.raises(ValueError, match="made at 224 px, preprocessing asks 448 px"):
        model.aggregate_tiles(tiles, preprocessing=config.replace(requested_tile_size_px=448))
    out = model.aggregate_tiles(tiles, preprocessing=config,
                                execution=ExecutionOptions(output_format="npz", output_dir=tmp_path / "t"))
    assert [o.sample_id for o in out] == ["a", "b"]
    table = xr.open_zarr(tiles[0].store_path, group="slides")
    assert list(table["sample_id"].values) == ["a", "b"]  # in the artifacts' order
    direct = model.embed_slide(slides["a"], preprocessing=config)
    np.testing.assert_allclose(table["embedding"].values[0], direct.slide_embedding.numpy(), rtol=1e-4, atol=1e-5)
    assert np.load(out[1].flat_path)["features"].shape == (768,)
    # Features of another tile encoder are refused, not silently aggregated.
    other = Model.from_preset("titan", checkpoint_path=checkpoints("titan"), tile_encoder=stand_in("titan"))
    with pytest.raises(ValueError, match="made by"):
        other.aggregate_tiles(tiles)


# -- patients ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moozy(checkpoints):
    return Model.from_preset("moozy", checkpoint_path=checkpoints("moozy"), tile_encoder=stand_in("moozy"))


def reference_patient(checkpoint, slide_embeddings) -> np.ndarray:
    case = get_preset("moozy")(checkpoint_path=checkpoint).build().eval()
    with torch.inference_mode():
        return case.encode_patient(torch.stack(list(slide_embeddings))).float().numpy()


def test_embed_patients_groups_in_order_of_first_appearance(moozy, checkpoints, slides):
    config = PreprocessingConfig(**EXACT)
    inputs = [{"sample_id": "b1", "image_path": slides["b"], "patient_id": "p2"},
              {"sample_id": "a1", "image_path": slides["a"], "patient_id": "p1"},
              {"sample_id": "a2", "image_path": slides["a"], "patient_id": "p2"}]
    patients = moozy.embed_patients(inputs, preprocessing=config)
    assert [p.patient_id for p in patients] == ["p2", "p1"]
    assert list(patients[0].slide_embeddings) == ["b1", "a2"] and list(patients[1].slide_embeddings) == ["a1"]
    assert patients[0].patient_embedding.shape == (768,)
    # Same slide image, same slide embedding, whichever patient it is in.
    torch.testing.assert_close(patients[1].slide_embeddings["a1"], patients[0].slide_embeddings["a2"])
    np.testing.assert_allclose(patients[0].patient_embedding.numpy(),
                               reference_patient(checkpoints("moozy"), patients[0].slide_embeddings.values()),
                               rtol=1e-4, atol=1e-5)
    # patient_id_map overrides the slides' own keys.
    # slide2vec 7.x's positional forms: embed_patients(slides, patient_id_map), embed_patient(slides, patient_id)
    remapped = moozy.embed_patients(inputs, {"b1": "x", "a1": "x", "a2": "y"}, preprocessing=config)
    assert [(p.patient_id, list(p.slide_embeddings)) for p in remapped] == [("x", ["b1", "a1"]), ("y", ["a2"])]
    # embed_patient: the argument, else the slides' common patient_id, else the first sample_id.
    assert moozy.embed_patient(inputs[:1], preprocessing=config).patient_id == "p2"
    assert moozy.embed_patient([slides["b"]], "z", preprocessing=config).patient_id == "z"
    assert moozy.embed_patient([slides["b"]], preprocessing=config).patient_id == "b"
    with pytest.raises(ValueError, match="several patients"):
        moozy.embed_patient(inputs, preprocessing=config)


def test_level_errors(moozy, checkpoints, slides, tiny):
    with pytest.raises(ValueError, match="patient-level model"):
        tiny.embed_patient([slides["a"]])
    slide_model = Model.from_preset("moozy-slide", checkpoint_path=checkpoints("moozy"))
    with pytest.raises(ValueError, match="patient-level model"):
        slide_model.embed_patients([slides["a"]])
    with pytest.raises(ValueError, match="tile-level"):
        tiny.aggregate_tiles([])
    with pytest.raises(ValueError, match="aggregates 384-d"):
        Model.from_preset("moozy", tile_encoder=tiny)
    with pytest.raises(ValueError, match="tile-level model"):
        Model.from_preset("lunit", tile_encoder=tiny)
    with pytest.raises(ValueError, match="makes no slide embeddings"):
        Pipeline(tiny, execution=ExecutionOptions(output_dir="x", save_slide_embeddings=True))
    with pytest.raises(ValueError, match="has no latents"):
        Pipeline(moozy, execution=ExecutionOptions(output_dir="x", save_latents=True))


def test_pipeline_with_the_patient_model(moozy, checkpoints, slides, tmp_path):
    config = PreprocessingConfig(**EXACT)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"sample_id,image_path,patient_id\nb1,{slides['b']},p2\na1,{slides['a']},p1\n"
                        f"a2,{slides['a']},p2\n")
    run = Pipeline(moozy, config, ExecutionOptions(output_dir=tmp_path / "run", output_format="npz",
                                                   save_slide_embeddings=True)).run(manifest_path=manifest)
    assert run.num_failed == 0
    assert [(p.patient_id, p.sample_ids) for p in run.patient_artifacts] == [("p2", ["b1", "a2"]), ("p1", ["a1"])]
    patients = xr.open_zarr(run.store_path, group="patients")
    slides_table = xr.open_zarr(run.store_path, group="slides")
    by_slide = dict(zip(slides_table["sample_id"].values, slides_table["embedding"].values))
    assert set(by_slide) == {"b1", "a1", "a2"}
    by_patient = dict(zip(patients["patient_id"].values, patients["embedding"].values))
    expected = reference_patient(checkpoints("moozy"), [torch.from_numpy(by_slide[s]) for s in ("b1", "a2")])
    np.testing.assert_allclose(by_patient["p2"], expected, rtol=1e-4, atol=1e-5)
    in_memory = moozy.embed_patients([{"sample_id": "b1", "image_path": slides["b"], "patient_id": "p2"},
                                      {"sample_id": "a2", "image_path": slides["a"], "patient_id": "p2"}],
                                     preprocessing=config)
    np.testing.assert_allclose(by_patient["p2"], in_memory[0].patient_embedding.numpy(), rtol=1e-4, atol=1e-5)
    assert np.load(run.patient_artifacts[0].flat_path)["features"].shape == (768,)

    # Without save_slide_embeddings the slide rows are not kept; patients are.
    lean = Pipeline(moozy, config, ExecutionOptions(output_dir=tmp_path / "lean")).run(manifest_path=manifest)
    tree = xr.open_datatree(lean.store_path, engine="zarr")
    assert "slides" not in tree.children and lean.slide_artifacts == []
    np.testing.assert_allclose(xr.open_zarr(lean.store_path, group="patients")["embedding"].values,
                               patients["embedding"].values, rtol=1e-5, atol=1e-6)


def test_a_patient_rerun_that_asks_for_slide_rows_makes_them(moozy, slides, tmp_path):
    config = PreprocessingConfig(**EXACT)
    manifest = [{"sample_id": "b1", "image_path": slides["b"], "patient_id": "p"}]
    lean = Pipeline(moozy, config, ExecutionOptions(output_dir=tmp_path / "run")).run(slides=manifest)
    assert lean.slide_artifacts == [] and lean.num_failed == 0
    again = Pipeline(moozy, config, ExecutionOptions(output_dir=tmp_path / "run", save_slide_embeddings=True)) \
        .run(slides=manifest)
    assert again.num_skipped == 0 and [a.sample_id for a in again.slide_artifacts] == ["b1"]
    direct = moozy.embed_patient(manifest, preprocessing=config)
    np.testing.assert_allclose(xr.open_zarr(again.store_path, group="slides")["embedding"].values[0],
                               direct.slide_embeddings["b1"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(xr.open_zarr(again.store_path, group="patients")["embedding"].values[0],
                               direct.patient_embedding.numpy(), rtol=1e-4, atol=1e-5)


def test_a_new_patient_of_embedded_slides_needs_only_its_patient_task(moozy, slides, tmp_path):
    """Slide rows kept by a first run; a second run groups the same slide under a new patient:
    no tile or slide work, just the patient embedding (its row in the store, its outcome a success)."""
    config, out = PreprocessingConfig(**EXACT), tmp_path / "run"
    execution = ExecutionOptions(output_dir=out, save_slide_embeddings=True)
    Pipeline(moozy, config, execution).run(slides=[{"sample_id": "b1", "image_path": slides["b"], "patient_id": "p"}])
    again = Pipeline(moozy, config, execution).run(
        slides=[{"sample_id": "b1", "image_path": slides["b"], "patient_id": "q"}])
    assert [(o.sample_id, o.status) for o in again.outcomes] == [("b1", "success")]
    patients = xr.open_zarr(again.store_path, group="patients")
    assert list(patients["patient_id"].values) == ["q", "p"]
    np.testing.assert_array_equal(patients["embedding"].values[0], patients["embedding"].values[1])


def test_patient_model_needs_patient_ids_before_any_work(moozy, slides, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"sample_id,image_path,patient_id\na,{slides['a']},p1\nb,{slides['b']},\n")
    with pytest.raises(ValueError, match=r"patient_id.*\['b'\]"):
        Pipeline(moozy, execution=ExecutionOptions(output_dir=tmp_path / "run")).run(manifest_path=manifest)
    assert not (tmp_path / "run" / "embeddings.zarr").exists()


@pytest.mark.parametrize("name", ["gigapath-slide", "prism"])
def test_pipeline_runs_the_other_slide_presets(name, checkpoints, slides, tmp_path):
    """Every slide preset goes through the Pipeline too (titan and moozy-slide are covered above)."""
    model = slide_model(name, checkpoints(SLIDE_PRESETS[name]))
    config = PreprocessingConfig(**EXACT)
    run = Pipeline(model, config, ExecutionOptions(output_dir=tmp_path / "run")).run(slides=[slides["b"]])
    assert run.num_failed == 0 and [a.sample_id for a in run.slide_artifacts] == ["b"]
    table = xr.open_zarr(run.store_path, group="slides")
    direct = model.embed_slide(slides["b"], preprocessing=config)
    np.testing.assert_allclose(table["embedding"].values[0], direct.slide_embedding.numpy(), rtol=1e-4, atol=1e-5)


def test_aggregation_runs_only_on_gpu_workers(checkpoints, slides, tmp_path):
    """Slide-encoder tasks carry resources={"GPU": 1} like the tile encoder's."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from slide2vec_dask.dataflow import worker

    model = slide_model("moozy-slide", checkpoints("moozy"))
    workers = {"cpu": {"cls": Nanny, "options": {"nthreads": 1}},
               "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        run = Pipeline(model, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=tmp_path / "run"),
                       client=client).run(slides=[slides["a"], slides["b"]])
        loaded = client.run(worker.loaded_encoder_keys)
        names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
    assert run.num_failed == 0 and len(run.slide_artifacts) == 2
    by_name = {names[addr]: {k[0] for k in keys} for addr, keys in loaded.items()}
    assert model.spec.key in by_name["gpu"] and model.tile_spec.key in by_name["gpu"]
    assert not by_name["cpu"] & {model.spec.key, model.tile_spec.key}
