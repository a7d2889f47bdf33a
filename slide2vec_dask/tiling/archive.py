"""Tile archives in hs2p's layout: their tiles read, and tiles made into them (JPEG).

``<id>.tiles.tar`` holds one JPEG per tile (``%06d.jpg``, the tile's index
in ``<id>.tiles.manifest.csv``: ``tile_index, x, y`` in level-0 px), at the
requested tile size.  Tiles are encoded with Pillow at quality 90, hs2p's
default.  Writing the files is `store.tile_archive`'s.
"""

from __future__ import annotations

import io

import numpy as np

JPEG_QUALITY = 90


def read_archive_tiles(path: str, offsets: np.ndarray, sizes: np.ndarray, tile: int) -> np.ndarray:
    """The JPEG members at ``offsets`` / ``sizes`` of the tar, decoded: ``(n, tile, tile, 3)`` uint8."""
    from PIL import Image

    out = np.empty((len(offsets), tile, tile, 3), dtype=np.uint8)
    order = np.argsort(offsets)   # one forward pass through the file
    with open(path, "rb") as f:
        for i in order:
            f.seek(int(offsets[i]))
            data = f.read(int(sizes[i]))
            try:
                with Image.open(io.BytesIO(data)) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as exc:
                raise OSError(f"{path}: the tile at byte {int(offsets[i])} is not a readable JPEG ({exc})") from None
            if pixels.shape[:2] != (tile, tile):
                raise ValueError(f"{path}: a tile is {pixels.shape[1]}x{pixels.shape[0]} px, the plan expects "
                                 f"{tile}x{tile} (an archive made for another tile size)")
            out[i] = pixels
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
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def jpeg_block(pixels: np.ndarray, keep, read_tile: int, size: int) -> list[bytes]:
    """A block's tiles as JPEGs (the in-memory API's archive task; see `graph.block_tiles_of`)."""
    from slide2vec_dask.dataflow.graph import block_tiles_of

    if keep is not None and keep.ndim == 3:
        keep = keep[:, :, 0]
    return encode_jpeg_tiles(block_tiles_of(pixels, keep, read_tile), size)


def in_plan_order(plan, k: int, blobs_of):
    """Each tile's JPEG in the plan's row-major order, a band of blocks at a time; ``blobs_of(block)``
    gives a block's JPEGs in the order its tiles were cut."""
    from slide2vec_dask.tiling.tile_list import bands, block_members

    for band in bands(*block_members(plan, k)):
        found = {}
        for block, index in band:
            found.update(zip(index.tolist(), blobs_of(block)))
        yield from (found[i] for i in sorted(found))
