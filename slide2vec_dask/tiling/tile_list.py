"""A plan of tiles at given level-0 positions, not on one grid: what peer tools hand over.

hs2p (and so slide2vec), CLAM and TRIDENT lay a separate grid over each
tissue region, starting at the region's corner, and grids of neighbouring
regions may overlap; their coordinates fit no single slide-wide lattice.  A
`TileList` keeps them as they are: ``xy`` holds each tile's level-0 top-left
corner, in row-major order (y, then x).  Blocks are the cells of a square
lattice of ``k * read_tile`` read-level pixels: a block holds the tiles whose
corner lies in its cell and reads the bounding box of those tiles, so nearby
tiles are decoded once and overlapping tiles stay exact.

A plan read from a tile archive (``archive``) names each tile's JPEG member
in the tar (byte offset and size): its blocks read those bytes, not the slide.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slide2vec_dask.tiling.grid import TileGeometry, TileGrid


@dataclass
class TileList(TileGeometry):
    """A slide's tiles at free level-0 positions (row-major), small and saved to reuse."""

    xy: np.ndarray                        # (n, 2) int64 level-0 (x, y) of each tile's top-left corner
    fraction: np.ndarray                  # (n,) float32 tissue fraction as the source gave it (NaN: none)
    meta: dict = field(default_factory=dict)
    archive: str | None = None            # a tile archive (tar) the tiles are read from instead of the slide
    member_offset: np.ndarray | None = None   # (n,) byte offset of each tile's JPEG in ``archive``
    member_size: np.ndarray | None = None     # (n,) its length in bytes
    region_tile_multiple: None = None     # (free positions have no regions)
    tissue_threshold: float = 0.0

    layout = "free"                       # (a `TileGrid`'s is "grid")

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy, dtype=np.int64).reshape(-1, 2)
        order = np.lexsort((xy[:, 0], xy[:, 1]))   # row-major: y, then x
        _, first = np.unique(xy[order], axis=0, return_index=True)
        order = order[np.sort(first)]             # one tile per position
        self.xy = xy[order]
        self.fraction = np.asarray(self.fraction, dtype=np.float32).reshape(-1)[order]
        if self.member_offset is not None:
            self.member_offset = np.asarray(self.member_offset, dtype=np.int64)[order]
            self.member_size = np.asarray(self.member_size, dtype=np.int64)[order]

    @property
    def num_tiles(self) -> int:
        return len(self.xy)

    @property
    def x(self) -> np.ndarray:
        return self.xy[:, 0]

    @property
    def y(self) -> np.ndarray:
        return self.xy[:, 1]

    @property
    def kept_tissue_fraction(self) -> np.ndarray:
        return self.fraction

    @property
    def resize_needed(self) -> bool:
        return self.read_tile_size_px != self.requested_tile_size_px

    def read_origin(self) -> np.ndarray:
        """(n, 2) read-level (row, col) of each tile's top-left pixel (computed once: every block asks)."""
        if getattr(self, "_origin", None) is None:
            self._origin = np.round(self.xy[:, ::-1] / self.level_downsample).astype(np.int64)
        return self._origin

    # -- blocks ------------------------------------------------------------------------------
    def blocks(self, k: int) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
        """The lattice cells (``k * read_tile`` read-level px) holding tiles, row-major, and each one's tiles.

        Tile indices of a cell are increasing; every cell row (band) is a contiguous range
        of the plan's row-major order, which lets finalisation stream band by band.
        """
        span = k * self.read_tile_size_px
        cell = self.read_origin() // span
        if not len(cell):
            return [], []
        keys = cell[:, 0] * (int(cell[:, 1].max()) + 1) + cell[:, 1]
        order = np.argsort(keys, kind="stable")
        _, starts = np.unique(keys[order], return_index=True)
        groups = np.split(order, starts[1:])
        ids = [(int(cell[g[0], 0]), int(cell[g[0], 1])) for g in groups]
        return ids, groups

    def window(self, tiles: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """A block's read window ``(y, x, height, width)`` (read level) and its tiles' (row, col) in it."""
        origin = self.read_origin()[tiles]
        y0, x0 = origin.min(axis=0)
        y1, x1 = origin.max(axis=0) + self.read_tile_size_px
        return (int(y0), int(x0), int(y1 - y0), int(x1 - x0)), (origin - (y0, x0)).astype(np.int32)

    def block_read(self, tiles: np.ndarray) -> tuple[tuple, np.ndarray | None]:
        """What a block of ``tiles`` reads, and its tiles' places in what it reads.

        From the slide: ``(level, y, x, height, width)`` and their (row, col) in that window;
        from an archive: the members' ``(offsets, sizes)``, and None (the tiles come whole).
        """
        if self.archive is not None:
            return (self.member_offset[tiles], self.member_size[tiles]), None
        (y, x, h, w), cuts = self.window(tiles)
        return (self.level, y, x, h, w), cuts

    # -- persistence -------------------------------------------------------------------------
    def _params(self) -> dict:
        skip = ("xy", "fraction", "member_offset", "member_size")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def save(self, path: str | Path) -> Path:
        """``.npz`` (x, y and tissue fraction for other tools, plus the parameters) and a readable ``.json``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        target = path.with_suffix(".npz")
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.npz")
        arrays = {"x": self.x, "y": self.y, "tissue_fraction": self.fraction}
        if self.member_offset is not None:
            arrays.update(member_offset=self.member_offset, member_size=self.member_size)
        np.savez_compressed(tmp, layout="list", params=json.dumps(self._params()), **arrays)
        os.replace(tmp, target)
        readable = path.with_suffix(".json")
        tmp = readable.with_name(f".{readable.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self._params(), "layout": "list", "num_tiles": self.num_tiles}, indent=2))
        os.replace(tmp, readable)
        return target

    @classmethod
    def from_npz(cls, data) -> "TileList":
        params = json.loads(str(data["params"]))
        members = {k: data[k] for k in ("member_offset", "member_size") if k in data}
        return cls(xy=np.stack([data["x"], data["y"]], axis=1), fraction=data["tissue_fraction"],
                   **members, **params)

    def matches(self, other) -> bool:
        return isinstance(other, TileList) and self._params() == other._params() and \
            np.array_equal(self.xy, other.xy)


def bands(blocks: list[tuple[int, int]], members: list[np.ndarray]):
    """Blocks (row-major) grouped by block row, each with its tiles' plan indices."""
    band: list = []
    for block, index in zip(blocks, members):
        if band and band[-1][0][0] != block[0]:
            yield band
            band = []
        band.append((block, index))
    if band:
        yield band


def block_members(plan, k: int):
    """``(blocks, members)`` of any plan for a known block size: each block's tiles as plan indices.

    (A grid block's tiles are its kept tiles in row-major order inside the block, as its worker cuts them.)
    """
    if plan.layout == "free":
        return plan.blocks(k)
    index = np.full(plan.keep.shape, -1, dtype=np.int64)
    index[plan.keep] = np.arange(plan.num_tiles)
    rows, cols = plan.keep.shape
    blocks, members = [], []
    for bi in range(-(-rows // k)):
        for bj in range(-(-cols // k)):
            part = index[bi * k : (bi + 1) * k, bj * k : (bj + 1) * k]
            part = part[part >= 0]
            if len(part):
                blocks.append((bi, bj))
                members.append(part)
    return blocks, members


def load_plan(path: str | Path):
    """A saved plan: a `TileGrid` (one grid) or a `TileList` (free positions)."""
    with np.load(Path(path).with_suffix(".npz"), allow_pickle=False) as data:
        if "layout" in data and str(data["layout"]) == "list":
            return TileList.from_npz(data)
    return TileGrid.load(path)
