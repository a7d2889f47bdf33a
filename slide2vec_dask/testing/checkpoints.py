"""Random checkpoints in each preset's *official* key layout and file format, for tests.

A real checkpoint is gated, large and cannot be fetched at test time, so
tests (and benchmarks) write their own: every tensor random but of a trained
model's scale (LayerNorm gains near 1, layer scales well above their init),
so a key that is mis-mapped or left unloaded changes the outputs.  Each
writer lays out the file the way the model's publisher does (prefixes,
``{"model": ...}`` wrappers, the unused text towers and heads next to the
weights we read), so the loaders are tested against the real shape of the
file, not against their own output.

* `tile_checkpoint` - any tile preset whose published file uses timm's keys
  (optionally a shallow twin); `fill_hf_cache` lays a file out as a
  pre-filled ``HF_HOME`` cache, for offline hub loading.
* `titan_checkpoint`, `conchv15_checkpoint`, `prism_checkpoint`,
  `gigapath_slide_checkpoint`, `moozy_checkpoint` - the slide and patient
  models' files.

Torch is imported only when a writer runs.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from slide2vec_dask.encoders.aggregators import moozy as M
from slide2vec_dask.encoders.aggregators import prism as P
from slide2vec_dask.encoders.aggregators.gigapath import create_architecture as gigapath_architecture
from slide2vec_dask.encoders.presets import get_tile_preset

__all__ = ["RANDOM_CHECKPOINTS", "conchv15_checkpoint", "fill_hf_cache", "gigapath_slide_checkpoint",
           "moozy_checkpoint", "prism_checkpoint", "random_state", "tile_checkpoint", "titan_checkpoint"]

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# -- the Hugging Face cache, offline ------------------------------------------------------------
def fill_hf_cache(home: str | Path, repo_id: str, filename: str, src: str | Path, *,
                  revision: str | None = None, commit: str = HUB_COMMIT, repo_type: str = "model",
                  link: bool = False) -> Path:
    """Lay ``src`` out as ``filename`` of ``repo_id`` in the cache under ``HF_HOME=home``; the cached path.

    The layout is huggingface_hub's (``hub/models--org--name/snapshots/<commit>/<file>``, or
    ``datasets--`` for a dataset repo, with ``refs/<revision or main>``), so
    ``hf_hub_download(..., local_files_only=True)`` finds it.  ``link`` symlinks instead of
    copying (the hub cache's own snapshots are symlinks too), for large files.
    """
    repo = Path(home) / "hub" / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (snapshot / filename).parent.mkdir(parents=True, exist_ok=True)
    if link:
        (snapshot / filename).symlink_to(Path(src).resolve())
    else:
        shutil.copy(src, snapshot / filename)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / (revision or "main")).write_text(commit)
    return snapshot / filename


# -- tile presets ------------------------------------------------------------------------------
def random_state(module, seed: int = 0) -> dict:
    """Random tensors for ``module``'s state dict, at a trained network's scale.

    Weights of rank >= 2 are ``N(0, 1/fan_in)`` (so deep stacks neither vanish nor
    explode), 1-D ``weight`` (norm gains) ``N(1, 0.1)``, other 1-D tensors (biases,
    layer scales, tokens) ``N(0, 0.1)``; BatchNorm running variances lie in
    ``[0.5, 1.5]``; integer buffers are zero.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in module.state_dict().items():
        shape = tuple(t.shape)
        if not t.is_floating_point():
            out[key] = torch.zeros(shape, dtype=t.dtype)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=gen)
        elif len(shape) >= 2 and key.rsplit(".", 1)[-1] in ("weight", "P", "Q") or key.endswith("in_proj_weight"):
            out[key] = torch.randn(shape, generator=gen) * math.prod(shape[1:]) ** -0.5
        elif len(shape) == 1 and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    return out


def _published_extras(preset, seed: int) -> dict:
    """Tensors the official file holds that the preset's architecture does not read (``ignore_keys``)."""
    if not preset.ignore_keys:
        return {}
    import timm
    import torch

    kwargs = {k: v for k, v in preset.timm_kwargs().items() if k not in ("features_only", "out_indices")}
    with torch.device("meta"):
        full = timm.create_model(preset.arch, pretrained=False, **kwargs)
    shapes = {k: v for k, v in full.state_dict().items() if k.startswith(preset.ignore_keys)}
    gen = torch.Generator().manual_seed(seed + 1)
    return {k: (torch.randn(v.shape, generator=gen) * 0.02 if v.is_floating_point()
                else torch.zeros(v.shape, dtype=v.dtype)) for k, v in shapes.items()}


def tile_checkpoint(preset, path: str | Path, seed: int = 0, **twin) -> tuple[Path, dict]:
    """Write a random checkpoint of a tile preset in its published (timm-keyed) layout.

    ``preset`` is a `TilePreset` or its name; ``twin`` overrides architecture
    kwargs (``embed_dim=48, depth=2`` makes a tiny twin).  ``.safetensors``
    or a ``torch.save`` state dict by ``path``'s suffix.  Returns the path and
    the state the architecture reads (without the ignored extras), for a
    bare-module reference.
    """
    import torch

    if isinstance(preset, str):
        preset = get_tile_preset(preset)
    if preset.layout not in ("timm", "mettle", "timm_features", "ctranspath"):
        raise ValueError(f"preset {preset.name!r} publishes the {preset.layout!r} layout; "
                         "tile_checkpoint writes timm-keyed files only")
    if twin:
        preset = preset.with_kwargs(**twin)
    with torch.device("meta"):
        model = preset.create_architecture()
    state = random_state(model, seed)
    stored = {**state, **_published_extras(preset, seed)}
    if preset.layout == "ctranspath":  # timm 0.5 keys, as CHIEF_CTransPath.pth has them, under "model"
        from slide2vec_dask.encoders.ctranspath import to_official_layout  # torch at its top level

        stored = {"model": to_official_layout(stored)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    else:
        torch.save(stored, path)
    return path, state


# -- slide and patient presets -------------------------------------------------------------------
def _titan_text_shapes() -> dict[str, tuple[int, ...]]:
    from slide2vec_dask.encoders.aggregators import titan as T  # torch at its top level

    w, n = T.TEXT["width"], T.TEXT["layers"]
    hidden = int(w * T.TEXT["mlp_ratio"])
    shapes = {"token_embedding.weight": (T.TEXT["vocab_size"], w),
              "positional_embedding": (T.TEXT["context_length"] + 1, w), "cls_emb": (w,),
              "ln_final.weight": (w,), "ln_final.bias": (w,), "text_projection": (w, w)}
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "attn.in_proj_weight": (3 * w, w),
                       p + "attn.in_proj_bias": (3 * w,), p + "attn.out_proj.weight": (w, w),
                       p + "attn.out_proj.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                       p + "mlp.c_fc.weight": (hidden, w), p + "mlp.c_fc.bias": (hidden,),
                       p + "mlp.c_proj.weight": (w, hidden), p + "mlp.c_proj.bias": (w,)})
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen):
    import torch

    t = torch.empty(shape)
    leaf = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if len(shape) == 1 and name.endswith("weight") and ("norm" in leaf or leaf.startswith("ln")):
        return t.normal_(1.0, 0.1, generator=gen)  # LayerNorm scale
    if len(shape) >= 2:  # fan-in scaling: a conv kernel's fan-in is all but its first axis
        return t.normal_(0.0, (math.prod(shape[1:]) if len(shape) == 4 else shape[-1]) ** -0.5, generator=gen)
    return t.normal_(0.0, 0.1, generator=gen)


def titan_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a random ``model.safetensors`` of TITAN in the hub's key layout (vision + text); its path.

    ``path`` is the file, or a directory to hold ``model.safetensors``.  The text tower's
    layout is open_clip's TextTransformer with TITAN's ``text_config`` (it is never loaded here).
    """
    from safetensors.torch import save_file

    from slide2vec_dask.encoders.aggregators import titan as T  # torch at its top level

    path = Path(path)
    if path.is_dir():
        path = path / T.HUB_FILES[0]
    import torch

    with torch.device("meta"):
        vision = {k: tuple(v.shape) for k, v in T.TitanSlideEncoder().state_dict().items()}
    shapes = {T.VISION_PREFIX + k: s for k, s in vision.items()}
    shapes.update({T.TEXT_PREFIX + k: s for k, s in _titan_text_shapes().items()})
    gen = torch.Generator().manual_seed(seed)
    save_file({k: _random_tensor(k, s, gen) for k, s in shapes.items()}, str(path), metadata={"format": "pt"})
    return path


def conchv15_checkpoint(path: str | Path, seed: int = 0, depth: int = 24) -> Path:
    """Write a random CONCH v1.5 state dict (``torch.save``, the hub's ``.bin`` layout, 224 px grid).

    ``depth`` < 24 writes a shallow twin for ``get_tile_preset('conchv15').with_kwargs(depth=...)``.
    """
    from slide2vec_dask.encoders.aggregators import titan as T  # torch at its top level

    import torch

    preset = get_tile_preset(T.TILE_PRESET)
    if depth != 24:
        preset = preset.with_kwargs(depth=depth)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in preset.create_architecture().state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    path = Path(path)
    torch.save({k: _random_tensor(k, s, gen) for k, s in shapes.items()}, path)
    return path


def prism_checkpoint(path: str | Path, seed: int = 0, cfg=None) -> Path:
    """Write random weights in the official file's format and key layout; returns ``path``.

    ``model.safetensors`` layout: the full slide encoder under ``image_resampler.``
    with one copy per shared tensor (the owner layer's key), plus the text side's
    contrastive heads and temperature.  BioGPT's own decoder tensors (~0.35 B
    parameters, not read by this preset) are left out to keep the file small.
    """
    import torch
    from safetensors.torch import save_file

    cfg = P.PRISM_CONFIG if cfg is None else cfg

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the official PRISM file is .safetensors; got {path.name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = P.create_prism(cfg)
        with torch.no_grad():
            for sub in module.modules():
                if isinstance(sub, torch.nn.LayerNorm):  # non-trivial norms, so a norm left unloaded shows
                    sub.weight.normal_(1.0, 0.1)
                    sub.bias.normal_(0.0, 0.1)
        full = module.state_dict()
        state = {P.CHECKPOINT_PREFIX + keys[0]: full[keys[0]].contiguous() for keys in P.shared_groups(module)}
        for key, shape in P.TEXT_HEADS.items():
            state[key] = torch.randn(shape) * 0.02 if shape else torch.tensor(2.6593)  # log(1/0.07)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def gigapath_slide_checkpoint(path, seed: int = 0) -> Path:
    """Write a random ``slide_encoder.pth`` of the full published architecture, official format.

    ``torch.save({"model": state_dict})`` with the official keys and shapes, as
    the official ``create_model`` reads it; every tensor random (LayerNorm
    weights near 1), so that a mis-mapped key shows in the outputs.
    """
    import torch
    from torch import nn

    path = Path(path)
    with torch.device("meta"):
        model = gigapath_architecture()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    norm_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key in norm_weights:
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith("weight"):
            state[key] = noise / shape[1] ** 0.5  # nn.Linear (out, in)
        else:
            state[key] = 0.02 * noise             # biases, cls_token
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


def moozy_checkpoint(path: str | Path, seed: int = 0, *, slide_config: dict | None = None,
                     case_config: dict | None = None) -> Path:
    """Write a random ``moozy.pt``: the full published architecture, official layout and configs.

    Weights are random but of a trained model's scale (LayerNorm gains near
    1, LayerScale gammas ~0.1 rather than 1e-5, so every layer matters); the
    ALiBi slopes are the fixed official ones (perturbed when learnable).  ``slide_config`` /
    ``case_config`` override entries of the published configs.
    """
    import torch

    slide_cfg = {**M.SLIDE_CONFIG, **(slide_config or {})}
    case_cfg = {**M.CASE_CONFIG, **(case_config or {})}
    gen = torch.Generator().manual_seed(seed)
    from slide2vec_dask.encoders.aggregators._moozy_nn import alibi_slopes  # torch at its top level

    payload = {}
    slopes = -torch.tensor(alibi_slopes(int(slide_cfg["n_heads"])), dtype=torch.float32).unsqueeze(1)
    if slide_cfg["learnable_alibi"]:  # trained slopes drift from their initial values
        slopes = slopes * (1 + 0.1 * torch.randn(slopes.shape, generator=gen))
    modules = {M.SLIDE_KEY: M.slide_module(slide_cfg, device="meta"),
               M.CASE_KEY: M.case_module(case_cfg, device="meta")}
    for key, module in modules.items():
        state = {}
        for name, t in module.state_dict().items():
            if name.endswith("pos_bias.slopes"):
                value = slopes.clone()  # one module shared by every block: the same tensor under each key
            elif name.endswith("gamma"):
                value = 0.1 + 0.05 * torch.randn(t.shape, generator=gen)
            elif name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
                value = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
            elif name.endswith("token") or name.endswith("tokens"):
                value = torch.randn(t.shape, generator=gen)
            else:
                value = 0.02 * torch.randn(t.shape, generator=gen)
            state[name] = value.to(torch.float32)
        payload[key] = state
    payload[M.SLIDE_CONFIG_KEY], payload[M.CASE_CONFIG_KEY] = slide_cfg, case_cfg
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


RANDOM_CHECKPOINTS = {"titan": titan_checkpoint, "prism": prism_checkpoint, "gigapath": gigapath_slide_checkpoint,
                      "moozy": moozy_checkpoint}
"""Writer of each aggregator module's official file, by module name."""
