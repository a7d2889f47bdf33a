"""What a slide- or patient-level encoder is, as data.

An `AggregatorSpec` is the picklable recipe of the last dataflow stage: it
names the tile encoder whose features it was trained on (chained
automatically: same spacing, tile size and output variant), and how to
build the aggregating module on a worker.  Like `EncoderSpec`, the module
is built once per worker process and cached under ``key``.

Module contracts (inputs arrive float32 on the module's device; the runtime
wraps calls in ``torch.inference_mode`` and the requested autocast):

* slide level: ``module.encode_slide(features, coords, tile_size_lv0)``
  with ``features`` ``(N, D_tile)``, ``coords`` ``(N, 2)`` int64 level-0
  top-left ``(x, y)`` of each tile in row-major tile order, and
  ``tile_size_lv0`` the tile side in level-0 pixels; returns a
  `SlideEncoding` (``embedding`` ``(D,)``, ``latents`` ``(L, D_lat)`` or
  ``None``).
* patient level: ``module.encode_patient(slide_embeddings)`` with
  ``slide_embeddings`` ``(S, D_slide)`` in the patient's slide order;
  returns ``(D,)``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from slide2vec_dask.encoders.base import EncoderSpec


class SlideEncoding(NamedTuple):
    embedding: Any  # torch.Tensor (D,)
    latents: Any = None  # torch.Tensor (L, D_lat) or None


@dataclass(frozen=True)
class AggregatorSpec:
    """A slide- or patient-level encoder over a chained tile encoder's features.

    ``tile_encoder`` is the tile stage the model was trained on;
    ``slide_encoder`` (patient level only) is the slide stage whose
    embeddings the patient module pools.  ``feature_dim`` is the output
    dimension of this level; ``latent_dim`` that of the latents, if any.
    """

    name: str
    level: str
    build: Callable[[], Any]
    tile_encoder: EncoderSpec
    feature_dim: int
    slide_encoder: "AggregatorSpec | None" = None
    latent_dim: int | None = None
    default_precision: str = "fp32"
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in ("slide", "patient"):
            raise ValueError(f"aggregator {self.name!r}: level must be 'slide' or 'patient', got {self.level!r}")
        if self.level == "patient" and self.slide_encoder is None:
            raise ValueError(f"patient-level aggregator {self.name!r} needs its slide_encoder")

    @property
    def spacing_um(self) -> float | None:
        return self.tile_encoder.spacing_um

    @property
    def tile_size_px(self) -> int:
        return self.tile_encoder.tile_size_px
