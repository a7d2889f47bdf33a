"""embed_slide end to end, checked against the bare timm model on tiles read by OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SYN_TILES, openslide_tiles, reference_embeddings

from slide2vec_dask import ExecutionOptions, Model, PreprocessingConfig, activate_progress_reporter

# The tiles of the synthetic slide's rectangles exactly: one grid from the slide's corner, on which
# the rectangles lie (hs2p's grids per contour start where each rectangle's mask starts).
EXACT = {"tissue_threshold": 0.5, "grid": "slide"}


def test_embeddings_equal_bare_model_on_openslide_tiles(tiny, syn_svs, vit_tiny_checkpoint):
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
    assert emb.num_tiles == len(SYN_TILES) and emb.tile_embeddings.shape == (len(SYN_TILES), 192)
    assert emb.tile_embeddings.dtype == torch.float32
    assert set(zip((emb.y // 224).tolist(), (emb.x // 224).tolist())) == SYN_TILES
    tiles = openslide_tiles(syn_svs, emb.x, emb.y, 224)
    expected = reference_embeddings(vit_tiny_checkpoint, tiles, tiny.spec.mean, tiny.spec.std)
    torch.testing.assert_close(emb.tile_embeddings, expected, atol=1e-4, rtol=0)


def test_between_levels_reads_finer_and_resizes(tiny, syn_svs, vit_tiny_checkpoint):
    config = PreprocessingConfig(requested_spacing_um=1.0, **EXACT)
    emb = tiny.embed_slide(syn_svs, preprocessing=config)
    assert emb.tile_size_lv0 == 448 and emb.attrs["read_tile_size_px"] == 448
    tiles = openslide_tiles(syn_svs, emb.x, emb.y, 448)
    expected = reference_embeddings(vit_tiny_checkpoint, tiles, tiny.spec.mean, tiny.spec.std)
    torch.testing.assert_close(emb.tile_embeddings, expected, atol=1e-4, rtol=0)
    # slide2vec resizes in float; the uint8 resize stays within rounding of it
    in_float = reference_embeddings(vit_tiny_checkpoint, tiles, tiny.spec.mean, tiny.spec.std, resize="float")
    assert torch.nn.functional.cosine_similarity(emb.tile_embeddings, in_float).min() > 0.9999


def test_coarser_level_reads_that_level(tiny, syn_svs, vit_tiny_checkpoint):
    # (a_t 0: at 2 µm/px the rectangles are under a_t = 4 reference tiles of 224 px, and hs2p drops them)
    emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(requested_spacing_um=2.0,
                                                                      tissue_threshold=0.01, filtering={"a_t": 0}))
    assert emb.attrs["read_level"] == 1 and emb.tile_size_lv0 == 896
    tiles = openslide_tiles(syn_svs, emb.x, emb.y, 896, level=1, read_size=224)
    expected = reference_embeddings(vit_tiny_checkpoint, tiles, tiny.spec.mean, tiny.spec.std)
    torch.testing.assert_close(emb.tile_embeddings, expected, atol=1e-4, rtol=0)


def test_real_slide(tiny, cmu_svs, vit_tiny_checkpoint):
    emb = tiny.embed_slide({"image_path": cmu_svs, "sample_id": "cmu"})
    assert emb.sample_id == "cmu" and emb.num_tiles > 30
    tiles = openslide_tiles(cmu_svs, emb.x, emb.y, 224)
    # CMU is 0.499 µm/px: within tolerance of 0.5, read as is.
    expected = reference_embeddings(vit_tiny_checkpoint, tiles, tiny.spec.mean, tiny.spec.std)
    torch.testing.assert_close(emb.tile_embeddings, expected, atol=1e-4, rtol=0)


def test_without_supertiles_and_tiny_batches_gives_the_same(tiny, syn_svs):
    a = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
    b = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(use_supertiles=False, **EXACT),
                         execution=ExecutionOptions(batch_size=3, num_workers=1, prefetch_factor=1))
    np.testing.assert_array_equal(a.x, b.x)
    torch.testing.assert_close(a.tile_embeddings, b.tile_embeddings, atol=1e-5, rtol=0)


def test_from_module_and_to_xarray(syn_svs, syn_image):
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = Model.from_module(pool, name="mean-rgb", mean=(0, 0, 0), std=(1, 1, 1))
    assert model.feature_dim == 3
    emb = model.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
    # The mean colour of each tile, computed from the source image (before JPEG), in [0, 1].
    expected = np.stack([syn_image[y : y + 224, x : x + 224].reshape(-1, 3).mean(0) / 255
                         for x, y in zip(emb.x, emb.y)])
    np.testing.assert_allclose(emb.tile_embeddings.numpy(), expected, atol=2e-3)
    ds = emb.to_xarray()
    assert ds.embedding.dims == ("tile", "feature") and ds.embedding.shape == (emb.num_tiles, 3)
    np.testing.assert_array_equal(ds.x.values, emb.x)
    assert ds.x.attrs["units"].startswith("pixels") and ds.attrs["encoder"] == "mean-rgb"
    assert ds.attrs["requested_spacing_um"] == 0.5 and ds.attrs["tile_size_lv0"] == 224


def test_two_weightless_modules_under_one_name_each_embed_with_their_own(syn_svs):
    """A notebook cell re-run with another parameter-free module under the same name (the worker
    caches built encoders by key) gets the new module, not the first one's outputs."""
    def pool(cells):
        return Model.from_module(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(cells), torch.nn.Flatten()),
                                 name="mean-rgb", mean=(0, 0, 0), std=(1, 1, 1))

    one, four = pool(1), pool(2)
    assert (one.feature_dim, four.feature_dim) == (3, 12)
    config = PreprocessingConfig(**EXACT)
    assert one.embed_slide(syn_svs, preprocessing=config).tile_embeddings.shape[1] == 3
    assert four.embed_slide(syn_svs, preprocessing=config).tile_embeddings.shape[1] == 12


def test_spacing_override_changes_the_geometry(tiny, syn_svs):
    # Claiming 0.25 µm/px makes 0.5 µm/px tiles twice as large in level-0 pixels.
    emb = tiny.embed_slide(syn_svs, spacing_at_level_0=0.25, preprocessing=PreprocessingConfig(**EXACT))
    assert emb.tile_size_lv0 == 448


def test_no_tissue_gives_zero_tiles(tiny, tmp_path):
    from slide2vec_dask import testing

    blank = testing.write_svs(tmp_path / "blank.svs", testing.tissue_image(1024, 1024, []), downsamples=(1,))
    emb = tiny.embed_slide(blank)
    assert emb.num_tiles == 0 and emb.tile_embeddings.shape == (0, 192)


def test_embed_slides_keeps_input_order(tiny, syn_svs, cmu_svs):
    results = tiny.embed_slides([{"image_path": cmu_svs, "sample_id": "b"},
                                 {"image_path": syn_svs, "sample_id": "a"}])
    assert [r.sample_id for r in results] == ["b", "a"]
    alone = tiny.embed_slide(syn_svs)
    torch.testing.assert_close(results[1].tile_embeddings, alone.tile_embeddings, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unique"):
        tiny.embed_slides([syn_svs, syn_svs])


def test_outputs_plan_and_reuse_it(tiny, syn_svs, tmp_path):
    out = tmp_path / "run"
    config = PreprocessingConfig(**EXACT, preview={"save_mask_preview": True, "save_tiling_preview": True})
    first = tiny.embed_slide(syn_svs, preprocessing=config, execution=ExecutionOptions(output_dir=out))
    assert first.mask_preview_path.exists() and first.tiling_preview_path.exists()
    saved = out / "coordinates" / "synthetic.npz"
    assert saved.exists()
    # Reusing the saved plan with a different threshold keeps the saved tiles.
    reuse = PreprocessingConfig(read_coordinates_from=out / "coordinates", tissue_threshold=1.0)
    again = tiny.embed_slide(syn_svs, preprocessing=reuse)
    np.testing.assert_array_equal(again.x, first.x)
    torch.testing.assert_close(again.tile_embeddings, first.tile_embeddings, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        tiny.embed_slide(syn_svs, preprocessing=reuse.replace(requested_spacing_um=1.0))


def test_resume_reuses_the_plan_only_when_the_config_matches(tiny, syn_svs, tmp_path):
    out = tmp_path / "run"
    tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT), execution=ExecutionOptions(output_dir=out))
    saved = out / "coordinates" / "synthetic.npz"
    from slide2vec_dask import TileGrid

    grid = TileGrid.load(saved)
    grid.keep[:] = False
    grid.keep[0, 0] = True       # a recognisable plan
    grid.save(saved)
    resumed = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(resume=True, **EXACT),
                               execution=ExecutionOptions(output_dir=out))
    assert resumed.num_tiles == 1
    changed = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(resume=True, tissue_threshold=0.9),
                               execution=ExecutionOptions(output_dir=out))
    assert changed.num_tiles > 1


def test_custom_progress_reporter_is_used_and_kept(tiny, syn_svs):
    class Recorder:
        def __init__(self):
            self.calls = []

        def start(self, total, description):
            self.calls.append(("start", total))

        def advance(self, n):
            self.calls.append(("advance", n))

        def close(self):
            self.calls.append(("close",))

    recorder = Recorder()
    activate_progress_reporter(recorder)
    try:
        emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
        from slide2vec_dask.progress import get_progress_reporter

        assert get_progress_reporter() is recorder
    finally:
        activate_progress_reporter(None)
    assert recorder.calls[0] == ("start", emb.num_tiles) and recorder.calls[-1] == ("close",)
    assert sum(c[1] for c in recorder.calls if c[0] == "advance") == emb.num_tiles


def test_model_is_built_once_per_process(syn_svs, vit_tiny_checkpoint):
    from slide2vec_dask.dataflow import worker

    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=vit_tiny_checkpoint)
    model.embed_slide(syn_svs)
    model.embed_slide(syn_svs)
    assert sum(1 for k in worker.loaded_encoder_keys() if k[0] == model.spec.key) == 1
    model.embed_slide(syn_svs, execution=ExecutionOptions(persistent_workers=False))
    assert not any(k[0] == model.spec.key for k in worker.loaded_encoder_keys())


def test_distributed_cluster_gives_the_same_result(tiny, syn_svs):
    from distributed import Client, LocalCluster

    local = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
    random_weights = Model.from_timm("vit_tiny_patch16_224")
    random_local = random_weights.embed_slide(syn_svs)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT),
                                  execution=ExecutionOptions(scheduler_address=cluster.scheduler_address))
        # Random (unloaded) weights are seeded: every worker process builds the same model.
        random_remote = random_weights.embed_slide(
            syn_svs, execution=ExecutionOptions(scheduler_address=cluster.scheduler_address))
        with Client(cluster) as client:
            ambient = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT))
            loaded = client.run(lambda: __import__("slide2vec_dask.dataflow.worker").dataflow.worker
                                .loaded_encoder_keys())
    np.testing.assert_array_equal(remote.x, local.x)
    torch.testing.assert_close(remote.tile_embeddings, local.tile_embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(ambient.tile_embeddings, local.tile_embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(random_remote.tile_embeddings, random_local.tile_embeddings, atol=1e-5, rtol=0)
    # Each worker process built the model at most once, whatever the number of blocks it ran.
    assert all(sum(1 for k in keys if k[0] == tiny.spec.key) <= 1 for keys in loaded.values())
    assert any(keys for keys in loaded.values())


def test_gpu_tasks_land_only_on_gpu_workers(tiny, syn_svs):
    """Embedding tasks ask for resources={"GPU": 1}; reads run anywhere."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from slide2vec_dask.dataflow import worker

    # One CPU-only worker and one declared as a (fake) GPU worker, as `--resources GPU=1` does.
    workers = {"cpu": {"cls": Nanny, "options": {"nthreads": 1}},
               "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        emb = tiny.embed_slide(syn_svs, preprocessing=PreprocessingConfig(**EXACT),
                               execution=ExecutionOptions(num_gpus=1))
        loaded = client.run(worker.loaded_encoder_keys)
        names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
    assert emb.num_tiles == len(SYN_TILES)
    by_name = {names[addr]: [k for k in keys if k[0] == tiny.spec.key] for addr, keys in loaded.items()}
    assert by_name["gpu"] and not by_name["cpu"]


def test_gpu_request_without_gpu_is_a_clear_error(tiny, syn_svs):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="num_gpus=1"):
        tiny.embed_slide(syn_svs, execution=ExecutionOptions(num_gpus=1))


def test_from_timm_errors(tmp_path):
    with pytest.raises(ValueError, match="no architecture"):
        Model.from_timm("vit_does_not_exist")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Model.from_timm("vit_tiny_patch16_224", checkpoint_path=tmp_path / "missing.safetensors")


def test_checkpoint_that_does_not_fit(tmp_path, syn_svs):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(3, 3)}, str(bad))
    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=bad)
    with pytest.raises(ValueError, match="does not fit"):
        model.embed_slide(syn_svs)


def test_pickle_checkpoints_are_refused(tmp_path, syn_svs):
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": object()}))
    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=evil)
    with pytest.raises(ValueError, match="weights-only"):
        model.embed_slide(syn_svs)


def test_bad_slides_have_their_own_errors(tiny, tmp_path, syn_tiff_nospacing):
    from slide2vec_dask import MissingSpacingError, UnreadableSlideError

    with pytest.raises(FileNotFoundError):
        tiny.embed_slide(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"nope" * 100)
    with pytest.raises(UnreadableSlideError):
        tiny.embed_slide(junk)
    with pytest.raises(MissingSpacingError):
        tiny.embed_slide(syn_tiff_nospacing)
    assert tiny.embed_slide(syn_tiff_nospacing, spacing_at_level_0=0.5).num_tiles > 0
    with pytest.raises(TypeError, match="image_path"):
        tiny.embed_slide(42)
    with pytest.raises(ValueError, match="image_path"):
        tiny.embed_slide({"path": "x.svs"})
