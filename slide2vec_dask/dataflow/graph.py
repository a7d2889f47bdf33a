"""A slide's tile embeddings as a lazy dask array over its tile grid.

``pixels = slide.to_dask(level, chunks=k * read_tile)`` reads blocks of k x k
tiles; ``map_blocks(embed_block, pixels, keep)`` embeds the kept tiles of a
block, giving a ``(rows, cols, feature)`` float32 array (NaN where a tile is
not kept).  Only blocks that hold kept tiles are ever computed, so glass is
never decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slide2vec_dask.dataflow.sources import read_block, source_of
from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.slide import Slide
from slide2vec_dask.tiling.grid import TileGrid

DEFAULT_BLOCK_PX = 2048


@dataclass(frozen=True)
class EmbedSettings:
    """What an embedding task needs besides pixels (small, picklable)."""

    batch_size: int = 32
    num_gpus: int = 0
    precision: str | None = None
    channels_last: bool = True


def block_tiles(grid: TileGrid, use_supertiles: bool, block_px: int = DEFAULT_BLOCK_PX) -> int:
    """Tiles per block side: about ``block_px`` read-level pixels, or 1 without supertiles."""
    return max(1, round(block_px / grid.read_tile_size_px)) if use_supertiles else 1


def block_layout(grid, use_supertiles: bool, block_px: int = DEFAULT_BLOCK_PX):
    """``(k, mask, blocks, tiles)``: tiles per block side, the grid's tiles to embed, the blocks holding any.

    In hierarchical mode a block is exactly one region (read whole, embedded whole),
    so the mask covers whole regions; otherwise blocks are ~``block_px`` supertiles.
    A plan of free positions (`TileList`) has no mask: ``tiles`` lists each block's
    tile indices instead (``None`` for grids).
    """
    if grid.layout == "free":
        k = block_tiles(grid, use_supertiles, block_px)
        blocks, tiles = grid.blocks(k)
        return k, None, blocks, tiles
    if grid.region_tile_multiple is not None:
        k, mask = grid.region_tile_multiple, grid.embed_mask
    else:
        k, mask = block_tiles(grid, use_supertiles, block_px), grid.keep
    rows, cols = mask.shape
    counts = (np.add.reduceat(np.add.reduceat(mask, np.arange(0, rows, k), axis=0), np.arange(0, cols, k), axis=1)
              if rows and cols else np.zeros((0, 0), int))
    return k, mask, [(int(i), int(j)) for i, j in zip(*np.nonzero(counts))], None


def cut_tiles(pixels: np.ndarray, keep: np.ndarray, tile: int) -> np.ndarray:
    """The kept tiles of a block, ``(n, tile, tile, 3)``, in row-major order."""
    rows, cols = keep.shape
    grid = pixels[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile, 3).swapaxes(1, 2)
    return np.ascontiguousarray(grid[keep])


def block_tiles_of(pixels: np.ndarray, keep: np.ndarray | None, tile: int) -> np.ndarray:
    """The tiles a block embeds, ``(n, tile, tile, 3)``.

    ``keep`` is a grid block's mask (2-D bool), a free block's tile corners in its pixels
    ((n, 2) rows and columns), or None when ``pixels`` are the tiles already (an archive's).
    """
    if keep is None:
        return pixels
    if keep.dtype == bool:
        return cut_tiles(pixels, keep, tile)
    out = np.empty((len(keep), tile, tile, 3), dtype=np.uint8)
    for i, (r, c) in enumerate(keep):
        out[i] = pixels[r : r + tile, c : c + tile]
    return out


def encode_tiles(tiles: np.ndarray, keep: np.ndarray | None, *, spec: EncoderSpec,
                 settings: EmbedSettings) -> np.ndarray:
    """The tiles' embeddings, laid out as the block's result.

    A grid block gives ``(rows, cols, feature)`` (NaN where no tile is kept); a free or
    archive block gives ``(n, feature)``, one row per tile in the block's order.
    """
    from slide2vec_dask.dataflow.worker import get_encoder, run_on_device

    def encode(device: str) -> np.ndarray:
        encoder = get_encoder(spec, device, settings.precision, settings.channels_last)
        return encoder.embed(tiles, settings.batch_size)

    embedded = run_on_device(settings.num_gpus, encode) if len(tiles) else np.zeros((0, spec.feature_dim), np.float32)
    if keep is None or keep.dtype != bool:
        return np.asarray(embedded, dtype=np.float32)
    out = np.full(keep.shape + (spec.feature_dim,), np.nan, dtype=np.float32)
    out[keep] = embedded
    return out


def encode_block(pixels: np.ndarray, keep: np.ndarray | None, *, spec: EncoderSpec, read_tile: int,
                 settings: EmbedSettings) -> np.ndarray:
    """A block's embeddings from its pixels (see `block_tiles_of` and `encode_tiles`)."""
    return encode_tiles(block_tiles_of(pixels, keep, read_tile), keep, spec=spec, settings=settings)


def embed_block(pixels: np.ndarray, keep: np.ndarray, *, spec: EncoderSpec, read_tile: int,
                settings: EmbedSettings) -> np.ndarray:
    """`map_blocks` form of `encode_block`."""
    return encode_block(pixels, _unpadded(keep), spec=spec, read_tile=read_tile, settings=settings)


def jpeg_block(pixels: np.ndarray, keep, read_tile: int, size: int) -> list[bytes]:
    """A block's tiles as JPEGs (``on_the_fly=False`` in the in-memory API: see `archive_graph`)."""
    from slide2vec_dask.tiling.archive import encode_jpeg_tiles

    return encode_jpeg_tiles(block_tiles_of(pixels, _unpadded(keep), read_tile), size)


def _unpadded(keep):
    """A grid's mask as `SlideGraph.keep_block` gives it carries a trailing length-1 axis (map_blocks')."""
    return keep[:, :, 0] if keep is not None and keep.ndim == 3 else keep


@dataclass
class SlideGraph:
    """The embedding array of one slide and the blocks worth computing."""

    array: object                        # dask array (rows, cols, feature)
    pixels: object                       # dask array (height, width, 3) of the read level
    keep: np.ndarray                     # (rows, cols) bool: the tiles to embed (whole regions if any)
    blocks: list[tuple[int, int]]        # (block_row, block_col) holding kept tiles
    k: int
    spec: EncoderSpec
    read_tile: int
    settings: EmbedSettings
    level: int = 0
    sample_id: str = ""

    def key(self, block: tuple[int, int]) -> tuple:
        return (self.array.name, block[0], block[1], 0)

    def pixels_key(self, block: tuple[int, int]) -> tuple:
        return (self.pixels.name, block[0], block[1], 0)

    def keep_block(self, block: tuple[int, int]) -> np.ndarray:
        k = self.k
        return self.keep[block[0] * k : (block[0] + 1) * k, block[1] * k : (block[1] + 1) * k, None]


def tile_embedding_graph(slide: Slide, grid: TileGrid, spec: EncoderSpec, settings: EmbedSettings,
                         use_supertiles: bool = True, block_px: int = DEFAULT_BLOCK_PX,
                         sample_id: str = "") -> SlideGraph:
    import dask
    import dask.array as da

    if spec.feature_dim is None:
        raise ValueError(f"encoder {spec.name!r}: feature_dim must be known to build the graph")
    rt = grid.read_tile_size_px
    k, mask, blocks, tiles = block_layout(grid, use_supertiles, block_px)
    if mask is None:
        return _free_graph(slide, grid, k, blocks, tiles, spec, settings, sample_id)
    rows, cols = mask.shape
    if grid.region_tile_multiple is not None:   # whole regions, white past the level's edge
        pixels = slide.to_dask(grid.level, chunks=k * rt, shape=(rows * rt, cols * rt))
    else:
        pixels = slide.to_dask(grid.level, chunks=k * rt)[: rows * rt, : cols * rt]
    # A trailing length-1 axis lines the mask up with the pixels' (y, x, channel) blocks.
    keep = da.from_array(mask[:, :, None], chunks=(k, k, 1), name=f"keep-{dask.base.tokenize(mask)}")
    spec_node = dask.delayed(spec, name=f"encoder-{spec.key}", pure=True)
    array = da.map_blocks(
        embed_block, pixels, keep,
        spec=spec_node, read_tile=rt, settings=settings,
        chunks=(keep.chunks[0], keep.chunks[1], (spec.feature_dim,)),
        dtype=np.float32,
        name=f"embed-{dask.base.tokenize(pixels.name, keep.name, spec.key, settings)}",
    )
    return SlideGraph(array, pixels, mask, blocks, k, spec, rt, settings,
                      grid.level, sample_id)


class _Tasks:
    """A plain task graph under one name: what `driver.run_blocks` needs of a graph's arrays."""

    def __init__(self, name: str, dsk: dict):
        self.name, self.dsk = name, dsk

    def __dask_graph__(self) -> dict:
        return self.dsk


@dataclass
class FreeSlideGraph(SlideGraph):
    """A plan of free positions (`TileList`): one read and one embedding task per lattice cell."""

    tiles: dict | None = None          # block -> the block's tile indices in the plan
    cuts: dict | None = None           # block -> its tiles' places in the block's pixels (None: archive tiles)

    def keep_block(self, block: tuple[int, int]):
        return self.cuts[block]


def _free_graph(source, plan, k: int, blocks, tiles, spec: EncoderSpec, settings: EmbedSettings,
                sample_id: str) -> FreeSlideGraph:
    """``source``: the open `Slide`, or None when the tiles come from the plan's archive."""
    import functools

    import dask

    ref = source_of(source, plan)
    token = dask.base.tokenize(ref, plan.xy, k, spec.key, settings)
    pixels_name, array_name = f"read-{token}", f"embed-{token}"
    embed = functools.partial(encode_block, spec=spec, read_tile=plan.read_tile_size_px, settings=settings)
    pixels, array, cuts = {}, {}, {}
    for block, members in zip(blocks, tiles):
        arguments, cuts[block] = plan.block_read(members)
        pixels[(pixels_name, *block, 0)] = (read_block, ref, *arguments)
        array[(array_name, *block, 0)] = (embed, (pixels_name, *block, 0), cuts[block])
    return FreeSlideGraph(_Tasks(array_name, {**pixels, **array}), _Tasks(pixels_name, pixels), None, blocks, k,
                          spec, plan.read_tile_size_px, settings, plan.level, sample_id,
                          tiles=dict(zip(blocks, tiles)), cuts=cuts)


@dataclass
class ArchiveGraph:
    """A slide's blocks as JPEG tiles (``on_the_fly=False`` in the in-memory API): its graph's reads, then
    `jpeg_block` where an embedding would be."""

    array: _Tasks
    source: SlideGraph

    def key(self, block: tuple[int, int]) -> tuple:
        return (self.array.name, block[0], block[1], 0)


def archive_graph(graph: SlideGraph, size: int) -> ArchiveGraph:
    import dask

    name = f"jpeg-{dask.base.tokenize(graph.array.name, size)}"
    dsk = dict(graph.pixels.__dask_graph__())
    for block in graph.blocks:
        dsk[(name, *block, 0)] = (jpeg_block, graph.pixels_key(block), graph.keep_block(block), graph.read_tile, size)
    return ArchiveGraph(_Tasks(name, dsk), graph)
