"""Blocks: the unit of reading and embedding.

A plan's tiles are read in blocks (about ``DEFAULT_BLOCK_PX`` read-level
pixels a side; one tile each without supertiles; one whole region in
hierarchical mode; one lattice cell of a `TileList`).  A block task reads
its pixels, cuts its tiles, embeds them and hands on a `BlockResult`: the
embeddings of its tiles in the plan's order within the block (what
`tiling.tile_list.block_members` lists for it), so placing a block's rows
is one rule for every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slide2vec_dask.clusters.client import resolve_num_gpus
from slide2vec_dask.dataflow import gpu_decode, worker
from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.encoders.dense import embed_with_grids
from slide2vec_dask.telemetry import clock
from slide2vec_dask.tiling.archive import decode_jpeg_tiles, encode_jpeg_tiles

DEFAULT_BLOCK_PX = 2048


@dataclass(frozen=True)
class EmbedSettings:
    """What an embedding task needs besides pixels (small, picklable)."""

    batch_size: int = 32
    num_gpus: int = 0
    precision: str | None = None
    channels_last: bool = True
    dense_dtype: str | None = None   # save_dense: the tiles' token grids too, kept in this dtype
    gpu_decode: bool = False

    @classmethod
    def of(cls, execution, client, preprocessing=None) -> "EmbedSettings":
        """What every embedding task of a call needs from its options (the one place they are read).

        ``gpu_decode`` is asked for in `ExecutionOptions`, or in `PreprocessingConfig` where
        slide2vec 7.x keeps it."""
        num_gpus = resolve_num_gpus(execution.num_gpus, client)
        wanted = bool(execution.gpu_decode or getattr(preprocessing, "gpu_decode", False))
        return cls(execution.batch_size, num_gpus, execution.precision, execution.channels_last,
                   execution.dense_dtype if execution.save_dense else None,
                   wanted and gpu_decode.refuse_without_cuda(num_gpus))


@dataclass
class BlockResult:
    """One block embedded: its tiles' rows, its region (hierarchical mode), its tiles as JPEGs (archives)."""

    tiles: np.ndarray                  # (n, feature): the block's tiles, in plan order
    region: np.ndarray | None = None   # (k * k, feature): every tile of the region, row-major
    jpegs: list[bytes] | None = None   # on_the_fly=False: the tiles as written to the archive
    grids: np.ndarray | None = None    # save_dense: (n, token_y, token_x, feature), the block's tiles' token grids


def block_tiles(plan, use_supertiles: bool, block_px: int = DEFAULT_BLOCK_PX) -> int:
    """Tiles per block side: about ``block_px`` read-level pixels, or 1 without supertiles."""
    return max(1, round(block_px / plan.read_tile_size_px)) if use_supertiles else 1


def block_layout(plan, use_supertiles: bool, block_px: int = DEFAULT_BLOCK_PX):
    """``(k, mask, blocks, tiles)``: tiles per block side, the grid's tiles to cut, the blocks holding any.

    In hierarchical mode a block is exactly one region (read whole, embedded whole),
    so the mask covers whole regions; otherwise blocks are ~``block_px`` supertiles.
    A plan of free positions (`TileList`) has no mask: ``tiles`` lists each block's
    tile indices instead (``None`` for grids).
    """
    if plan.layout == "free":
        k = block_tiles(plan, use_supertiles, block_px)
        blocks, tiles = plan.blocks(k)
        return k, None, blocks, tiles
    if plan.region_tile_multiple is not None:
        k, mask = plan.region_tile_multiple, plan.embed_mask
    else:
        k, mask = block_tiles(plan, use_supertiles, block_px), plan.keep
    rows, cols = mask.shape
    counts = (np.add.reduceat(np.add.reduceat(mask, np.arange(0, rows, k), axis=0), np.arange(0, cols, k), axis=1)
              if rows and cols else np.zeros((0, 0), int))
    return k, mask, [(int(i), int(j)) for i, j in zip(*np.nonzero(counts))], None


def cut_tiles(pixels: np.ndarray, cuts: np.ndarray | None, tile: int) -> np.ndarray:
    """The tiles a block embeds, ``(n, tile, tile, 3)``, in row-major order.

    ``cuts`` is a grid block's mask (2-D bool), a free block's tile corners in its pixels
    ((n, 2) rows and columns), or None when ``pixels`` are the tiles already (an archive's).
    """
    if cuts is None:
        return pixels
    if cuts.dtype == bool:
        rows, cols = cuts.shape
        grid = pixels[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile, 3).swapaxes(1, 2)
        return np.ascontiguousarray(grid[cuts])
    out = np.empty((len(cuts), tile, tile, 3), dtype=np.uint8)
    for i, (r, c) in enumerate(cuts):
        out[i] = pixels[r : r + tile, c : c + tile]
    return out


def encode_tiles(tiles: np.ndarray, spec: EncoderSpec, settings: EmbedSettings) -> np.ndarray:
    """``(n, feature)`` float32 embeddings of ``(n, h, w, 3)`` uint8 tiles, on this process's device."""
    if not len(tiles):
        return np.zeros((0, spec.feature_dim), np.float32)

    def encode(device: str) -> np.ndarray:
        encoder = worker.get_encoder(spec, device, settings.precision, settings.channels_last)
        return encoder.embed(tiles, settings.batch_size)

    return np.asarray(worker.run_on_device(settings.num_gpus, encode), dtype=np.float32)


def encode_tiles_with_grids(tiles: np.ndarray, spec: EncoderSpec, settings: EmbedSettings):
    """`encode_tiles` plus each tile's patch-token grid from the same forward (``save_dense``)."""
    def encode(device: str):
        encoder = worker.get_encoder(spec, device, settings.precision, settings.channels_last)
        return embed_with_grids(encoder, tiles, settings.batch_size)

    pooled, grids = worker.run_on_device(settings.num_gpus, encode)
    return pooled, grids.astype(np.float16 if settings.dense_dtype == "fp16" else np.float32)


def _encode_jpeg_block(block, cuts, spec: EncoderSpec, read_tile: int, settings: EmbedSettings):
    """A `gpu_decode.JpegBlock` decoded, cut and embedded on this process's GPU; None to decode on the CPU."""
    def encode(device: str):
        if not device.startswith("cuda"):
            return None
        with clock.stage("decode"):
            pixels = gpu_decode.decode_block(block, device)
        if pixels is None:
            return None
        tiles = gpu_decode.cut_tiles(pixels, cuts, read_tile)
        encoder = worker.get_encoder(spec, device, settings.precision, settings.channels_last)
        return encoder.embed(tiles, settings.batch_size)

    embedded = worker.run_on_device(settings.num_gpus, encode)
    return None if embedded is None else np.asarray(embedded, dtype=np.float32)


def embed_pixels(pixels: np.ndarray, cuts: np.ndarray | None, kept: np.ndarray | None, *, spec: EncoderSpec,
                 read_tile: int, settings: EmbedSettings, archive_tile: int | None = None) -> BlockResult:
    """A block's pixels cut, embedded and sorted into a `BlockResult`.

    ``kept`` (hierarchical mode) says which of the region's ``k * k`` tiles are tissue
    tiles; every tile of the region is embedded.  With ``archive_tile``
    (``on_the_fly=False``) the tiles are JPEG-encoded at that size, and what is embedded
    is those JPEGs decoded: a later run from the archive gets the same embeddings.
    """
    if isinstance(pixels, gpu_decode.JpegBlock):   # gpu_decode: decoded, cut and embedded on the device
        # (save_dense needs the grids, which the GPU path does not keep: the CPU decodes those blocks)
        embedded = None if settings.dense_dtype is not None else _encode_jpeg_block(
            pixels, cuts, spec, read_tile, settings)
        if embedded is not None:
            return BlockResult(embedded, None, None) if kept is None else BlockResult(embedded[kept], embedded, None)
        y, x = pixels.origin   # (no CUDA device here, or the GPU decoder disagreed: the CPU decodes)
        with clock.stage("read"):
            pixels = pixels.ref.read(pixels.level, y, x, pixels.height, pixels.width)
    with clock.stage("cut"):
        tiles = cut_tiles(pixels, cuts, read_tile)
    jpegs = None
    if archive_tile is not None:
        jpegs = encode_jpeg_tiles(tiles, archive_tile)
        tiles = decode_jpeg_tiles(jpegs) if jpegs else tiles[:0]
        if kept is not None:   # (the archive holds the tissue tiles only)
            jpegs = [j for j, keep in zip(jpegs, kept) if keep]
    grids = None
    if settings.dense_dtype is not None:
        embedded, grids = encode_tiles_with_grids(tiles, spec, settings)
    else:
        embedded = encode_tiles(tiles, spec, settings)
    if kept is None:
        return BlockResult(embedded, None, jpegs, grids)
    return BlockResult(embedded[kept], embedded, jpegs, None if grids is None else grids[kept])
