"""`Model`: a named encoder and the in-memory embedding entry points.

A model is tile-, slide- or patient-level.  Slide- and patient-level models
carry an `AggregatorSpec` that chains the tile encoder they were trained
on: every entry point runs the tile stage first, then aggregates.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Sequence

from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.dataflow.blocks import EmbedSettings
from slide2vec_dask.dataflow.driver import Driver, Stages
from slide2vec_dask.dataflow.executors import executor_for
from slide2vec_dask.dataflow.sinks import MemorySink, StoreSink
from slide2vec_dask.dataflow.tasks import row_exports
from slide2vec_dask.dataflow.worker import release_encoders, warm_encoder
from slide2vec_dask import dense_api
from slide2vec_dask.inputs import SlideInput
from slide2vec_dask.progress import get_progress_reporter
from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleBuilder, TimmBuilder
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.registry import get_preset, preset_level
from slide2vec_dask.pipeline import Pipeline
from slide2vec_dask.clusters.client import resolve_num_gpus
from slide2vec_dask.compat import identity as feature_ids
from slide2vec_dask.config import check_bool
from slide2vec_dask.results import EmbeddedPatient, EmbeddedSlide, EmbeddedSlides, SlideArtifact, SlideOutcome
from slide2vec_dask.tiling.annotations import bags_of
from slide2vec_dask.tiling.plan import annotation_sampling, resolve_request
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.telemetry import RunTelemetry, write_report


class Model:
    """An encoder plus its input contract (spacing, tile size, normalisation).

    Build one with `Model.from_preset`, `Model.from_timm` or
    `Model.from_module`; weights are loaded lazily, once per worker.
    """

    def __init__(self, spec: EncoderSpec | AggregatorSpec | None = None, *, name: str | None = None,
                 device: str | None = None, precision: str | None = None, output_variant: str | None = None,
                 allow_non_recommended_settings: bool = False):
        """``Model(spec)``, or slide2vec 7.x's ``Model(name="uni", device="auto", output_variant=...,
        allow_non_recommended_settings=...)`` for a preset (or a registered encoder) by name."""
        if device == "auto":
            device = None
        if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if precision is not None and precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be 'fp16', 'bf16', 'fp32' or None, got {precision!r}")
        if (spec is None) == (name is None):
            raise ValueError("give a spec (Model.from_preset / from_timm / from_module build one) or name=PRESET")
        if name is not None:
            spec = Model.from_preset(name, output_variant=output_variant).spec
        elif output_variant is not None:
            raise ValueError("output_variant applies to Model(name=...) / Model.from_preset")
        self.spec = spec
        self.device = device
        self.precision = precision
        self.last_run_report: dict | None = None   # the last embed_* call's run report (see telemetry)
        self.allow_non_recommended_settings = check_bool("allow_non_recommended_settings",
                                                         allow_non_recommended_settings)

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, level={self.level!r}, feature_dim={self.feature_dim}, "
                f"spacing_um={self.tile_spec.spacing_um}, tile_size_px={self.tile_spec.tile_size_px})")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tile_spec(self) -> EncoderSpec:
        """The tile stage: the encoder itself, or the one a slide/patient model chains."""
        return self.spec.tile_encoder if isinstance(self.spec, AggregatorSpec) else self.spec

    @property
    def slide_spec(self) -> AggregatorSpec | None:
        """The slide stage (slide-level models: the model; patient-level: its slide encoder)."""
        if not isinstance(self.spec, AggregatorSpec):
            return None
        return self.spec if self.spec.level == "slide" else self.spec.slide_encoder

    @property
    def level(self) -> str:
        return self.spec.level

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    # -- constructors -----------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *, checkpoint_path: str | Path | None = None,
                    output_variant: str | None = None, device: str | None = None,
                    precision: str | None = None, tile_checkpoint_path: str | Path | None = None,
                    tile_encoder: "Model | None" = None, allow_non_recommended_settings: bool = False) -> "Model":
        """A published pathology model by name (see `list_models()`).

        Slide- and patient-level presets chain their tile encoder:
        ``checkpoint_path`` is the slide/patient model's weights,
        ``tile_checkpoint_path`` the chained tile encoder's, and
        ``tile_encoder`` replaces the chained tile encoder by another model
        with the same feature dimension (e.g. a locally fine-tuned copy).
        """
        import dataclasses

        level = preset_level(name)
        if level == "tile":
            if tile_checkpoint_path is not None or tile_encoder is not None:
                raise ValueError(f"{name!r} is a tile-level model: tile_checkpoint_path / tile_encoder only apply "
                                 "to slide- and patient-level presets; use checkpoint_path")
            spec = get_preset(name)(checkpoint_path=checkpoint_path, output_variant=output_variant)
            return cls(spec, device=device, precision=precision,
                       allow_non_recommended_settings=allow_non_recommended_settings)
        spec = get_preset(name)(checkpoint_path=checkpoint_path, output_variant=output_variant,
                                tile_checkpoint_path=tile_checkpoint_path)
        if tile_encoder is not None:
            if tile_encoder.level != "tile":
                raise ValueError(f"tile_encoder must be a tile-level model, got {tile_encoder.level}-level "
                                 f"{tile_encoder.name!r}")
            if tile_encoder.feature_dim != spec.tile_encoder.feature_dim:
                raise ValueError(f"{name!r} aggregates {spec.tile_encoder.feature_dim}-d features of "
                                 f"{spec.tile_encoder.name!r}; tile_encoder {tile_encoder.name!r} gives "
                                 f"{tile_encoder.feature_dim}-d")
            tile = tile_encoder.tile_spec
            if spec.slide_encoder is not None:
                spec = dataclasses.replace(spec, slide_encoder=dataclasses.replace(spec.slide_encoder,
                                                                                   tile_encoder=tile))
            spec = dataclasses.replace(spec, tile_encoder=tile)
        return cls(spec, device=device, precision=precision,
                   allow_non_recommended_settings=allow_non_recommended_settings)

    @classmethod
    def from_timm(cls, name: str, *, pretrained: bool = False, checkpoint_path: str | Path | None = None,
                  spacing_um: float = 0.5, tile_size_px: int = 224, mean=None, std=None,
                  **timm_kwargs: Any) -> "Model":
        """Any timm architecture as a tile encoder (pooled features, no classifier head).

        ``mean``/``std`` default to timm's pretrained config for ``name``.
        ``checkpoint_path`` loads a local ``.safetensors`` or weights-only
        ``.pt``/``.pth`` state dict.
        """
        import timm
        import torch
        from dask.base import tokenize

        if not timm.is_model(name):
            raise ValueError(f"timm has no architecture {name!r}; timm.list_models('*{name[:8]}*') lists similar ones")
        kwargs = {"num_classes": 0, **timm_kwargs}
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, **kwargs)
        cfg = getattr(probe, "pretrained_cfg", {}) or {}
        builder = TimmBuilder(name, pretrained, None if checkpoint_path is None else str(Path(checkpoint_path).resolve()),
                              tuple(sorted(kwargs.items())))
        spec = EncoderSpec(
            name=name,
            build=builder,
            # Same recipe, same key: workers reuse one loaded model across Model instances.
            key=f"timm:{name}:{tokenize(builder)}",
            spacing_um=spacing_um, tile_size_px=tile_size_px,
            mean=tuple(mean or cfg.get("mean") or IMAGENET_MEAN),
            std=tuple(std or cfg.get("std") or IMAGENET_STD),
            feature_dim=int(probe.num_features),
        )
        if checkpoint_path is not None and not Path(checkpoint_path).exists():
            raise FileNotFoundError(f"timm model {name!r}: checkpoint not found: {checkpoint_path}")
        return cls(spec)

    @classmethod
    def from_module(cls, module, *, name: str, spacing_um: float = 0.5, tile_size_px: int = 224,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, feature_dim: int | None = None) -> "Model":
        """Wrap any ``torch.nn.Module`` mapping ``(B, 3, H, W)`` floats to ``(B, D)``.

        ``feature_dim`` is measured with one forward pass when not given.
        """
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
        if feature_dim is None:
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            with torch.inference_mode():
                out = module.eval()(torch.zeros(1, 3, tile_size_px, tile_size_px, device=device))
            if out.ndim != 2:
                raise ValueError(f"module {name!r} returned shape {tuple(out.shape)}; it must map "
                                 "(B, 3, H, W) to (B, D)")
            feature_dim = int(out.shape[1])
        spec = EncoderSpec(name=name, build=ModuleBuilder(module), spacing_um=spacing_um,
                           tile_size_px=tile_size_px, mean=tuple(mean), std=tuple(std), feature_dim=feature_dim,
                           key=_module_key(module, name, spacing_um, tile_size_px, mean, std, feature_dim))
        return cls(spec)

    # -- embedding --------------------------------------------------------
    def embed_slide(self, slide, *, annotation: str | list[str] | None = None,
                    preprocessing: PreprocessingConfig | None = None,
                    execution: ExecutionOptions | None = None, spacing_at_level_0: float | None = None,
                    mask_path: str | Path | None = None, sample_id: str | None = None) -> EmbeddedSlide:
        """Embed every tissue tile of one slide (a path, or a dict with ``image_path``...).

        ``annotation`` (slide2vec 7.x) picks the bag of that class (a list gives a list): with
        ``PreprocessingConfig(masks=...)`` sampling classes, each class's name (or ``"merged"``),
        else ``"tissue"``; None returns the one bag, and refuses when there are several."""
        item = SlideInput.parse(slide, spacing_at_level_0=spacing_at_level_0, mask_path=mask_path,
                                sample_id=sample_id, storage_options=execution and execution.storage_options)
        bags = self.embed_slides([item], preprocessing=preprocessing, execution=execution)[item.sample_id]
        if annotation is None:
            if len(bags) > 1:
                raise ValueError(f"embed_slide() made {len(bags)} annotation bags for {item.sample_id} "
                                 f"({sorted(bags)}); pass annotation=... to pick one, or use embed_slides(...) "
                                 "for all (each EmbeddedSlide carries its .annotation)")
            return next(iter(bags.values()))
        wanted = [annotation] if isinstance(annotation, str) else list(annotation)
        missing = [a for a in wanted if a not in bags]
        if missing:
            raise ValueError(f"embed_slide() found no {missing[0]!r} annotation bag for {item.sample_id}; "
                             f"available bags: {sorted(bags)}")
        return bags[annotation] if isinstance(annotation, str) else [bags[a] for a in wanted]

    def embed_slides(self, slides: Sequence, *, annotations: list[str] | None = None,
                     preprocessing: PreprocessingConfig | None = None,
                     execution: ExecutionOptions | None = None) -> EmbeddedSlides:
        """Embed several slides through one stream of blocks.

        The result iterates the `EmbeddedSlide`s in input order and indexes as slide2vec 7.x's
        ``result[sample_id][annotation]`` (`EmbeddedSlides`); ``annotations`` keeps only those
        classes (tissue-only sampling: ``"tissue"``).  Slide-level models (and patient-level
        ones, through their slide stage) also fill ``slide_embedding`` and, when the model has
        them, ``latents``.  Hierarchical runs give ``tile_embeddings`` of shape ``(R, T, D)``.
        """
        items = self._inputs(slides, execution)
        if not items:
            return EmbeddedSlides()
        level = "slide" if self.slide_spec is not None else "tile"
        made = self._embed(items, level, {}, preprocessing, execution)[0]
        return EmbeddedSlides(s for s in made if annotations is None or s.annotation in annotations)

    def embed_patient(self, slides: Sequence, patient_id: str | None = None, *,
                      preprocessing: PreprocessingConfig | None = None,
                      execution: ExecutionOptions | None = None) -> EmbeddedPatient:
        """One patient's embedding from all its slides (paths or dicts).

        The patient id is ``patient_id``, else the slides' common
        ``patient_id`` key, else the first slide's ``sample_id``.
        """
        self._require_level("patient", "embed_patient")
        items = self._inputs(slides, execution)
        if not items:
            raise ValueError("embed_patient needs at least one slide")
        if patient_id is None:
            given = {it.extra.get("patient_id") for it in items} - {None, ""}
            if len(given) > 1:
                raise ValueError(f"embed_patient got slides of several patients {sorted(given)}; "
                                 "use embed_patients, or pass patient_id= to treat them as one")
            patient_id = given.pop() if given else items[0].sample_id
        return self._patients([(str(patient_id), items)], preprocessing, execution)[0]

    def embed_patients(self, slides: Sequence, patient_id_map: dict[str, str] | None = None, *,
                       preprocessing: PreprocessingConfig | None = None,
                       execution: ExecutionOptions | None = None) -> list[EmbeddedPatient]:
        """One `EmbeddedPatient` per patient, in order of first appearance.

        A slide's patient is ``patient_id_map[sample_id]``, else its
        ``patient_id`` key, else its own ``sample_id``.
        """
        self._require_level("patient", "embed_patients")
        items = self._inputs(slides, execution)
        groups: dict[str, list] = {}
        for it in items:
            pid = (patient_id_map or {}).get(it.sample_id) or it.extra.get("patient_id") or it.sample_id
            groups.setdefault(str(pid), []).append(it)
        return self._patients(list(groups.items()), preprocessing, execution)

    def _patients(self, groups, preprocessing, execution) -> list[EmbeddedPatient]:
        items = [it for _, members in groups for it in members]
        patients = {pid: [it.sample_id for it in members] for pid, members in groups}
        made = self._embed(items, "patient", patients, preprocessing, execution)[1]
        return [made[pid] for pid, _ in groups]   # (made in the order patients finished)

    def _embed(self, items: list[SlideInput], level: str, patients: dict[str, list[str]],
               preprocessing: PreprocessingConfig | None, execution: ExecutionOptions | None):
        """The driver with a memory sink: ``(slides in input order, patients in order of first appearance)``.

        Slides stream as `Pipeline.run` streams them: planned just ahead of the blocks,
        blocks of many slides interleaved, the slide and patient stages as their inputs land.
        """
        config = preprocessing or PreprocessingConfig()
        execution = self.resolve_execution(execution)
        self.check_recommended(config, execution)
        sampling = annotation_sampling(config)
        if level != "tile" and sampling is not None and len(sampling.bags) > 1:
            raise ValueError(f"a {level}-level model encodes one bag per slide, and masks samples "
                             f"{len(sampling.bags)} classes {list(sampling.bags)}: set masks output_mode='merged' "
                             "(one bag of every sampled tile), sample one class, or use a tile-level model")
        if execution.output_format is not None:
            raise ValueError("output_format writes per-slide files from Pipeline.run; embed_slide(s) "
                             "return embeddings in memory (EmbeddedSlide.to_xarray() to save them yourself)")
        if not config.on_the_fly and config.read_tiles_from is None and execution.output_dir is None:
            raise ValueError("on_the_fly=False writes each slide's tile archive to <output_dir>/tiles/: set "
                             "ExecutionOptions(output_dir=...)")
        executor = executor_for(execution.scheduler_address, execution.num_workers)
        settings = EmbedSettings.of(execution, executor.client, config)
        if executor.client is None:
            # in this process: the model builds while the first slide is planned and decoded
            warm_encoder(self.tile_spec, settings.num_gpus, settings.precision, settings.channels_last)
        stages = Stages(level, self.tile_spec, self.slide_spec, self.spec if level == "patient" else None)
        sink = MemorySink(items, stages, settings, execution.output_dir)
        outcomes = {it.sample_id: SlideOutcome(it.sample_id, str(it.image_path)) for it in items}
        telemetry = RunTelemetry(run_id=uuid.uuid4().hex[:8], entry=f"{level}-level embed_*", settings={
            "encoder": stages.tile_spec.name, "encoder_key": stages.tile_spec.key, "batch_size": execution.batch_size,
            "precision": execution.precision, "num_gpus": settings.num_gpus, "num_workers": execution.num_workers,
            "prefetch_factor": execution.prefetch_factor, "gpu_decode": execution.gpu_decode})
        driver = Driver(executor=executor, sink=sink, stages=stages, config=config, execution=execution,
                        settings=settings, outcomes=outcomes, patients=patients, reporter=get_progress_reporter(),
                        label=items[0].sample_id if len(items) == 1 else f"{len(items)} slides", telemetry=telemetry)
        try:
            driver.run(items)
            # The run report: on the model (`last_run_report`), and in output_dir when there is one.
            self.last_run_report = telemetry.report(outcomes.values())
            if execution.output_dir is not None:
                write_report(execution.output_dir, self.last_run_report)
        finally:
            executor.close()
            if executor.client is None and not execution.persistent_workers:
                for spec in (stages.tile_spec, stages.slide_spec, stages.patient_spec):
                    if spec is not None:
                        release_encoders(spec.key)
        identity = self.feature_identity(config, execution)
        slides = [self._as_7x(bag, identity, execution) for it in items
                  for bag in bags_of(sink.slides[it.sample_id], sink.plans.get(it.sample_id))]
        return slides, sink.patients

    def _as_7x(self, slide: EmbeddedSlide, identity: dict, execution: ExecutionOptions) -> EmbeddedSlide:
        """slide2vec 7.x's view of a result: regions as ``(R, T, D)``, features in ``output_dtype``,
        the encoder input size and transform of the feature identity."""
        import torch

        slide.as_regions()
        slide.encoder_input_size_px = identity["encoder_input_size_px"]
        slide.transform = identity["transform"]
        if identity["feature_dtype"] == "fp16" and isinstance(slide.tile_embeddings, torch.Tensor):
            slide.tile_embeddings = slide.tile_embeddings.half()
        return slide

    # -- persisted artifacts without Pipeline ----------------------------------------------------
    def embed_tiles(self, slides: Sequence, tiling_results=None, *, output_dir: str | Path | None = None,
                    preprocessing: PreprocessingConfig | None = None,
                    execution: ExecutionOptions | None = None, on_slide_persisted=None) -> list:
        """Tile embeddings of ``slides`` written to ``output_dir``'s store; one `TileArtifact` per slide
        (`HierarchicalArtifact` in hierarchical runs, as slide2vec 7.x returns).

        ``tiling_results`` (slide2vec 7.x's second argument) are the slides' tile coordinates made
        beforehand: a folder of coordinate files (ours, or hs2p's ``<id>.coordinates.npz``), or
        hs2p tiling results / artifacts (a sequence, or a mapping by sample id) whose
        ``coordinates_npz_path`` lies in one folder; None tiles here.  ``on_slide_persisted`` is
        called with each slide's artifact.  For slide/patient models this is their tile stage
        alone; hand the artifacts to `aggregate_tiles` later (or on other hardware).
        """
        execution = self.resolve_execution(execution)
        if output_dir is not None:
            execution = execution.replace(output_dir=output_dir)
        if execution.output_dir is None:
            raise ValueError("ExecutionOptions.output_dir is required for Model.embed_tiles(...)")
        config = preprocessing or PreprocessingConfig()
        folder = coordinates_folder(tiling_results)
        if folder is not None:
            config = config.replace(read_coordinates_from=folder)
        tile_model = Model(self.tile_spec, device=self.device, precision=self.precision,
                           allow_non_recommended_settings=self.allow_non_recommended_settings)
        result = Pipeline(tile_model, config, execution).run(slides=list(slides),
                                                             on_slide_persisted=on_slide_persisted)
        if result.num_failed:
            failed = [f"{o.sample_id}: {o.error_type}: {o.error}" for o in result.failed]
            raise RuntimeError(f"embed_tiles: {len(failed)} slide(s) failed: " + "; ".join(failed))
        return result.hierarchical_artifacts or result.tile_artifacts

    # -- slide2vec 7.x's recommended settings and feature identity ---------------------------------
    def check_recommended(self, config: PreprocessingConfig, execution: ExecutionOptions) -> None:
        """Refuse a spacing, tile size or precision the publisher does not recommend for this
        preset (slide2vec 7.x's guard); ``allow_non_recommended_settings=True`` makes it a warning.
        Models built with `from_timm` / `from_module` declare their own contract and pass."""
        import logging

        spec = self.tile_spec
        rec = (spec.info or {}).get("recommended")
        if not rec:
            return
        # The spec's own contract is the recommendation (a slide model may chain its tile encoder at
        # another spacing or size than the tile preset's); a plug-in may list several spacings.
        listed = [float(s) for s in rec.get("spacing_um") or []]
        spacings = listed if spec.spacing_um is not None and float(spec.spacing_um) in listed else (
            [] if spec.spacing_um is None else [float(spec.spacing_um)])
        spacing, tile = resolve_request(spec, config, strict=False)
        wrong = []
        if spacings and spacing is not None and not any(abs(float(spacing) - s) <= 1e-8 for s in spacings):
            wrong.append(f"requested_spacing_um={float(spacing):g} (recommended: {spacings})")
        if int(tile) != int(spec.tile_size_px):
            wrong.append(f"requested_tile_size_px={tile} (recommended: {spec.tile_size_px})")
        if execution.precision is not None and execution.num_gpus != 0 and self.device != "cpu" \
                and execution.precision != spec.default_precision:
            wrong.append(f"precision={execution.precision} (recommended: {spec.default_precision})")
        if not wrong:
            return
        what = f"model {self.tile_spec.name!r} is configured with {'; '.join(wrong)}"
        if not self.allow_non_recommended_settings:
            raise ValueError(f"{what}; these settings are not what its publisher recommends: use the recommended "
                             "ones, or pass allow_non_recommended_settings=True to Model / Model.from_preset")
        logging.getLogger("slide2vec_dask").warning("%s (allow_non_recommended_settings=True)", what)

    def feature_identity(self, preprocessing: PreprocessingConfig | None = None,
                         execution: ExecutionOptions | None = None) -> dict:
        """The feature identity of this model's features under these settings (`compat.identity`):
        what the store's run attributes and the pt/npz sidecars record under ``compatibility``."""
        config, execution = preprocessing or PreprocessingConfig(), self.resolve_execution(execution)
        _, tile = resolve_request(self.tile_spec, config, strict=False)
        gpus = execution.num_gpus if execution.num_gpus is not None else resolve_num_gpus(None, None)
        precision = execution.precision or (self.tile_spec.default_precision if gpus else "fp32")
        return feature_ids.feature_identity(self, tile, precision, execution.output_dtype,
                                            config.region_multiple(tile))

    def pooled_identity_differences(self, recorded: dict, *, preprocessing: PreprocessingConfig | None = None,
                                    execution: ExecutionOptions | None = None,
                                    encoded_pixels: bool = True) -> dict:
        """``{field: (recorded, current)}`` where a sidecar's ``compatibility`` record (or the record
        itself) differs from what this model would make now; empty when it proves the same identity.
        A field the record lacks is `MISSING_FIELD`; ``encoded_pixels=False`` (a zero-tile slide)
        leaves the transform out."""
        record = dict(recorded.get("compatibility", recorded))
        return feature_ids.differences(record, self.feature_identity(preprocessing, execution), encoded_pixels)

    def aggregate_tiles(self, tile_artifacts: Sequence, *, preprocessing: PreprocessingConfig | None = None,
                        execution: ExecutionOptions | None = None) -> list:
        """Slide embeddings from persisted tile artifacts (`embed_tiles`, or a tile-level run's).

        Each slide's features are read from its store by the task that
        aggregates it; results go into the same store's ``slides`` table
        (and ``slide_embeddings/`` files when ``execution.output_format``
        asks).  Returns one `SlideArtifact` per artifact, in order.
        """
        if self.slide_spec is None:
            raise ValueError(f"aggregate_tiles needs a slide- or patient-level model; {self.name!r} is tile-level")
        spec, execution, artifacts = self.slide_spec, self.resolve_execution(execution), list(tile_artifacts)
        if preprocessing is not None:   # 7.x: the settings the tiles were made with, checked against them
            self.check_recommended(preprocessing, execution)
            _, tile = resolve_request(spec.tile_encoder, preprocessing, strict=False)
            for a in artifacts:
                made = EmbeddingStore(Path(a.store_path).parent).run_attrs().get("requested_tile_size_px")
                if made is not None and int(made) != int(tile):
                    raise ValueError(f"{a.sample_id}: its tiles were made at {made} px, preprocessing asks {tile} px")
        stores: dict[Path, EmbeddingStore] = {}
        for a in artifacts:
            folder = Path(a.store_path).parent
            if folder not in stores:   # a store of another layout is refused before anything is read
                stores[folder] = EmbeddingStore(folder)
                stores[folder].check_layout()
            store = stores[folder]
            stored = store.tile_encoder(a.sample_id)
            if stored != spec.tile_encoder.name:
                raise ValueError(f"{a.sample_id}: its tile embeddings were made by {stored!r}, but {spec.name!r} "
                                 f"aggregates {spec.tile_encoder.name!r} features")
        executor = executor_for(execution.scheduler_address, execution.num_workers)
        settings = EmbedSettings.of(execution, executor.client)
        stages = Stages("slide", spec.tile_encoder, spec, save_latents=execution.save_latents, slide_attrs={
            "model": spec.name, "model_key": spec.key, "tile_encoder": spec.tile_encoder.name})
        try:
            for folder, store in stores.items():   # the driver with a store sink, the slide stage only
                mine = [a.sample_id for a in artifacts if Path(a.store_path).parent == folder]
                driver = Driver(executor=executor, sink=StoreSink(store, stages, settings, None), stages=stages,
                                config=PreprocessingConfig(), execution=execution, settings=settings,
                                outcomes={sid: SlideOutcome(sid, "") for sid in mine}, patients={},
                                reporter=get_progress_reporter(), label=f"{len(mine)} slides")
                driver.run([], mine)
                if driver.failure is not None:
                    raise driver.failure
                store.assemble("slide", store.finished_rows("slide", mine), with_latents=execution.save_latents,
                               attrs={"model": spec.name})
                store.finish_run()
        finally:
            executor.close()
            if executor.client is None and not execution.persistent_workers:
                release_encoders(spec.key)
        out = []
        for a in artifacts:
            store, flat = stores[Path(a.store_path).parent], None
            if execution.output_format is not None:
                dest = Path(execution.output_dir) if execution.output_dir is not None else store.output_dir
                flat = row_exports(store, "slide", a.sample_id, execution.output_format, dest)["flat_path"] or None
            out.append(SlideArtifact(a.sample_id, int(spec.feature_dim), Path(a.store_path),
                                     EmbeddingStore.table_group("slide"), None if flat is None else Path(flat),
                                     has_latents=execution.save_latents))
        return out

    # -- images and dense grids (slide2vec 7.1.4's names) ----------------------------------------------
    def embed_images(self, images: Sequence, *, execution: ExecutionOptions | None = None) -> list:
        """One embedding per image (`ImageSpec`, a path, or pixels), through the encoder as tiles go:
        resized to its tile size and normalised.  With ``execution.output_dir``: written to
        ``image_embeddings/<sample_id>.pt`` (skipped when already there for this encoder);
        one `ImageEmbeddingArtifact` per image, in order (``.load()`` gives the ``(D,)`` tensor)."""
        return dense_api.embed_images(self.tile_spec, images, execution=self.resolve_execution(execution))

    def embed_images_dense(self, images: Sequence, *, dense, execution: ExecutionOptions | None = None) -> list:
        """The ``(K, gh, gw)`` grid of each image (`DenseImageOptions`: what ``K`` holds, geometry,
        windows); ``dense_image_embeddings/<sample_id>.pt`` with an output directory.  One
        `DenseImageArtifact` per image, in order."""
        return dense_api.embed_images_dense(self.spec, images, dense=dense, execution=self.resolve_execution(execution),
                                            allow_non_recommended=self.allow_non_recommended_settings)

    def embed_regions_dense(self, regions: Sequence, *, dense, execution: ExecutionOptions | None = None) -> list:
        """The ``(K, gh, gw)`` grid of each region of interest (`SlideRegions`: level-0 ``(x, y)``),
        read at ``dense.spacing_um`` as ``dense.target_size`` pixels; written to
        ``dense_embeddings/[<annotation>/]<sample_id>/<x>_<y>.pt`` with an output directory.
        One `DenseRegionArtifact` per region, in order."""
        return dense_api.embed_regions_dense(self.spec, regions, dense=dense, execution=self.resolve_execution(execution),
                                             allow_non_recommended=self.allow_non_recommended_settings)

    def dense_identity_differences(self, recorded: dict, *, dense, execution: ExecutionOptions | None = None) -> dict:
        """``{field: (recorded, current)}`` for each request-wide field of a dense sidecar's ``compatibility``
        block (or that block's parent record) that differs from what this dense request (`DenseOptions` for
        regions, `DenseImageOptions` for images) would record now, `MISSING_FIELD` where it is not recorded;
        empty when the record proves the same identity.  Per-sample fields (the sample, its path, its read
        plan) are not compared.  An invalid request raises as the embed methods do.  An unset precision is
        the model's recommended one (slide2vec 7.1.4's rule; a CPU extraction left unset runs fp32: pass
        it).  The transform is read from an isolated CPU copy of a registered encoder class; this model's
        backend is not touched, no pixels are encoded, no files are written."""
        if not isinstance(dense, (dense_api.DenseOptions, dense_api.DenseImageOptions)):
            raise TypeError(f"Model.dense_identity_differences(dense=...) expects DenseOptions or DenseImageOptions, "
                            f"got {type(dense).__name__}")
        execution = self.resolve_execution(execution)
        if execution.precision is None:
            execution = execution.replace(precision=self.tile_spec.default_precision)
        current = dense_api.dense_request(self.spec, dense, execution, self.allow_non_recommended_settings,
                                          isolated_transform=True).identity
        record = recorded.get("compatibility", recorded) if isinstance(recorded.get("compatibility"), dict) else recorded
        return feature_ids.differences(dict(record), current)

    def prepare_dense_encoder(self, *, dense, execution: ExecutionOptions | None = None):
        """A live `DenseEncodeKit` for augmented tensors (training): ``kit.preprocessor()`` per item,
        ``kit.encode(batch)`` -> ``(B, K, gh, gw)`` on the device.  Reading fields (spacing,
        tolerance, backend) do not apply."""
        return dense_api.prepare_dense_encoder(self.tile_spec, dense=dense,
                                               execution=self.resolve_execution(execution), device=self.device)

    def _inputs(self, slides: Sequence, execution: ExecutionOptions | None = None) -> list:
        if isinstance(slides, (str, Path)) or isinstance(slides, dict):
            slides = [slides]
        options = execution.storage_options if execution is not None else None   # slides at URLs
        items = [SlideInput.parse(s, storage_options=options) for s in slides]
        ids = [it.sample_id for it in items]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"sample ids must be unique, repeated: {duplicated}; give each slide a 'sample_id'")
        return items

    def resolve_execution(self, execution: ExecutionOptions | None) -> ExecutionOptions:
        """The model's own device/precision choices fill what the call leaves open."""
        execution = execution or ExecutionOptions()
        if execution.precision is None and self.precision is not None:
            execution = execution.replace(precision=self.precision)
        if self.device == "cpu" and execution.num_gpus != 0:   # a model placed on the CPU runs there (slide2vec)
            execution = execution.with_gpus(0)
        elif execution.num_gpus is None and self.device is not None:
            execution = execution.with_gpus(1)
        return execution

    def _require_level(self, level: str, what: str) -> None:
        if self.level != level:
            raise ValueError(f"{what} needs a {level}-level model; {self.name!r} is a {self.level}-level model")


def coordinates_folder(tiling_results) -> Path | None:
    """The folder of coordinate files slide2vec 7.x's ``tiling_results`` stand for (None: tile here)."""
    if tiling_results is None:
        return None
    if isinstance(tiling_results, (str, Path)):
        return Path(tiling_results)
    values = list(tiling_results.values()) if isinstance(tiling_results, dict) else list(tiling_results)
    folders = set()
    for r in values:
        path = r.get("coordinates_npz_path") if isinstance(r, dict) else getattr(r, "coordinates_npz_path", None)
        if path is None:
            raise TypeError(f"tiling_results: {type(r).__name__} names no coordinates_npz_path; pass the folder of "
                            "coordinate files (hs2p's <id>.coordinates.npz + .coordinates.meta.json) instead")
        folders.add(Path(path).parent)
    if len(folders) != 1:
        raise ValueError(f"tiling_results: coordinate files in {len(folders)} folders {sorted(map(str, folders))}; "
                         "put them in one folder")
    return folders.pop()


def _module_key(module, *contract) -> str:
    """A key that names the module's class, architecture (its printout: two weightless modules
    differ there), weights and contract: the same model in a later process gets the same key, so a
    run resumes into its store instead of refusing it, and another model never shares a cached one."""
    import hashlib

    import torch

    kind = (type(module).__module__, type(module).__qualname__, repr(module))
    digest = hashlib.blake2b(repr((kind, contract)).encode(), digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"module-{digest.hexdigest()}"
