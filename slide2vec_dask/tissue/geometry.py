"""Exact geometry of a learned mask: read at the model's µm/px, patch, stitch, map back.

One convention everywhere, the one the tile plan uses: pixel ``j`` of an
image whose pixels are ``r`` level-0 pixels wide covers level-0
``[j*r, (j+1)*r)``.  So

* the model's image (`model_grid`) has ``ceil(size0 / r)`` pixels a side
  (the last one may reach past the slide: white, as glass);
* it is read band by band from the coarsest level that is still at least as
  fine (`read_band`), the level's pixels resampled onto the model's grid
  with the exact fractional box (PIL's ``box``), never by rounding a scale;
* patches are cut from the bands with an optional overlap; overlapping
  scores are averaged (`Stitcher`);
* the model's pixels are mapped to the mask grid by their *centres*
  (`Stitcher.result`): a mask pixel is tissue when most model pixels centred
  in it are, or, for a model coarser than the mask, when the model pixel
  under its centre is.  Nothing is rounded to a patch, so a slide whose
  level-0 size is not a multiple of the patch gets no shift (the
  TRIDENT#121 kind of bug).

numpy and PIL only: this module runs without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# a band's resampling drifts by less than this many model pixels over its width: no resize
_NO_RESIZE_DRIFT = 0.5


@dataclass(frozen=True)
class ModelGrid:
    """The model's view of a slide: ``r`` level-0 pixels per model pixel, ``shape`` model pixels."""

    level0_shape: tuple[int, int]
    r: float
    shape: tuple[int, int]
    level: int             # the pyramid level read
    scale: float           # that level's pixels per model pixel (>= ~1: reads shrink, never enlarge)


def model_grid(slide, spacing_um: float, tolerance: float = 0.05) -> ModelGrid:
    """Where the model reads: the coarsest level at most ``spacing_um`` (within ``tolerance``)."""
    h0, w0 = (int(v) for v in slide.level_shapes[0])
    r = float(spacing_um) / float(slide.spacing)
    spacings = slide.level_spacings
    fitting = [i for i, s in enumerate(spacings) if s <= spacing_um * (1 + tolerance)]
    level = max(fitting, key=lambda i: spacings[i]) if fitting else 0
    shape = (max(1, math.ceil(h0 / r - 1e-9)), max(1, math.ceil(w0 / r - 1e-9)))
    return ModelGrid((h0, w0), r, shape, level, r / float(slide.level_downsamples[level]))


def read_band(slide, grid: ModelGrid, y: int, height: int, chunk: int = 2048) -> np.ndarray:
    """Model-grid rows ``[y, y + height)``, all columns: ``(height, width, 3)`` uint8, white past the slide.

    Read ``chunk`` model columns at a time, so a wide slide read from a much finer level never
    holds more than a block of it; each chunk is resampled with its own exact box, so the chunks
    are the whole band's pixels.
    """
    width = grid.shape[1]
    if abs(grid.scale - 1.0) * max(grid.shape) < _NO_RESIZE_DRIFT:   # the level is the model's grid
        return slide.read_level(grid.level, y, 0, height, width)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for x in range(0, width, chunk):
        out[:, x : x + chunk] = _resampled(slide, grid, y, x, height, min(chunk, width - x))
    return out


def _resampled(slide, grid: ModelGrid, y: int, x: int, height: int, width: int) -> np.ndarray:
    """Model pixels ``[y, y+height) x [x, x+width)`` from the level, by their exact level-pixel box."""
    from PIL import Image

    s = grid.scale
    margin = math.ceil(s) + 1                                 # the resampling filter's reach
    top, bottom, left, right = y * s, (y + height) * s, x * s, (x + width) * s
    ry0, rx0 = math.floor(top) - margin, math.floor(left) - margin
    ry1, rx1 = math.ceil(bottom) + margin, math.ceil(right) + margin
    window = slide.read_level(grid.level, ry0, rx0, ry1 - ry0, rx1 - rx0)
    box = (left - rx0, top - ry0, right - rx0, bottom - ry0)
    resample = Image.BOX if s >= 1 else Image.BILINEAR      # area average when shrinking
    return np.asarray(Image.fromarray(window).resize((width, height), resample, box=box))


def patch_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Patch origins along one axis: stride ``patch - overlap``, the last patch may reach past the end."""
    stride = max(1, patch - overlap)
    starts = list(range(0, max(size - overlap, 1), stride))
    return starts or [0]


class Stitcher:
    """Averages patch scores on the model grid band by band and folds finished rows into the mask grid.

    Memory stays at one band of model rows (plus the overlap) and the mask grid's counters,
    however large the slide.
    """

    def __init__(self, grid: ModelGrid, mask_shape: tuple[int, int]):
        self.grid, self.mask_shape = grid, mask_shape
        h0, w0 = grid.level0_shape
        mh, mw = mask_shape
        # model pixel -> the mask pixel its centre falls in
        self.rows = np.minimum(((np.arange(grid.shape[0]) + 0.5) * grid.r * mh / h0).astype(np.int64), mh - 1)
        self.cols = np.minimum(((np.arange(grid.shape[1]) + 0.5) * grid.r * mw / w0).astype(np.int64), mw - 1)
        self.coarse = grid.r >= min(h0 / mh, w0 / mw)   # model pixels larger than mask pixels: keep them all
        self.full = np.zeros(grid.shape, dtype=bool) if self.coarse else None
        self.tissue = np.zeros(mh * mw, dtype=np.float64)
        self.score = np.zeros((0, grid.shape[1]), dtype=np.float32)
        self.count = np.zeros((0, grid.shape[1]), dtype=np.uint8)
        self.top = 0   # model row of score[0]

    def add(self, y: int, x: int, scores: np.ndarray) -> None:
        """Scores of one patch whose origin is model pixel (y, x); parts past the grid are dropped."""
        h = min(scores.shape[0], self.grid.shape[0] - y)
        w = min(scores.shape[1], self.grid.shape[1] - x)
        need = y + h - self.top
        if need > self.score.shape[0]:
            extra = need - self.score.shape[0]
            self.score = np.vstack([self.score, np.zeros((extra, self.grid.shape[1]), np.float32)])
            self.count = np.vstack([self.count, np.zeros((extra, self.grid.shape[1]), np.uint8)])
        self.score[y - self.top : y - self.top + h, x : x + w] += scores[:h, :w]
        self.count[y - self.top : y - self.top + h, x : x + w] += 1

    def finish_rows(self, upto: int, decide) -> None:
        """Rows above model row ``upto`` get no more patches: ``decide(mean score) -> bool`` and fold them."""
        n = min(upto, self.grid.shape[0]) - self.top
        if n <= 0:
            return
        mean = self.score[:n] / np.maximum(self.count[:n], 1)
        keep = decide(mean) & (self.count[:n] > 0)
        rows = np.arange(self.top, self.top + n)
        if self.coarse:
            self.full[rows] = keep
        else:
            mw = self.mask_shape[1]
            index = (self.rows[rows][:, None] * mw + self.cols[None, :]).ravel()
            self.tissue += np.bincount(index, weights=keep.ravel(), minlength=self.tissue.size)
        self.score, self.count = self.score[n:], self.count[n:]
        self.top += n

    def result(self) -> np.ndarray:
        """The boolean mask on the mask grid."""
        mh, mw = self.mask_shape
        h0, w0 = self.grid.level0_shape
        if self.coarse:   # each mask pixel takes the model pixel under its centre
            ry = np.minimum(((np.arange(mh) + 0.5) * h0 / mh / self.grid.r).astype(np.int64), self.grid.shape[0] - 1)
            rx = np.minimum(((np.arange(mw) + 0.5) * w0 / mw / self.grid.r).astype(np.int64), self.grid.shape[1] - 1)
            return self.full[ry][:, rx]
        per_row = np.bincount(self.rows, minlength=mh)
        per_col = np.bincount(self.cols, minlength=mw)
        total = np.outer(per_row, per_col).ravel()
        return (self.tissue * 2 >= np.maximum(total, 1)).reshape(mh, mw) & (total > 0).reshape(mh, mw)
