"""`Model.embed_images`, `embed_images_dense`, `embed_regions_dense`, `prepare_dense_encoder`.

Each call turns its inputs into units (`dataflow.dense_tasks`) and runs them through
the one driver with a `DenseSink`: planned on workers, read and encoded in blocks on the
devices, written to slide2vec's ``.pt`` layout when ``ExecutionOptions.output_dir`` is
set (resumed per ROI / image on a rerun), else kept in memory.  Either way the result is
one artifact per input item, in input order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from slide2vec_dask.compat import identity as feature_ids
from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.dataflow.blocks import EmbedSettings
from slide2vec_dask.dataflow.dense_tasks import DenseRequest, ImageUnit, RegionUnit
from slide2vec_dask.dataflow.driver import Driver, Stages
from slide2vec_dask.dataflow.executors import executor_for
from slide2vec_dask.dataflow.sinks import DenseSink
from slide2vec_dask.dataflow.worker import release_encoders
from slide2vec_dask.dense_options import DenseImageOptions, DenseOptions, ImageSpec, SlideRegions
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.encoders.dense import DenseEncodeKit, DensePlan
from slide2vec_dask.encoders.plugins import PluginBuilder
from slide2vec_dask.encoders.registry import get_preset
from slide2vec_dask.encoders.runtime import resolve_precision
from slide2vec_dask.progress import get_progress_reporter
from slide2vec_dask.results import SlideOutcome


def embed_regions_dense(spec: EncoderSpec, regions: Sequence[SlideRegions], *, dense: DenseOptions,
                        execution: ExecutionOptions, allow_non_recommended: bool = False) -> list:
    if not isinstance(dense, DenseOptions):
        raise TypeError(f"embed_regions_dense(dense=...) takes DenseOptions, got {type(dense).__name__}")
    request = dense_request(spec, dense, execution, allow_non_recommended)
    regions = list(regions)
    for r in regions:
        if not isinstance(r, SlideRegions):
            raise TypeError(f"embed_regions_dense takes SlideRegions, got {type(r).__name__}")
    units, seen = [], set()
    for r in regions:
        uid = r.sample_id if r.annotation is None else f"{r.annotation}/{r.sample_id}"
        if uid in seen:
            raise ValueError(f"{uid}: given twice; put all of a slide's regions (per annotation) in one SlideRegions")
        seen.add(uid)
        units.append(RegionUnit(uid, r))
    results = _run(spec, units, request, execution, f"{sum(len(r.coordinates) for r in regions)} regions")
    return [results[(u.sample_id, i)] for u in units for i in range(len(u.regions.coordinates))]


def embed_images_dense(spec: EncoderSpec, images: Sequence, *, dense: DenseImageOptions,
                       execution: ExecutionOptions, allow_non_recommended: bool = False) -> list:
    if not isinstance(dense, DenseImageOptions):
        raise TypeError(f"embed_images_dense(dense=...) takes DenseImageOptions, got {type(dense).__name__}")
    request = dense_request(spec, dense, execution, allow_non_recommended)
    return _images(spec, images, request, execution)


def dense_request(spec, dense, execution: ExecutionOptions, allow_non_recommended: bool = False,
                  isolated_transform: bool = False) -> DenseRequest:
    """Everything a dense call checks and records before reading a pixel: the request, or the ValueError
    extraction raises (`Model.dense_identity_differences` goes through here too, with
    ``isolated_transform``: the transform is then read from `isolated_spec`, once the request is valid)."""
    if not isinstance(dense, (DenseOptions, DenseImageOptions)):
        raise TypeError(f"dense=... takes DenseOptions or DenseImageOptions, got {type(dense).__name__}")
    if isinstance(spec, AggregatorSpec):
        raise ValueError(f"dense outputs come from a tile-level encoder; {spec.name!r} is a {spec.level}-level "
                         f"model: use its tile encoder, Model.from_preset({spec.tile_encoder.name!r})")
    dense.validate()
    if dense.spacing_um is not None and not allow_non_recommended:
        _check_spacing(spec, float(dense.spacing_um))
    source = (lambda: isolated_spec(spec)) if isolated_transform else (lambda: spec)
    if isinstance(dense, DenseOptions):
        return _request(spec, "regions", dense, dense.target_size, dense.spacing_um, execution, source)
    request = _request(spec, "dense_images", dense, dense.size, dense.spacing_um, execution, source)
    return dataclasses.replace(request, default_spacing_um=spec.spacing_um)


def _check_spacing(spec, spacing_um: float) -> None:
    """A spacing the publisher (or the registration) does not list is refused, as for pooled runs."""
    listed = [float(v) for v in ((spec.info or {}).get("recommended") or {}).get("spacing_um") or []]
    if listed and not any(abs(spacing_um - v) <= 1e-8 for v in listed):
        raise ValueError(f"{spec.name!r}: spacing_um={spacing_um:g} is not a spacing its publisher recommends "
                         f"({listed}); use one of them, or pass allow_non_recommended_settings=True to Model / "
                         "Model.from_preset")


def isolated_spec(spec: EncoderSpec) -> EncoderSpec:
    """A spec whose transform can be read without touching ``spec``'s backend: a registered class is built
    once more, on the CPU; any other spec states its mean / std as data and is its own."""
    if not isinstance(spec.build, PluginBuilder):
        return spec
    isolated = get_preset(spec.name)(output_variant=(spec.info or {}).get("output_variant"))
    isolated.build.instance().to("cpu")
    return isolated


def embed_images(spec: EncoderSpec, images: Sequence, *, execution: ExecutionOptions) -> list:
    request = DenseRequest("images", None, None, 0.0, "auto", _output_dir(execution),
                           {"encoder": spec.name, "encoder_key": spec.key, "precision": _precision(spec, execution)},
                           execution.batch_size)
    return _images(spec, images, request, execution)


def prepare_dense_encoder(spec: EncoderSpec, *, dense, execution: ExecutionOptions, device: str | None) -> DenseEncodeKit:
    """A live encoder for augmented ``(3, H, W)`` tensors at ``dense.target_size`` (training time)."""
    if not isinstance(dense, (DenseOptions, DenseImageOptions)):
        raise TypeError(f"prepare_dense_encoder(dense=...) takes DenseImageOptions or DenseOptions, "
                        f"got {type(dense).__name__}")
    dense.validate()
    size = dense.size if isinstance(dense, DenseImageOptions) else dense.target_size
    if device is None:   # num_gpus None: a GPU when this process sees one, as everywhere else
        device = "cuda" if execution.num_gpus or (execution.num_gpus is None and _cuda_available()) else "cpu"
    precision = resolve_precision(spec, execution.precision, device.split(":")[0])
    plan = DensePlan.resolve(spec, dense, size, _output_dtype(execution, precision))
    return DenseEncodeKit(spec, plan, device, precision)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# -- shared ----------------------------------------------------------------------------------------
def _images(spec, images: Sequence, request: DenseRequest, execution: ExecutionOptions) -> list:
    specs = [as_image_spec(image, i) for i, image in enumerate(images)]
    ids = [s.sample_id for s in specs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"image sample ids must be unique (each names its file), repeated: {repeated[:5]}")
    size = max(1, execution.batch_size)
    units = [ImageUnit(f"images-{i:07d}", tuple(specs[i : i + size]), i) for i in range(0, len(specs), size)]
    results = _run(spec, units, request, execution, f"{len(specs)} images")
    return [results[(u.sample_id, k)] for u in units for k in range(len(u.images))]


def as_image_spec(image: Any, index: int) -> ImageSpec:
    """An `ImageSpec` from one, a path, or pixels (named ``image_<index>``)."""
    if isinstance(image, ImageSpec):
        return image
    if isinstance(image, dict):
        return ImageSpec(**image)
    if hasattr(image, "shape") or hasattr(image, "getbands"):
        return ImageSpec(sample_id=f"image_{index:06d}", image_path=image)
    from pathlib import Path

    return ImageSpec(sample_id=Path(image).stem, image_path=image)


def _output_dir(execution: ExecutionOptions) -> str | None:
    if execution.output_format not in (None, ("pt",)):
        raise ValueError(f"output_format={execution.output_format!r}: images and dense grids are written as "
                         "slide2vec's .pt files (and .meta.json sidecars); leave output_format unset or 'pt'")
    if execution.save_dense:
        raise ValueError("save_dense keeps tiles' grids in Pipeline.run's store; the dense entry points write "
                         "their grids anyway: leave save_dense unset here")
    return None if execution.output_dir is None else str(execution.output_dir)


def _precision(spec, execution: ExecutionOptions) -> str:
    device = "cuda" if (execution.num_gpus or 0) > 0 else "cpu"
    return resolve_precision(spec, execution.precision, device)


def _output_dtype(execution: ExecutionOptions, precision: str) -> str:
    """slide2vec's rule: grids in fp16 when the encoder runs in fp16, else fp32; ``output_dtype`` decides when set."""
    chosen = getattr(execution, "output_dtype", None)
    if chosen is not None:
        return {"float16": "fp16", "float32": "fp32"}.get(str(chosen).replace("torch.", ""), str(chosen))
    return "fp16" if precision == "fp16" else "fp32"


def _request(spec, kind: str, dense, target_size, spacing_um, execution: ExecutionOptions,
             transform_source=None) -> DenseRequest:
    precision = _precision(spec, execution)
    plan = DensePlan.resolve(spec, dense, target_size, _output_dtype(execution, precision))
    # slide2vec's request-wide identity (compared by dense_identity_differences), then what resume also matches
    identity = feature_ids.dense_identity(spec, plan, precision, images=kind == "dense_images",
                                          transform_spec=None if transform_source is None else transform_source())
    compatibility = {**identity, "encoder_key": spec.key, "spacing_um": spacing_um, "tolerance": float(dense.tolerance)}
    return DenseRequest(kind, plan, spacing_um, float(dense.tolerance), dense.backend, _output_dir(execution),
                        compatibility, execution.batch_size, identity=identity)


def _run(spec: EncoderSpec, units: list, request: DenseRequest, execution: ExecutionOptions, label: str) -> dict:
    if not units:
        return {}
    executor = executor_for(execution.scheduler_address, execution.num_workers)
    settings = EmbedSettings.of(execution, executor.client)
    sink = DenseSink(request)
    outcomes = {u.sample_id: SlideOutcome(u.sample_id, str(u.image_path)) for u in units}
    driver = Driver(executor=executor, sink=sink, stages=Stages("tile", spec), config=PreprocessingConfig(),
                    execution=execution, settings=settings, outcomes=outcomes, patients={},
                    reporter=get_progress_reporter(), label=label)
    try:
        driver.run(units)
    finally:
        executor.close()
        if executor.client is None and not execution.persistent_workers:
            release_encoders(spec.key)
    return sink.results
