"""What an encoder is, as data: a picklable recipe plus its input contract.

An `EncoderSpec` travels in the Dask graph; the heavy `torch.nn.Module` is
built from it once per worker process (see `slide2vec_dask.dataflow.worker`),
so tasks never carry weights.
"""

from __future__ import annotations

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
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message advises weights_only=False, i.e. running the file's code: never ours to give.
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
        raise ValueError(f"{what}: {path} is not a weights-only torch checkpoint ({detail}), so it was not "
                         "loaded: it holds objects whose loading could run code. Re-save the weights as a "
                         "plain state dict (torch.save(model.state_dict(), ...)) or as .safetensors") from None
    for nested in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and nested in state and isinstance(state[nested], dict):
            state = state[nested]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def state_dict_mismatch(own: dict, state: dict) -> str:
    """'' when ``state`` fits ``own`` exactly, else what does not (missing, unexpected, shapes)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    detail = []
    if missing:
        detail.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected:
        detail.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
    if shapes:
        k = shapes[0]
        detail.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} "
                      f"vs model {tuple(own[k].shape)}")
    return "; ".join(detail)


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
