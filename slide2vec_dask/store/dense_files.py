"""slide2vec's file layout for image embeddings and dense grids, and the artifacts naming them.

::

    <output_dir>/dense_embeddings/[<annotation>/]<sample_id>/<x>_<y>.pt      (K, gh, gw) grid of one ROI
                                                            <x>_<y>.meta.json geometry sidecar
    <output_dir>/dense_image_embeddings/<sample_id>.pt  + .meta.json      (K, gh, gw) grid of one image
    <output_dir>/image_embeddings/<sample_id>.pt        + .meta.json      (D,) embedding of one image

Payloads are ``torch.save``'d tensors (``torch.load(path, weights_only=True)`` reads
them), written aside and renamed into place; the sidecar is written last and is the
done-marker: a payload without its sidecar is an interrupted unit.  A unit is skipped on
a rerun when its sidecar's ``compatibility`` block equals the current request's (same
encoder, same geometry and options, same image), so runs resume per ROI / image.

Given no output directory the API keeps results in memory: the artifact's ``path`` is
None and `load()` returns the tensor it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.atomic import atomic

REGIONS_DIR = "dense_embeddings"
DENSE_IMAGES_DIR = "dense_image_embeddings"
IMAGES_DIR = "image_embeddings"


class _Artifact:
    def load(self):
        """The tensor: held in memory, else read from ``path``."""
        if self.data is not None:
            return self.data
        import torch

        return torch.load(self.path, map_location="cpu", weights_only=True)

    @property
    def metadata(self) -> dict[str, Any]:
        """The sidecar (read from ``metadata_path`` when written)."""
        if self.metadata_path is not None and self.metadata_path.exists():
            return json.loads(self.metadata_path.read_text(encoding="utf-8"))
        return dict(self.record)


@dataclass(frozen=True, kw_only=True)
class DenseRegionArtifact(_Artifact):
    """One ROI's ``(K, gh, gw)`` grid: ``dense_embeddings/[<annotation>/]<sample_id>/<x>_<y>.pt``."""

    sample_id: str
    x: int
    y: int
    path: Path | None
    metadata_path: Path | None
    feature_dim: int
    grid_shape: tuple[int, int]
    annotation: str | None = None
    data: Any = field(default=None, repr=False, compare=False)
    record: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class DenseImageArtifact(_Artifact):
    """One image's ``(K, gh, gw)`` grid: ``dense_image_embeddings/<sample_id>.pt``."""

    sample_id: str
    path: Path | None
    metadata_path: Path | None
    feature_dim: int
    grid_shape: tuple[int, int]
    data: Any = field(default=None, repr=False, compare=False)
    record: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class ImageEmbeddingArtifact(_Artifact):
    """One image's ``(D,)`` embedding: ``image_embeddings/<sample_id>.pt``."""

    sample_id: str
    path: Path | None
    metadata_path: Path | None
    format: str
    feature_dim: int
    data: Any = field(default=None, repr=False, compare=False)
    record: dict = field(default_factory=dict, repr=False, compare=False)


# -- names ---------------------------------------------------------------------------------------
def region_paths(output_dir, sample_id: str, annotation: str | None, x: int, y: int) -> tuple[Path, Path]:
    folder = Path(output_dir) / REGIONS_DIR
    if annotation not in (None, "tissue", "merged"):
        folder = folder / annotation
    stem = folder / sample_id / f"{int(x)}_{int(y)}"
    return stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".meta.json")


def image_paths(output_dir, sample_id: str, dense: bool) -> tuple[Path, Path]:
    folder = Path(output_dir) / (DENSE_IMAGES_DIR if dense else IMAGES_DIR)
    return folder / f"{sample_id}.pt", folder / f"{sample_id}.meta.json"


# -- writing and resuming ---------------------------------------------------------------------------
def write_unit(payload: np.ndarray, paths: tuple[Path, Path], record: dict) -> None:
    """Payload aside-and-renamed, then its sidecar (the done-marker), also aside-and-renamed."""
    import torch

    tensor_path, meta_path = paths
    meta_path.unlink(missing_ok=True)   # a rewrite interrupted between the two never pairs old and new
    atomic(tensor_path, lambda tmp: torch.save(torch.from_numpy(np.ascontiguousarray(payload)), tmp))
    atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=_plain),
                                                 encoding="utf-8"))


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def finished(paths: tuple[Path, Path], compatibility: dict) -> dict | None:
    """The sidecar of a unit already written for this same request, else None (write it again)."""
    tensor_path, meta_path = paths
    if not (meta_path.exists() and tensor_path.exists()):
        return None
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("compatibility") == json.loads(json.dumps(compatibility, default=_plain)) else None


def region_artifact(record: dict, paths: tuple[Path, Path] | None, data=None) -> DenseRegionArtifact:
    return DenseRegionArtifact(
        sample_id=record["sample_id"], x=int(record["x"]), y=int(record["y"]),
        path=None if paths is None else paths[0], metadata_path=None if paths is None else paths[1],
        feature_dim=int(record["feature_dim"]), grid_shape=tuple(record["grid_shape"]),
        annotation=record.get("annotation"), data=data, record=record)


def dense_image_artifact(record: dict, paths: tuple[Path, Path] | None, data=None) -> DenseImageArtifact:
    return DenseImageArtifact(
        sample_id=record["sample_id"], path=None if paths is None else paths[0],
        metadata_path=None if paths is None else paths[1], feature_dim=int(record["feature_dim"]),
        grid_shape=tuple(record["grid_shape"]), data=data, record=record)


def image_artifact(record: dict, paths: tuple[Path, Path] | None, data=None) -> ImageEmbeddingArtifact:
    return ImageEmbeddingArtifact(
        sample_id=record["sample_id"], path=None if paths is None else paths[0],
        metadata_path=None if paths is None else paths[1], format="pt", feature_dim=int(record["feature_dim"]),
        data=data, record=record)
