"""A built encoder on one device: uint8 tiles in, float32 embeddings out.

Tiles travel as uint8 (4x smaller than float) and become floats on the
device, where resizing and normalisation happen in one fused pass; the
normalisation constants are folded into a single multiply-add.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.telemetry import clock

_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


class LoadedEncoder:
    def __init__(self, spec: EncoderSpec, device: str, precision: str, channels_last: bool = True):
        import torch

        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        module = spec.build()
        module.eval().requires_grad_(False)
        self.module = module.to(self.device, memory_format=torch.channels_last) if channels_last else module.to(self.device)
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std  ==  x * scale + shift
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def embed(self, tiles, batch_size: int) -> np.ndarray:
        """``(N, h, w, 3)`` uint8 tiles (a numpy array, or a tensor already on the device:
        ``gpu_decode``) -> ``(N, D)`` float32 embeddings.

        Inside a block task the transfer and the forward pass are timed for the run
        report: CUDA events on a GPU (no extra synchronisation: read after the copy back),
        the wall clock on a CPU.
        """
        import torch

        outputs = []
        # Balanced batches (36 tiles with batch_size 32 -> 18 + 18, not 32 + 4): a tiny
        # trailing batch costs nearly as much as a full one.
        size = -(-len(tiles) // -(-len(tiles) // batch_size)) if len(tiles) else batch_size
        timing = clock.current()
        events = [] if timing is not None and self.device.type == "cuda" else None
        t0 = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(tiles), size):
                batch = tiles[start : start + size]
                batch = batch if torch.is_tensor(batch) else torch.from_numpy(batch)
                outputs.append(self._forward(batch, events))
        if not outputs:
            return np.zeros((0, self.spec.feature_dim or 0), dtype=np.float32)
        result = torch.cat(outputs).float().cpu().numpy()
        if events is not None:   # (the copy back synchronised: the events are done)
            timing.add("transfer", sum(a.elapsed_time(b) for a, b, _ in events) / 1000)
            timing.add("forward", sum(b.elapsed_time(c) for _, b, c in events) / 1000)
        elif timing is not None:
            timing.add("forward", time.perf_counter() - t0)
        return result

    def _forward(self, batch, events: list | None = None):
        import torch
        import torch.nn.functional as F

        if events is not None:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC view = channels_last NCHW
        if events is not None:
            marks[1].record()
        x = x.float()
        size = self.spec.tile_size_px
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = torch.addcmul(self._shift, x, self._scale, out=x)  # in place: one float copy per batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.module(x)
        if events is not None:
            marks[2].record()
            events.append(marks)
        if out.ndim != 2:
            raise ValueError(f"encoder {self.spec.name!r} returned shape {tuple(out.shape)}; a tile encoder "
                             "must map (B, 3, H, W) to (B, D)")
        return out

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, _DTYPES[self.precision]))


def resolve_precision(spec: EncoderSpec, requested: str | None, device_type: str) -> str:
    """None picks the model's default on GPU and fp32 on CPU (no fast half precision there)."""
    if requested is not None:
        return requested
    return spec.default_precision if device_type == "cuda" else "fp32"


class LoadedAggregator:
    """A slide- or patient-level encoder on one device: float32 arrays in and out."""

    def __init__(self, spec, device: str, precision: str):
        import torch

        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision
        module = spec.build()
        module.eval().requires_grad_(False)
        self.module = module.to(self.device)

    def encode_slide(self, features, coords: np.ndarray, tile_size_lv0: int):
        """``(N, D_tile)`` features (array, or a float32 tensor already on the device) + ``(N, 2)``
        level-0 coords -> ``(D,)`` embedding, latents or None."""
        import torch

        if len(features) == 0:
            raise ValueError(f"{self.spec.name}: a slide with no tiles has no slide embedding")
        if not isinstance(features, torch.Tensor):
            features = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        with torch.inference_mode(), self._autocast():
            out = self.module.encode_slide(features.to(self.device),
                                           torch.from_numpy(np.ascontiguousarray(coords, np.int64)).to(self.device),
                                           int(tile_size_lv0))
        latents = None if out.latents is None else out.latents.float().cpu().numpy()
        return out.embedding.float().cpu().numpy(), latents

    def encode_patient(self, slide_embeddings: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            out = self.module.encode_patient(torch.from_numpy(np.ascontiguousarray(slide_embeddings, np.float32))
                                             .to(self.device))
        return out.float().cpu().numpy()

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, _DTYPES[self.precision]))
