"""Learned tissue and artefact masks: HEST, GrandQC and SAM2, as segmentation methods.

* `catalog` - the models as data (µm/px, patch, weights, extra);
* `geometry` - reading at the model's µm/px, patches, stitching, mapping back (numpy, PIL);
* `models` - architectures from their packages, publishers' checkpoint layouts, the per-process cache;
* `run` - a slide's mask on the plan's mask grid: what `tiling.plan` calls.


The package itself stays light (the config imports its catalog); numpy and torch
come with `run` and `models`.
"""

from slide2vec_dask.tissue.catalog import ARTIFACT_MODES, ARTIFACT_SPACINGS, LEARNED_METHODS

__all__ = ["ARTIFACT_MODES", "ARTIFACT_SPACINGS", "LEARNED_METHODS"]
