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

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from slide2vec_dask.clusters.client import resolve_num_gpus
from slide2vec_dask.dataflow import gpu_decode, worker
from slide2vec_dask.encoders.base import EncoderSpec
from slide2vec_dask.encoders.dense import embed_with_grids
from slide2vec_dask.telemetry import clock
from slide2vec_dask.tiling.archive import decode_jpeg_tiles, encode_jpeg_tiles

DEFAULT_BLOCK_PX = 2048
#: How far below an exact 2x (4x, 8x) the read-to-requested ratio may be and still be decoded at 1/2
#: (1/4, 1/8): the rest is a resize by at most this much (a 0.2630 µm/px slide read at 0.5 µm/px:
#: 426 px tiles, decoded at 1/2 to 213, resized to 224).
SCALE_SLACK = 0.05

log = logging.getLogger(__name__)


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


def decode_scale(slide, plan, wanted: bool, free_reads=None) -> int:
    """1, or the scale (2, 4, 8) at which a plan's blocks are decoded when ``wanted`` (``scaled_decode``).

    Taken when the read tile is about that many times the requested one (within `SCALE_SLACK`),
    the slide's backend decodes the read level at that scale (`Slide.decode_scales`: the tifffile
    backend on JPEG and JPEG 2000 tiles) and every block and tile starts on a whole reduced pixel
    (the read tile, and for free positions ``free_reads``' windows and corners, multiples of it).
    Where it cannot, a warning says so and the slide is decoded in full, exactly.
    """
    if not wanted or slide is None or plan.read_tile_size_px <= plan.requested_tile_size_px:
        return 1
    ratio = plan.read_tile_size_px / plan.requested_tile_size_px
    fitting = [s for s in (8, 4, 2) if ratio >= s * (1 - SCALE_SLACK)]
    if not fitting:
        return 1
    scales = slide.decode_scales(plan.level)
    usable = [s for s in fitting if s in scales and plan.read_tile_size_px % s == 0
              and _aligned(free_reads, s)]
    if usable:
        return usable[0]
    why = (f"its read tiles ({plan.read_tile_size_px} px) or positions are not multiples of {fitting[0]}"
           if any(s in scales for s in fitting) else
           f"the {slide.backend} backend cannot decode level {plan.level} at reduced scale (only JPEG and "
           "JPEG 2000 tiles through the tifffile backend can)")
    warnings.warn(f"{slide.path}: scaled_decode=True, but {why}; its tiles are decoded in full and resized",
                  RuntimeWarning, stacklevel=2)
    log.warning("%s: scaled_decode ignored: %s", slide.path, why)
    return 1


def _aligned(free_reads, scale: int) -> bool:
    """Every free block's window origin and tile corners on whole multiples of ``scale`` (grids: True)."""
    if free_reads is None:
        return True
    return all(read[1] % scale == 0 and read[2] % scale == 0 and not (np.asarray(cuts) % scale).any()
               for read, cuts in free_reads)


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


def resize_tiles(tiles: np.ndarray, size: int) -> np.ndarray:
    """``(n, h, w, 3)`` uint8 tiles resized to ``size`` (antialiased bilinear, as the encoder would),
    in uint8: torch's vectorised uint8 kernel, ~15x faster than the float resize on the
    encoder's thread (448 -> 224: 0.5 vs 8-10 ms a tile here), within one grey level of it, and
    run on the decoding thread that cut the tiles, beside the encoder instead of before it."""
    if tiles.shape[1] == size and tiles.shape[2] == size:
        return tiles
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)   # channels_last uint8
        out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out.permute(0, 2, 3, 1).contiguous().numpy()


def cut_block(pixels: np.ndarray, cuts: np.ndarray | None, kept: np.ndarray | None, *, spec: EncoderSpec,
                read_tile: int, settings: EmbedSettings,
                archive_tile: int | None = None) -> tuple[np.ndarray, list[bytes] | None]:
    """A block's pixels cut into the tiles the encoder takes, and (archives) their JPEGs.

    With ``archive_tile`` (``on_the_fly=False``) the tiles are JPEG-encoded at that size,
    and what is embedded is those JPEGs decoded: a later run from the archive gets the
    same embeddings; ``kept`` (hierarchical mode) says which go into the archive.  On a
    CPU the tiles are resized to the encoder's size here (`resize_tiles`), so what waits
    for the device is the small tiles only, never the block's pixels.
    """
    with clock.stage("cut"):
        tiles = cut_tiles(pixels, cuts, read_tile)
    jpegs = None
    if archive_tile is not None:
        jpegs = encode_jpeg_tiles(tiles, archive_tile)
        tiles = decode_jpeg_tiles(jpegs) if jpegs else tiles[:0]
        if kept is not None:   # (the archive holds the tissue tiles only)
            jpegs = [j for j, keep in zip(jpegs, kept) if keep]
    if settings.num_gpus == 0 and len(tiles):   # on a GPU the device resizes, for free
        tiles = resize_tiles(tiles, spec.tile_size_px)
    return tiles, jpegs


def embed_tiles(tiles: np.ndarray, jpegs: list[bytes] | None, kept: np.ndarray | None, *, spec: EncoderSpec,
                settings: EmbedSettings) -> BlockResult:
    """A block's tiles embedded and sorted into a `BlockResult`; ``kept`` (hierarchical mode) says
    which of the region's ``k * k`` tiles are tissue tiles (every tile of the region is embedded).
    With ``save_dense`` each tile's token grid comes from the same forward."""
    grids = None
    if settings.dense_dtype is not None:
        embedded, grids = encode_tiles_with_grids(tiles, spec, settings)
    else:
        embedded = encode_tiles(tiles, spec, settings)
    if kept is None:
        return BlockResult(embedded, None, jpegs, grids)
    return BlockResult(embedded[kept], embedded, jpegs, None if grids is None else grids[kept])


def embed_jpeg_block(block, cuts, kept, *, spec: EncoderSpec, read_tile: int,
                     settings: EmbedSettings) -> BlockResult | np.ndarray:
    """``gpu_decode``: a `gpu_decode.JpegBlock` decoded, cut and embedded on this process's GPU, or,
    where it cannot be (no CUDA device here, the GPU decoder disagreed, ``save_dense`` which needs the
    grids the GPU path does not keep), the block's pixels decoded on the CPU for `cut_block`."""
    embedded = None if settings.dense_dtype is not None else _encode_jpeg_block(block, cuts, spec, read_tile,
                                                                                settings)
    if embedded is not None:
        return BlockResult(embedded, None, None) if kept is None else BlockResult(embedded[kept], embedded, None)
    y, x = block.origin
    with clock.stage("read"):
        return block.ref.read(block.level, y, x, block.height, block.width)
