"""The aggregation stage: slide- and patient-level encoders after the tile stage.

Each task runs where the model is (``resources={"GPU": 1}`` on a cluster)
and reads its inputs from the store itself: a slide's tile embeddings never
travel through the client, whatever their number.  The module is built
once per worker process and runs on its device's own thread, like the
tile encoders.
"""

from __future__ import annotations

from typing import Any

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


def slide_task(path: str, sample_id: str, spec: AggregatorSpec, settings: EmbedSettings, save_latents: bool,
               attrs: dict[str, Any]) -> int:
    """Worker side: ``tiles/<id>`` -> ``_slides/<id>``; returns the number of tiles aggregated."""
    from slide2vec_dask import store
    from slide2vec_dask.dataflow import worker

    def run(device):
        # Read on the device's own thread, straight into device memory: no full copy on the host.
        features, coords, tile_size_lv0 = store.read_tile_features(path, sample_id, device)
        encoded = worker.get_aggregator(spec, device, settings.precision).encode_slide(features, coords,
                                                                                      tile_size_lv0)
        return (*encoded, coords)

    embedding, latents, coords = worker.run_on_device(settings.num_gpus, run)
    store.write_slide_embedding(path, sample_id, embedding, latents if save_latents else None,
                                {**attrs, "num_tiles": int(len(coords))})
    return int(len(coords))


def patient_task(path: str, patient_id: str, sample_ids: list[str], spec: AggregatorSpec,
                 settings: EmbedSettings, attrs: dict[str, Any]) -> int:
    """Worker side: the slides' rows in ``_slides`` -> ``_patients/<patient_id>``."""
    from slide2vec_dask import store

    slides = np.stack([store.read_slide_embedding(path, s) for s in sample_ids])
    embedding = encode_patient(spec, slides, settings)
    store.write_patient_embedding(path, patient_id, embedding, {**attrs, "sample_ids": list(sample_ids)})
    return len(sample_ids)


def aggregate_in_memory(results: list, spec: AggregatorSpec, execution) -> None:
    """Fill ``slide_embedding`` (and ``latents``) of in-memory `EmbeddedSlide` results.

    On a cluster each slide is one task on a GPU worker (its features go
    with it: they are in this process already); otherwise the model runs
    here, on this process's device thread.
    """
    import torch

    from slide2vec_dask.dataflow.clusters import resolve_client
    from slide2vec_dask.dataflow.embed import resolve_num_gpus

    client = resolve_client(execution.scheduler_address)
    num_gpus = resolve_num_gpus(execution, client)
    settings = EmbedSettings(execution.batch_size, num_gpus, execution.precision, execution.channels_last)
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
    from slide2vec_dask.dataflow.embed import resolve_num_gpus

    client = resolve_client(execution.scheduler_address)
    num_gpus = resolve_num_gpus(execution, client)
    settings = EmbedSettings(execution.batch_size, num_gpus, execution.precision, execution.channels_last)
    if client is not None:
        return client.submit(encode_patient, spec, slide_embeddings, settings, pure=False,
                             resources={"GPU": 1} if num_gpus > 0 else None).result()
    out = encode_patient(spec, slide_embeddings, settings)
    if not execution.persistent_workers:
        from slide2vec_dask.dataflow.worker import release_encoders

        release_encoders(spec.key)
    return out


def aggregate_stored(artifacts: list, spec: AggregatorSpec, execution) -> list:
    """`Model.aggregate_tiles`: slide_task for each tile artifact, then the ``slides`` table per store."""
    from pathlib import Path

    from slide2vec_dask import store
    from slide2vec_dask.dataflow.clusters import resolve_client
    from slide2vec_dask.dataflow.embed import resolve_num_gpus
    from slide2vec_dask.results import SlideArtifact

    client = resolve_client(execution.scheduler_address)
    num_gpus = resolve_num_gpus(execution, client)
    settings = EmbedSettings(execution.batch_size, num_gpus, execution.precision, execution.channels_last)
    attrs = {"model": spec.name, "model_key": spec.key, "tile_encoder": spec.tile_encoder.name}
    for a in artifacts:
        stored = store.tile_encoder_of(a.store_path, a.sample_id)
        if stored != spec.tile_encoder.name:
            raise ValueError(f"{a.sample_id}: its tile embeddings were made by {stored!r}, but {spec.name!r} "
                             f"aggregates {spec.tile_encoder.name!r} features")
    args = [(str(a.store_path), a.sample_id, spec, settings, execution.save_latents, attrs) for a in artifacts]
    if client is not None:
        client.gather([client.submit(slide_task, *arg, pure=False, resources={"GPU": 1} if num_gpus > 0 else None)
                       for arg in args])
    else:
        for arg in args:
            slide_task(*arg)
    out = []
    for path in dict.fromkeys(Path(a.store_path) for a in artifacts):
        first = [a.sample_id for a in artifacts if Path(a.store_path) == path]
        store.assemble(path, "slide", store.finished_rows(path, "slide", first), with_latents=execution.save_latents,
                       attrs={"model": spec.name})
        store.consolidate(path)
    for a in artifacts:
        flat = None
        if execution.output_format is not None:
            folder = Path(execution.output_dir) if execution.output_dir is not None else Path(a.store_path).parent
            flat = store.export_row(a.store_path, "slide", a.sample_id, folder, execution.output_format)
        out.append(SlideArtifact(a.sample_id, int(spec.feature_dim), Path(a.store_path), "slides", flat,
                                 has_latents=execution.save_latents))
    return out
