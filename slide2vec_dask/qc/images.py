"""A slide's QC picture: its thumbnail with the tiling's layers drawn over it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slide2vec_dask.atomic import atomic, digest

logger = logging.getLogger("slide2vec_dask")

QC_FOLDER = "qc"
#: Longest side of a QC picture, pixels: at most the first, at least the second where the slide allows.
MAX_SIDE, MIN_SIDE = 1024, 512


@dataclass
class Layer:
    """What is drawn over the thumbnail: a tint over a grid of tissue fractions, or tile outlines.

    ``fraction`` (rows, cols) in [0, 1] over cells of ``cell`` level-0 px; ``boxes`` (n, 2) level-0
    ``x, y`` of squares of ``size`` level-0 px.  Per-class layers (annotations) are more of the same.
    """

    name: str
    color: tuple[int, int, int]
    fraction: np.ndarray | None = None
    cell: float = 0.0
    boxes: np.ndarray | None = None
    size: float = 0.0
    inset: int = 0     # px the outlines are drawn inside the tile (a tile in two bags shows both)


def image_name(sample_id: str) -> str:
    """``qc/<name>.jpg``: the id made safe for a file name and a URL, unique by a digest when changed."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:120]
    return f"{safe}.jpg" if safe == sample_id else f"{safe}-{digest(sample_id, 4)}.jpg"


# annotation classes without a colour of their own (masks.colors): distinct from each other, from the
# tiles' red and from H&E's pinks and purples
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (23, 190, 207), (188, 189, 34), (0, 0, 0),
           (255, 215, 0), (127, 127, 127))


def bag_colors(bags, colors: dict | None) -> dict[str, tuple[int, int, int]]:
    """Each bag's colour: its class's ``masks.colors`` entry, else the palette's in bag order."""
    colors = colors or {}
    return {bag: tuple(colors[bag]) if colors.get(bag) else PALETTE[i % len(PALETTE)] for i, bag in enumerate(bags)}


def tiling_layers(grid) -> list[Layer]:
    """The tiling's layers: the tissue it saw (per grid cell) and the tiles it kept; with annotation
    bags, one layer of tile outlines per bag in its class's colour instead."""
    member = getattr(grid, "member", None)
    if member is not None:
        colors = bag_colors(grid.meta["bags"], grid.meta.get("colors"))
        xy = np.stack([np.asarray(grid.x), np.asarray(grid.y)], axis=1) if grid.num_tiles else np.zeros((0, 2))
        return [Layer(bag, colors[bag], boxes=xy[member[:, b]], size=float(grid.tile_size_lv0), inset=b)
                for b, bag in enumerate(grid.meta["bags"])]
    layers = []
    fraction = getattr(grid, "tissue_fraction", None)
    if fraction is not None and getattr(grid, "layout", "grid") == "grid" and np.ndim(fraction) == 2:
        layers.append(Layer("tissue", (46, 160, 67), fraction=np.asarray(fraction, float),
                            cell=float(grid.tile_size_lv0)))
    boxes = np.stack([np.asarray(grid.x), np.asarray(grid.y)], axis=1) if grid.num_tiles else np.zeros((0, 2))
    layers.append(Layer("tiles", (220, 40, 40), boxes=boxes, size=float(grid.tile_size_lv0)))
    return layers


def render(thumbnail: np.ndarray, downsample: float, layers: list[Layer]) -> np.ndarray:
    """``thumbnail`` (level 0 / ``downsample``) with ``layers`` drawn over it, in order."""
    from PIL import Image, ImageDraw

    image = thumbnail.astype(np.float32)
    h, w = image.shape[:2]
    for layer in layers:
        if layer.fraction is not None and layer.fraction.size:
            rows = np.minimum((np.arange(h) * downsample / layer.cell).astype(int), layer.fraction.shape[0] - 1)
            cols = np.minimum((np.arange(w) * downsample / layer.cell).astype(int), layer.fraction.shape[1] - 1)
            alpha = 0.35 * np.clip(layer.fraction[np.ix_(rows, cols)], 0, 1)[..., None]
            image = image * (1 - alpha) + np.asarray(layer.color, np.float32) * alpha
    out = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for layer in layers:
        if layer.boxes is not None:
            side = max(layer.size / downsample, 1.0)
            d = min(layer.inset, max(0, int(side // 2) - 1))
            for x, y in layer.boxes / downsample:
                draw.rectangle([x + d, y + d, x + side - 1 - d, y + side - 1 - d], outline=layer.color)
    return np.asarray(out)


def write_slide_image(qc_dir: str | Path, sample_id: str, slide, grid, segmentation_downsample: float = 64) -> str:
    """``qc/<slide>.jpg`` for a planned slide; its file name, or "" when it could not be made.

    The thumbnail is taken at the segmentation's downsample when that gives a picture
    between `MIN_SIDE` and `MAX_SIDE` (the slide keeps the mask's thumbnail: no second
    decode), else at the nearest downsample that does.  A picture
    that cannot be made costs a warning, never the slide.
    """
    from PIL import Image

    try:
        h0, w0 = slide.level_shapes[0]
        longest = max(h0, w0)
        downsample = max(longest / MAX_SIDE, min(float(segmentation_downsample), longest / MIN_SIDE), 1.0)
        thumbnail = slide.thumbnail(downsample)
        picture = render(thumbnail, h0 / thumbnail.shape[0], tiling_layers(grid))
        name = image_name(sample_id)
        target = Path(qc_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic(target, lambda tmp: Image.fromarray(picture).save(tmp, format="JPEG", quality=85))
        return name
    except (OSError, ValueError, MemoryError) as exc:
        logger.warning("%s: no QC picture (%s: %s)", sample_id, type(exc).__name__, exc)
        return ""
