"""Explore a run's embeddings with xarray: lazy per-slide means, and one slide's first
principal component drawn on the slide.

    python examples/xarray_analysis.py [OUTPUT_DIR] [--sample-id ID] [--png PATH] [--width PX]

OUTPUT_DIR is the ``output_dir`` of a ``Pipeline`` run (it holds ``embeddings.zarr``);
default: ``$SLIDE2VEC_OUTPUT_DIR``, else ``outputs/run1``. Make one with
``slide2vec-dask run config.yaml`` or ``Pipeline(...).run(...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from slide2vec_dask import open_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", default=os.environ.get("SLIDE2VEC_OUTPUT_DIR", "outputs/run1"),
                        help="a Pipeline run's output_dir (default: $SLIDE2VEC_OUTPUT_DIR or outputs/run1)")
    parser.add_argument("--sample-id", help="the slide to analyse (default: the first with 2 tiles or more)")
    parser.add_argument("--png", help="where the PC1 map goes (default: OUTPUT_DIR/pc1_<sample_id>.png)")
    parser.add_argument("--width", type=int, default=800, help="PNG width in pixels; the height keeps the "
                        "aspect ratio of the slide's tissue (default 800)")
    parser.add_argument("--renderer", choices=("auto", "matplotlib", "pil"), default="auto",
                        help="matplotlib when installed (auto), else Pillow")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)

    # The run as a DataTree: tiles/<sample_id> holds embedding (tile, feature) and coords x, y.
    tree = open_embeddings(output_dir)
    sample_ids = sorted(tree["tiles"].children)
    if not sample_ids:
        sys.exit(f"{output_dir}: the store holds no slides yet")
    print(f"{len(sample_ids)} slides: {', '.join(sample_ids)}")

    # The same store opened with dask arrays (one dask chunk per zarr chunk): nothing is read yet.
    lazy = open_embeddings(output_dir, chunks={})
    means = xr.concat([lazy[f"tiles/{s}"].to_dataset()["embedding"].mean("tile") for s in sample_ids],
                      dim="slide").assign_coords(slide=sample_ids)
    print(f"per-slide means {dict(means.sizes)}: {type(means.data).__module__}.{type(means.data).__name__}, "
          f"{len(means.data.__dask_graph__())} tasks, not computed yet")
    means = means.compute()
    print(f"after .compute(): {type(means.data).__module__}.{type(means.data).__name__}")

    sample_id = args.sample_id or next((s for s in sample_ids if tree[f"tiles/{s}"].to_dataset().sizes.get("tile", 0) >= 2),
                                       None)
    if sample_id not in sample_ids:
        sys.exit(f"no slide {sample_id!r} with tiles in the store (slides: {sample_ids})")
    mean = means.sel(slide=sample_id).values
    print(f"{sample_id} mean embedding ({mean.size} features): {json.dumps([float(v) for v in mean])}")

    ds = lazy[f"tiles/{sample_id}"].to_dataset()
    x, y = ds["x"].values, ds["y"].values
    tile = int(ds.attrs["tile_size_lv0"])
    pc1, explained = first_component(ds["embedding"].values)
    print(f"{sample_id}: {len(pc1)} tiles, PC1 explains {explained:.8f} of the variance")

    png = Path(args.png) if args.png else output_dir / f"pc1_{sample_id}.png"
    size = draw(png, x, y, tile, pc1, args.width, args.renderer, title=f"{sample_id}: PC1 of tile embeddings")
    print(f"wrote {png} ({size[0]}x{size[1]} px)")


def first_component(embeddings: np.ndarray) -> tuple[np.ndarray, float]:
    """Scores on the first principal component (SVD of the centred matrix), and its variance share.

    The sign is fixed so that the largest loading is positive (SVD leaves it arbitrary).
    """
    centred = embeddings.astype(np.float64) - embeddings.mean(axis=0, dtype=np.float64)
    if len(centred) < 2:
        raise ValueError("a principal component needs at least 2 tiles")
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axis = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
    total = float((s ** 2).sum())
    return centred @ axis, (float(s[0] ** 2) / total if total > 0 else 0.0)


def canvas_size(x: np.ndarray, y: np.ndarray, tile: int, width: int) -> tuple[int, int]:
    """PNG size: ``width`` wide, as tall as the tissue's bounding box is, in proportion."""
    span_x = float(x.max() + tile - x.min())
    span_y = float(y.max() + tile - y.min())
    return width, max(1, round(width * span_y / span_x))


def draw(png: Path, x, y, tile: int, values, width: int, renderer: str, title: str) -> tuple[int, int]:
    size = canvas_size(x, y, tile, width)
    png.parent.mkdir(parents=True, exist_ok=True)
    if renderer in ("auto", "matplotlib"):
        try:
            import matplotlib
        except ImportError:
            if renderer == "matplotlib":
                sys.exit("--renderer matplotlib: matplotlib is not installed (pip install matplotlib, or --renderer pil)")
        else:
            matplotlib.use("Agg")
            return _draw_matplotlib(png, x, y, tile, values, size, title)
    return _draw_pil(png, x, y, tile, values, size)


def _draw_matplotlib(png: Path, x, y, tile, values, size, title) -> tuple[int, int]:
    import matplotlib.pyplot as plt

    dpi = 100
    # +0.5 px: Agg truncates the figure's size in pixels, and width / dpi * dpi may land just below it.
    fig = plt.figure(figsize=((size[0] + 0.5) / dpi, (size[1] + 0.5) / dpi), dpi=dpi)
    ax = fig.add_axes((0.02, 0.02, 0.84, 0.9))
    limit = float(np.abs(values).max()) or 1.0
    points = ax.scatter(x + tile / 2, y + tile / 2, c=values, cmap="coolwarm", vmin=-limit, vmax=limit,
                        marker="s", s=max(1.0, (0.84 * size[0] * 72 / dpi * tile / (x.max() + tile - x.min())) ** 2))
    ax.set_xlim(x.min(), x.max() + tile)
    ax.set_ylim(y.max() + tile, y.min())  # image convention: y grows downwards
    ax.set_aspect("equal", adjustable="box")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.colorbar(points, cax=fig.add_axes((0.88, 0.1, 0.03, 0.75)), label="PC1")
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    return size


def _draw_pil(png: Path, x, y, tile, values, size) -> tuple[int, int]:
    """Each tile a square, blue (negative) through white to red (positive)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (235, 235, 235))
    pen = ImageDraw.Draw(image)
    scale = size[0] / float(x.max() + tile - x.min())
    limit = float(np.abs(values).max()) or 1.0
    for tx, ty, value in zip(x, y, values):
        t = float(value) / limit  # -1 .. 1
        fade = int(round(255 * (1 - abs(t))))
        colour = (255, fade, fade) if t > 0 else (fade, fade, 255)
        left, top = (tx - x.min()) * scale, (ty - y.min()) * scale
        pen.rectangle([left, top, left + tile * scale - 1, top + tile * scale - 1], fill=colour)
    image.save(png)
    return size


if __name__ == "__main__":
    main()
