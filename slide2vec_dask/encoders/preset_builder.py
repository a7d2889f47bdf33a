"""From a `TilePreset` (data, `presets`) to a loaded module, on the worker.

`create_architecture` makes the published architecture (timm, plus the small
native wrappers of `pooling` where the model has one), `create_module` wraps
it to return one output variant, and `PresetBuilder`, the picklable ``build``
of a preset's `EncoderSpec`, creates that module on the meta device, re-keys
the published checkpoint (`key_layouts`) and loads it strictly.

The table imports this module, and the table is imported whenever a preset is
looked up (on the client too), so torch, timm, `pooling` (which imports
torch) and ``conch`` are imported inside the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slide2vec_dask.encoders.base import materialize_buffers, read_state_dict, state_dict_mismatch
from slide2vec_dask.encoders.key_layouts import resample_pos_embed, to_timm_layout

if TYPE_CHECKING:   # annotations only (strings, PEP 563): `presets` imports this module at run time
    from slide2vec_dask.encoders.presets import TilePreset

CONCH_INSTALL = "pip install git+https://github.com/mahmoodlab/CONCH.git"
CONCH_V15_TRUNK = "vit_large_patch16_224"  # CONCH v1.5's trunk: timm's ViT-L/16 layout (ls1/ls2 LayerScale)


# -- architecture -------------------------------------------------------------
def create_architecture(preset: TilePreset, runtime: bool = False):
    """`TilePreset.create_architecture`: the bare model whose state dict is the published file's."""
    if preset.layout == "conch_v15":
        return _conch_v15_architecture(preset, runtime)
    if preset.arch is None:
        raise NotImplementedError(f"preset {preset.name!r} is not a timm architecture ({preset.architecture})")
    import timm

    trunk = timm.create_model(preset.arch, pretrained=False, **preset.timm_kwargs(runtime))
    if preset.layout == "mettle":
        from slide2vec_dask.encoders.pooling import MettleEncoder

        return MettleEncoder(trunk)
    if preset.layout == "isight":
        from slide2vec_dask.encoders.pooling import ISightEncoder

        return ISightEncoder(trunk)
    return trunk


def create_module(preset: TilePreset, variant: str, runtime: bool = True):
    """`TilePreset.create_module` for a checked ``variant``: the architecture returning ``(B, feature_dim)``."""
    from slide2vec_dask.encoders.pooling import TimmPooled, TokenPooler

    model = create_architecture(preset, runtime=runtime)
    if preset.layout in ("mettle", "isight"):
        model.output_variant = variant
        return model
    if preset.layout in ("timm_features", "ctranspath"):
        return TimmPooled(model)
    if preset.layout == "conch_v15":
        return model
    return TokenPooler(model, variant)


def _conch_v15_architecture(preset: TilePreset, runtime: bool):
    """CONCH v1.5 (TITAN's ``return_conch()``): timm ViT-L/16 trunk + attentional pooler + LayerNorm."""
    import timm

    from slide2vec_dask.encoders.pooling import ConchV15Encoder

    trunk = timm.create_model(CONCH_V15_TRUNK, pretrained=False, **preset.timm_kwargs(runtime))
    return ConchV15Encoder(trunk, embed_dim=preset.feature_dim())


# -- building: architecture + weights, on the worker ----------------------
@dataclass(frozen=True)
class PresetBuilder:
    """Builds a preset's module and loads its weights (picklable; runs where the model runs)."""

    preset: TilePreset
    output_variant: str
    checkpoint_path: str | None = None

    def __call__(self):
        if self.preset.layout == "conch":
            return self._build_conch()
        if self.preset.layout == "conch_v15":
            return self._build_conch_v15()
        return self._build_timm()

    def _weights_file(self) -> Path:
        return self.preset.weights.resolve(self.preset.name, self.checkpoint_path)

    def _build_timm(self):
        import torch

        preset = self.preset
        path = self._weights_file()
        what = f"preset {preset.name!r} ({preset.hub_id})"
        state = read_state_dict(path, what)
        with torch.device("meta"):
            module = preset.create_module(self.output_variant, runtime=True)
        model = module.model if hasattr(module, "model") else module  # the keys of the published file
        state = to_timm_layout(state, preset.layout, model)
        if preset.ignore_keys:  # tensors of the published file that the published use never reads
            state = {k: v for k, v in state.items() if not k.startswith(preset.ignore_keys)}
        if preset.pos_embed_interp is not None:
            state = resample_pos_embed(state, model, preset.pos_embed_interp)
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise ValueError(
                f"{what}: checkpoint {path} does not fit the {preset.architecture} architecture: {problems}. "
                f"Pass the checkpoint published at {preset.url} ({' or '.join(preset.hub_files)}"
                + (", in the Hugging Face transformers layout or timm's" if preset.layout.startswith("hf_") else "")
                + "), or leave checkpoint_path unset to fetch it from the hub.")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        materialize_buffers(model)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{what}: tensors left unloaded after loading {path}: {left[:5]}")
        return module.eval()

    def _build_conch(self):
        try:
            from conch.open_clip_custom import create_model_from_pretrained
        except ImportError as exc:
            raise ImportError(
                f"preset {self.preset.name!r} needs the `conch` package (CONCH's own model code, not on "
                f"PyPI), which is not installed: {CONCH_INSTALL}") from exc
        from slide2vec_dask.encoders.pooling import ConchImageEncoder

        path = self._weights_file()
        model, _ = create_model_from_pretrained("conch_ViT-B-16", checkpoint_path=str(path))
        return ConchImageEncoder(model).eval()

    def _build_conch_v15(self):
        import torch

        preset = self.preset
        path = self._weights_file()
        what = f"preset {preset.name!r} ({preset.hub_id})"
        state = read_state_dict(path, what)
        with torch.device("meta"):
            model = preset.create_architecture(runtime=True)
        pos = state.get("trunk.pos_embed")
        if pos is not None and preset.pos_embed_interp is not None:
            trunk = resample_pos_embed({"pos_embed": pos}, model.trunk, preset.pos_embed_interp)
            state = {**state, "trunk.pos_embed": trunk["pos_embed"]}
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise ValueError(
                f"{what}: checkpoint {path} does not fit the {preset.architecture} architecture: {problems}. "
                f"Pass CONCH v1.5's published weights ({' or '.join(preset.hub_files)} of {preset.url}, or "
                "pytorch_model_vision.bin of https://huggingface.co/MahmoodLab/conchv1_5: keys trunk.*, "
                "attn_pool_contrast.*, ln_contrast.*), or leave checkpoint_path unset to fetch it from the hub.")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()
