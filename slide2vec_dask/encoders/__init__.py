"""Encoders: picklable specs, the preset registry, and the on-device runtime."""

from slide2vec_dask.encoders.base import EncoderSpec, ModuleBuilder, TimmBuilder, load_checkpoint
from slide2vec_dask.encoders.plugins import (SlideEncoder, TileEncoder, TimmTileEncoder, TorchTileEncoder,
                                            register_encoder)
from slide2vec_dask.encoders.registry import (EncoderProviderDiagnostic, encoder_registry, get_preset,
                                              list_encoder_provider_diagnostics, list_models, register_preset)
from slide2vec_dask.encoders.weights import Weights

__all__ = ["EncoderSpec", "TimmBuilder", "ModuleBuilder", "load_checkpoint", "get_preset", "list_models",
           "register_preset", "Weights", "register_encoder", "TileEncoder", "SlideEncoder", "TorchTileEncoder",
           "TimmTileEncoder", "encoder_registry", "list_encoder_provider_diagnostics",
           "EncoderProviderDiagnostic"]
