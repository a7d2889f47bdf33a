"""Building, loading and running the learned segmenters; one cached copy per process and device.

Architectures come from their maintained packages (torchvision's
DeepLabV3-ResNet50 for HEST, ``segmentation_models_pytorch`` for GrandQC,
``sam2`` for SAM2.1); each checkpoint is read in its publisher's layout and
loaded strictly, so a file of another model is refused by name instead of
half-loading.  Torch is imported when a model is built, never at import.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slide2vec_dask.tissue.catalog import ARTIFACT_REMOVED, IMAGENET_MEAN, IMAGENET_STD, Segmenter

_LOCK = threading.Lock()
_MODELS: dict[tuple, "Loaded"] = {}
_BUILDING: dict[tuple, threading.Lock] = {}
_DEVICE_LOCKS: dict[str, threading.Lock] = {}

# Stand-ins for tests: name -> () -> torch module, replacing an architecture (see slide2vec_dask.testing.masks)
ARCHITECTURES: dict[str, Callable[[], Any]] = {}


class MissingExtraError(ImportError, ValueError):
    """A learned mask's architecture package is not installed (a ValueError too: the slide fails, the run goes on)."""


def require(seg: Segmenter):
    """The segmenter's package, or an error naming the extra that installs it."""
    try:
        return importlib.import_module(seg.package)
    except ImportError as exc:
        raise MissingExtraError(
            f"segmentation method {seg.name!r} needs the {seg.package!r} package ({exc}); install it with "
            f"`pip install 'slide2vec-dask[{seg.extra}]'`") from exc


def architecture(seg: Segmenter, config_path: Path | None = None):
    """The untrained module, as its publisher builds it."""
    if seg.name in ARCHITECTURES:
        return ARCHITECTURES[seg.name]()
    require(seg)
    if seg.name == "hest":   # TRIDENT: deeplabv3_resnet50 with a 2-class head, no auxiliary head
        from torchvision.models.segmentation import deeplabv3_resnet50

        return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=False)
    if seg.name in ("grandqc", "grandqc-artifacts"):
        import segmentation_models_pytorch as smp

        cls = smp.UnetPlusPlus if seg.name == "grandqc" else smp.Unet
        with warnings.catch_warnings():   # smp deprecates the "timm-" encoders; GrandQC's keys are theirs
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls(encoder_name="timm-efficientnet-b0", encoder_weights=None,
                       classes=2 if seg.name == "grandqc" else 8, activation=None)
    if seg.name == "sam2":
        return _sam2_model(config_path)
    raise ValueError(f"unknown segmenter {seg.name!r}")


def _sam2_model(config_path: Path):
    """SAM2 built from its yaml (``model:`` section, hydra ``_target_`` entries), as hs2p builds it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = OmegaConf.load(str(config_path))
    return instantiate(conf.get("model", conf), _recursive_=True)


def state_dict_of(seg: Segmenter, path: Path) -> dict:
    """The tensors of ``path`` in the module's own keys, from the publisher's layout."""
    import torch

    expected = seg.weights.describe_files()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot be read as a weights-only checkpoint for segmentation method {seg.name!r} "
            f"(expected {expected}; {type(exc).__name__}: {str(exc)[:200]}). A file that pickles the whole "
            "model (GrandQC's original release) can be converted once with "
            "torch.save(torch.load(f, weights_only=False).state_dict(), 'out.pth')") from exc
    if seg.name == "hest":   # a Lightning checkpoint: state_dict under "model.", plus an auxiliary head
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ValueError(f"{path}: not a HEST tissue checkpoint: expected a Lightning checkpoint with a "
                             f"'state_dict' entry ({expected})")
        return {k[len("model."):] if k.startswith("model.") else k: v
                for k, v in ckpt["state_dict"].items() if "aux" not in k}
    if seg.name == "sam2":
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise ValueError(f"{path}: not a SAM2 checkpoint: expected {{'model': state_dict}} ({expected})")
        return ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: not a {seg.title} checkpoint: expected a plain state dict ({expected})")
    return ckpt


def load_strict(seg: Segmenter, module, state: dict, path: Path) -> None:
    """Every key of the module from the file and nothing else; a mismatch names the file and the model."""
    ours = module.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = sorted(k for k in set(ours) & set(state) if tuple(ours[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing key(s) (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else ""]
        raise ValueError(f"{path} is not a checkpoint of {seg.title} (expected {seg.weights.describe_files()}): "
                         + "; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)


class Loaded:
    """A segmenter on a device: ``scores(patches)`` -> per-pixel score (what `decide` thresholds)."""

    def __init__(self, seg: Segmenter, device: str, checkpoint: Path, config_path: Path | None = None,
                 removed: tuple[int, ...] = ()):
        import torch

        self.seg, self.device, self.removed = seg, device, removed
        module = architecture(seg, config_path)
        load_strict(seg, module, state_dict_of(seg, checkpoint), checkpoint)
        self.module = module.to(device).eval()
        self.num_params = sum(p.numel() for p in module.parameters())
        self.dtype = torch.float16 if device.startswith("cuda") and seg.cuda_precision == "fp16" else None
        if seg.name == "sam2":
            from sam2.sam2_image_predictor import SAM2ImagePredictor

            self.predictor = SAM2ImagePredictor(self.module)

    def preprocess(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) as the model was trained to see them (GrandQC: after a JPEG q80 round trip)."""
        if self.seg.jpeg_quality is None:
            return patches
        return np.stack([jpeg_round_trip(p, self.seg.jpeg_quality) for p in patches])

    def scores(self, patches: np.ndarray) -> np.ndarray:
        """float32 (N, H, W): tissue probability (HEST, GrandQC), or 1 where an artefact class wins."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(self.preprocess(patches))).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            out = self.module(x)
            logits = out["out"] if isinstance(out, dict) else out
            probs = torch.softmax(logits.float(), dim=1)
        if self.seg.name == "hest":
            return probs[:, 1].cpu().numpy()
        if self.seg.name == "grandqc":
            return probs[:, 0].cpu().numpy()
        classes = probs.argmax(dim=1)
        removed = torch.tensor(self.removed, device=classes.device)
        return torch.isin(classes, removed).float().cpu().numpy()

    def sam2_scores(self, image: np.ndarray) -> np.ndarray:
        """SAM2 on the whole image: padded white to a square, one box prompt over the image (hs2p's way)."""
        import torch

        h, w = image.shape[:2]
        side = max(h, w)
        padded = np.full((side, side, 3), 255, dtype=np.uint8)
        padded[:h, :w] = image
        with torch.inference_mode():
            self.predictor.set_image(padded)
            logits, _, _ = self.predictor.predict(point_coords=None, point_labels=None,
                                                  box=np.array([0, 0, w, h], dtype=np.float32),
                                                  multimask_output=False, return_logits=True)
        logits = np.asarray(logits[0], dtype=np.float32)[:h, :w]
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))


def jpeg_round_trip(patch: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode as JPEG the way GrandQC's pipeline does (OpenCV, the array taken as BGR)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", patch, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError("JPEG encoding of a patch failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def resolve_device(device: str) -> str:
    """``auto``: this worker's GPU when it has one, else its CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"segmentation device {device!r}: this worker sees no CUDA device; use 'auto' or 'cpu'")
    return device


def get_model(seg: Segmenter, device: str, checkpoint: Path, config_path: Path | None = None,
              removed: tuple[int, ...] = ()) -> Loaded:
    """The model built on ``device`` once per process, then reused by every slide."""
    key = (seg.key(str(checkpoint), None if config_path is None else str(config_path)), device, removed,
           id(ARCHITECTURES.get(seg.name)))
    with _LOCK:
        model = _MODELS.get(key)
        building = _BUILDING.setdefault(key, threading.Lock())
    if model is not None:
        return model
    with building:   # two slides asking at once build it once
        with _LOCK:
            model = _MODELS.get(key)
        if model is None:
            model = Loaded(seg, device, checkpoint, config_path, removed)
            with _LOCK:
                _MODELS[key] = model
    return model


def device_lock(device: str) -> threading.Lock:
    """One model call at a time per device (slides planned in parallel take turns)."""
    with _LOCK:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


def loaded_model_keys() -> list[tuple[str, str]]:
    """(segmenter, device) of each model this process holds (tests, diagnostics)."""
    with _LOCK:
        return [(model.seg.name, model.device) for model in _MODELS.values()]


def release_models() -> None:
    """Free every cached segmenter (tests; a worker that needs the memory back)."""
    with _LOCK:
        _MODELS.clear()
        _BUILDING.clear()


def removed_classes(mode: str) -> tuple[int, ...]:
    return ARTIFACT_REMOVED[mode]
