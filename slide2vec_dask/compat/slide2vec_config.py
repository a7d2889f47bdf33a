"""slide2vec 7.x's YAML run configuration, read as it is and mapped onto our options.

``slide2vec-dask CONFIG.yaml [--skip-datetime] [--tiling-only] [--run-on-cpu] [--output-dir DIR]
[dotted.key=value ...]`` runs a slide2vec config: its sections (``csv``, ``output_dir``,
``resume``, ``resume_dirname``, ``save_tiles``, ``seed``, ``model``, ``tiling``, ``speed``,
``wandb``) over slide2vec's defaults (`DEFAULTS`, its ``default.yaml``'s keys and values),
``${dotted.path}`` references resolved.  Every key is known: a typo is refused naming the
closest key.  Keys that mean nothing here are accepted with one warning each (`IGNORED`).
"""

from __future__ import annotations

import copy
import datetime
import difflib
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from slide2vec_dask import config_yaml
from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig, shown
from slide2vec_dask.store.output_dir import atomic

logger = logging.getLogger("slide2vec_dask")

# slide2vec 7.1.4's keys and default values (its configs/default.yaml).
DEFAULTS: dict[str, Any] = {
    "csv": None, "output_dir": "output", "resume": False, "resume_dirname": None, "save_tiles": False, "seed": 0,
    "model": {"name": None, "output_variant": None, "batch_size": 32, "save_tile_embeddings": False,
              "save_slide_embeddings": False, "save_latents": False, "allow_non_recommended_settings": False},
    "tiling": {
        "on_the_fly": True, "gpu_decode": False, "adaptive_batching": False, "use_supertiles": True,
        "jpeg_backend": "pil", "read_coordinates_from": None, "read_tiles_from": None, "backend": "auto",
        "mask_backend": "auto",
        "masks": {"output_mode": "per_annotation", "strategy": "joint", "pixel_mapping": {"background": 0, "tissue": 1},
                  "colors": {"background": None, "tissue": [157, 219, 129]},
                  "min_coverage": {"background": None, "tissue": 0.01}},
        "params": {"requested_spacing_um": None, "tolerance": 0.05, "requested_tile_size_px": None,
                   "requested_region_size_px": None, "region_tile_multiple": None, "overlap": 0.0},
        "seg_params": {"downsample": 64, "sthresh": 8, "sthresh_up": 255, "mthresh": 7, "close": 4, "method": "hsv",
                       "sam2_checkpoint_path": None, "sam2_config_path": None, "sam2_device": "cpu",
                       "sam2_num_workers": None},
        "filter_params": {"ref_tile_size": "${tiling.params.requested_tile_size_px}", "a_t": 4, "a_h": 2,
                          "filter_white": False, "filter_black": False, "white_threshold": 220, "black_threshold": 25,
                          "fraction_threshold": 0.9, "filter_grayspace": False,
                          "grayspace_saturation_threshold": 0.05, "grayspace_fraction_threshold": 0.6,
                          "filter_blur": False, "blur_threshold": 50.0, "qc_spacing_um": 2.0},
        "preview": {"save_mask_preview": True, "save_tiling_preview": True, "downsample": 32,
                    "tissue_contour_color": [157, 219, 129], "mask_overlay_alpha": 0.5},
    },
    "speed": {"precision": None, "output_dtype": None, "num_dataloader_workers": None, "num_gpus": None,
              "num_preprocessing_workers": None, "num_cucim_workers": 4, "prefetch_factor_embedding": 4},
    "wandb": {"enable": False, "project": "", "username": "", "exp_name": "", "tags": [], "dir": "", "group": None,
              "resume_id": "${resume_dirname}"},
}

# Keys accepted, warned about once each, and not acted on: why they mean nothing here.
IGNORED = {
    "wandb": "slide2vec-dask logs no Weights & Biases run (progress is on the terminal and in process_list.csv)",
    "speed.num_cucim_workers": "cuCIM's per-read threads: our readers decode in the engine's thread pool",
    "tiling.jpeg_backend": "tile archives are written with our JPEG encoder",
    "tiling.gpu_decode": "tiles are decoded on the CPU readers",
    "tiling.adaptive_batching": "batches follow the engine's blocks",
    "tiling.preview.tissue_contour_color": "previews draw their own colours",
    "tiling.preview.mask_overlay_alpha": "previews draw their own colours",
}
_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


class Slide2vecConfigError(ValueError):
    """A slide2vec config this release refuses (unknown key, bad value); the message names it."""


def is_slide2vec_config(doc: Any) -> bool:
    """Whether a YAML document is a slide2vec config (its top-level keys are slide2vec's)."""
    return isinstance(doc, dict) and bool(doc) and set(map(str, doc)) <= set(DEFAULTS) and bool(
        set(doc) & {"csv", "model", "tiling", "speed", "wandb", "resume", "save_tiles"})


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out.append(prefix + key)
        if isinstance(value, dict) and key not in ("pixel_mapping", "colors", "min_coverage"):
            out += _flat_keys(value, prefix + key + ".")
    return out


def _check_known(given: Any, schema: Any, where: str) -> None:
    if not isinstance(given, dict):
        return
    if not isinstance(schema, dict):
        raise Slide2vecConfigError(f"{where} must be a value, got a mapping {shown(given)}")
    for key, value in given.items():
        if key not in schema:
            name = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(name, _flat_keys(DEFAULTS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise Slide2vecConfigError(f"unknown key {name!r}{hint}; slide2vec's keys are those of its default.yaml")
        if key in ("pixel_mapping", "colors", "min_coverage"):
            if value is not None and not isinstance(value, dict):
                raise Slide2vecConfigError(f"{where}.{key} must be a mapping, got {shown(value)}")
            continue
        if isinstance(schema[key], dict):
            if value is not None and not isinstance(value, dict):
                raise Slide2vecConfigError(f"{where + '.' if where else ''}{key} must be a mapping, got {shown(value)}")
            _check_known(value, schema[key], f"{where}.{key}" if where else str(key))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("pixel_mapping", "min_coverage",
                                                                                          "colors"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise Slide2vecConfigError(f"${{{dotted}}} names no key of the config")
        node = node[part]
    return node


def _resolve(tree: Any, root: dict, depth: int = 0) -> Any:
    """``${a.b}`` references: a whole-string reference keeps the value's type, others are text."""
    if depth > 20:
        raise Slide2vecConfigError("${...} references form a loop")
    if isinstance(tree, dict):
        return {k: _resolve(v, root, depth) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_resolve(v, root, depth) for v in tree]
    if isinstance(tree, str):
        whole = _REF.fullmatch(tree)
        if whole:
            return _resolve(_get(root, whole.group(1)), root, depth + 1)
        return _REF.sub(lambda m: str(_resolve(_get(root, m.group(1)), root, depth + 1)), tree)
    return tree


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load(path: str | Path, overrides: list[str] = (), output_dir: str | None = None) -> tuple[dict, dict]:
    """``(resolved config, what the user wrote)``: the file and its ``key=value`` overrides (dotted,
    values read as YAML scalars) over slide2vec's defaults, every key checked."""
    path = Path(path)
    try:
        user = config_yaml.load(path.read_text(encoding="utf-8")) or {}
    except (config_yaml.ConfigYAMLError, yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise Slide2vecConfigError(f"{path}: {exc}") from None
    if not isinstance(user, dict):
        raise Slide2vecConfigError(f"{path}: expected a mapping of slide2vec's sections")
    for override in list(overrides) + ([f"output_dir={Path(output_dir).resolve()}"] if output_dir else []):
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise Slide2vecConfigError(f"override {override!r} must look like key=value, e.g. model.batch_size=64")
        try:
            value = config_yaml.load(text) if text.strip() else None
        except (config_yaml.ConfigYAMLError, yaml.YAMLError):
            value = text
        _set(user, key.strip().lstrip("-"), value)
    _check_known(user, DEFAULTS, "")
    cfg = _resolve(_merge(DEFAULTS, user), _merge(DEFAULTS, user))
    return cfg, user


def warn_ignored(user: dict) -> list[str]:
    """One warning per key that means nothing here and that the config (or its overrides) gives."""
    said = []
    for dotted, why in IGNORED.items():
        try:
            _get(user, dotted)
        except Slide2vecConfigError:
            continue
        logger.warning("slide2vec config: %s is accepted and ignored: %s", dotted, why)
        said.append(dotted)
    return said


def run_folder(cfg: dict, skip_datetime: bool) -> Path:
    """slide2vec's output folder: ``output_dir/<run id>``, the run id being ``resume_dirname`` when
    resuming, else the start time (``%Y-%m-%d_%H_%M``) unless ``--skip-datetime``."""
    base = Path(str(cfg["output_dir"])).expanduser()
    if cfg.get("resume"):
        run_id = str(cfg.get("resume_dirname") or "")
    elif skip_datetime:
        run_id = ""
    else:
        run_id = datetime.datetime.now().strftime("%Y-%m-%d_%H_%M")
    return base / run_id if run_id else base


def model_options(cfg: dict, run_on_cpu: bool) -> dict[str, Any]:
    m = cfg["model"]
    if not m.get("name"):
        raise Slide2vecConfigError("model.name is required: a preset name (slide2vec-dask models lists them) or a "
                                   "name given to register_encoder")
    return {"name": m["name"], "output_variant": m.get("output_variant"), "device": "cpu" if run_on_cpu else "auto",
            "allow_non_recommended_settings": m.get("allow_non_recommended_settings")}


def preprocessing(cfg: dict) -> PreprocessingConfig:
    """``tiling`` (and ``resume``, ``save_tiles``) as a `PreprocessingConfig`, hs2p's names passed through."""
    t, p = cfg["tiling"], cfg["tiling"]["params"]
    filt = {k: v for k, v in t["filter_params"].items() if not (k == "ref_tile_size" and v is None)}
    values: dict[str, Any] = {
        "backend": t["backend"], "mask_backend": t["mask_backend"],
        "tiling": {"requested_spacing_um": p["requested_spacing_um"], "requested_tile_size_px": p["requested_tile_size_px"],
                   "tolerance": p["tolerance"], "overlap": p["overlap"]},
        "segmentation": t["seg_params"], "filter": filt,
        "preview": {k: v for k, v in t["preview"].items()},
        "masks": {k: t["masks"].get(k) for k in ("pixel_mapping", "min_coverage", "colors", "output_mode", "strategy")},
        "region_tile_multiple": p["region_tile_multiple"], "requested_region_size_px": p["requested_region_size_px"],
        "use_supertiles": t["use_supertiles"], "read_coordinates_from": t["read_coordinates_from"] or None,
        "read_tiles_from": t["read_tiles_from"] or None, "resume": cfg["resume"],
        # save_tiles: the run writes each slide's tile archive (tiles/<id>.tiles.tar) and reads from it
        "on_the_fly": t["on_the_fly"], "save_tiles": cfg["save_tiles"],
    }
    try:
        return PreprocessingConfig(**values)
    except ValueError as exc:
        raise Slide2vecConfigError(f"tiling: {exc}") from None


def execution(cfg: dict, output_dir: Path, run_on_cpu: bool) -> ExecutionOptions:
    """``model`` (batch size, what to save) and ``speed`` as `ExecutionOptions`; pt files as slide2vec writes."""
    m, s = cfg["model"], cfg["speed"]
    values = {"output_dir": output_dir, "output_format": "pt", "batch_size": m["batch_size"],
              "save_tile_embeddings": m["save_tile_embeddings"], "save_slide_embeddings": m["save_slide_embeddings"],
              "save_latents": m["save_latents"], "precision": "fp32" if run_on_cpu else s["precision"],
              "output_dtype": s["output_dtype"], "num_workers_per_gpu": s["num_dataloader_workers"],
              "num_preprocessing_workers": s["num_preprocessing_workers"], "prefetch_factor": s["prefetch_factor_embedding"]}
    try:
        ex = ExecutionOptions(**values, num_gpus=None if run_on_cpu else s["num_gpus"])
    except ValueError as exc:
        raise Slide2vecConfigError(f"model/speed: {exc}") from None
    return ex.with_gpus(0) if run_on_cpu else ex


def save(cfg: dict, folder: Path) -> Path:
    """``<output_dir>/config.yaml``: the resolved configuration the run used, as slide2vec keeps it."""
    folder.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg, sort_keys=False)
    return atomic(folder / "config.yaml", lambda tmp: tmp.write_text(text, encoding="utf-8"))
