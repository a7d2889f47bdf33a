"""Synthetic whole-slide images for tests and benchmarks.

Real slides are large, licensed and slow to fetch, so tests and benchmark
scripts build their own: Aperio-style SVS pyramids (:func:`write_svs`),
generic or OME pyramidal TIFFs (:func:`write_tiff`), user tissue-mask files
(:func:`write_label_mask`), images whose tissue is known exactly
(:func:`tissue_image`, :func:`tissue_mask`) and arbitrarily large slides
built from real tissue (:func:`real_tissue_source`).

Only numpy, tifffile, imagecodecs and pillow are needed, so importing this
module stays cheap.  Random model checkpoints in each publisher's key layout
(and a pre-filled offline Hugging Face cache) are in
`slide2vec_dask.testing.checkpoints`, which imports torch when it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

__all__ = [
    "GLASS",
    "Source",
    "real_tissue_source",
    "tissue_image",
    "tissue_mask",
    "write_label_mask",
    "write_svs",
    "write_tiff",
]

Source = Callable[[int, int, int, int], np.ndarray]
"""``source(y, x, h, w) -> uint8 (h, w, 3)``: level-0 pixels of a region."""

GLASS = (242, 242, 240)
"""Near-white, near-grey colour of empty glass (HSV saturation ~2/255)."""

_APERIO = "Aperio Image Library v12.0.0 \r\n"
_BIGTIFF_BYTES = 3_500_000_000
_THUMBNAIL_SIZE = 1024


class _Reducer:
    """Area-average an image fed as consecutive row strips by an integer factor.

    Strips may have any height: rows left over from one strip are carried
    into the next, so a level can be reduced without ever holding it whole.
    Incomplete blocks at the bottom and right edges are dropped, which gives
    the ``floor(H / d) x floor(W / d)`` level sizes Aperio uses.
    """

    def __init__(self, height: int, width: int, factor: int, channels: tuple[int, ...]):
        self.factor = factor
        self.out = np.empty((height // factor, width // factor, *channels), np.uint8)
        self._carry = np.zeros((0, *self.out.shape[1:]), np.uint32)
        self._row = 0

    def add(self, strip: np.ndarray) -> np.ndarray:
        """Consume the next rows; return the reduced rows completed by them."""
        d, (h, w) = self.factor, self.out.shape[:2]
        cols = strip[:, 0 : w * d : d].astype(np.uint32)
        for i in range(1, d):  # strided adds: much faster than a small-axis sum
            cols += strip[:, i : w * d : d]
        rows = np.concatenate([self._carry, cols])
        n = min(len(rows) // d, h - self._row)
        blocks = rows[: n * d].reshape(n, d, *rows.shape[1:]).sum(axis=1)
        done = ((blocks + d * d // 2) // (d * d)).astype(np.uint8)
        self.out[self._row : self._row + n] = done
        self._row += n
        self._carry = rows[n * d :]
        return done


def _pyramid_factors(downsamples: Sequence[int]) -> list[int]:
    """Return the factor of each level relative to the previous one.

    Each level is reduced from the previous one, so each downsample must be
    an integer multiple of the one before it.
    """
    ds = [int(d) for d in downsamples]
    if ds != list(downsamples) or ds[0] != 1 or any(b <= a or b % a for a, b in zip(ds, ds[1:])):
        raise ValueError(
            f"downsamples must be integers starting at 1, each a multiple of the previous: {downsamples}"
        )
    return [b // a for a, b in zip(ds, ds[1:])]


def _tiles(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Yield the tiles of one row strip, edge-padded to full tiles.

    Edge padding (rather than tifffile's zero padding) keeps dark JPEG
    ringing out of the valid pixels of edge tiles.
    """
    pad = ((0, tile - len(strip)), (0, -strip.shape[1] % tile), (0, 0))
    if any(after for _, after in pad):
        strip = np.pad(strip, pad, mode="edge")
    for x in range(0, strip.shape[1], tile):
        yield strip[:, x : x + tile]


def write_svs(
    path: str | Path,
    source: np.ndarray | Source,
    *,
    shape: tuple[int, int] | None = None,
    mpp: float = 0.5,
    tile_size: int = 240,
    downsamples: Sequence[int] = (1, 4, 16),
    quality: int = 90,
    app_mag: int = 20,
) -> Path:
    """Write an Aperio-style pyramidal SVS that OpenSlide and tifffile both read.

    OpenSlide reports vendor ``"aperio"``, ``openslide.mpp-x == mpp`` and one
    level per downsample; tifffile reports ``pages[0].is_svs`` and one entry
    per downsample in ``series[0].levels``.  The layout copies Aperio's:

    - page 0: level 0, tiled JPEG, ImageDescription ``"Aperio Image Library
      ...|AppMag = {app_mag}|MPP = {mpp}"``;
    - page 1: a stripped JPEG thumbnail (at most 1024 px).  tifffile always
      takes page 1 as the thumbnail, so without it the first reduced level
      would be lost;
    - pages 2...: the reduced levels, tiled JPEG, NewSubfileType 0 like
      Aperio (tifffile stops collecting levels at a "reduced" page).

    JPEG tiles are stored like Aperio's ``JPEG/RGB``: RGB components without
    chroma subsampling and with photometric RGB, so OpenSlide and
    tifffile/imagecodecs decode level 0 to identical pixels.

    Level ``i`` is ``floor(H / d_i) x floor(W / d_i)`` pixels, the
    area average of level 0, as Aperio does; OpenSlide therefore reports
    downsamples as the mean of ``H / h_i`` and ``W / w_i``, slightly above
    ``d_i`` when ``d_i`` does not divide the size.

    Parameters
    ----------
    path
        Output file.
    source
        Level-0 pixels: a uint8 ``(H, W, 3)`` array, or a callable
        ``source(y, x, h, w)`` returning them region by region so that slides
        larger than memory can be written.  The callable is asked for
        full-width strips of ``tile_size`` rows, top to bottom, and only
        the reduced levels (``1/d_1**2`` of level 0 and less) are held
        in memory.
    shape
        ``(H, W)`` of level 0; required when `source` is a callable.
    mpp
        Microns per level-0 pixel.
    tile_size
        Tile edge in pixels, a multiple of 16.
    downsamples
        Integer level downsamples, starting at 1, each a multiple of the
        previous one.
    quality
        JPEG quality.
    app_mag
        Objective power written as ``AppMag``.

    Returns
    -------
    Path
        `path`.
    """
    if callable(source):
        if shape is None:
            raise ValueError("shape is required when source is a callable")
        read = source
    else:
        image = np.asarray(source)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"source must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        shape = shape or image.shape[:2]
        if tuple(shape) != image.shape[:2]:
            raise ValueError(f"shape {shape} does not match source {image.shape}")
        read = lambda y, x, h, w: image[y : y + h, x : x + w]  # noqa: E731
    height, width = shape

    reducers, size = [], (height, width)
    for factor in _pyramid_factors(downsamples):
        reducers.append(_Reducer(*size, factor, (3,)))
        size = reducers[-1].out.shape[:2]
    thumbnail = _Reducer(*size, max(1, math.ceil(max(size) / _THUMBNAIL_SIZE)), (3,))

    def level0_tiles() -> Iterator[np.ndarray]:
        for y in range(0, height, tile_size):
            rows = min(tile_size, height - y)
            strip = np.asarray(read(y, 0, rows, width))
            if strip.shape != (rows, width, 3) or strip.dtype != np.uint8:
                raise ValueError(
                    f"source({y}, 0, {rows}, {width}) returned {strip.dtype} {strip.shape}, "
                    f"expected uint8 {(rows, width, 3)}"
                )
            # Reduce before yielding: tifffile stops pulling after the last tile.
            reduced = strip
            for reducer in [*reducers, thumbnail]:
                reduced = reducer.add(reduced)  # each level feeds the next
            yield from _tiles(strip, tile_size)

    head = f"{_APERIO}{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size})"
    jpeg = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality, "outcolorspace": "RGB"},
        subsampling=(1, 1),
        metadata=None,
    )
    tiled = dict(jpeg, tile=(tile_size, tile_size))
    bigtiff = height * width * 3 > _BIGTIFF_BYTES
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(
            level0_tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            description=f"{head} JPEG/RGB Q={quality}|AppMag = {app_mag}|MPP = {mpp}",
            **tiled,
        )
        th, tw = thumbnail.out.shape[:2]
        tif.write(thumbnail.out, description=f"{_APERIO}{width}x{height} -> {tw}x{th} - ", **jpeg)
        for reducer in reducers:
            h, w = reducer.out.shape[:2]
            tif.write(reducer.out, description=f"{head} -> {w}x{h} JPEG/RGB Q={quality}", **tiled)
    return Path(path)


def write_tiff(
    path: str | Path,
    image: np.ndarray,
    *,
    spacing_um: float | None = None,
    tile_size: int = 256,
    downsamples: Sequence[int] = (1, 2, 4),
    compression: str | None = "jpeg",
    quality: int = 90,
    ome: bool = False,
) -> Path:
    """Write a generic pyramidal tiled TIFF, levels in SubIFDs, as tifffile does.

    With `spacing_um`, XResolution/YResolution hold pixels per centimetre
    (ResolutionUnit CENTIMETER); without, ResolutionUnit is NONE, the
    "missing spacing" case readers must report.  With ``ome=True`` the file
    is OME-TIFF and the spacing is also written as PhysicalSizeX/Y in µm.

    tifffile lists every level in ``series[0].levels``.  OpenSlide opens it
    as vendor ``"generic-tiff"`` but ignores SubIFDs, so it sees level 0
    only.  JPEG tiles use tifffile's default YCbCr 4:2:0 encoding.

    Parameters
    ----------
    path
        Output file.
    image
        ``(H, W, 3)`` RGB or ``(H, W)`` grayscale level 0.
    spacing_um
        Microns per level-0 pixel, or None to write no physical size.
    tile_size
        Tile edge in pixels, a multiple of 16.
    downsamples
        Integer level downsamples, starting at 1, each a multiple of the
        previous one; reduced levels are area averages.
    compression
        Any tifffile compression name, or None.
    quality
        JPEG quality; ignored by other compressions.
    ome
        Write OME-XML metadata.

    Returns
    -------
    Path
        `path`.
    """
    image = np.asarray(image)
    levels = [image]
    for factor in _pyramid_factors(downsamples):
        reducer = _Reducer(*levels[-1].shape[:2], factor, levels[-1].shape[2:])
        reducer.add(levels[-1])
        levels.append(reducer.out)

    metadata = None
    if ome:
        metadata = {"axes": "YXS" if image.ndim == 3 else "YX"}
        if spacing_um is not None:
            metadata |= {
                "PhysicalSizeX": spacing_um,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": spacing_um,
                "PhysicalSizeYUnit": "µm",
            }
    options = dict(
        photometric="rgb" if image.ndim == 3 else "minisblack",
        tile=(tile_size, tile_size),
        compression=compression,
        compressionargs={"level": quality} if compression == "jpeg" else None,
    )
    with tifffile.TiffWriter(path, ome=ome) as tif:
        for i, (level, d) in enumerate(zip(levels, downsamples)):
            if spacing_um is None:
                resolution = dict(resolution=None, resolutionunit="NONE")
            else:
                ppcm = 1e4 / (spacing_um * d)
                resolution = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            if i == 0:
                tif.write(level, subifds=len(levels) - 1, metadata=metadata, **resolution, **options)
            else:
                tif.write(level, subfiletype=1, metadata=None, **resolution, **options)
    return Path(path)


def write_label_mask(path: str | Path, mask: np.ndarray, *, tile_size: int = 256) -> Path:
    """Write a tissue-mask TIFF like one a user would supply.

    The mask may have any resolution; nonzero means tissue.  It is stored as
    uint8 (tissue 1, background 0), tiled and zlib (deflate) compressed.

    Returns
    -------
    Path
        `path`.
    """
    label = (np.asarray(mask) != 0).astype(np.uint8)
    tifffile.imwrite(
        path,
        label,
        photometric="minisblack",
        tile=(tile_size, tile_size),
        compression="zlib",
        metadata=None,
    )
    return Path(path)


def tissue_mask(height: int, width: int, rects: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """Return the known tissue of :func:`tissue_image`: True inside `rects`.

    `rects` are ``(y0, x0, y1, x1)`` level-0 boxes, half-open.
    """
    mask = np.zeros((height, width), bool)
    for y0, x0, y1, x1 in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def tissue_image(
    height: int,
    width: int,
    rects: Sequence[tuple[int, int, int, int]],
    *,
    background: tuple[int, int, int] = GLASS,
    seed: int = 0,
) -> np.ndarray:
    """Return a uint8 RGB slide whose tissue is exactly `rects`.

    Glass is `background` with faint grey-level noise (HSV saturation stays
    below 5/255 for the default colour); tissue is H&E-like texture of
    pink stroma and purple nuclei with per-channel noise, HSV saturation
    above 40/255 everywhere.  Any saturation threshold in between recovers
    :func:`tissue_mask` exactly, which makes tissue detection testable.
    """
    rng = np.random.default_rng(seed)
    glass = np.asarray(background, np.int16) + rng.integers(-2, 3, (height, width, 1), dtype=np.int16)
    # Nuclei: a coarse random field of 8x8 px cells mixes purple into pink
    # stroma; squaring it keeps stroma dominant.
    blend = rng.random((height // 8 + 1, width // 8 + 1, 1), np.float32)
    blend = blend.repeat(8, 0).repeat(8, 1)[:height, :width] ** 2
    pink, purple = np.array([220, 130, 180], np.float32), np.array([130, 70, 150], np.float32)
    tissue = pink + blend * (purple - pink) + rng.integers(-15, 16, (height, width, 3))
    mask = tissue_mask(height, width, rects)[..., None]
    return np.where(mask, tissue, glass).clip(0, 255).astype(np.uint8)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..255 (``max - min`` relative to ``max``), as in PIL."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi, lo = np.maximum(np.maximum(r, g), b).astype(np.int32), np.minimum(np.minimum(r, g), b)
    return (hi - lo) * 255 // np.maximum(hi, 1)


def real_tissue_source(
    svs_path: str | Path,
    *,
    shape: tuple[int, int],
    tissue_fraction: float = 0.6,
    seed: int = 0,
) -> Source:
    """Return a level-0 :data:`Source` for a large slide made of real tissue.

    Benchmarks need slides of realistic size and content, but real large
    slides are not at hand.  This tiles 256 px tissue patches cut from a
    small real slide (e.g. ``CMU-1-Small-Region.svs``; its level 0 is read
    whole) over a canvas of `shape`, split into 512 px cells.  Blob-shaped
    regions (superlevel set of a sum of random Gaussian bumps) cover
    `tissue_fraction` of the cells with real tissue (patches, flipped or not,
    picked at random per 256 px block); the other cells are glass with faint
    noise.  Everything is determined by `seed`, so any region reads the same
    pixels whatever the order or size of the calls.

    The returned callable ``source(y, x, h, w)`` must stay inside the canvas.
    It has attributes ``tissue_cells`` (bool grid of the 512 px cells, edge
    cells included) and ``tissue_fraction`` (its mean).
    """
    patch, cell = 256, 512
    height, width = shape
    rng = np.random.default_rng(seed)

    with tifffile.TiffFile(svs_path) as tif:
        real = tif.pages[0].asarray()
    stained = _saturation(real) > 40
    picked = [
        real[y : y + patch, x : x + patch]
        for y in range(0, real.shape[0] - patch + 1, patch // 2)
        for x in range(0, real.shape[1] - patch + 1, patch // 2)
        if stained[y : y + patch, x : x + patch].mean() >= 0.75
    ]
    if not picked:
        raise ValueError(f"no tissue patches found in {svs_path}")
    tissue = np.stack(picked)
    glass = np.asarray(GLASS, np.int16) + rng.integers(-2, 3, (1, patch, patch, 1), dtype=np.int16)
    bank = np.concatenate([glass.astype(np.uint8), tissue, tissue[:, ::-1], tissue[:, :, ::-1]])

    ny, nx = -(-height // cell), -(-width // cell)
    cy, cx = np.mgrid[0:ny, 0:nx] + 0.5
    field = np.zeros((ny, nx))
    for _ in range(4):
        (my, mx), sigma = rng.random(2) * (ny, nx), (0.15 + 0.2 * rng.random()) * max(ny, nx)
        field += np.exp(-((cy - my) ** 2 + (cx - mx) ** 2) / (2 * sigma**2))
    cells = np.zeros((ny, nx), bool)
    cells.flat[np.argsort(-field, axis=None)[: round(tissue_fraction * cells.size)]] = True

    k = cell // patch
    ids = rng.integers(1, len(bank), (ny * k, nx * k))
    ids[~cells.repeat(k, 0).repeat(k, 1)] = 0

    def source(y: int, x: int, h: int, w: int) -> np.ndarray:
        if y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"region {(y, x, h, w)} outside the {shape} canvas")
        out = np.empty((h, w, 3), np.uint8)
        for py in range(y // patch, -(-(y + h) // patch)):
            y0, y1 = max(y, py * patch), min(y + h, (py + 1) * patch)
            for px in range(x // patch, -(-(x + w) // patch)):
                x0, x1 = max(x, px * patch), min(x + w, (px + 1) * patch)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = bank[
                    ids[py, px], y0 - py * patch : y1 - py * patch, x0 - px * patch : x1 - px * patch
                ]
        return out

    source.tissue_cells = cells
    source.tissue_fraction = float(cells.mean())
    return source
