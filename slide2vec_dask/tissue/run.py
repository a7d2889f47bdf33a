"""A slide's learned tissue mask, and its artefact pass, on the plan's mask grid.

`learned_tissue_mask` and `remove_artifacts` are what tiling calls: the
slide and the mask grid's shape in, a boolean mask of that shape out, so
tile fractions, previews, hierarchical regions and exports use it as they
use a threshold mask.  The model reads the slide band by band at its own
µm/px (`geometry`), patches are batched per slide, and the model is built
once per process and device (`models`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from slide2vec_dask.atomic import atomic
from slide2vec_dask.tissue import geometry, models
from slide2vec_dask.tissue.catalog import ARTIFACTS, TISSUE, Segmenter

_SAM2_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def uses_model(segmentation: Mapping[str, Any]) -> bool:
    """Whether planning runs a learned model (so the plan task belongs where the GPUs are)."""
    return segmentation.get("method") in TISSUE or segmentation.get("artifacts") is not None


def learned_tissue_mask(slide, segmentation: Mapping[str, Any], shape: tuple[int, int],
                        sample_id: str = "") -> np.ndarray:
    """The method's tissue mask on a ``shape`` grid over the whole slide (the thumbnail's)."""
    seg = TISSUE[segmentation["method"]]
    spacing = segmentation["model_spacing_um"] or seg.spacing_um
    if seg.name == "sam2":
        device = models.resolve_device(segmentation["sam2_device"] or segmentation["device"])
        with _sam2_slot(segmentation["sam2_num_workers"]):
            model = models.get_model(seg, device, _weights(seg, segmentation["sam2_checkpoint_path"], sample_id),
                                     _sam2_config(seg, segmentation["sam2_config_path"], sample_id))
            grid = geometry.model_grid(slide, spacing)
            image = geometry.read_band(slide, grid, 0, grid.shape[0])
            with models.device_lock(device):
                scores = model.sam2_scores(image)
        stitcher = geometry.Stitcher(grid, shape)
        stitcher.add(0, 0, scores)
        stitcher.finish_rows(grid.shape[0], lambda s: s > segmentation["confidence_threshold"])
        mask = stitcher.result()
    else:
        thr = float(segmentation["confidence_threshold"])
        # TRIDENT: HEST keeps p(tissue) > thr; GrandQC keeps class 0 when it wins with p >= thr
        decide = (lambda s: s > thr) if seg.name == "hest" else (lambda s: s >= max(thr, 0.5))
        device = models.resolve_device(segmentation["device"])
        model = models.get_model(seg, device, _weights(seg, segmentation["checkpoint_path"], sample_id))
        mask = _patched(slide, model, spacing, segmentation, shape, decide, device)
    return _closed(mask, segmentation["close"])


def remove_artifacts(slide, segmentation: Mapping[str, Any], mask: np.ndarray, sample_id: str = "") -> np.ndarray:
    """``mask`` less what GrandQC's artefact model labels an artefact (all classes, or pen marks only)."""
    mode = segmentation["artifacts"]
    if mode is None:
        return mask
    seg = ARTIFACTS[float(segmentation["artifacts_spacing_um"])]
    device = models.resolve_device(segmentation["device"])
    model = models.get_model(seg, device, _weights(seg, segmentation["artifacts_checkpoint_path"], sample_id),
                             removed=models.removed_classes(mode))
    artifact = _patched(slide, model, seg.spacing_um, segmentation, mask.shape, lambda s: s >= 0.5, device)
    return mask & ~artifact


def _patched(slide, model: models.Loaded, spacing: float, segmentation: Mapping[str, Any],
             shape: tuple[int, int], decide, device: str) -> np.ndarray:
    """Patches of the model's grid, a band at a time, batched; stitched onto the mask grid."""
    patch = int(segmentation["patch_size"] or model.seg.patch)
    overlap = int(segmentation["overlap"])
    if overlap >= patch:
        raise ValueError(f"segmentation.overlap ({overlap}) must be smaller than the patch ({patch} px)")
    batch = int(segmentation["batch_size"])
    grid = geometry.model_grid(slide, spacing)
    stitcher = geometry.Stitcher(grid, shape)
    xs = geometry.patch_starts(grid.shape[1], patch, overlap)
    width = xs[-1] + patch
    for y in geometry.patch_starts(grid.shape[0], patch, overlap):
        band = geometry.read_band(slide, grid, y, patch)
        if band.shape[1] < width:   # the last patch reaches past the slide: glass
            band = np.pad(band, ((0, 0), (0, width - band.shape[1]), (0, 0)), constant_values=255)
        patches = np.stack([band[:, x : x + patch] for x in xs])
        for i in range(0, len(xs), batch):
            with models.device_lock(device):
                scores = model.scores(patches[i : i + batch])
            for x, s in zip(xs[i : i + batch], scores):
                stitcher.add(y, x, s)
        stitcher.finish_rows(y + patch - overlap, decide)
    stitcher.finish_rows(grid.shape[0], decide)
    return stitcher.result()


def _weights(seg: Segmenter, checkpoint_path, sample_id: str) -> Path:
    """The local checkpoint, else the hub file (cache first; ``HF_HUB_OFFLINE`` honoured)."""
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{sample_id or 'slide'}: {seg.name} checkpoint not found: {path}")
        return path
    return seg.weights.resolve(f"segmentation:{seg.name}")


def _sam2_config(seg: Segmenter, config_path, sample_id: str) -> Path:
    if config_path is not None:
        path = Path(config_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{sample_id or 'slide'}: SAM2 config not found: {path}")
        return path
    return seg.config.resolve("segmentation:sam2")


def _sam2_slot(limit: int | None):
    """hs2p's ``sam2_num_workers``: at most that many slides segmented by SAM2 at once in this process."""
    if limit is None:
        return _NoSlot()
    with _SLOTS_LOCK:
        return _SAM2_SLOTS.setdefault(int(limit), threading.BoundedSemaphore(int(limit)))


class _NoSlot:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _closed(mask: np.ndarray, close: int) -> np.ndarray:
    """The same closing the threshold methods apply (``segmentation.close``; 0: the model's mask as is)."""
    if not close or not mask.any():
        return mask
    from scipy import ndimage

    structure = np.ones((int(close),) * 2, dtype=bool)
    return ndimage.binary_closing(mask, structure=structure, border_value=0) | mask


def mask_file(plan_path: Path) -> Path:
    """Where a plan's learned mask is saved: ``<sample>.mask.png`` next to ``<sample>.npz``."""
    return Path(plan_path).with_suffix(".mask.png")


def save_mask(mask: np.ndarray, path: Path) -> Path:
    """The mask as a 1-bit PNG (mask grid = the plan's segmentation grid), written aside and renamed."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic(path, lambda tmp: Image.fromarray(mask.astype(bool)).save(tmp, format="PNG"))


def load_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("1"), dtype=bool)
