"""Command line: ``slide2vec-dask run | embed | export | models``.

``run CONFIG.yaml [key=value ...]`` runs the `Pipeline` described by a YAML
file (sections ``manifest``, ``model``, ``preprocessing``, ``execution``),
with dotted overrides; ``embed`` does the same from flags alone; ``models``
lists the presets; ``export`` writes a finished run in other tools' formats.

Exit codes: 0 when every slide succeeded or was skipped, 1 when any slide
failed (the summary names them; ``process_list.csv`` has the errors), 2 for
usage and configuration errors, reported before any work starts, 3 when the
output folder cannot be used (a file, not writable, full, or held by another
run), 130 when interrupted.

Importing this module is cheap (argparse only): PyYAML, torch, timm and Dask
load inside the commands that need them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

PROG = "slide2vec-dask"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = ("exit codes: 0 all slides succeeded or were skipped, 1 some slide failed, 2 usage/config error, "
              "3 output folder unusable (a file, read-only, full, or in use by another run), 130 interrupted")

SECTIONS = ("manifest", "model", "preprocessing", "execution", "cluster")
PRESET_KEYS = ("preset", "checkpoint_path", "output_variant", "tile_checkpoint_path")
# cluster: {kind: local|slurm|k8s|tcp://HOST:PORT, wait_for_workers: N, wait_timeout: S, <kind>: {options}}
CLUSTER_KEYS = ("kind", "wait_for_workers", "wait_timeout", "local", "slurm", "k8s")
TIMM_KEYS = ("timm", "checkpoint_path", "spacing_um", "tile_size_px", "pretrained", "mean", "std")
MODEL_KEYS = tuple(dict.fromkeys(PRESET_KEYS + TIMM_KEYS))
# Path-valued settings; in the YAML file they are relative to the file's folder.
PATH_KEYS = {"manifest": (), "model": ("checkpoint_path", "tile_checkpoint_path"), "execution": ("output_dir",),
             "preprocessing": ("read_coordinates_from", "read_tiles_from")}

SAMPLE_CONFIG = """\
manifest: slides.csv            # sample_id,image_path[,mask_path,spacing_at_level_0]
model:
  preset: lunit                 # or  timm: vit_small_patch16_224  (+ spacing_um, tile_size_px)
  # checkpoint_path: weights/lunit.safetensors
preprocessing:
  requested_spacing_um: 0.5
  tissue_threshold: 0.1
  segmentation: {method: hsv, downsample: 64}
execution:
  output_dir: out               # out/embeddings.zarr, out/process_list.csv
  batch_size: 64
# cluster:                      # default: a local cluster for the run
#   kind: slurm                 # local | slurm | k8s | tcp://scheduler:8786  (or --cluster)
#   wait_for_workers: 1
#   slurm: {gpu_jobs: 2, cores: 8, memory: 64GB, walltime: "04:00:00", queue: gpu}
"""


class UsageError(Exception):
    """A usage or configuration problem found before any work starts (exit code 2)."""


# -- configuration -------------------------------------------------------------
def _fields(section: str) -> tuple[str, ...]:
    import dataclasses

    from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig

    cls = PreprocessingConfig if section == "preprocessing" else ExecutionOptions
    return tuple(f.name for f in dataclasses.fields(cls))


def _nested(section: str, key: str) -> tuple[str, ...] | None:
    """Valid keys of a dict-valued preprocessing field, None for other fields."""
    from slide2vec_dask import config

    defaults = {"segmentation": config.SEGMENTATION_DEFAULTS, "filtering": config.FILTERING_DEFAULTS,
                "preview": config.PREVIEW_DEFAULTS}
    return tuple(defaults[key]) if section == "preprocessing" and key in defaults else None


def _unknown(key: str, valid: Sequence[str], what: str = "key") -> UsageError:
    import difflib

    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"unknown {what} {key!r}{hint}; valid {what}s are: {', '.join(valid)}")


def _valid_keys(section: str) -> tuple[str, ...]:
    if section == "cluster":
        return CLUSTER_KEYS
    return MODEL_KEYS if section == "model" else _fields(section)


def check_config(cfg: dict[str, Any], where: str = "config") -> None:
    """Every section and field known; raises `UsageError` naming the first unknown one."""
    for section, value in cfg.items():
        if section not in SECTIONS:
            raise _unknown(str(section), SECTIONS, "section")
        if section == "manifest" or value is None:
            continue
        if not isinstance(value, dict):
            raise UsageError(f"{where}: section {section!r} must be a mapping of keys to values, "
                             f"got {type(value).__name__}")
        valid = _valid_keys(section)
        for key, sub in value.items():
            if key not in valid:
                raise _unknown(f"{section}.{key}", valid)
            nested = _nested(section, key)
            if nested is not None and sub is not None:
                if not isinstance(sub, dict):
                    from slide2vec_dask.config import shown

                    raise UsageError(f"{where}: {section}.{key} must be a mapping, got {shown(sub)}")
                for name in sub:
                    if name not in nested:
                        raise _unknown(f"{section}.{key}.{name}", nested)


def _resolve_paths(cfg: dict[str, Any], base: Path) -> None:
    """Make the YAML's relative paths relative to ``base`` (its folder); ``~`` expands."""
    from slide2vec_dask.slide.remote import is_url

    def resolve(value):
        if value is None or value == "" or is_url(str(value)):
            return value
        path = Path(str(value)).expanduser()
        return str(path if path.is_absolute() else base / path)

    if "manifest" in cfg:
        cfg["manifest"] = resolve(cfg["manifest"])
    for section in ("model", "execution", "preprocessing"):
        for key in PATH_KEYS[section]:
            if isinstance(cfg.get(section), dict) and key in cfg[section]:
                cfg[section][key] = resolve(cfg[section][key])


def load_config(path: str | Path) -> dict[str, Any]:
    """The YAML run configuration, checked, with its relative paths resolved."""
    import yaml

    from slide2vec_dask import config_yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        cfg = config_yaml.load(path.read_text(encoding="utf-8"))
    except config_yaml.ConfigYAMLError as exc:
        raise UsageError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    check_config(cfg, str(path))
    _resolve_paths(cfg, path.resolve().parent)
    return cfg


def _slide2vec_file(path: str | Path) -> bool:
    """Whether ``path`` holds a slide2vec 7.x config (top-level csv/model/tiling/speed... keys)."""
    from slide2vec_dask import config_yaml
    from slide2vec_dask.compat.slide2vec_config import is_slide2vec_config

    try:
        return is_slide2vec_config(config_yaml.load(Path(path).read_text(encoding="utf-8")))
    except Exception:   # unreadable: load_config says why
        return False


def parse_value(text: str) -> Any:
    """An override's value as a YAML scalar, read as the config file is: ``64`` → int,
    ``true`` → bool (``yes``/``no`` stay strings), ``null`` → None."""
    import yaml

    from slide2vec_dask import config_yaml

    try:
        value = config_yaml.load(text)
    except (yaml.YAMLError, config_yaml.ConfigYAMLError):
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string; a number is meant
            number = float(value)
        except ValueError:
            return value
        return number if value.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity") else value
    return value


def apply_override(cfg: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` to ``cfg`` (paths in overrides are relative to the current folder)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"override {override!r} must look like key=value, e.g. execution.batch_size=64")
    parts = key.split(".")
    section = parts[0]
    if section not in SECTIONS:
        raise _unknown(section, SECTIONS, "section")
    value = parse_value(text)
    from slide2vec_dask.slide.remote import is_url

    if value is not None and parts[-1] in PATH_KEYS.get(section, ()) + ("manifest",) and not is_url(str(value)):
        value = str(Path(str(value)).expanduser())
    if section == "manifest":
        if len(parts) != 1:
            raise UsageError(f"override {key!r}: 'manifest' is a path, set it as manifest=PATH")
        cfg["manifest"] = value
        return
    if len(parts) == 1:
        raise UsageError(f"override {key!r} names a whole section; set one field, "
                         f"e.g. {section}.{_valid_keys(section)[0]}=...")
    valid = _valid_keys(section)
    if parts[1] not in valid:
        raise _unknown(key, valid)
    body = cfg.get(section)
    if not isinstance(body, dict):
        body = cfg[section] = {}
    nested = _nested(section, parts[1])
    if len(parts) == 2:
        body[parts[1]] = value
    elif len(parts) == 3 and section == "cluster" and parts[1] in ("local", "slurm", "k8s"):
        # Free-form options of a cluster kind; the cluster helper checks their names.
        if not isinstance(body.get(parts[1]), dict):
            body[parts[1]] = {}
        body[parts[1]][parts[2]] = value
    elif len(parts) == 3 and nested is not None:
        if parts[2] not in nested:
            raise _unknown(key, nested)
        if not isinstance(body.get(parts[1]), dict):
            body[parts[1]] = {}
        body[parts[1]][parts[2]] = value
    else:
        raise UsageError(f"override {key!r}: {section}.{parts[1]} has no sub-keys")
    check_config(cfg, "overrides")


def _model_options(section: Any) -> dict[str, Any]:
    """The ``model`` section checked: exactly one of ``preset`` / ``timm``, and only its keys."""
    from slide2vec_dask.config import shown

    if not isinstance(section, dict):
        raise UsageError("config needs a 'model' section: {preset: NAME} or {timm: NAME}")
    opts = {k: v for k, v in section.items() if v is not None}
    kinds = [k for k in ("preset", "timm") if k in opts]
    if len(kinds) != 1:
        raise UsageError("model: give exactly one of 'preset' (a name from `slide2vec-dask models`) or "
                         f"'timm' (a timm architecture); got {kinds or 'neither'}")
    kind = kinds[0]
    valid = PRESET_KEYS if kind == "preset" else TIMM_KEYS
    for key in opts:
        if key not in valid:
            hint = (" (for a preset, set preprocessing.requested_spacing_um / requested_tile_size_px)"
                    if key in ("spacing_um", "tile_size_px") else "")
            raise UsageError(f"model.{key} does not apply to a {kind} model{hint}; "
                             f"valid keys are: {', '.join(valid)}")
    if not isinstance(opts[kind], str) or not opts[kind]:
        raise UsageError(f"model.{kind} must be a name, got {shown(opts[kind])}")
    for key, integer in (("spacing_um", False), ("tile_size_px", True)):
        value = opts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
                                  or value <= 0):
            raise UsageError(f"model.{key} must be a positive {'integer' if integer else 'number'}, got {shown(value)}")
    return opts


def _build_model(opts: dict[str, Any]):
    from slide2vec_dask.model import Model

    opts = dict(opts)
    if "preset" in opts:
        return Model.from_preset(opts.pop("preset"), **opts)
    return Model.from_timm(opts.pop("timm"), **opts)


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name)
    return {} if value is None else dict(value)


# -- running -----------------------------------------------------------------
def check_run(manifest: Any, preprocessing: dict[str, Any], execution: dict[str, Any],
              cluster: dict[str, Any] | None = None):
    """The checks of a run that read no file and start nothing (``run --print-config`` makes them
    too): the cluster kind, and the preprocessing / execution options built.  Returns the kind,
    the cluster options left, and the two option objects."""
    from slide2vec_dask.config import ExecutionOptions, PreprocessingConfig, shown

    if manifest in (None, ""):
        raise UsageError("no manifest given: set 'manifest: PATH' in the config (or manifest=PATH)")
    if execution.get("output_dir") in (None, ""):
        raise UsageError("execution.output_dir is required: the folder that receives embeddings.zarr "
                         "and process_list.csv")
    cluster = dict(cluster or {})
    kind = cluster.pop("kind", None) or "local"
    if not isinstance(kind, str):
        raise UsageError(f"cluster.kind must be local, slurm, k8s or a scheduler address, got {shown(kind)}")
    if "://" in kind:
        if execution.get("scheduler_address") not in (None, kind):
            raise UsageError(f"two schedulers given: cluster {kind!r} and execution.scheduler_address "
                             f"{shown(execution['scheduler_address'])}")
        execution = {**execution, "scheduler_address": kind}
        kind = "address"
    elif kind not in ("local", "slurm", "k8s"):
        raise UsageError(f"cluster must be local, slurm, k8s or a scheduler address (tcp://HOST:PORT), "
                         f"got {shown(kind)}")
    elif kind != "local" and execution.get("scheduler_address"):
        raise UsageError(f"cluster {kind!r} starts its own scheduler; drop execution.scheduler_address")
    return (kind, cluster, _built("preprocessing", PreprocessingConfig, preprocessing),
            _built("execution", ExecutionOptions, execution))


def _built(section: str, cls, values: dict[str, Any]):
    """``cls(**values)``, its refusal naming the config section the field sits in."""
    try:
        if section == "execution" and values.get("num_gpus") == 0:   # the command line's CPU spelling
            return cls(**{**values, "num_gpus": None}).with_gpus(0)
        return cls(**values)
    except ValueError as exc:
        raise UsageError(f"{section}: {exc}") from None


def execute(manifest: Any, model_opts: dict[str, Any], preprocessing: dict[str, Any],
            execution: dict[str, Any], cluster: dict[str, Any] | None = None, tiling_only: bool = False) -> int:
    """Check everything cheap first, then start the cluster, build the model and run the pipeline
    (``tiling_only``: only tile; the model gives the tile size and spacing, its weights are not loaded)."""
    from slide2vec_dask.inputs import read_manifest

    kind, cluster, prep, ex = check_run(manifest, preprocessing, execution, cluster)
    slides = read_manifest(manifest)
    if not slides:
        raise UsageError(f"manifest {manifest} lists no slides")
    model = _build_model(model_opts)
    from slide2vec_dask.pipeline import Pipeline

    with _cluster_client(kind, cluster, ex) as client:
        result = Pipeline(model, prep, ex, client=client).run(manifest_path=manifest, tiling_only=tiling_only)
    return report(result)


@contextlib.contextmanager
def _cluster_client(kind: str, options: dict[str, Any], execution):
    """The client of the run's cluster (None: the Pipeline's own local cluster), closed afterwards."""
    wait = options.pop("wait_for_workers", 1)
    timeout = options.pop("wait_timeout", 600)
    others = sorted(k for k, v in options.items() if k != kind and v is not None)
    if others:
        raise UsageError(f"cluster options for {others} given, but the cluster is {kind!r}")
    if kind == "address":
        from slide2vec_dask.clusters.client import resolve_client

        yield resolve_client(execution.scheduler_address)  # ConnectionError: a usage error, nothing ran yet
        return
    if kind == "local" and not options.get("local"):
        yield None
        return
    from distributed import Client

    from slide2vec_dask.clusters import make_cluster

    cluster = make_cluster(kind, **dict(options.get(kind) or {}))
    client = Client(cluster, set_as_default=False)
    try:
        if wait:
            # The run sizes its window of blocks in flight from the workers present when it starts.
            client.wait_for_workers(int(wait), timeout=float(timeout))
        yield client
    finally:
        client.close()
        cluster.close()


def report(result) -> int:
    """Print the one-line summary (and the failed slides); the exit code."""
    from slide2vec_dask.telemetry import summary_lines

    failed = result.failed
    if result.report is not None:   # the run report's last lines: GPU busy, idle, where the time went
        for line in summary_lines(result.report, result.report_path):
            print(f"{PROG}: {line}", flush=True)
    print(f"{PROG}: {result.num_succeeded} succeeded, {result.num_skipped} skipped, {len(failed)} failed; "
          f"process list: {result.process_list_path}; store: {result.store_path}", flush=True)
    if not failed:
        return EXIT_OK
    for row in failed[:20]:
        print(f"  failed {row.sample_id}: {row.error_type}: {row.error}", file=sys.stderr)
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (see {result.process_list_path})", file=sys.stderr)
    return EXIT_FAILED


TILING_ONLY_HELP = ("only tile the slides: plans (coordinates/), previews when asked, and hs2p's coordinate files "
                    "(tiles/<id>.coordinates.npz + .meta.json); no model weights loaded, nothing embedded")


# -- commands ----------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    if _slide2vec_file(args.config):
        if args.cluster is not None or args.print_config:
            raise UsageError("--cluster / --print-config apply to slide2vec-dask configs; a slide2vec config runs "
                             f"as `{PROG} {args.config} [--skip-datetime] [--run-on-cpu] ...`")
        return cmd_slide2vec([args.config, *args.overrides])
    cfg = load_config(args.config)
    for override in args.overrides:
        apply_override(cfg, override)
    if args.cluster is not None:
        cfg["cluster"] = {**_section(cfg, "cluster"), "kind": args.cluster}
    model_opts = _model_options(cfg.get("model"))
    sections = (cfg.get("manifest"), _section(cfg, "preprocessing"), _section(cfg, "execution"),
                _section(cfg, "cluster"))
    if args.print_config:
        import yaml

        from slide2vec_dask.slide.remote import redacted

        check_run(*sections)  # what is printed is what `run` would accept
        if isinstance(cfg.get("execution"), dict) and cfg["execution"].get("storage_options"):
            cfg["execution"]["storage_options"] = redacted(cfg["execution"]["storage_options"])
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return EXIT_OK
    manifest, preprocessing, execution, cluster = sections
    return execute(manifest, model_opts, preprocessing, execution, cluster, tiling_only=args.tiling_only)


def cmd_embed(args: argparse.Namespace) -> int:
    if args.model is not None:
        # A preset keeps its own contract; --spacing / --tile-size are a request to the tiler.
        model_opts = {"preset": args.model, "checkpoint_path": args.checkpoint, "output_variant": args.output_variant}
        preprocessing = {"requested_spacing_um": args.spacing, "requested_tile_size_px": args.tile_size}
    else:
        if args.output_variant is not None:
            raise UsageError("--output-variant applies to --model presets, not to --timm")
        model_opts = {"timm": args.timm, "checkpoint_path": args.checkpoint,
                      "spacing_um": args.spacing, "tile_size_px": args.tile_size}
        preprocessing = {}
    model_opts = _model_options(model_opts)
    execution = {"output_dir": args.output, "scheduler_address": args.scheduler, "batch_size": args.batch_size,
                 "num_gpus": args.num_gpus, "precision": args.precision, "num_workers": args.num_workers,
                 "output_format": args.output_format, "overwrite": args.overwrite}
    return execute(args.manifest, model_opts, {k: v for k, v in preprocessing.items() if v is not None},
                   {k: v for k, v in execution.items() if v is not None},
                   {} if args.cluster is None else {"kind": args.cluster}, tiling_only=args.tiling_only)


def cmd_models(args: argparse.Namespace) -> int:
    from slide2vec_dask.encoders.registry import list_models

    names = list_models(args.level)
    if not names:
        print(f"{PROG}: no {args.level}-level presets", file=sys.stderr)
        return EXIT_OK
    if not args.verbose:
        print("\n".join(names))
        return EXIT_OK
    from slide2vec_dask.encoders.catalog import describe, text_table

    rows = []
    for name in names:
        try:
            rows.append(describe(name))
        except Exception as exc:  # a broken entry must not hide the others
            print(f"{name}: ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(text_table(rows))
    return EXIT_OK


def cmd_export(args) -> int:
    from slide2vec_dask.exporters import export

    samples = [s for s in args.samples.split(",") if s] if args.samples else None
    try:
        paths = export(args.output_dir, args.formats, samples=samples, dest=args.dest, force=args.force)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc
    except RuntimeError as exc:
        if isinstance(exc.__cause__, OSError):  # the destination failed mid-way (full, removed): exit 3
            from slide2vec_dask.store.output_dir import OutputDirError

            raise OutputDirError(str(exc)) from exc
        raise
    print(f"{len(paths)} file(s) in {', '.join(args.formats)} under {args.dest or args.output_dir}")
    return EXIT_OK


# -- parser ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from slide2vec_dask._version import __version__
    from slide2vec_dask.config import OUTPUT_FORMATS

    parser = argparse.ArgumentParser(
        prog=PROG, description="Whole-slide images to tile embeddings with pathology foundation models, on Dask.",
        epilog=f"A slide2vec 7.x config runs as '{PROG} CONFIG.yaml [--skip-datetime] [--tiling-only] [--run-on-cpu] "
               f"[--output-dir DIR] [key=value ...]'. {EXIT_CODES}. '{PROG} COMMAND --help' tells more.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", help="run a YAML configuration, with key=value overrides",
        description="Embed the slides of a manifest as a YAML configuration describes.\n"
                    "Relative paths in the file are relative to its folder; paths in overrides\n"
                    "to the current folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, values read as YAML scalars (numbers, true/false, null):\n"
               "  execution.batch_size=64 preprocessing.segmentation.method=otsu manifest=other.csv\n"
               "  model.preset=uni execution.scheduler_address=tcp://scheduler:8786\n\n"
               "sections: manifest (path), model ({preset: NAME, checkpoint_path, output_variant} or\n"
               "{timm: NAME, checkpoint_path, spacing_um, tile_size_px, pretrained, mean, std}),\n"
               "preprocessing (PreprocessingConfig fields), execution (ExecutionOptions fields),\n"
               "cluster ({kind: local|slurm|k8s|tcp://..., wait_for_workers, wait_timeout,\n"
               "slurm: {slurm_cluster options}, k8s: {kubernetes_cluster options}}).\n\n"
               "example config:\n" + "".join("  " + line for line in SAMPLE_CONFIG.splitlines(True)) +
               "\n" + EXIT_CODES)
    run.add_argument("config", metavar="CONFIG.yaml", help="the run configuration")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="settings that replace the file's")
    run.add_argument("--cluster", metavar="KIND", help="local (default), slurm, k8s, or a scheduler address "
                     "tcp://HOST:PORT; replaces cluster.kind (options in the config's cluster section)")
    run.add_argument("--tiling-only", action="store_true", help=TILING_ONLY_HELP)
    run.add_argument("--print-config", action="store_true",
                     help="print the effective configuration (overrides applied, paths resolved) and exit")
    run.set_defaults(func=cmd_run)

    embed = sub.add_parser(
        "embed", help="embed the slides of a manifest with one model",
        description="Embed every slide of a manifest CSV (sample_id,image_path[,mask_path,spacing_at_level_0]) "
                    "into DIR/embeddings.zarr; DIR/process_list.csv records each slide's outcome. "
                    "Slides already complete in the store are skipped.",
        epilog=EXIT_CODES)
    embed.add_argument("--manifest", required=True, metavar="M.csv", help="the slides (CSV)")
    which = embed.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="PRESET", help=f"a preset name (see '{PROG} models')")
    which.add_argument("--timm", metavar="NAME", help="a timm architecture instead of a preset")
    embed.add_argument("--output", required=True, metavar="DIR", help="output folder")
    embed.add_argument("--cluster", metavar="KIND", help="local (default), slurm or k8s with default options "
                       "(use `run` and a cluster section for more), or tcp://HOST:PORT")
    embed.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                       help="an existing Dask scheduler (default: a local cluster for this run)")
    embed.add_argument("--checkpoint", metavar="PATH", help="local weights (.safetensors, .pt, .pth, .bin)")
    embed.add_argument("--output-variant", metavar="NAME", help="a preset's output variant (e.g. cls, cls_mean)")
    embed.add_argument("--batch-size", type=int, metavar="N", help="tiles per forward pass (default 32)")
    embed.add_argument("--num-gpus", type=int, metavar="N", help="GPUs to use; 0 = CPU (default: all visible)")
    embed.add_argument("--num-workers", type=int, metavar="N", help="block-decoding threads (default: CPU count)")
    embed.add_argument("--precision", choices=("fp16", "bf16", "fp32"), help="default: the model's on GPU, fp32 on CPU")
    embed.add_argument("--spacing", type=float, metavar="UM",
                       help="tile spacing in µm/px (--timm: the model's, default 0.5; --model: requested)")
    embed.add_argument("--tile-size", type=int, metavar="PX",
                       help="tile size in px (--timm: the model's, default 224; --model: requested)")
    embed.add_argument("--output-format", choices=OUTPUT_FORMATS, action="append", metavar="FORMAT",
                       help="also write each slide's file in this format as it finishes (repeatable): "
                            + ", ".join(OUTPUT_FORMATS))
    embed.add_argument("--tiling-only", action="store_true", help=TILING_ONLY_HELP)
    embed.add_argument("--overwrite", action="store_true", help="replace an existing store instead of resuming")
    embed.set_defaults(func=cmd_embed)

    exp = sub.add_parser(
        "export", help="write a finished run's embeddings in other tools' formats",
        description="Write the slides (and slide/patient embeddings) of OUTPUT_DIR/embeddings.zarr as the "
                    "files other tools read. Files already up to date are skipped.",
        epilog="formats: trident-h5 (TRIDENT/Patho-Bench), clam-h5 (CLAM), stamp-h5 (STAMP), anndata, "
               "spatialdata (LazySlide/wsidata), geojson (QuPath), pt/npz (slide2vec). "
               "exit codes: 0 done, 2 usage error or missing optional library, 3 destination unusable "
               "(a file, read-only, full)")
    exp.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output folder (holds embeddings.zarr)")
    exp.add_argument("--format", required=True, action="append", choices=OUTPUT_FORMATS, metavar="FORMAT",
                     dest="formats", help="repeatable: " + ", ".join(OUTPUT_FORMATS))
    exp.add_argument("--samples", metavar="ID[,ID...]", help="only these sample ids (default: every finished slide)")
    exp.add_argument("--dest", metavar="DIR", help="where the files go (default: OUTPUT_DIR)")
    exp.add_argument("--force", action="store_true", help="rewrite files that are already up to date")
    exp.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="list the model presets",
                            description="List the model presets usable with --model / model.preset.")
    models.add_argument("--level", metavar="LEVEL", help="only presets of this level: tile, slide or patient")
    models.add_argument("-v", "--verbose", action="store_true",
                        help="a table with feature dimension, spacing, tile size and weights repo")
    models.set_defaults(func=cmd_models)
    return parser


# -- slide2vec 7.x's command line -----------------------------------------------------------------
def slide2vec_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} CONFIG.yaml", description="Run a slide2vec 7.x configuration as it is (its csv, model, "
        "tiling, speed sections); the store, process_list.csv and slide2vec's pt files go to output_dir.",
        epilog="overrides: dotted keys of the config, e.g. model.batch_size=64 tiling.params.requested_spacing_um=0.5. "
               + EXIT_CODES)
    parser.add_argument("config", metavar="CONFIG.yaml", help="a slide2vec configuration file")
    parser.add_argument("--skip-datetime", action="store_true", help="no <date>_<time> run folder under output_dir")
    parser.add_argument("--tiling-only", action="store_true", help="only tile the slides (coordinates, previews)")
    parser.add_argument("--run-on-cpu", action="store_true", help="run the model on the CPU (fp32)")
    parser.add_argument("--output-dir", metavar="DIR", help="replaces the config's output_dir")
    return parser


def cmd_slide2vec(argv: Sequence[str]) -> int:
    """``slide2vec-dask CONFIG.yaml [--skip-datetime] [--tiling-only] [--run-on-cpu] [--output-dir DIR] [k=v ...]``."""
    args, overrides = slide2vec_parser().parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-") and "=" not in o]
    if flags:
        raise UsageError(f"unknown option(s) {flags}; overrides look like key=value")
    import random

    import numpy as np
    import torch

    from slide2vec_dask.compat import slide2vec_config as s2v
    from slide2vec_dask.model import Model
    from slide2vec_dask.pipeline import Pipeline

    if not Path(args.config).is_file():
        raise UsageError(f"config file not found: {args.config}")
    cfg, user = s2v.load(args.config, overrides, args.output_dir)
    s2v.warn_ignored(user)
    if cfg.get("csv") in (None, ""):
        raise UsageError("csv is required: the CSV of slides (sample_id,image_path[,mask_path,...])")
    model = Model(**s2v.model_options(cfg, args.run_on_cpu))
    prep = s2v.preprocessing(cfg)
    out = s2v.run_folder(cfg, args.skip_datetime)
    ex = s2v.execution(cfg, out, args.run_on_cpu)
    seed = int(cfg.get("seed") or 0)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cfg["output_dir"] = str(out)
    s2v.save(cfg, out)
    result = Pipeline(model, prep, execution=ex).run(manifest_path=str(Path(cfg["csv"]).expanduser()),
                                                      tiling_only=args.tiling_only)
    return report(result)


def _is_config_call(argv: Sequence[str]) -> bool:
    """``slide2vec-dask CONFIG.yaml ...``: slide2vec's own command line (a file, not a command)."""
    return bool(argv) and str(argv[0]).lower().endswith((".yaml", ".yml")) and not str(argv[0]).startswith("-")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_config_call(argv):
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        try:
            return cmd_slide2vec(argv)
        except (UsageError, ValueError, FileNotFoundError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_ENVIRONMENT
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    args = build_parser().parse_args(argv)
    # Dask's INFO chatter (scheduler, nanny, worker start/stop) drowns the summary; workers inherit this.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, NotImplementedError, ConnectionError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        from slide2vec_dask.store.output_dir import RunEnvironmentError, describe_os_error

        if isinstance(exc, RunEnvironmentError):
            print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        elif isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"{PROG} {args.command}: error: {describe_os_error(exc)}{where}", file=sys.stderr)
        else:
            raise
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
