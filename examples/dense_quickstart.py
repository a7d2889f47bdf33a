"""Images, regions and dense token grids: every entry point once, on a slide and images it writes itself.

    python examples/dense_quickstart.py --output-dir dense-demo

A random-weight ViT-S/16 (no download); put ``Model.from_preset("uni2")`` or any ViT preset in its place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slide2vec_dask import (DenseImageOptions, DenseOptions, ExecutionOptions, ImageSpec, Model, Pipeline,
                            PreprocessingConfig, SlideRegions, open_embeddings, testing)

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", type=Path, default=Path("dense-demo"))
root = parser.parse_args().output_dir
root.mkdir(parents=True, exist_ok=True)

# inputs: a small pyramidal slide (0.5 µm/px) and two PNG tiles cut from it
pixels = testing.tissue_image(1792, 2240, [(224, 224, 1568, 2016)], seed=1)
slide = testing.write_svs(root / "slide.svs", pixels, mpp=0.5, downsamples=(1, 4))
for name, (y, x) in {"a": (448, 448), "b": (672, 896)}.items():
    Image.fromarray(pixels[y : y + 224, x : x + 224]).save(root / f"{name}.png")

model = Model.from_timm("vit_small_patch16_224", dynamic_img_size=True)
out = ExecutionOptions(output_dir=root / "out")

# one embedding per image: files, or numpy / PIL / torch pixels
images = model.embed_images([ImageSpec(sample_id="a", image_path=root / "a.png"),
                             np.asarray(Image.open(root / "b.png"))], execution=out)
print("embed_images:", [(a.sample_id, tuple(a.load().shape)) for a in images])

# the token grid of each region of interest (level-0 x, y), read at 0.5 µm/px as 448 px, in 224 px windows
grids = model.embed_regions_dense(
    [SlideRegions(sample_id="slide", image_path=slide, coordinates=[(224, 224), (1024, 512)])],
    dense=DenseOptions(spacing_um=0.5, target_size=448, window_size=224, overlap=0.25), execution=out)
print("embed_regions_dense:", [(str(a.path.relative_to(root)), tuple(a.load().shape)) for a in grids])

# the CLS token's attention maps of whole images
attention = model.embed_images_dense(
    [ImageSpec(sample_id="a", image_path=root / "a.png", spacing_at_level_0=0.5)],
    dense=DenseImageOptions(target_size=224, spacing_um=0.5, feature_kind="cls_attention"), execution=out)
print("embed_images_dense:", str(attention[0].path.relative_to(root)), tuple(attention[0].load().shape))

# a live encoder for augmented tensors (training a head on frozen features)
kit = model.prepare_dense_encoder(dense=DenseImageOptions(target_size=224))
augmented = [torch.from_numpy(np.array(Image.open(root / "a.png"))).permute(2, 0, 1).flip(-1)]
features = kit.encode(torch.stack([kit.preprocessor()(t) for t in augmented]))
print("prepare_dense_encoder:", tuple(features.shape), kit.geometry.grid_shape)

# the whole slide: every tissue tile's grid, from the same forward as its embedding, in the run's store
Pipeline(model, PreprocessingConfig(), ExecutionOptions(output_dir=root / "run", save_dense=True)).run(
    slides=[slide])
dense = open_embeddings(root / "run")["dense/slide"].to_dataset()
print("save_dense:", dict(dense.embedding.sizes), dense.embedding.dtype)
