"""`Model`: a named encoder and the in-memory embedding entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, ModuleBuilder, TimmBuilder
from slide2vec_dask.results import EmbeddedSlide


class Model:
    """An encoder plus its input contract (spacing, tile size, normalisation).

    Build one with `Model.from_preset`, `Model.from_timm` or
    `Model.from_module`; weights are loaded lazily, once per worker.
    """

    def __init__(self, spec: EncoderSpec, *, device: str | None = None, precision: str | None = None):
        if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if precision is not None and precision not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be 'fp16', 'bf16', 'fp32' or None, got {precision!r}")
        self.spec = spec
        self.device = device
        self.precision = precision

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, level={self.level!r}, feature_dim={self.feature_dim}, "
                f"spacing_um={self.spec.spacing_um}, tile_size_px={self.spec.tile_size_px})")

    @property
    def name(self) -> str:
        return self.spec.name

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
                    precision: str | None = None) -> "Model":
        """A published pathology model by name (see `list_models()`)."""
        from slide2vec_dask.encoders.registry import get_preset

        spec = get_preset(name)(checkpoint_path=checkpoint_path, output_variant=output_variant)
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
                           tile_size_px=tile_size_px, mean=tuple(mean), std=tuple(std), feature_dim=feature_dim)
        return cls(spec)

    # -- embedding --------------------------------------------------------
    def embed_slide(self, slide, *, preprocessing: PreprocessingConfig | None = None,
                    execution: ExecutionOptions | None = None, spacing_at_level_0: float | None = None,
                    mask_path: str | Path | None = None, sample_id: str | None = None) -> EmbeddedSlide:
        """Embed every tissue tile of one slide (a path, or a dict with ``image_path``...)."""
        from slide2vec_dask.dataflow.embed import SlideInput

        item = SlideInput.parse(slide, spacing_at_level_0=spacing_at_level_0, mask_path=mask_path,
                                sample_id=sample_id)
        return self.embed_slides([item], preprocessing=preprocessing, execution=execution)[0]

    def embed_slides(self, slides: Sequence, *, preprocessing: PreprocessingConfig | None = None,
                     execution: ExecutionOptions | None = None) -> list[EmbeddedSlide]:
        """Embed several slides through one stream of blocks; results in input order."""
        from slide2vec_dask.dataflow.embed import SlideInput, embed_slides

        self._require_level("tile", "embed_slide(s)")
        items = [SlideInput.parse(s) for s in slides]
        ids = [it.sample_id for it in items]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"sample ids must be unique, repeated: {duplicated}; give each slide a 'sample_id'")
        if not items:
            return []
        return embed_slides(items, self.spec, preprocessing or PreprocessingConfig(),
                            self.resolve_execution(execution))

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
