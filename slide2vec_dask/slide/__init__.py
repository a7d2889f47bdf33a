"""Slides opened lazily: metadata at once, pixels as dask blocks."""

from slide2vec_dask.slide.base import MissingSpacingError, Slide, UnreadableSlideError
from slide2vec_dask.slide.open import open_slide

__all__ = ["open_slide", "Slide", "MissingSpacingError", "UnreadableSlideError"]
