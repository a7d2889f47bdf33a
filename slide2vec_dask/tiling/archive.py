"""Tile archives in hs2p's layout: their tiles read, and tiles made into them (JPEG).

``<id>.tiles.tar`` holds one JPEG per tile (``%06d.jpg``, the tile's index
in ``<id>.tiles.manifest.csv``: ``tile_index, x, y`` in level-0 px), at the
requested tile size.  Tiles are encoded with Pillow at quality 90, hs2p's
default.  Writing the files is `store.tile_archive`'s.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from slide2vec_dask.tiling.tile_list import bands, block_members

JPEG_QUALITY = 90
ARCHIVE_SUFFIX = ".tiles.tar"
ARCHIVE_FOLDER = "tiles"   # where a run writes its archives: <output_dir>/tiles/ (hs2p's place for them)


def archive_path(folder, sample_id: str) -> Path:
    """The slide's tar in ``folder``: whether it exists says whether the archive is whole."""
    return Path(folder) / f"{sample_id}{ARCHIVE_SUFFIX}"


def max_member_bytes(tile: int) -> int:
    """The most bytes a ``tile`` px JPEG tile may take: twice its raw pixels, plus 64 KiB of headers
    (a JPEG at quality 100 of pure noise stays under its raw size); a larger member is refused unread."""
    return 2 * 3 * tile * tile + 65536


def read_archive_tiles(path: str, offsets: np.ndarray, sizes: np.ndarray, xy: np.ndarray, tile: int) -> np.ndarray:
    """The JPEG members at ``offsets`` / ``sizes`` of the tar, decoded: ``(n, tile, tile, 3)`` uint8.

    ``xy`` (each tile's level-0 position) names a tile that is refused: one larger than a tile's
    JPEG can be is not read, one of other dimensions not decoded.
    """
    out = np.empty((len(offsets), tile, tile, 3), dtype=np.uint8)
    order = np.argsort(offsets)   # one forward pass through the file
    limit = max_member_bytes(tile)
    with open(path, "rb") as f:
        for i in order:
            where = f"{path}: the tile at ({int(xy[i][0])}, {int(xy[i][1])}) (byte {int(offsets[i])})"
            if sizes[i] > limit:
                raise ValueError(f"{where} takes {int(sizes[i])} bytes; a {tile} px JPEG tile takes at most {limit}")
            f.seek(int(offsets[i]))
            out[i] = _decode(f.read(int(sizes[i])), tile, where)
    return out


def encode_jpeg_tiles(tiles: np.ndarray, size: int, quality: int = JPEG_QUALITY) -> list[bytes]:
    """Each tile resized to ``size`` (bilinear, as hs2p does) and JPEG-encoded."""
    from PIL import Image

    out = []
    for tile in tiles:
        im = Image.fromarray(tile)
        if im.size != (size, size):
            im = im.resize((size, size), resample=Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_jpeg_tiles(blobs: list[bytes]) -> np.ndarray:
    return np.stack([_decode(b) for b in blobs])


def _decode(data: bytes, tile: int | None = None, where: str = "a tile") -> np.ndarray:
    """One JPEG's pixels; with ``tile``, its dimensions are checked from its header, before decoding."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if tile is not None and im.size != (tile, tile):
                raise ValueError(f"{where} is {im.size[0]}x{im.size[1]} px, the plan expects {tile}x{tile} (an "
                                 "archive made for another tile size, or a damaged one); not decoded")
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise OSError(f"{where} is not a readable JPEG ({exc})") from None


def in_plan_order(plan, k: int, blobs_of):
    """Each tile's JPEG in the plan's row-major order, a band of blocks at a time; ``blobs_of(block)``
    gives a block's JPEGs in the order its tiles were cut."""
    for band in bands(*block_members(plan, k)):
        found = {}
        for block, index in band:
            found.update(zip(index.tolist(), blobs_of(block)))
        yield from (found[i] for i in sorted(found))
