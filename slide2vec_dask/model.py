"""`Model`: a named encoder and the in-memory embedding entry points.

A model is tile-, slide- or patient-level.  Slide- and patient-level models
carry an `AggregatorSpec` that chains the tile encoder they were trained
on: every entry point runs the tile stage first, then aggregates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.dataflow.blocks import EmbedSettings
from slide2vec_dask.dataflow.driver import Driver, Stages
from slide2vec_dask.dataflow.executors import executor_for
from slide2vec_dask.dataflow.sinks import MemorySink, StoreSink
from slide2vec_dask.dataflow.tasks import row_exports
from slide2vec_dask.dataflow.worker import release_encoders, warm_encoder
from slide2vec_dask.inputs import SlideInput
from slide2vec_dask.progress import get_progress_reporter
from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleBuilder, TimmBuilder
from slide2vec_dask.encoders.aggregators.base import AggregatorSpec
from slide2vec_dask.encoders.registry import get_preset, preset_level
from slide2vec_dask.pipeline import Pipeline
from slide2vec_dask.results import EmbeddedPatient, EmbeddedSlide, SlideArtifact, SlideOutcome
from slide2vec_dask.store import EmbeddingStore


class Model:
    """An encoder plus its input contract (spacing, tile size, normalisation).

    Build one with `Model.from_preset`, `Model.from_timm` or
    `Model.from_module`; weights are loaded lazily, once per worker.
    """

    def __init__(self, spec: EncoderSpec | AggregatorSpec, *, device: str | None = None,
                 precision: str | None = None):
        if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if precision is not None and precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be 'fp16', 'bf16', 'fp32' or None, got {precision!r}")
        self.spec = spec
        self.device = device
        self.precision = precision

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
                    tile_encoder: "Model | None" = None) -> "Model":
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
            return cls(spec, device=device, precision=precision)
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
        return cls(spec, device=device, precision=precision)

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
                           key=_module_key(module, name, spacing_um, tile_size_px, mean, std))
        return cls(spec)

    # -- embedding --------------------------------------------------------
    def embed_slide(self, slide, *, preprocessing: PreprocessingConfig | None = None,
                    execution: ExecutionOptions | None = None, spacing_at_level_0: float | None = None,
                    mask_path: str | Path | None = None, sample_id: str | None = None) -> EmbeddedSlide:
        """Embed every tissue tile of one slide (a path, or a dict with ``image_path``...)."""
        item = SlideInput.parse(slide, spacing_at_level_0=spacing_at_level_0, mask_path=mask_path,
                                sample_id=sample_id)
        return self.embed_slides([item], preprocessing=preprocessing, execution=execution)[0]

    def embed_slides(self, slides: Sequence, *, preprocessing: PreprocessingConfig | None = None,
                     execution: ExecutionOptions | None = None) -> list[EmbeddedSlide]:
        """Embed several slides through one stream of blocks; results in input order.

        Slide-level models (and patient-level ones, through their slide
        stage) also fill ``slide_embedding`` and, when the model has them,
        ``latents``.
        """
        items = self._inputs(slides)
        if not items:
            return []
        level = "slide" if self.slide_spec is not None else "tile"
        return self._embed(items, level, {}, preprocessing, execution)[0]

    def embed_patient(self, slides: Sequence, *, patient_id: str | None = None,
                      preprocessing: PreprocessingConfig | None = None,
                      execution: ExecutionOptions | None = None) -> EmbeddedPatient:
        """One patient's embedding from all its slides (paths or dicts).

        The patient id is ``patient_id``, else the slides' common
        ``patient_id`` key, else the first slide's ``sample_id``.
        """
        self._require_level("patient", "embed_patient")
        items = self._inputs(slides)
        if not items:
            raise ValueError("embed_patient needs at least one slide")
        if patient_id is None:
            given = {it.extra.get("patient_id") for it in items} - {None, ""}
            if len(given) > 1:
                raise ValueError(f"embed_patient got slides of several patients {sorted(given)}; "
                                 "use embed_patients, or pass patient_id= to treat them as one")
            patient_id = given.pop() if given else items[0].sample_id
        return self._patients([(str(patient_id), items)], preprocessing, execution)[0]

    def embed_patients(self, slides: Sequence, *, patient_id_map: dict[str, str] | None = None,
                       preprocessing: PreprocessingConfig | None = None,
                       execution: ExecutionOptions | None = None) -> list[EmbeddedPatient]:
        """One `EmbeddedPatient` per patient, in order of first appearance.

        A slide's patient is ``patient_id_map[sample_id]``, else its
        ``patient_id`` key, else its own ``sample_id``.
        """
        self._require_level("patient", "embed_patients")
        items = self._inputs(slides)
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
        if execution.output_format is not None:
            raise ValueError("output_format writes per-slide files from Pipeline.run; embed_slide(s) "
                             "return embeddings in memory (EmbeddedSlide.to_xarray() to save them yourself)")
        if not config.on_the_fly and config.read_tiles_from is None and execution.output_dir is None:
            raise ValueError("on_the_fly=False writes each slide's tile archive to <output_dir>/tiles/: set "
                             "ExecutionOptions(output_dir=...)")
        executor = executor_for(execution.scheduler_address, execution.num_workers)
        settings = EmbedSettings.of(execution, executor.client)
        if executor.client is None:
            # in this process: the model builds while the first slide is planned and decoded
            warm_encoder(self.tile_spec, settings.num_gpus, settings.precision, settings.channels_last)
        stages = Stages(level, self.tile_spec, self.slide_spec, self.spec if level == "patient" else None)
        sink = MemorySink(items, stages, settings, execution.output_dir)
        outcomes = {it.sample_id: SlideOutcome(it.sample_id, str(it.image_path)) for it in items}
        driver = Driver(executor=executor, sink=sink, stages=stages, config=config, execution=execution,
                        settings=settings, outcomes=outcomes, patients=patients, reporter=get_progress_reporter(),
                        label=items[0].sample_id if len(items) == 1 else f"{len(items)} slides")
        try:
            driver.run(items)
        finally:
            executor.close()
            if executor.client is None and not execution.persistent_workers:
                for spec in (stages.tile_spec, stages.slide_spec, stages.patient_spec):
                    if spec is not None:
                        release_encoders(spec.key)
        return [sink.slides[it.sample_id] for it in items], sink.patients

    # -- persisted artifacts without Pipeline ----------------------------------------------------
    def embed_tiles(self, slides: Sequence, *, output_dir: str | Path | None = None,
                    preprocessing: PreprocessingConfig | None = None,
                    execution: ExecutionOptions | None = None) -> list:
        """Tile embeddings of ``slides`` written to ``output_dir``'s store; one `TileArtifact` per slide.

        For slide/patient models this is their tile stage alone; hand the
        artifacts to `aggregate_tiles` later (or on other hardware).
        """
        execution = self.resolve_execution(execution)
        if output_dir is not None:
            execution = execution.replace(output_dir=output_dir)
        tile_model = Model(self.tile_spec, device=self.device, precision=self.precision)
        result = Pipeline(tile_model, preprocessing, execution).run(slides=list(slides))
        if result.num_failed:
            failed = [f"{o.sample_id}: {o.error_type}: {o.error}" for o in result.failed]
            raise RuntimeError(f"embed_tiles: {len(failed)} slide(s) failed: " + "; ".join(failed))
        return result.tile_artifacts

    def aggregate_tiles(self, tile_artifacts: Sequence, *, execution: ExecutionOptions | None = None) -> list:
        """Slide embeddings from persisted tile artifacts (`embed_tiles`, or a tile-level run's).

        Each slide's features are read from its store by the task that
        aggregates it; results go into the same store's ``slides`` table
        (and ``slide_embeddings/`` files when ``execution.output_format``
        asks).  Returns one `SlideArtifact` per artifact, in order.
        """
        if self.slide_spec is None:
            raise ValueError(f"aggregate_tiles needs a slide- or patient-level model; {self.name!r} is tile-level")
        spec, execution, artifacts = self.slide_spec, self.resolve_execution(execution), list(tile_artifacts)
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

    def _inputs(self, slides: Sequence) -> list:
        if isinstance(slides, (str, Path)) or isinstance(slides, dict):
            slides = [slides]
        items = [SlideInput.parse(s) for s in slides]
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
        if execution.num_gpus is None and self.device is not None:
            execution = execution.replace(num_gpus=0 if self.device == "cpu" else 1)
        return execution

    def _require_level(self, level: str, what: str) -> None:
        if self.level != level:
            raise ValueError(f"{what} needs a {level}-level model; {self.name!r} is a {self.level}-level model")


def _module_key(module, *contract) -> str:
    """A key that names the module's class, weights and contract: the same model in a
    later process gets the same key, so a run resumes into its store instead of refusing it."""
    import hashlib

    import torch

    digest = hashlib.blake2b(repr((type(module).__qualname__, contract)).encode(), digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"module-{digest.hexdigest()}"
