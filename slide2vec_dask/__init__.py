"""slide2vec-dask: whole-slide images to embeddings, as a streaming Dask dataflow.

The public surface is imported lazily so that ``import slide2vec_dask`` stays
fast: torch, timm and dask load only when a model or slide is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from slide2vec_dask._version import __version__

_EXPORTS = {
    "Model": "slide2vec_dask.model",
    "PreprocessingConfig": "slide2vec_dask.config",
    "ExecutionOptions": "slide2vec_dask.config",
    "EmbeddedSlide": "slide2vec_dask.results",
    "RunResult": "slide2vec_dask.results",
    "TileArtifact": "slide2vec_dask.results",
    "EmbeddedPatient": "slide2vec_dask.results",
    "SlideArtifact": "slide2vec_dask.results",
    "PatientArtifact": "slide2vec_dask.results",
    "Pipeline": "slide2vec_dask.pipeline",
    "open_embeddings": "slide2vec_dask.store",
    "StoreLayoutError": "slide2vec_dask.store",
    "export": "slide2vec_dask.exporters",
    "OutputDirError": "slide2vec_dask.store.output_dir",
    "OutputDirLocked": "slide2vec_dask.store.output_dir",
    "read_manifest": "slide2vec_dask.inputs",
    "open_slide": "slide2vec_dask.slide",
    "Slide": "slide2vec_dask.slide",
    "MissingSpacingError": "slide2vec_dask.slide",
    "UnreadableSlideError": "slide2vec_dask.slide",
    "TileGrid": "slide2vec_dask.tiling",
    "list_models": "slide2vec_dask.encoders.registry",
    "activate_progress_reporter": "slide2vec_dask.progress",
    "ImageSpec": "slide2vec_dask.dense_options",
    "SlideRegions": "slide2vec_dask.dense_options",
    "DenseOptions": "slide2vec_dask.dense_options",
    "DenseImageOptions": "slide2vec_dask.dense_options",
    "DenseRegionArtifact": "slide2vec_dask.store.dense_files",
    "DenseImageArtifact": "slide2vec_dask.store.dense_files",
    "ImageEmbeddingArtifact": "slide2vec_dask.store.dense_files",
    # slide2vec 7.x names (README "Coming from slide2vec")
    "TileEmbeddingArtifact": "slide2vec_dask.results",
    "SlideEmbeddingArtifact": "slide2vec_dask.results",
    "HierarchicalEmbeddingArtifact": "slide2vec_dask.results",
    "PatientEmbeddingArtifact": "slide2vec_dask.results",
    "EmbeddedSlides": "slide2vec_dask.results",
    "MISSING_FIELD": "slide2vec_dask.compat.identity",
    "register_encoder": "slide2vec_dask.encoders.plugins",
    "TileEncoder": "slide2vec_dask.encoders.plugins",
    "TimmTileEncoder": "slide2vec_dask.encoders.plugins",
    "TorchTileEncoder": "slide2vec_dask.encoders.plugins",
    "list_encoder_provider_diagnostics": "slide2vec_dask.encoders.registry",
    "EncoderProviderDiagnostic": "slide2vec_dask.encoders.registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slide2vec_dask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig
    from slide2vec_dask.dense_options import DenseImageOptions, DenseOptions, ImageSpec, SlideRegions
    from slide2vec_dask.store.dense_files import DenseImageArtifact, DenseRegionArtifact, ImageEmbeddingArtifact
    from slide2vec_dask.encoders.registry import list_models
    from slide2vec_dask.exporters import export
    from slide2vec_dask.model import Model
    from slide2vec_dask.progress import activate_progress_reporter
    from slide2vec_dask.inputs import read_manifest
    from slide2vec_dask.pipeline import Pipeline
    from slide2vec_dask.results import (EmbeddedPatient, EmbeddedSlide, PatientArtifact, RunResult,
                                        SlideArtifact, TileArtifact)
    from slide2vec_dask.store import StoreLayoutError, open_embeddings
    from slide2vec_dask.store.output_dir import OutputDirError, OutputDirLocked
    from slide2vec_dask.slide import MissingSpacingError, Slide, UnreadableSlideError, open_slide
    from slide2vec_dask.tiling import TileGrid
