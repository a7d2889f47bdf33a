"""The aggregation stage: slide- and patient-level encoders after the tile stage.

Each task runs where the model is (``resources={"GPU": 1}`` on a cluster)
and reads its inputs from the store itself: a slide's tile embeddings never
travel through the client, whatever their number.  The module is built
once per worker process and runs on its device's own thread, like the
tile encoders.
"""

from __future__ import annotations


import numpy as np

from slide2vec_dask.dataflow.graph import EmbedSettings
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec


def encode_slide(spec: AggregatorSpec, features: np.ndarray, coords: np.ndarray, tile_size_lv0: int,
                 settings: EmbedSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """One slide's (embedding, latents) from its tile features, on this process's device."""
    from slide2vec_dask.dataflow import worker

    def run(device):
        return worker.get_aggregator(spec, device, settings.precision).encode_slide(features, coords, tile_size_lv0)

    return worker.run_on_device(settings.num_gpus, run)


def encode_patient(spec: AggregatorSpec, slide_embeddings: np.ndarray, settings: EmbedSettings) -> np.ndarray:
    """One patient's embedding from its slides' embeddings (in the patient's slide order)."""
    from slide2vec_dask.dataflow import worker

    def run(device):
        return worker.get_aggregator(spec, device, settings.precision).encode_patient(slide_embeddings)

    return worker.run_on_device(settings.num_gpus, run)


def aggregate_in_memory(results: list, spec: AggregatorSpec, execution) -> None:
    """Fill ``slide_embedding`` (and ``latents``) of in-memory `EmbeddedSlide` results.

    On a cluster each slide is one task on a GPU worker (its features go
    with it: they are in this process already); otherwise the model runs
    here, on this process's device thread.
    """
    import torch

    from slide2vec_dask.dataflow.clusters import resolve_client
    from slide2vec_dask.dataflow.embed import embed_settings

    client = resolve_client(execution.scheduler_address)
    settings = embed_settings(execution, client)
    num_gpus = settings.num_gpus
    inputs = [(r.tile_embeddings.numpy(), np.stack([r.x, r.y], axis=1).astype(np.int64), r.tile_size_lv0)
              for r in results]
    for r, (features, _, _) in zip(results, inputs):
        if len(features) == 0:
            raise ValueError(f"{r.sample_id}: no tissue tiles, so no slide embedding; check the slide or "
                             "lower PreprocessingConfig(tissue_threshold=...)")
    if client is not None:
        futures = [client.submit(encode_slide, spec, f, c, t, settings, pure=False,
                                 resources={"GPU": 1} if num_gpus > 0 else None) for f, c, t in inputs]
        outputs = client.gather(futures)
    else:
        outputs = [encode_slide(spec, f, c, t, settings) for f, c, t in inputs]
        if not execution.persistent_workers:
            from slide2vec_dask.dataflow.worker import release_encoders

            release_encoders(spec.key)
    for r, (embedding, latents) in zip(results, outputs):
        r.slide_embedding = torch.from_numpy(embedding)
        r.latents = None if latents is None else torch.from_numpy(latents)
        r.attrs["slide_encoder"] = spec.name


def patient_in_memory(slide_embeddings: np.ndarray, spec: AggregatorSpec, execution) -> np.ndarray:
    from slide2vec_dask.dataflow.clusters import resolve_client
    from slide2vec_dask.dataflow.embed import embed_settings

    client = resolve_client(execution.scheduler_address)
    settings = embed_settings(execution, client)
    num_gpus = settings.num_gpus
    if client is not None:
        return client.submit(encode_patient, spec, slide_embeddings, settings, pure=False,
                             resources={"GPU": 1} if num_gpus > 0 else None).result()
    out = encode_patient(spec, slide_embeddings, settings)
    if not execution.persistent_workers:
        from slide2vec_dask.dataflow.worker import release_encoders

        release_encoders(spec.key)
    return out


def aggregate_stored(artifacts: list, spec: AggregatorSpec, execution) -> list:
    """`Model.aggregate_tiles`: the Pipeline's slide task for each tile artifact, then each store's ``slides``."""
    from pathlib import Path

    from slide2vec_dask.dataflow.clusters import resolve_client
    from slide2vec_dask.dataflow.embed import embed_settings
    from slide2vec_dask.dataflow.tasks import slide_task
    from slide2vec_dask.results import SlideArtifact
    from slide2vec_dask.store import EmbeddingStore

    client = resolve_client(execution.scheduler_address)
    settings = embed_settings(execution, client)
    attrs = {"model": spec.name, "model_key": spec.key, "tile_encoder": spec.tile_encoder.name}
    stores = {a.sample_id: EmbeddingStore(Path(a.store_path).parent) for a in artifacts}
    for a in artifacts:
        stored = stores[a.sample_id].tile_encoder(a.sample_id)
        if stored != spec.tile_encoder.name:
            raise ValueError(f"{a.sample_id}: its tile embeddings were made by {stored!r}, but {spec.name!r} "
                             f"aggregates {spec.tile_encoder.name!r} features")
    args = [(stores[a.sample_id], a.sample_id, spec, settings, execution.save_latents, attrs, True, None)
            for a in artifacts]
    if client is not None:
        results = client.gather([client.submit(slide_task, *arg, pure=False,
                                               resources={"GPU": 1} if settings.num_gpus > 0 else None)
                                 for arg in args])
    else:
        results = [slide_task(*arg) for arg in args]
    for a, result in zip(artifacts, results):
        if isinstance(result, BaseException):
            raise result
    out = []
    for store in {str(s.path): s for s in stores.values()}.values():
        first = [a.sample_id for a in artifacts if stores[a.sample_id].path == store.path]
        store.assemble("slide", store.finished_rows("slide", first), with_latents=execution.save_latents,
                       attrs={"model": spec.name})
        store.finish_run()
    for a in artifacts:
        flat = None
        if execution.output_format is not None:
            from slide2vec_dask.exporters import export_row

            folder = Path(execution.output_dir) if execution.output_dir is not None else Path(a.store_path).parent
            paths = export_row(stores[a.sample_id], "slide", a.sample_id, execution.output_format, folder)
            flat = next((p for p in paths if p.suffix in (".pt", ".npz") and p.parent.name == "slide_embeddings"),
                        paths[0] if paths else None)
        out.append(SlideArtifact(a.sample_id, int(spec.feature_dim), Path(a.store_path),
                                 EmbeddingStore.table_group("slide"), flat,
                                 has_latents=execution.save_latents))
    return out
