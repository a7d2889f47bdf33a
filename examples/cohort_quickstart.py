"""Embed a cohort into one Zarr store on this machine: a plain script, no set-up, nothing to download.

    python examples/cohort_quickstart.py [MANIFEST.csv] [--output-dir DIR]

Without a manifest, five small synthetic H&E-like slides are written first
(one without tissue). The weights are random; for real features use
``Model.from_preset(...)`` with a ``checkpoint_path`` or the Hugging Face
cache. Like a user's own script, this file has no ``if __name__ ==
"__main__":`` guard: the embedded local cluster does not need one.
"""

import argparse
import tempfile
from pathlib import Path

from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig, open_embeddings, testing

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("manifest", nargs="?", help="CSV with sample_id,image_path[,mask_path,spacing_at_level_0]")
parser.add_argument("--output-dir", default=None, help="where embeddings.zarr and process_list.csv go")
args = parser.parse_args()

output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="slide2vec-cohort-"))
manifest = args.manifest
if manifest is None:
    folder = output_dir / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["sample_id,image_path"]
    for i in range(5):
        rects = [] if i == 4 else [(224 * (i % 3), 224, 1120 + 224 * (i % 3), 1568)]
        image = testing.tissue_image(1792, 2240, rects, seed=i)
        rows.append(f"case-{i},{testing.write_svs(folder / f'case-{i}.svs', image, mpp=0.5, downsamples=(1, 4))}")
    manifest = output_dir / "slides.csv"
    manifest.write_text("\n".join(rows) + "\n")

pipeline = Pipeline(
    Model.from_timm("vit_tiny_patch16_224"),       # random weights: nothing to download
    preprocessing=PreprocessingConfig(requested_spacing_um=0.5, requested_tile_size_px=224),
    execution=ExecutionOptions(output_dir=output_dir, batch_size=32),
)
result = pipeline.run(manifest_path=manifest)

print(f"{result.num_succeeded} succeeded, {result.num_skipped} skipped, {result.num_failed} failed")
for outcome in result.outcomes:
    print(f"  {outcome.sample_id}: {outcome.status}, {outcome.num_tiles} tiles {outcome.error}".rstrip())
tree = open_embeddings(output_dir)
print(f"store {result.store_path}: slides {sorted(tree['tiles'].children)}")
