"""The learned segmenters as data: what each reads, where its weights are, which extra builds it.

Each record says what its publisher's own code does (TRIDENT for HEST and
GrandQC, hs2p / AtlasPatch for SAM2): the µm/px the model reads at, the
patch side, the input normalisation, the JPEG round trip GrandQC's tissue
model was trained behind, how its output becomes "tissue", and the hub file
its weights come in (a `Weights` record, resolved like every encoder's:
a local file, else the Hugging Face cache, else the hub).
"""

from __future__ import annotations

from dataclasses import dataclass

from slide2vec_dask.encoders.weights import Weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HEST_REPO = "MahmoodLab/hest-tissue-seg"
ATLASPATCH_REPO = "AtlasAnalyticsLab/AtlasPatch"

# GrandQC's artefact classes (its paper's numbering; 0 is unused)
ARTIFACT_CLASSES = {1: "normal tissue", 2: "fold", 3: "dark spot & foreign object", 4: "pen marking",
                    5: "edge & air bubble", 6: "out of focus", 7: "background"}
# what each artefact mode removes, as TRIDENT's artefact segmenter does (its background goes too)
ARTIFACT_REMOVED = {"all": (2, 3, 4, 5, 6, 7), "pen": (4, 7)}


@dataclass(frozen=True)
class Segmenter:
    """One learned mask model: how it reads a slide and where its weights come from."""

    name: str
    title: str
    spacing_um: float               # µm/px the model reads at
    patch: int | None               # model input side; None: the whole image at once (SAM2)
    weights: Weights
    extra: str                      # ``pip install slide2vec-dask[<extra>]`` brings its architecture
    package: str                    # the module that extra installs (what is imported)
    cuda_precision: str = "fp32"    # autocast dtype on a GPU, as the publisher runs it (CPU: fp32)
    jpeg_quality: int | None = None  # JPEG round trip of each patch before the model (GrandQC tissue)
    config: Weights | None = None   # SAM2: the model's yaml, published next to its weights

    def key(self, checkpoint: str | None, config: str | None) -> str:
        return self.weights.cache_key(self.name, None, self.spacing_um, self.patch, checkpoint, config)


HEST = Segmenter(
    "hest", "HEST tissue segmenter (DeepLabV3-ResNet50, 2 classes)", 1.0, 512,
    Weights(HEST_REPO, ("deeplabv3_seg_v4.ckpt",)), extra="masks", package="torchvision",
    cuda_precision="fp16")
GRANDQC = Segmenter(
    "grandqc", "GrandQC tissue detector (UNet++, timm-efficientnet-b0, 2 classes)", 10.0, 512,
    Weights(HEST_REPO, ("Tissue_Detection_MPP10.pth",)), extra="masks", package="segmentation_models_pytorch",
    cuda_precision="fp16", jpeg_quality=80)
ARTIFACTS = {
    spacing: Segmenter(
        "grandqc-artifacts", f"GrandQC artefact segmenter at {spacing:g} µm/px (U-Net, timm-efficientnet-b0, 8 classes)",
        spacing, 512, Weights(HEST_REPO, (f"GrandQC_MPP{tag}_state_dict.pth", f"GrandQC_MPP{tag}.pth")),
        extra="masks", package="segmentation_models_pytorch")
    for spacing, tag in ((1.0, "1"), (1.5, "15"), (2.0, "2"))
}
SAM2 = Segmenter(
    "sam2", "SAM2.1 Hiera-tiny fine-tuned for tissue (AtlasPatch)", 8.0, None,
    Weights(ATLASPATCH_REPO, ("model.pth",)), extra="sam2", package="sam2",
    config=Weights(ATLASPATCH_REPO, ("sam2.1_hiera_t.yaml",)))

TISSUE = {"hest": HEST, "grandqc": GRANDQC, "sam2": SAM2}
LEARNED_METHODS = tuple(TISSUE)
ARTIFACT_MODES = tuple(ARTIFACT_REMOVED)
ARTIFACT_SPACINGS = tuple(ARTIFACTS)
