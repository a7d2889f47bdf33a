"""slide2vec's encoder plug-in API: a user's `TileEncoder` class registered by name.

``@register_encoder("my-encoder", encode_dim=..., input_size=..., supported_spacing_um=...,
precision=...)`` on a `TileEncoder` subclass makes ``Model.from_preset("my-encoder")`` (and
``Model(name=...)``, the CLI's ``model.name`` / ``model.preset``) build it, like a preset.

How it runs here: the encoder becomes an `EncoderSpec` whose ``build`` instantiates the class
on the worker that embeds (the class travels inside the task by value when it is defined in a
script, as cloudpickle sends ``__main__`` classes), wrapped in a module that calls its
``encode_tiles``.  Tiles reach it as our engine feeds every encoder: float ``(B, 3, H, W)``
at ``input_size``, normalised with the mean / std its normalisation transform names (the
``Normalize`` step of ``get_normalization_transform()``, else of ``get_transform()``; none:
values in [0, 1]).  Slide- and patient-level plug-ins are not supported (our aggregators are
modules of `slide2vec_dask.encoders.aggregators`).
"""

from __future__ import annotations

import hashlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from slide2vec_dask.encoders.registry import register_preset

PRECISIONS = ("fp16", "bf16", "fp32")


class TileEncoder(ABC):
    """A tile encoder: ``encode_tiles((B, 3, H, W) float) -> (B, D)`` plus its transform."""

    @property
    @abstractmethod
    def encode_dim(self) -> int: ...

    @property
    @abstractmethod
    def device(self): ...

    @abstractmethod
    def to(self, device) -> "TileEncoder": ...

    @abstractmethod
    def get_transform(self) -> Callable: ...

    @abstractmethod
    def encode_tiles(self, batch): ...

    def get_normalization_transform(self) -> Callable:
        """Photometrics only (no resize); defaults to `get_transform`."""
        return self.get_transform()


class TorchTileEncoder(TileEncoder):
    """A tile encoder around one ``torch.nn.Module`` with known input size and mean / std."""

    def __init__(self, model, *, encode_dim: int, input_size: int, mean, std, output_variant: str | None = None):
        self._encode_dim, self._input_size = int(encode_dim), int(input_size)
        self._mean, self._std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._attach(model, output_variant)

    def _attach(self, model, output_variant: str | None) -> None:
        import torch

        self._model = model.eval()
        self._device = torch.device("cpu")
        self._output_variant = output_variant

    def _transform(self, resize: bool):
        from torchvision.transforms import v2
        import torch

        steps = [v2.ToImage()] + ([v2.Resize((self._input_size, self._input_size), antialias=True)] if resize else [])
        return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=self._mean, std=self._std)])

    def get_transform(self) -> Callable:
        return self._transform(resize=True)

    def get_normalization_transform(self) -> Callable:
        return self._transform(resize=False)

    def encode_tiles(self, batch):
        return self._model(batch)

    @property
    def encode_dim(self) -> int:
        return self._encode_dim

    @property
    def device(self):
        return self._device

    def to(self, device) -> "TorchTileEncoder":
        import torch

        self._device = torch.device(device)
        self._model = self._model.to(self._device)
        return self


class TimmTileEncoder(TorchTileEncoder):
    """A timm architecture as a tile encoder: mean / std and size from its ``pretrained_cfg``."""

    def __init__(self, model_name: str, *, output_variant: str | None = None, **timm_kwargs: Any):
        import timm

        kwargs = {"pretrained": True, "num_classes": 0, **timm_kwargs}
        model = timm.create_model(model_name, **kwargs)
        cfg = timm.data.resolve_data_config({}, model=model)
        self._encode_dim = int(model.num_features)
        self._input_size = int(cfg["input_size"][-1])
        self._mean, self._std = tuple(cfg["mean"]), tuple(cfg["std"])
        self._attach(model, output_variant)

    def get_transform(self) -> Callable:
        import timm

        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=self._model))


@dataclass(frozen=True)
class PluginInfo:
    """What ``@register_encoder`` declared."""

    name: str
    cls: type
    outputs: tuple[tuple[str, int | None], ...]
    input_size: int
    supported_spacing_um: tuple[float, ...] | None
    default_spacing_um: float
    precision: str
    source: str

    def variant(self, output_variant: str | None) -> str:
        names = [v for v, _ in self.outputs]
        chosen = names[0] if output_variant is None else output_variant
        if chosen not in names:
            raise ValueError(f"encoder {self.name!r} has no output_variant {chosen!r}; choose one of {names}")
        return chosen


def register_encoder(name: str, *, encode_dim: int | None = None, output_variants: dict | None = None,
                     default_output_variant: str | None = None, input_size: int | None = None,
                     supported_spacing_um: float | list[float] | None, default_spacing_um: float | None = None,
                     precision: str = "fp16", level: str = "tile", source: str = "", **ignored: Any):
    """Decorator: register a `TileEncoder` subclass under ``name`` (slide2vec 7.x's signature).

    ``encode_dim`` or ``output_variants`` ({variant: {"encode_dim": D}}) give the feature
    dimension(s); ``input_size`` the square tile side it encodes (default 224);
    ``supported_spacing_um`` the recommended spacing(s) (None: spacing-agnostic, then
    ``default_spacing_um`` is required); ``precision`` the recommended precision.  Other
    slide2vec keywords (``patch_size``, ``supports_variable_input_size``, ...) describe
    dense or variable-size extraction, which our pooled path does not use; they are accepted.
    """
    if level != "tile":
        raise ValueError(f"register_encoder({name!r}, level={level!r}): only tile-level plug-ins are supported; "
                         "slide and patient models are the presets of slide2vec_dask.encoders.aggregators")
    if (encode_dim is None) == (output_variants is None):
        raise ValueError(f"register_encoder({name!r}): give exactly one of encode_dim or output_variants")
    if precision not in PRECISIONS:
        raise ValueError(f"register_encoder({name!r}): precision must be one of {PRECISIONS}, got {precision!r}")
    if output_variants is None:
        outputs = (("default", int(encode_dim)),)
    else:
        outputs = tuple((str(v), (meta or {}).get("encode_dim")) for v, meta in dict(output_variants).items())
        if default_output_variant is not None:
            outputs = tuple(sorted(outputs, key=lambda o: o[0] != default_output_variant))
    spacings = None if supported_spacing_um is None else tuple(
        float(s) for s in (supported_spacing_um if isinstance(supported_spacing_um, (list, tuple))
                           else [supported_spacing_um]))
    if default_spacing_um is None:
        if spacings is None or len(spacings) != 1:
            raise ValueError(f"register_encoder({name!r}): default_spacing_um is required when "
                             "supported_spacing_um is None or lists several spacings")
        default_spacing_um = spacings[0]

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, TileEncoder)):
            raise TypeError(f"register_encoder({name!r}) decorates a TileEncoder subclass, got {cls!r}")
        info = PluginInfo(str(name).strip().lower(), cls, outputs, int(input_size or 224), spacings,
                          float(default_spacing_um), precision, str(source))

        def factory(checkpoint_path=None, output_variant=None) -> EncoderSpec:
            if checkpoint_path is not None:
                raise ValueError(f"{name!r} is a registered encoder class: it loads its own weights "
                                 "(checkpoint_path does not apply)")
            return plugin_spec(info, output_variant)

        factory.owner = cls
        register_preset(info.name, "tile", architecture=f"plug-in {cls.__module__}.{cls.__qualname__}",
                        outputs=dict(outputs))(factory)
        return cls

    return decorate


def code_fingerprint(cls: type, source: str = "") -> dict[str, str]:
    """slide2vec's ``encoder_code`` record: the class, a hash of its source, where its weights come from."""
    try:
        text = inspect.getsource(cls)
    except (OSError, TypeError):
        text = f"{cls.__module__}.{cls.__qualname__}"
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), "object": f"{cls.__module__}.{cls.__qualname__}",
            "source": source}


def plugin_spec(info: PluginInfo, output_variant: str | None) -> EncoderSpec:
    """The spec of a registered class: built once here to learn its dimension and photometrics."""
    variant = info.variant(output_variant)
    encoder = info.cls(output_variant=variant)
    mean, std = _normalization(encoder)
    code = code_fingerprint(info.cls, info.source)
    return EncoderSpec(
        name=info.name, build=PluginBuilder(info.cls, variant), spacing_um=info.default_spacing_um,
        tile_size_px=info.input_size, mean=mean, std=std, feature_dim=int(encoder.encode_dim),
        default_precision=info.precision, key=f"plugin:{info.name}:{variant}:{code['fingerprint'][:16]}",
        info={"output_variant": variant, "encoder_code": code, "architecture": code["object"],
              "recommended": {"spacing_um": None if info.supported_spacing_um is None
                              else list(info.supported_spacing_um),
                              "tile_size_px": info.input_size, "precision": info.precision}})


def _normalization(encoder: TileEncoder) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for get in (getattr(encoder, "get_normalization_transform", None), encoder.get_transform):
        found = _find_normalize(get() if get is not None else None)
        if found is not None:
            return found
    if isinstance(encoder, TorchTileEncoder):
        return encoder._mean, encoder._std
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _find_normalize(transform) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if transform is None:
        return None
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        mean, std = getattr(step, "mean", None), getattr(step, "std", None)
        if mean is not None and std is not None and not callable(mean):
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            if len(mean) == 3 and len(std) == 3:
                return mean, std
    return None


@dataclass(frozen=True)
class PluginBuilder:
    """Instantiates the registered class on the worker and wraps it as a module."""

    cls: type
    output_variant: str

    def __call__(self):
        return plugin_module(self.cls(output_variant=self.output_variant))


def plugin_module(encoder: TileEncoder):
    """``encoder`` as a ``torch.nn.Module``: forward is ``encode_tiles``, ``.to`` moves the encoder."""
    import torch

    class TileEncoderModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            model = getattr(inner, "_model", None)
            if isinstance(model, torch.nn.Module):
                self.model = model   # eval() / requires_grad_() reach its parameters

        def to(self, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                self.inner.to(device)
                model = getattr(self.inner, "_model", None)
                if isinstance(model, torch.nn.Module):
                    self.model = model
            return self

        def forward(self, x):
            return self.inner.encode_tiles(x)

    return TileEncoderModule(encoder)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TileEncoder", "TorchTileEncoder", "TimmTileEncoder",
           "register_encoder"]
