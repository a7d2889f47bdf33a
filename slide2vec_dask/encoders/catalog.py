"""The model zoo as a table, read from the registry: for ``slide2vec-dask models -v`` and the docs.

Every column comes from what the presets declare (`PresetAbout`, the spec a
factory returns, its `Weights` record); parameter counts are counted on the
``meta`` device from the published architecture, so no weights are touched
and nothing is typed in twice.  The README and docs/models.md hold the same
table between ``<!-- models-table:start -->`` / ``<!-- models-table:end -->``
markers; ``python -m slide2vec_dask.encoders.catalog --write`` regenerates
them, and a test checks they agree with the registry.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

from slide2vec_dask.encoders.registry import get_preset, list_models, preset_about, preset_level

START, END = "<!-- models-table:start -->", "<!-- models-table:end -->"
DOCUMENTS = ("README.md", "docs/models.md")


@functools.lru_cache(maxsize=None)
def count_parameters(name: str) -> int | None:
    """Parameters of the published architecture (shared tensors once), counted on the meta device."""
    import torch

    about = preset_about(name)
    if about.architecture_module is None:
        return None
    try:
        with torch.device("meta"):
            module = about.architecture_module()
    except (ImportError, NotImplementedError):
        return None  # an architecture that needs a package not installed (CONCH v1)
    return sum(p.numel() for p in module.parameters())


def describe(name: str) -> dict:
    """One row: what the registry knows about preset ``name``."""
    about = preset_about(name)
    spec = get_preset(name)()
    info = spec.info
    tile = getattr(spec, "tile_encoder", spec)
    return {
        "name": name,
        "level": preset_level(name),
        "architecture": about.architecture or info.get("architecture", ""),
        "parameters": count_parameters(name),
        "outputs": dict(about.outputs) or {info.get("output_variant", "default"): spec.feature_dim},
        "spacing": tile.spacing_um,
        "tile": tile.tile_size_px,
        "hub id": info.get("hub_id", ""),
        "gated": info.get("gated"),
        "licence": info.get("licence", ""),
        "precision": spec.default_precision,
        "tile encoder": None if tile is spec else tile.name,
    }


def describe_all(level: str | None = None) -> list[dict]:
    return [describe(name) for name in list_models(level)]


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _cells(row: dict) -> list[str]:
    outputs = ", ".join(f"{v} {d}" for v, d in row["outputs"].items())
    spacing = "any" if row["spacing"] is None else f"{row['spacing']:.4g}"
    arch = row["architecture"] + (f" over `{row['tile encoder']}`" if row.get("tile encoder") else "")
    return [f"`{row['name']}`", row["level"], arch, _count(row["parameters"]), outputs, spacing,
            str(row["tile"]), row["hub id"], "yes" if row["gated"] else "no", row["licence"], row["precision"]]


def markdown_table(rows: list[dict]) -> str:
    header = ["preset", "level", "architecture", "parameters", "outputs (variant dim)", "µm/px", "tile px",
              "hub id", "gated", "licence", "GPU precision"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    """The ``models -v`` listing: aligned columns, the default output's dimension third."""
    header = ["name", "level", "dim", "outputs", "parameters", "µm/px", "tile", "hub id", "gated", "licence",
              "architecture"]
    body = []
    for r in rows:
        c = _cells(r)
        default = str(next(iter(r["outputs"].values())))
        outputs = ",".join(f"{v}={d}" for v, d in r["outputs"].items())
        body.append([r["name"], c[1], default, outputs, c[3], c[5], c[6], c[7] or "-", c[8], c[9],
                     c[2]])
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header) - 1)]
    fmt = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)) + "  " + cells[-1]  # noqa: E731
    return "\n".join(fmt(line).rstrip() for line in [header, *body])


def render_into(text: str, table: str) -> str:
    """``text`` with the block between the markers replaced by ``table``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} block to fill")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the model tables of the README and docs/models.md")
    parser.add_argument("--write", action="store_true", help="rewrite the files (default: check they agree)")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2]))
    args = parser.parse_args(argv)
    table = markdown_table(describe_all())
    stale = []
    for name in DOCUMENTS:
        path = Path(args.root) / name
        text = path.read_text()
        fresh = render_into(text, table)
        if fresh != text:
            stale.append(name)
            if args.write:
                path.write_text(fresh)
    if stale and not args.write:
        print(f"model tables out of date in {', '.join(stale)}: run python -m slide2vec_dask.encoders.catalog --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
