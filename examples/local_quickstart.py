"""Embed one slide on this machine, no set-up.

    python examples/local_quickstart.py [SLIDE] [--output-dir DIR]

Without SLIDE a small synthetic H&E-like slide is written first, so the
example runs anywhere. Weights are random (no download): swap in
``Model.from_preset(...)`` or a ``checkpoint_path`` for real features.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from slide2vec_dask import ExecutionOptions, Model, PreprocessingConfig, testing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", nargs="?", help="a whole-slide image (SVS, TIFF, NDPI, MRXS, ...)")
    parser.add_argument("--output-dir", default=None, help="where previews and the tile plan go")
    args = parser.parse_args()

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="slide2vec-"))
    slide = args.slide
    if slide is None:
        image = testing.tissue_image(2688, 3584, [(224, 448, 1568, 1792), (1792, 2240, 2464, 3360)])
        slide = testing.write_svs(output_dir / "synthetic.svs", image, mpp=0.5)

    model = Model.from_timm("vit_small_patch16_224")
    embedded = model.embed_slide(
        slide,
        preprocessing=PreprocessingConfig(
            requested_spacing_um=0.5,
            requested_tile_size_px=224,
            preview={"save_mask_preview": True, "save_tiling_preview": True},
        ),
        execution=ExecutionOptions(output_dir=output_dir, batch_size=32),
    )
    print(f"{embedded.sample_id}: {embedded.num_tiles} tiles, embeddings {tuple(embedded.tile_embeddings.shape)}")
    print(f"first tile at level-0 (x={embedded.x[0]}, y={embedded.y[0]}), {embedded.tile_size_lv0} px wide")
    print(f"tiling preview: {embedded.tiling_preview_path}")
    print(embedded.to_xarray())


if __name__ == "__main__":
    main()
