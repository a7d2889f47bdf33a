"""Random checkpoints of the learned mask models, in each publisher's file layout, and stand-ins.

* `hest_checkpoint` - a Lightning checkpoint as ``MahmoodLab/hest-tissue-seg``'s
  ``deeplabv3_seg_v4.ckpt``: ``state_dict`` keys under ``model.``, with the
  auxiliary head the loader must drop, next to Lightning's own entries;
* `grandqc_checkpoint`, `grandqc_artifact_checkpoint` - plain state dicts
  (``Tissue_Detection_MPP10.pth``, ``GrandQC_MPP1_state_dict.pth``);
* `sam2_checkpoint` - ``{"model": state_dict}`` as AtlasPatch's ``model.pth``,
  built from `sam2_config` (the SAM2.1 Hiera-tiny yaml);
* `DarkIsTissue` and `stand_in` - a one-layer model whose weights are set by
  hand to say "tissue where the pixel is darker than a grey level", in the
  official layouts, to test the plumbing where the answer is known.

Torch and the architectures' packages are imported when a writer runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from slide2vec_dask.testing.checkpoints import random_state
from slide2vec_dask.tissue import models
from slide2vec_dask.tissue.catalog import ARTIFACTS, GRANDQC, IMAGENET_MEAN, IMAGENET_STD, SAM2

__all__ = ["DarkIsTissue", "grandqc_artifact_checkpoint", "grandqc_checkpoint", "hest_checkpoint",
           "sam2_checkpoint", "sam2_config", "stand_in", "stand_in_checkpoint"]


def hest_checkpoint(path: str | Path, seed: int = 0, module=None) -> Path:
    """A HEST Lightning checkpoint (random weights unless ``module`` is given)."""
    import torch
    from torchvision.models.segmentation import deeplabv3_resnet50

    if module is None:
        module = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2, aux_loss=True)
        state = random_state(module, seed)
    else:
        state = dict(module.state_dict())
        state["aux_classifier.4.weight"] = torch.zeros(2, 256, 1, 1)   # the head TRIDENT drops
    ckpt = {"epoch": 41, "global_step": 12345, "pytorch-lightning_version": "1.9.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()}, "lr_schedulers": [],
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 1e-4, "num_classes": 2}}
    torch.save(ckpt, path)
    return Path(path)


def grandqc_checkpoint(path: str | Path, seed: int = 0, module=None) -> Path:
    """GrandQC's tissue detector (UNet++, timm-efficientnet-b0, 2 classes) as a plain state dict."""
    return _plain(path, module if module is not None else models.architecture(GRANDQC), seed, module is None)


def grandqc_artifact_checkpoint(path: str | Path, seed: int = 0, module=None) -> Path:
    """GrandQC's artefact model (U-Net, timm-efficientnet-b0, 8 classes) as a plain state dict."""
    return _plain(path, module if module is not None else models.architecture(ARTIFACTS[1.0]), seed,
                  module is None)


def sam2_config() -> Path:
    """The SAM2.1 Hiera-tiny yaml the ``sam2`` package ships (the config AtlasPatch publishes)."""
    import sam2

    return Path(sam2.__file__).parent / "configs" / "sam2.1" / "sam2.1_hiera_t.yaml"


def sam2_checkpoint(path: str | Path, seed: int = 0, config: str | Path | None = None) -> Path:
    """AtlasPatch's ``model.pth`` layout: ``{"model": state_dict}`` of SAM2.1 Hiera-tiny."""
    import torch

    module = models.architecture(SAM2, Path(config) if config else sam2_config())
    torch.save({"model": random_state(module, seed)}, path)
    return Path(path)


def _plain(path, module, seed: int, random: bool) -> Path:
    import torch

    torch.save(random_state(module, seed) if random else dict(module.state_dict()), path)
    return Path(path)


def DarkIsTissue(classes: int = 2, tissue_class: int = 1, grey: float = 128.0, hest_output: bool = False,
                 other_class: int | None = None):
    """A 1x1 convolution on the normalised pixel: ``tissue_class`` wins where grey < ``grey``.

    ``other_class`` (default the first class that is not ``tissue_class``) wins elsewhere; the
    rest are never chosen.  ``hest_output``: return ``{"out": logits}`` as torchvision's DeepLabV3.
    """
    import torch
    from torch import nn

    other = other_class if other_class is not None else (0 if tissue_class != 0 else 1)

    class _Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, classes, 1)
            self.inputs: list = []
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.fill_(-100.0)
                # grey = sum_c w_c * (x_c*std_c + mean_c)*255, x the normalised input
                coef = torch.tensor([0.299, 0.587, 0.114])
                std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
                k = 0.5   # logit units per grey level
                w = -k * coef * std * 255
                b = k * (grey - float((coef * mean * 255).sum()))
                self.head.weight[tissue_class, :, 0, 0] = w
                self.head.bias[tissue_class] = b
                self.head.bias[other] = 0.0

        def forward(self, x):
            self.inputs.append(x.detach().cpu())
            logits = self.head(x)
            return {"out": logits} if hest_output else logits

    return _Net()


@contextlib.contextmanager
def stand_in(name: str, factory):
    """Build ``factory()`` instead of ``name``'s architecture while the block runs (this process)."""
    models.ARCHITECTURES[name] = factory
    try:
        yield
    finally:
        models.ARCHITECTURES.pop(name, None)
        models.release_models()


def stand_in_checkpoint(name: str, path: str | Path, module) -> Path:
    """``module``'s weights in the layout of ``name``'s published file."""
    writers = {"hest": hest_checkpoint, "grandqc": grandqc_checkpoint,
               "grandqc-artifacts": grandqc_artifact_checkpoint}
    return writers[name](path, module=module)
