"""What block tasks read from, named small enough to travel with every task: a slide or a tile archive."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slide2vec_dask.slide.base import reopen
from slide2vec_dask.tiling.archive import read_archive_tiles


@dataclass(frozen=True)
class SlideRef:
    """A slide as tasks name it: reopened (once per process) where it is read."""

    path: str
    backend: str
    spacing_at_level_0: float | None

    @classmethod
    def of(cls, slide) -> "SlideRef":
        return cls(*slide.__reduce__()[1])   # (path, backend, spacing override): how a slide pickles

    def open(self):
        return reopen(self.path, self.backend, self.spacing_at_level_0)

    def read(self, level: int, y: int, x: int, height: int, width: int, scale: int = 1,
             needed: np.ndarray | None = None) -> np.ndarray:
        """The window's pixels; at 1/``scale`` (decoded so by the codec) when ``scale`` > 1; ``needed``:
        the level-pixel rectangles of its tiles (`Slide.read_level`: file tiles under none are skipped)."""
        return self.open().read_level_scaled(level, y, x, height, width, scale, needed)


@dataclass(frozen=True)
class ArchiveRef:
    """A tile archive (hs2p's ``.tiles.tar``) as tasks name it: blocks read their tiles' JPEG bytes."""

    path: str
    tile: int

    def read(self, offsets: np.ndarray, sizes: np.ndarray, xy: np.ndarray) -> np.ndarray:
        return read_archive_tiles(self.path, offsets, sizes, xy, self.tile)


def source_of(slide, plan) -> SlideRef | ArchiveRef:
    """Where a plan's blocks are read: its slide, or (``slide`` None) the archive the plan names."""
    return ArchiveRef(plan.archive, plan.read_tile_size_px) if slide is None else SlideRef.of(slide)


def read_block(source, *arguments) -> np.ndarray:
    """A block's pixels (or an archive block's tiles) straight from the file (runs on any worker)."""
    return source.read(*arguments)
