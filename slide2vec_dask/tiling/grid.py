"""The tile plan of a slide: which level to read, where the tiles are, which are kept.

Geometry.  Tiles sit on one regular grid in the *read level's* pixels:
tile ``(row, col)`` covers ``[row * read_tile_size_px, (row + 1) * ...)``
and likewise for columns, starting at the level's top-left pixel.  Its
level-0 origin is ``x = round(col * read_tile_size_px * downsample)`` (same
for ``y``); for the usual integer downsamples that is exactly
``col * tile_size_lv0``.  Only tiles that fit entirely inside the level are
planned.  Level choice: the level whose spacing is within
``spacing_tolerance`` of the requested spacing (the closest one); otherwise
the next finer level is read with a proportionally larger tile and resized
to the model's tile size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slide2vec_dask.atomic import atomic


@dataclass(frozen=True)
class LevelChoice:
    level: int
    read_spacing_um: float
    read_tile_size_px: int
    tile_size_lv0: int


def select_level(spacings: list[float], requested_spacing_um: float, tolerance: float) -> tuple[int, float, bool]:
    """(level, its spacing, within tolerance): the level nearest the request, else the next finer one.

    hs2p's `select_level`, expression for expression, so both read the same level and
    derive the same tile footprint.
    """
    level = int(np.argmin([abs(s - requested_spacing_um) for s in spacings]))
    best = spacings[level]
    within = abs(best - requested_spacing_um) / requested_spacing_um <= tolerance
    if not within:
        while level > 0 and best > requested_spacing_um:
            level -= 1
            best = spacings[level]
            within = abs(best - requested_spacing_um) / requested_spacing_um <= tolerance
    return level, best, within


def choose_level(spacings: list[float], downsamples: list[float], requested_spacing_um: float,
                 tile_size_px: int, tolerance: float, sample: str = "") -> LevelChoice:
    """Pick the pyramid level and the tile size to read there (hs2p's `plan_spacing_read`)."""
    level, read_spacing, within = select_level(spacings, requested_spacing_um, tolerance)
    if not within and read_spacing > requested_spacing_um:
        raise ValueError(
            f"{sample or 'slide'}: requested spacing {requested_spacing_um} µm/px is finer than the slide's "
            f"level 0 ({spacings[0]:.4g} µm/px); choose requested_spacing_um >= {spacings[0]:.4g} or check "
            "spacing_at_level_0."
        )
    read_tile = tile_size_px if within else max(1, round(tile_size_px * requested_spacing_um / read_spacing))
    base = spacings[0] / downsamples[0]
    return LevelChoice(level, read_spacing, read_tile, round(read_tile * read_spacing / base))


@dataclass
class TileGeometry:
    """What every plan states: the level read, spacings, and the tile's size asked for, read and at level 0."""

    level: int
    level_downsample: float
    slide_spacing_um: float
    read_spacing_um: float
    requested_spacing_um: float
    requested_tile_size_px: int
    read_tile_size_px: int
    tile_size_lv0: int


@dataclass
class TileGrid(TileGeometry):
    """A slide's tile plan on one grid; small, in memory, and saved to reuse."""

    tissue_threshold: float
    tissue_fraction: np.ndarray              # (rows, cols) float32, every grid tile
    keep: np.ndarray                         # (rows, cols) bool, the tiles to embed
    meta: dict = field(default_factory=dict)
    region_tile_multiple: int | None = None  # R: regions of R x R tiles (hierarchical mode)

    layout = "grid"                          # (a `TileList`'s is "free")

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid."""
        return self.keep.shape

    @property
    def num_tiles(self) -> int:
        return int(self.keep.sum())

    @property
    def rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        """Grid row and column of each kept tile, in row-major (y, then x) order."""
        rows, cols = np.nonzero(self.keep)
        return rows, cols

    @property
    def x(self) -> np.ndarray:
        """Level-0 x of each kept tile's top-left pixel."""
        return self._lv0(self.rows_cols[1])

    @property
    def y(self) -> np.ndarray:
        return self._lv0(self.rows_cols[0])

    @property
    def kept_tissue_fraction(self) -> np.ndarray:
        """Tissue fraction of each kept tile (row-major)."""
        rows, cols = self.rows_cols
        return self.tissue_fraction[rows, cols]

    def _lv0(self, index: np.ndarray) -> np.ndarray:
        return np.round(index.astype(np.float64) * self.read_tile_size_px * self.level_downsample).astype(np.int64)

    # -- regions (hierarchical mode) ---------------------------------------
    # The region grid is the tile grid coarsened by R from the same origin, so every tile lies
    # in exactly one region; regions at the right/bottom edge reach past the slide, and their
    # tiles out there are white padding (tile_mask False).
    @property
    def region_shape(self) -> tuple[int, int]:
        r = self._r()
        return -(-self.shape[0] // r), -(-self.shape[1] // r)

    @property
    def padded_keep(self) -> np.ndarray:
        """``keep`` padded with False to whole regions: (region rows * R, region cols * R)."""
        r = self._r()
        rr, rc = self.region_shape
        out = np.zeros((rr * r, rc * r), dtype=bool)
        out[: self.shape[0], : self.shape[1]] = self.keep
        return out

    @property
    def region_keep(self) -> np.ndarray:
        """(region rows, region cols): a region is kept when any of its tiles is."""
        r = self._r()
        rr, rc = self.region_shape
        return self.padded_keep.reshape(rr, r, rc, r).any(axis=(1, 3))

    @property
    def embed_mask(self) -> np.ndarray:
        """Padded tiles to embed: every tile of a kept region (flat mode: ``keep``)."""
        if self.region_tile_multiple is None:
            return self.keep
        r = self._r()
        return np.repeat(np.repeat(self.region_keep, r, axis=0), r, axis=1)

    @property
    def num_regions(self) -> int:
        return int(self.region_keep.sum())

    @property
    def region_rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        return np.nonzero(self.region_keep)

    @property
    def region_x(self) -> np.ndarray:
        """Level-0 x of each kept region's top-left pixel (row-major region order)."""
        return self._lv0(self.region_rows_cols[1] * self._r())

    @property
    def region_y(self) -> np.ndarray:
        return self._lv0(self.region_rows_cols[0] * self._r())

    @property
    def tile_mask(self) -> np.ndarray:
        """(regions, R*R) bool: which sub-tiles (row-major inside the region) are kept tissue tiles."""
        r = self._r()
        rr, rc = self.region_shape
        blocks = self.padded_keep.reshape(rr, r, rc, r).swapaxes(1, 2)
        return blocks[self.region_keep].reshape(-1, r * r)

    def _r(self) -> int:
        if self.region_tile_multiple is None:
            raise ValueError("this plan has no regions (region_tile_multiple is not set)")
        return self.region_tile_multiple

    @property
    def resize_needed(self) -> bool:
        return self.read_tile_size_px != self.requested_tile_size_px

    # -- persistence ----------------------------------------------------
    def _params(self) -> dict:
        params = {k: v for k, v in asdict(self).items() if k not in ("tissue_fraction", "keep")}
        return params

    def save(self, path: str | Path) -> Path:
        """Write the plan as ``.npz`` (arrays, plus x/y for other tools) and a readable ``.json``."""
        return save_plan(path, {"tissue_fraction": self.tissue_fraction, "keep": self.keep, "x": self.x, "y": self.y,
                                "params": json.dumps(self._params())},
                         {**self._params(), "num_tiles": self.num_tiles})

    @classmethod
    def load(cls, path: str | Path) -> "TileGrid":
        with np.load(Path(path).with_suffix(".npz"), allow_pickle=False) as data:
            params = json.loads(str(data["params"]))
            return cls(tissue_fraction=data["tissue_fraction"], keep=data["keep"], **params)

    def matches(self, other: "TileGrid") -> bool:
        """Same geometry and selection parameters (used to decide whether a saved plan is reusable)."""
        a, b = self._params(), other._params()
        return all(a[k] == b[k] for k in a if k != "meta") and a["meta"].get("config") == b["meta"].get("config")


def save_plan(path: str | Path, arrays: dict, readable: dict) -> Path:
    """A plan's ``.npz`` and ``.json``, each written aside and renamed (`atomic`): a run killed or
    a disk filled mid-save never leaves a plan resume would trust, and `sweep` finds what it left."""
    path = Path(path)
    target = atomic(path.with_suffix(".npz"), lambda tmp: _savez(tmp, arrays))
    atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(readable, indent=2)))
    return target


def _savez(tmp: Path, arrays: dict) -> None:
    with open(tmp, "wb") as f:   # (a file object: numpy would add ".npz" to the temporary's name)
        np.savez_compressed(f, **arrays)
