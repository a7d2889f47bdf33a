"""Slide- and patient-level encoders: the aggregation stage after the tile stage.

Each published model lives in its own module (``gigapath``, ``titan``,
``moozy``, ``prism``) as a native PyTorch implementation whose parameter
names load the official checkpoint, and registers its preset(s) with
`register_preset(name, level="slide" | "patient")`.
"""

from slide2vec_dask.encoders.aggregators.base import AggregatorSpec, SlideEncoding

__all__ = ["AggregatorSpec", "SlideEncoding"]
