"""What an encoder is, as data: a picklable recipe plus its input contract.

An `EncoderSpec` travels in the Dask graph; the heavy `torch.nn.Module` is
built from it once per worker process (see `slide2vec_dask.dataflow.worker`),
so tasks never carry weights.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """A tile encoder: how to build it, and what it expects and returns.

    ``build`` returns a module mapping normalised float ``(B, 3, H, W)`` to
    ``(B, feature_dim)``.  ``key`` identifies the built module in worker
    caches: two specs with the same key share one loaded model.
    """

    name: str
    build: Callable[[], Any]
    spacing_um: float | None
    tile_size_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int | None = None
    level: str = "tile"
    default_precision: str = "fp32"
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TimmBuilder:
    """Builds a timm architecture, optionally loading a local checkpoint."""

    arch: str
    pretrained: bool = False
    checkpoint_path: str | None = None
    kwargs: tuple = ()

    def __call__(self):
        import timm
        import torch

        if not self.pretrained and self.checkpoint_path is None:
            # Random weights (tests, benchmarks): seeded, so every worker builds the same model.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return timm.create_model(self.arch, pretrained=False, **dict(self.kwargs))
        model = timm.create_model(self.arch, pretrained=self.pretrained, **dict(self.kwargs))
        if self.checkpoint_path is not None:
            load_checkpoint(model, self.checkpoint_path, what=f"timm model {self.arch!r}")
        return model


@dataclass(frozen=True)
class ModuleBuilder:
    """Hands out a user's ready-made module (pickled once per worker when distributed)."""

    module: Any

    def __call__(self):
        return self.module


def read_state_dict(path: str | Path, what: str) -> dict:
    """Tensors from ``.safetensors`` or a ``.pt/.pth/.bin`` state dict, never arbitrary pickles."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ValueError(_not_safetensors(path, what, exc)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(_refused(path, what, exc)) from None
    for nested in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and nested in state and isinstance(state[nested], dict):
            state = state[nested]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _refused(path: Path, what: str, exc: Exception) -> str:
    """Why torch's weights-only loader refused ``path``, in our words: torch's own message advises
    ``weights_only=False`` (running the file's code), which is never ours to give."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return (f"{what}: {path} is not a weights-only torch checkpoint: its pickle names {found.group(1)}, "
                "a Python object rather than a tensor, and loading it could run code, so it was refused (not "
                "loaded). Re-save only its weights, as a state dict, in a Python session you trust: "
                "torch.save(model.state_dict(), 'weights.pt'), or as .safetensors "
                "(safetensors.torch.save_file(state_dict, 'weights.safetensors')).")
    text = text.split("WeightsUnpickler error:")[-1] if "Weights only load failed" in text else text
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    detail = f"{type(exc).__name__}: {line[:120]}" if line else type(exc).__name__
    return (f"{what}: {path} could not be read as a weights-only torch checkpoint ({detail}): it is damaged, "
            "or not a file written by torch.save. Give a .safetensors file, or a state dict saved with "
            "torch.save(model.state_dict(), 'weights.pt').")


def _not_safetensors(path: Path, what: str, exc: Exception) -> str:
    """A ``.safetensors`` file safetensors cannot read: often a torch checkpoint given the wrong name."""
    with open(path, "rb") as f:
        head = f.read(4)
    kind = "zip" if head.startswith(b"PK\x03\x04") else "pickle" if head[:1] == b"\x80" else None
    if kind:
        return (f"{what}: {path} is not a safetensors file (it looks like a pickle/{kind} torch checkpoint). "
                "Name it .pt to load it as a weights-only torch checkpoint, or convert its weights with "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors').")
    return (f"{what}: {path} is not a readable safetensors file ({str(exc)[:120]}): it is damaged or "
            "truncated; download or write it again.")


def state_dict_mismatch(own: dict, state: dict) -> str:
    """'' when ``state`` fits ``own`` exactly, else what does not (missing, unexpected, shapes)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    # Floating weights are loaded as float32 whatever their precision; a tensor of another kind
    # (integer, bool, complex) where the model holds floats, or the reverse, is another model's file.
    dtypes = sorted(k for k in set(own) & set(state) if _kind(own[k]) != _kind(state[k]))
    detail = []
    if missing:
        detail.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected:
        detail.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
    if shapes:
        k = shapes[0]
        detail.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} "
                      f"vs model {tuple(own[k].shape)}")
    if dtypes:
        k = dtypes[0]
        detail.append(f"{len(dtypes)} dtype mismatch(es), e.g. {k}: checkpoint {state[k].dtype} "
                      f"vs model {own[k].dtype}")
    return "; ".join(detail)


def _kind(tensor) -> str:
    if tensor.is_floating_point():
        return "float"
    if tensor.is_complex():
        return "complex"
    return "bool" if str(tensor.dtype) == "torch.bool" else "int"


def load_into_meta(module, state: dict, problem: str):
    """Load ``state`` strictly (as float32) into a ``module`` built on the meta device; returns it in eval mode.

    ``problem`` is the error message with a ``{problems}`` slot for the keys
    and shapes that do not fit; building on ``meta`` and assigning the
    checkpoint's tensors keeps one copy of the weights in memory, not two.
    """
    problems = state_dict_mismatch(module.state_dict(), state)
    if problems:
        raise ValueError(problem.format(problems=problems))
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                           strict=True, assign=True)
    return module.eval()


def load_checkpoint(model, path: str | Path, what: str) -> None:
    """Load a state dict strictly, with an error that says which keys do not fit."""
    state = read_state_dict(path, what)
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ValueError(f"{what}: checkpoint {path} does not fit the architecture: {problems}")
    model.load_state_dict(state, strict=True)


def materialize_buffers(model) -> None:
    """Compute the non-persistent buffers a ``meta``-built model left empty (RoPE periods, say).

    They are in no checkpoint by design: the module computes them from its
    config.  timm modules say how (``init_non_persistent_buffers``); a module
    that does not is an error, not silently random.
    """
    import torch

    for module in model.modules():
        names = [n for n, b in module.named_buffers(recurse=False)
                 if b is not None and b.is_meta and n in module._non_persistent_buffers_set]
        if not names:
            continue
        init = getattr(module, "init_non_persistent_buffers", None)
        if init is None:
            raise RuntimeError(f"{type(module).__name__} has computed buffers {names} and no way to compute them "
                               "off the meta device")
        for name in names:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        with torch.no_grad():
            init()
