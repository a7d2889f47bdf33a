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
values in [0, 1]).  The class is instantiated lazily, once per `Model` in a process (its
backend, as slide2vec's `Model` holds one): building a `Model` loads nothing, the first
use (an embed call, its mean / std) does, and later calls reuse that instance; a Dask
worker builds its own.

Dense outputs (``embed_regions_dense`` / ``embed_images_dense``) call its
``encode_tiles_dense`` / ``encode_tiles_dense_prenorm`` / ``encode_tiles_attention``
(`encoders.dense`), on the geometry the registration's ``patch_size`` and
``supports_variable_input_size`` declare.

``@register_encoder(..., level="slide", tile_encoder="<registered tile encoder>")`` on a
`SlideEncoder` subclass makes a slide-level model: its tile stage is that tile encoder,
and its ``encode_slide(tile_features, coordinates, tile_size_lv0=...)`` (or
``encode_slide_with_latents``) is the slide stage, hosted like our aggregators
(`aggregators.base.AggregatorSpec`).  Patient-level plug-ins are not supported.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from slide2vec_dask.encoders.aggregators.base import AggregatorSpec, SlideEncoding
from slide2vec_dask.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from slide2vec_dask.encoders.registry import get_preset, preset_level, register_preset

PRECISIONS = ("fp16", "bf16", "fp32")


class _Encoder(ABC):
    """What slide2vec's tile and slide encoder classes both declare: a dimension, a device, a move."""

    @property
    @abstractmethod
    def encode_dim(self) -> int: ...

    @property
    @abstractmethod
    def device(self): ...

    @abstractmethod
    def to(self, device) -> "_Encoder": ...


class TileEncoder(_Encoder):
    """A tile encoder: ``encode_tiles((B, 3, H, W) float) -> (B, D)`` plus its transform."""

    @abstractmethod
    def get_transform(self) -> Callable: ...

    @abstractmethod
    def encode_tiles(self, batch): ...

    def get_normalization_transform(self) -> Callable:
        """Photometrics only (no resize); defaults to `get_transform`."""
        return self.get_transform()

    # -- dense outputs (optional: an encoder with a patch-token grid overrides them) --------------
    def encode_tiles_dense(self, batch):
        """``(B, 3, H, W)`` normalised -> ``(B, d, H / ph, W / pw)``: the patch tokens after the final norm."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_tiles_dense: it has no "
                                  "dense (patch-grid) features")

    def encode_tiles_dense_prenorm(self, batch):
        """The same grid before the backbone's final normalisation."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_tiles_dense_prenorm "
                                  "(feature_kind='patch_features_prenorm')")

    def encode_tiles_attention(self, batch, *, blocks=(-1,), include_registers: bool = False):
        """``(B, K, h, w)`` CLS (and register) attention maps, ``[block][query][head]`` channel order."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_tiles_attention "
                                  "(feature_kind='cls_attention')")

    @property
    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError(f"{type(self).__name__} does not expose a patch size")


#: The method of a `TileEncoder` each dense ``feature_kind`` calls.
DENSE_METHODS = {"patch_features": "encode_tiles_dense", "patch_features_prenorm": "encode_tiles_dense_prenorm",
                 "cls_attention": "encode_tiles_attention"}


def implements(cls: type, method: str) -> bool:
    """Whether a registered class overrides ``method`` of `TileEncoder` (the base only refuses)."""
    return getattr(cls, method, None) is not getattr(TileEncoder, method)


class SlideEncoder(_Encoder):
    """A slide encoder: pools a slide's tile features (of its registered ``tile_encoder``) into one vector.

    ``encode_slide(tile_features (N, D_tile), coordinates (N, 2) level-0 x, y, *, tile_size_lv0)``
    -> ``(D,)``; ``encode_slide_with_latents`` may also return latents (default: none)."""

    tile_encoder = None   # slide2vec attaches its tile encoder here; the tile stage runs apart in ours

    @abstractmethod
    def encode_slide(self, tile_features, coordinates=None, *, tile_size_lv0: int | None = None): ...

    def encode_slide_with_latents(self, tile_features, coordinates=None, *, tile_size_lv0: int | None = None):
        return self.encode_slide(tile_features, coordinates, tile_size_lv0=tile_size_lv0), None

    def encode_tiles(self, batch):
        if self.tile_encoder is None:
            raise AttributeError("slide encoders must attach a tile_encoder before encoding tiles")
        return self.tile_encoder.encode_tiles(batch)


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
    patch_size: tuple[int, int] | None = None
    supports_variable_input_size: bool = True
    tile_encoder: str | None = None             # slide level: the registered tile encoder it pools
    tile_encoder_output_variant: str | None = None
    token: str = ""                             # this registration's class object (worker caches tell them apart)

    def variant(self, output_variant: str | None) -> str:
        names = [v for v, _ in self.outputs]
        chosen = names[0] if output_variant is None else output_variant
        if chosen not in names:
            raise ValueError(f"encoder {self.name!r} has no output_variant {chosen!r}; choose one of {names}")
        return chosen

    def dim(self, variant: str) -> int | None:
        return dict(self.outputs).get(variant)


def register_encoder(name: str, *, encode_dim: int | None = None, output_variants: dict | None = None,
                     default_output_variant: str | None = None, input_size: int | None = None,
                     supported_spacing_um: float | list[float] | None, default_spacing_um: float | None = None,
                     precision: str = "fp16", level: str = "tile", source: str = "",
                     patch_size: int | tuple[int, int] | None = None, supports_variable_input_size: bool | None = None,
                     tile_encoder: str | None = None, tile_encoder_output_variant: str | None = None,
                     **ignored: Any):
    """Decorator: register a `TileEncoder` (or, ``level="slide"``, a `SlideEncoder`) subclass under
    ``name`` (slide2vec 7.x's signature).

    ``encode_dim`` or ``output_variants`` ({variant: {"encode_dim": D}}) give the feature
    dimension(s); ``input_size`` the square tile side it encodes (default 224);
    ``supported_spacing_um`` the recommended spacing(s) (None: spacing-agnostic, then
    ``default_spacing_um`` is required); ``precision`` the recommended precision;
    ``patch_size`` its token grid (dense outputs need it) and ``supports_variable_input_size``
    whether it takes other input sizes than ``input_size`` (dense windows).  A slide encoder
    names its ``tile_encoder`` (and ``tile_encoder_output_variant``).  Other slide2vec
    keywords are accepted.
    """
    if level not in ("tile", "slide"):
        raise ValueError(f"register_encoder({name!r}, level={level!r}): tile- and slide-level plug-ins are "
                         "supported; patient models are the presets of slide2vec_dask.encoders.aggregators")
    if level == "slide" and not tile_encoder:
        raise ValueError(f"register_encoder({name!r}, level='slide'): name the registered tile_encoder it pools")
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
    patch = None if patch_size is None else (
        (int(patch_size), int(patch_size)) if isinstance(patch_size, int) else tuple(int(v) for v in patch_size))
    base = SlideEncoder if level == "slide" else TileEncoder

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register_encoder({name!r}, level={level!r}) decorates a {base.__name__} subclass, "
                            f"got {cls!r}")
        info = PluginInfo(str(name).strip().lower(), cls, outputs, int(input_size or 224), spacings,
                          float(default_spacing_um), precision, str(source), patch,
                          True if supports_variable_input_size is None else bool(supports_variable_input_size),
                          None if tile_encoder is None else str(tile_encoder), tile_encoder_output_variant,
                          uuid.uuid4().hex)
        if level == "slide":
            def factory(checkpoint_path=None, output_variant=None, tile_checkpoint_path=None) -> AggregatorSpec:
                if checkpoint_path is not None:
                    raise ValueError(f"{name!r} is a registered encoder class: it loads its own weights "
                                     "(checkpoint_path does not apply)")
                return slide_plugin_spec(info, output_variant, tile_checkpoint_path)
        else:
            def factory(checkpoint_path=None, output_variant=None) -> EncoderSpec:
                if checkpoint_path is not None:
                    raise ValueError(f"{name!r} is a registered encoder class: it loads its own weights "
                                     "(checkpoint_path does not apply)")
                return plugin_spec(info, output_variant)

        factory.owner = cls
        register_preset(info.name, level, architecture=f"plug-in {cls.__module__}.{cls.__qualname__}",
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


class PluginSpec(EncoderSpec):
    """The spec of a registered tile class: its mean / std (and an undeclared dimension) are read from the
    class's instance, which is built on first use (`PluginBuilder.instance`), never when the spec is made."""

    @property
    def mean(self):
        return self.build.normalization()[0]

    @mean.setter
    def mean(self, value):   # the dataclass __init__ sets it: the instance decides
        pass

    @property
    def std(self):
        return self.build.normalization()[1]

    @std.setter
    def std(self, value):
        pass

    @property
    def feature_dim(self):
        declared = self.__dict__.get("_declared_dim")
        return declared if declared is not None else int(self.build.instance().encode_dim)

    @feature_dim.setter
    def feature_dim(self, value):
        self.__dict__["_declared_dim"] = value


def plugin_spec(info: PluginInfo, output_variant: str | None) -> EncoderSpec:
    """The spec of a registered class (nothing is instantiated here)."""
    variant = info.variant(output_variant)
    code = code_fingerprint(info.cls, info.source)
    return PluginSpec(
        name=info.name, build=PluginBuilder(info.cls, variant, info.token), spacing_um=info.default_spacing_um,
        tile_size_px=info.input_size, mean=None, std=None, feature_dim=info.dim(variant),
        default_precision=info.precision, key=f"plugin:{info.name}:{variant}:{code['fingerprint'][:16]}",
        info={"output_variant": variant, "encoder_code": code, "architecture": code["object"],
              "patch_size": None if info.patch_size is None else list(info.patch_size),
              "supports_variable_input_size": info.supports_variable_input_size,
              "recommended": {"spacing_um": None if info.supported_spacing_um is None
                              else list(info.supported_spacing_um),
                              "tile_size_px": info.input_size, "precision": info.precision}})


def slide_plugin_spec(info: PluginInfo, output_variant: str | None, tile_checkpoint_path=None) -> AggregatorSpec:
    """A registered `SlideEncoder` over its registered tile encoder (nothing is instantiated here)."""
    variant = info.variant(output_variant)
    if preset_level(info.tile_encoder) != "tile":
        raise ValueError(f"{info.name!r}: its tile_encoder {info.tile_encoder!r} is not a tile-level encoder")
    tile = get_preset(info.tile_encoder)(checkpoint_path=tile_checkpoint_path,
                                         output_variant=info.tile_encoder_output_variant)
    code = code_fingerprint(info.cls, info.source)
    dim = info.dim(variant)
    if dim is None:
        raise ValueError(f"register_encoder({info.name!r}, level='slide'): declare encode_dim of output_variant "
                         f"{variant!r}")
    return AggregatorSpec(
        name=info.name, level="slide", build=SlideBuilder(info.cls, variant, info.token), tile_encoder=tile,
        feature_dim=int(dim), default_precision=info.precision,
        key=f"plugin:{info.name}:{variant}:{code['fingerprint'][:16]}:{tile.key}",
        info={"output_variant": variant, "encoder_code": code, "architecture": code["object"],
              "tile_encoder_output_variant": (tile.info or {}).get("output_variant") or "default"})


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


class PluginBuilder:
    """Instantiates the registered class once (lazily, thread-safe) and hands it out wrapped as a module.

    The instance is this process's backend of every `Model` holding this spec: built on first use,
    reused by later calls.  It does not travel: a pickled builder (a Dask worker's) builds its own.
    ``token`` names the registration: two classes with the same source (and so the same spec key)
    registered in one process are cached apart (`dataflow.worker`)."""

    def __init__(self, cls: type, output_variant: str, token: str = ""):
        self.cls, self.output_variant, self.token = cls, output_variant, token
        self._instance, self._lock = None, threading.Lock()

    def __getstate__(self):
        return {"cls": self.cls, "output_variant": self.output_variant, "token": self.token}

    def __setstate__(self, state):
        self.__init__(state["cls"], state["output_variant"], state.get("token", ""))

    def __eq__(self, other):
        return type(other) is type(self) and (other.cls, other.output_variant) == (self.cls, self.output_variant)

    def __hash__(self):
        return hash((self.cls, self.output_variant))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cls.__qualname__}, {self.output_variant!r})"

    def instance(self):
        with self._lock:
            if self._instance is None:
                self._instance = self.cls(output_variant=self.output_variant)
            return self._instance

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return _normalization(self.instance())

    def __call__(self):
        return plugin_module(self.instance())


class SlideBuilder(PluginBuilder):
    """A registered `SlideEncoder` as our aggregators' module contract (``encode_slide`` -> `SlideEncoding`)."""

    def __call__(self):
        return slide_module(self.instance())


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


def slide_module(encoder: SlideEncoder):
    """``encoder`` as an aggregator module: ``encode_slide(features, coords, tile_size_lv0)`` -> `SlideEncoding`."""
    import torch

    class SlideEncoderModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            model = getattr(inner, "_model", None)
            if isinstance(model, torch.nn.Module):
                self.model = model

        def to(self, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None:
                self.inner.to(device)
            return self

        def encode_slide(self, features, coords, tile_size_lv0: int) -> SlideEncoding:
            embedding, latents = self.inner.encode_slide_with_latents(features, coords, tile_size_lv0=tile_size_lv0)
            return SlideEncoding(torch.as_tensor(embedding).reshape(-1), latents)

    return SlideEncoderModule(encoder)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TileEncoder", "SlideEncoder", "TorchTileEncoder", "TimmTileEncoder",
           "register_encoder"]
