"""Checkpoint surgery: a published state dict, re-keyed to the timm module that runs it.

Kept apart from the preset table (`presets`, data) and the builder
(`preset_builder`, which creates the module and loads the file), as timm
keeps its ``_manipulate.py``: these are plain functions of a state dict (and,
where tensors are fused or resampled, of the target module) that know
nothing of any one preset, so the table stays data and the builder short.
`to_timm_layout` maps each published key layout of `LAYOUTS` onto timm's keys:
the ``transformers`` layouts (Phikon, Phikon-v2, Hibou, Midnight),
transformers' CLIP inside iSight's training checkpoint, timm 0.5's Swin
(CTransPath, in `ctranspath`).  `resample_pos_embed` fits a position
embedding published for another grid, with the algorithm of `POS_EMBED_INTERP`
the official code applies at run time.

torch is imported inside the functions that make tensors, so that importing
the table (which validates its layouts against this module) stays torch-free.
"""

from __future__ import annotations

import math

# A preset's ``layout``: the key layout of its published checkpoint, which also tells the builder the
# module to make (``mettle`` / ``isight`` / ``timm_features`` / ``ctranspath``: a small native wrapper
# around the timm trunk; ``conch``: CONCH's own package; ``conch_v15``: loaded in its own keys).
LAYOUTS = ("timm", "hf_vit", "hf_dinov2", "conch", "conch_v15", "mettle", "timm_features", "ctranspath", "isight")
# How a checkpoint's position embedding is resampled to the tile grid, when it was
# published for another grid: the algorithm the official code applies at run time.
POS_EMBED_INTERP = {
    "bicubic": dict(mode="bicubic", align_corners=False, antialias=False),    # transformers Dinov2
    "bicubic_aa": dict(mode="bicubic", align_corners=False, antialias=True),  # timm (dynamic / pretrained)
    # DINO / iBOT interpolate_pos_encoding (CONCH v1.5): scale_factor (grid + 0.1) / side, not a target size
    "bicubic_dino": dict(mode="bicubic", align_corners=False, antialias=False, grid_offset=0.1),
}


def _strip(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_timm_layout(state: dict) -> bool:
    return any(k.startswith("blocks.") for k in state) or "cls_token" in state


def to_timm_layout(state: dict, layout: str, model) -> dict:
    """A published checkpoint's tensors renamed (and fused) to the timm model's keys.

    A checkpoint already in timm's layout passes through for every layout.
    Keys that do not map stay as they are, so a mismatch is reported by name.
    """
    if layout == "ctranspath":
        from slide2vec_dask.encoders.ctranspath import from_official_layout  # lazy: imports torch

        return from_official_layout(state)
    if layout == "isight":
        return from_isight_layout(state)
    if layout in ("timm", "mettle", "timm_features") or _is_timm_layout(state):
        return dict(state)
    if layout == "hf_vit":
        return _from_hf(_strip(state, "vit."), model, _HF_VIT_LAYER)
    if layout == "hf_dinov2":
        return _from_hf(_strip(state, "dinov2."), model, _HF_DINOV2_LAYER)
    raise ValueError(f"no key mapping for layout {layout!r}")


ISIGHT_VISION = "patch_encoder.vision_model."  # CLAM_ViT.patch_encoder is a transformers CLIPModel
ISIGHT_PROJECTION = "visual_token_projection."
_HF_CLIP_LAYER = {"layer_norm1": "norm1", "self_attn.out_proj": "attn.proj", "layer_norm2": "norm2",
                  "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def from_isight_layout(state: dict) -> dict:
    """iSight's ``model_state_dict`` -> `ISightEncoder` keys.

    Read: the CLIP vision tower (``patch_encoder.vision_model.*``, transformers' CLIP
    names, q/k/v fused here) and ``visual_token_projection.*``.  Not read, as the
    published tile features never use them: ``post_layernorm``, the text tower,
    CLIP's projections and logit scale, the CLAM pooler and the five task heads.
    A state dict already in `ISightEncoder`'s keys passes unchanged.
    """
    import torch

    if isinstance(state.get("model_state_dict"), dict):  # the released training checkpoint's wrapper
        state = state["model_state_dict"]
    if any(k.startswith("trunk.") for k in state):
        return dict(state)
    out: dict = {}
    qkv: dict = {}
    for key, value in state.items():
        if key.startswith(ISIGHT_PROJECTION):
            out[key] = value
            continue
        if not key.startswith(ISIGHT_VISION):
            continue
        rest = key[len(ISIGHT_VISION):]
        if rest.startswith("post_layernorm.") or rest == "embeddings.position_ids":
            continue
        if rest == "embeddings.class_embedding":
            out["trunk.cls_token"] = value.reshape(1, 1, -1)
        elif rest == "embeddings.patch_embedding.weight":
            out["trunk.patch_embed.proj.weight"] = value
        elif rest == "embeddings.position_embedding.weight":
            out["trunk.pos_embed"] = value.unsqueeze(0)
        elif rest.startswith("pre_layrnorm."):  # sic: transformers' name
            out["trunk.norm_pre." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("encoder.layers."):
            idx, sub = rest[len("encoder.layers."):].split(".", 1)
            name, kind = sub.rsplit(".", 1)
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((idx, kind), {})[name[len("self_attn."):-len("_proj")]] = value
            elif name in _HF_CLIP_LAYER:
                out[f"trunk.blocks.{idx}.{_HF_CLIP_LAYER[name]}.{kind}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (idx, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"trunk.blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        else:
            out.update({f"{ISIGHT_VISION}encoder.layers.{idx}.self_attn.{n}_proj.{kind}": v for n, v in parts.items()})
    return out


# transformers (on-disk) names inside encoder.layer.N -> timm names inside blocks.N
_HF_VIT_LAYER = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_DINOV2_LAYER = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",       # SwiGLU: [x1; x2] packed as in timm's SwiGLUPacked
    "mlp.weights_out": "mlp.fc2",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_DROP = ("embeddings.mask_token", "pooler.")


def _from_hf(state: dict, model, layer_map: dict) -> dict:
    import torch

    out: dict = {}
    qkv: dict = {}
    for key, value in state.items():
        if key.startswith(_HF_DROP):
            continue  # the masked-image-modelling token and the unused pooler head
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.register_tokens":
            out["reg_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("encoder.layer."):
            idx, rest = key[len("encoder.layer."):].split(".", 1)
            if rest.startswith("attention.attention."):
                name, kind = rest[len("attention.attention."):].split(".")
                qkv.setdefault((idx, kind), {})[name] = value
                continue
            sub, kind = rest.rsplit(".", 1)
            mapped = layer_map.get(rest) or layer_map.get(sub)
            if mapped is None:
                out[key] = value
            elif mapped.endswith("gamma"):
                out[f"blocks.{idx}.{mapped}"] = value
            else:
                out[f"blocks.{idx}.{mapped}.{kind}"] = value
        else:
            out[key] = value
    for (idx, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:
            for name, value in parts.items():
                out[f"encoder.layer.{idx}.attention.attention.{name}.{kind}"] = value
    # transformers adds the position embedding to [CLS, patches]; timm models with
    # registers (no_embed_class) add it to the patches only: fold CLS's into the token.
    pos = out.get("pos_embed")
    if getattr(model, "no_embed_class", False) and pos is not None and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def resample_pos_embed(state: dict, model, interp: str) -> dict:
    """Resample ``state['pos_embed']`` to the model's patch grid (no-op when it already fits)."""
    import torch
    import torch.nn.functional as F

    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or target is None or tuple(pos.shape) == tuple(target.shape):
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = tuple(model.patch_embed.grid_size)
    n_old = pos.shape[1] - prefix
    side = math.isqrt(n_old)
    if side * side != n_old or pos.shape[-1] != target.shape[-1]:
        return state  # not a square grid of the same width: the fit check reports it
    head, patches = pos[:, :prefix], pos[:, prefix:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # interpolate in float32
    kwargs = dict(POS_EMBED_INTERP[interp])
    offset = kwargs.pop("grid_offset", None)
    if offset is None:
        patches = F.interpolate(patches, size=grid, **kwargs)
    else:  # the run-time algorithm of DINO-style ViTs: output size floor(grid + offset) == grid
        patches = F.interpolate(patches, scale_factor=((grid[0] + offset) / side, (grid[1] + offset) / side), **kwargs)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return {**state, "pos_embed": torch.cat([head, patches], dim=1)}
