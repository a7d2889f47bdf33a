"""A slide2vec 7.1.4 user's script: image embeddings, dense region grids, dense image grids.

Run as ``python slide2vec_user_dense.py LIBRARY WEIGHTS SLIDE IMAGES_DIR OUTPUT_DIR`` with
LIBRARY ``slide2vec`` (in slide2vec's own venv) or ``slide2vec_dask``: the calls below are
slide2vec's, by its field names, and only the import changes.  The encoder is a random
ViT-S/16 whose weights are in WEIGHTS (a state dict), registered with slide2vec's
``register_encoder``, or given to slide2vec-dask with ``Model.from_timm``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

LIBRARY, WEIGHTS, SLIDE, IMAGES, OUT = sys.argv[1:6]
s2v = importlib.import_module(LIBRARY)
Model, ExecutionOptions = s2v.Model, s2v.ExecutionOptions
ImageSpec, SlideRegions, DenseOptions, DenseImageOptions = (s2v.ImageSpec, s2v.SlideRegions, s2v.DenseOptions,
                                                            s2v.DenseImageOptions)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def encoder() -> "Model":
    """The one part that differs: how a custom random-weight timm encoder is declared."""
    import torch

    if LIBRARY == "slide2vec_dask":
        return Model.from_timm("vit_small_patch16_224", checkpoint_path=WEIGHTS, dynamic_img_size=True,
                               mean=MEAN, std=STD, spacing_um=0.5, tile_size_px=224)
    from torchvision.transforms import v2

    from slide2vec.encoders.base import TimmTileEncoder
    from slide2vec.encoders.registry import register_encoder

    @register_encoder("peer-vits16", encode_dim=384, input_size=224, supports_variable_input_size=True,
                      patch_size=16, supported_spacing_um=0.5, precision="fp32", source="random weights")
    class PeerViTS16(TimmTileEncoder):
        def __init__(self, *, output_variant=None):
            super().__init__("vit_small_patch16_224", output_variant=output_variant, pretrained=False,
                             dynamic_img_size=True)
            self._model.load_state_dict(torch.load(WEIGHTS, weights_only=True))

        def get_transform(self):
            return v2.Compose([v2.ToImage(), v2.Resize((224, 224), antialias=True),
                               v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=MEAN, std=STD)])

        def get_normalization_transform(self):
            return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=MEAN, std=STD)])

    return Model.from_preset("peer-vits16")


model = encoder()
images = sorted(Path(IMAGES).glob("*.png"))
out = Path(OUT)
execution = ExecutionOptions(output_dir=out / "images", precision="fp32")
model.embed_images([ImageSpec(sample_id=p.stem, image_path=p) for p in images], execution=execution)

coordinates = [(448, 448), (2240, 2240)]
regions = [SlideRegions(sample_id="syn", image_path=SLIDE, coordinates=coordinates),
           SlideRegions(sample_id="syn", image_path=SLIDE, coordinates=coordinates[:1], annotation="tumor")]
runs = {
    "grid": DenseOptions(spacing_um=0.5, target_size=224),
    "padded": DenseOptions(spacing_um=0.5, target_size=200, pad_mode="replicate"),
    "prenorm": DenseOptions(spacing_um=0.5, target_size=224, feature_kind="patch_features_prenorm"),
    "attention": DenseOptions(spacing_um=0.5, target_size=224, feature_kind="cls_attention",
                              attention_blocks=(0, -1)),
    "windows": DenseOptions(spacing_um=0.5, target_size=448, window_size=224, overlap=0.5),
}
for name, dense in runs.items():
    model.embed_regions_dense(regions, dense=dense, execution=ExecutionOptions(output_dir=out / name, precision="fp32"))

specs = [ImageSpec(sample_id=p.stem, image_path=p, spacing_at_level_0=0.5) for p in images]
image_runs = {
    "dense_images": DenseImageOptions(target_size=224, spacing_um=0.5),
    "dense_images_windows": DenseImageOptions(target_size=224, spacing_um=0.5, window_size=160, overlap=0.25,
                                              pad_mode="constant", image_pad_value=0.5),
    "dense_images_attention": DenseImageOptions(target_size=224, spacing_um=0.5, feature_kind="cls_attention"),
}
for name, dense in image_runs.items():
    model.embed_images_dense(specs, dense=dense, execution=ExecutionOptions(output_dir=out / name, precision="fp32"))
print("done", LIBRARY)
