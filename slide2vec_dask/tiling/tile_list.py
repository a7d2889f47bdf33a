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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slide2vec_dask.tiling.grid import TileGeometry, TileGrid, save_plan


MAX_COORDINATE = 2**31        # level-0 px: beyond any slide, and far from int64's limits in block arithmetic
MAX_TILES = 2**24             # per slide: 256 MB of positions; a 200k px square slide holds 800k 224 px tiles
MAX_TILES_PER_BLOCK = 16      # per block of k x k tile cells: a tiling overlapping by 3/4 has 16


def checked_positions(raw, where: str) -> np.ndarray:
    """``raw`` as (N, 2) int64 level-0 (x, y), or a ValueError naming ``where`` and what is wrong.

    The one check of positions read from a file (peers' coordinates, archive manifests, saved
    lists): the shape is (N, 2), the values are finite whole numbers (a fraction is refused,
    never truncated), none is beyond any slide, and no position is listed twice.
    """
    xy = np.asarray(raw)
    check_shape(xy.shape, where)
    if xy.dtype.kind not in "iuf":
        raise ValueError(f"{where}: the coordinates are {xy.dtype}, not numbers")
    if xy.dtype.kind == "f":
        _refuse(where, ~np.isfinite(xy).all(axis=1), xy, "are not finite (NaN or infinite)")
        _refuse(where, (xy != np.round(xy)).any(axis=1), xy, "are not whole numbers of level-0 pixels")
    _refuse(where, (np.abs(xy.astype(np.float64)) > MAX_COORDINATE).any(axis=1), xy,
            f"lie outside the slide (beyond {MAX_COORDINATE} px, larger than any slide)")
    xy = xy.astype(np.int64)
    _refuse_repeats(xy, where)
    return xy


def check_shape(shape: tuple, where: str) -> None:
    """Positions are (N, 2), N at most `MAX_TILES` (checked from a file's header, before reading it)."""
    if len(shape) != 2 or shape[1] != 2:
        raise ValueError(f"{where}: the coordinates have shape {tuple(shape)}; expected (N, 2), one (x, y) row "
                         "per tile (a file of another layout, or transposed)")
    if shape[0] > MAX_TILES:
        raise ValueError(f"{where}: {shape[0]} tile positions; at most {MAX_TILES} are read (more than any slide "
                         "holds at any tile size a model takes)")


def check_inside(xy: np.ndarray, tile_lv0: int, width: int, height: int, where: str) -> None:
    """Refuse tiles wholly outside level 0 (``width`` x ``height``); a tile may overhang an edge, as hs2p's do."""
    x, y = xy[:, 0], xy[:, 1]
    outside = (x + tile_lv0 <= 0) | (y + tile_lv0 <= 0) | (x >= width) | (y >= height)
    _refuse(where, outside, xy, f"lie outside the slide ({width} x {height} px at level 0; "
                                f"{tile_lv0} px tiles)")


def _refuse(where: str, bad: np.ndarray, xy: np.ndarray, what: str) -> None:
    if bad.any():
        a, b = xy[np.argmax(bad)]
        raise ValueError(f"{where}: {int(bad.sum())} of {len(xy)} tile positions {what}, e.g. "
                         f"({_number(a)}, {_number(b)}); fix or regenerate the coordinates")


def _number(value) -> str:
    return str(int(value)) if np.isfinite(value) and value == np.round(value) and abs(value) < 2**63 else f"{value:g}"


def _refuse_repeats(xy: np.ndarray, where: str) -> None:
    """Positions listed twice: a peer lists each once, so the file was joined or damaged (which row is
    right is unknowable: an archive's would be two different tiles), and it is refused, not deduplicated."""
    if not len(xy):
        return
    positions, counts = np.unique(xy, axis=0, return_counts=True)
    repeated = counts > 1
    if repeated.any():
        shown = ", ".join(f"({a}, {b}) x{c}" for (a, b), c in zip(positions[repeated][:5], counts[repeated][:5]))
        n = int(repeated.sum())
        raise ValueError(f"{where}: {int(counts[repeated].sum())} rows repeat {n} position{'s' * (n > 1)}: "
                         f"{shown}; each tile position must be listed once (write the file again)")


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
    # annotation bags (tiling/annotations.py): each sampled class's coverage of each tile, and
    # which tiles each bag holds; their names are meta["classes"] / meta["bags"]
    class_coverage: np.ndarray | None = None  # (n, C) float32
    member: np.ndarray | None = None          # (n, B) bool

    layout = "free"                       # (a `TileGrid`'s is "grid")

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy)
        if xy.shape != (len(xy), 2) or xy.dtype.kind not in "iu":   # (its sources check with their names)
            raise ValueError(f"a TileList needs (N, 2) integer positions, not {xy.dtype} {xy.shape}")
        xy = xy.astype(np.int64)
        order = np.lexsort((xy[:, 0], xy[:, 1]))   # row-major: y, then x
        self.xy = xy[order]
        self.fraction = np.asarray(self.fraction, dtype=np.float32).reshape(-1)[order]
        if self.member_offset is not None:
            self.member_offset = np.asarray(self.member_offset, dtype=np.int64)[order]
            self.member_size = np.asarray(self.member_size, dtype=np.int64)[order]
        if self.member is not None:
            self.class_coverage = np.asarray(self.class_coverage, dtype=np.float32).reshape(len(xy), -1)[order]
            self.member = np.asarray(self.member, dtype=bool).reshape(len(xy), -1)[order]

    @property
    def num_tiles(self) -> int:
        return len(self.xy)

    @property
    def source(self) -> str:
        """The slide and the file its positions came from, as messages name them."""
        where = self.meta.get("tiles_from") or self.meta.get("coordinates_from")
        return ": ".join(str(p) for p in (self.meta.get("sample_id"), where) if p)

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
        shifted = cell - cell.min(axis=0)   # (tiles overhanging the top or left edge sit in cells below 0)
        keys = shifted[:, 0] * (int(shifted[:, 1].max()) + 1) + shifted[:, 1]
        order = np.argsort(keys, kind="stable")
        _, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
        if counts.max() > MAX_TILES_PER_BLOCK * k * k:
            raise ValueError(f"{self.source}: {int(counts.max())} tiles lie in one block ({span} px square at read "
                             f"level {self.level}); at most {MAX_TILES_PER_BLOCK * k * k} may (tiles "
                             f"overlapping by more than 3/4 are not a tiling): check the coordinates")
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
        from an archive: the members' ``(offsets, sizes, positions)``, and None (the tiles come whole).
        """
        if self.archive is not None:
            return (self.member_offset[tiles], self.member_size[tiles], self.xy[tiles]), None
        (y, x, h, w), cuts = self.window(tiles)
        return (self.level, y, x, h, w), cuts

    # -- persistence -------------------------------------------------------------------------
    def _params(self) -> dict:
        skip = ("xy", "fraction", "member_offset", "member_size", "class_coverage", "member")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def save(self, path: str | Path) -> Path:
        """``.npz`` (x, y and tissue fraction for other tools, plus the parameters) and a readable ``.json``."""
        arrays = {"x": self.x, "y": self.y, "tissue_fraction": self.fraction, "layout": "list",
                  "params": json.dumps(self._params())}
        if self.member_offset is not None:
            arrays.update(member_offset=self.member_offset, member_size=self.member_size)
        if self.member is not None:
            arrays.update(class_coverage=self.class_coverage, bag_member=self.member)
        return save_plan(path, arrays, {**self._params(), "layout": "list", "num_tiles": self.num_tiles})

    @classmethod
    def from_npz(cls, data, where: str) -> "TileList":
        params = json.loads(str(data["params"]))
        members = {k: data[k] for k in ("member_offset", "member_size") if k in data}
        x, y, *_ = columns(data, ("x", "y", "tissue_fraction", *members), where)
        xy = checked_positions(np.stack([x, y], axis=1), where)
        if "bag_member" in data:
            bags = {"class_coverage": data["class_coverage"], "member": data["bag_member"]}
            if bags["member"].shape != (len(xy), len(params["meta"].get("bags") or ())) or \
                    bags["class_coverage"].shape != (len(xy), len(params["meta"].get("classes") or ())):
                raise ValueError(f"{where}: its bag tables do not match its tiles and classes; plan the slide again")
            members.update(bags)
        return cls(xy=xy, fraction=data["tissue_fraction"], **members, **params)

    def matches(self, other) -> bool:
        return isinstance(other, TileList) and self._params() == other._params() and \
            np.array_equal(self.xy, other.xy) and (self.member is None) == (other.member is None) and \
            (self.member is None or np.array_equal(self.member, other.member))


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


def columns(data, keys, where: str) -> list[np.ndarray]:
    """``data``'s arrays ``keys``, checked to be 1-D numbers of one length (one value per tile);
    a ValueError naming ``where`` and the array otherwise."""
    arrays = [np.asarray(data[k]) for k in keys]
    for key, a in zip(keys, arrays):
        if a.ndim != 1 or a.dtype.kind not in "iuf":
            raise ValueError(f"{where}: {key} is {a.dtype} of shape {a.shape}; expected one value per tile "
                             "(1-D numbers)")
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"{where}: the arrays differ in length: " + ", ".join(
            f"{len(a)} {k}" for k, a in zip(keys, arrays)) + "; expected one value per tile in each")
    return arrays


def load_plan(path: str | Path):
    """A saved plan: a `TileGrid` (one grid) or a `TileList` (free positions)."""
    with np.load(Path(path).with_suffix(".npz"), allow_pickle=False) as data:
        if "layout" in data and str(data["layout"]) == "list":
            return TileList.from_npz(data, str(Path(path).with_suffix(".npz")))
    return TileGrid.load(path)
