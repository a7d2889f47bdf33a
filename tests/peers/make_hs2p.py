"""Run hs2p itself (in its own environment, see setup-hs2p.sh) for tests/test_peers.py.

    python make_hs2p.py make SLIDE SAMPLE_ID OUTPUT_DIR [--spacing 0.5] [--tile-size 224]
                             [--save-tiles] [--backend openslide]
        Tiles SLIDE with hs2p.tile_slides (HSV segmentation, no overlap) into OUTPUT_DIR
        (artifacts under OUTPUT_DIR/tiles/) and prints one JSON object: the artifact paths,
        num_tiles, hs2p's version, read_level / tile_size_lv0 from its meta, and the seconds
        it took.

    python make_hs2p.py tile SLIDE SAMPLE_ID OUTPUT_DIR SETTINGS_JSON
        Tiles SLIDE with hs2p.tile_slides under slide2vec 7.1.4's defaults (hsv, a_t 4,
        ref_tile_size = the tile size, tissue coverage >= 0.01), each replaced by what
        SETTINGS_JSON gives: {"spacing", "tile_size", "overlap", "tolerance", "min_coverage",
        "backend", "mask_path", "spacing_at_level_0", "segmentation": {...}, "filtering": {...}}
        (hs2p's own key names), or a
        list of such objects (one run each, into OUTPUT_DIR/<i>), and prints the coordinates
        it wrote: x, y, tissue_fractions, num_tiles and the meta (a list for a list).

    python make_hs2p.py annotate SLIDE MASK OUTPUT_DIR SETTINGS_JSON
        Annotation-aware sampling: hs2p.tile_slide on SLIDE with the label mask MASK and
        SETTINGS_JSON's "masks" ({"pixel_mapping", "min_coverage", "strategy", "output_mode"}, hs2p's
        MaskSamplingConfig) plus the "tile" settings above; prints {annotation or "merged": {x, y,
        tissue_fractions}}.

    python make_hs2p.py load NPZ META
        Reads a ``<sample_id>.coordinates.npz`` + ``.coordinates.meta.json`` pair (ours or
        hs2p's) with hs2p's public loader ``hs2p.load_tiling_result`` (which validates the
        meta schema and the tile_index range) and prints x, y, tile_index and the tile
        geometry it found as JSON.

Only hs2p's public API is used; this file imports nothing from slide2vec_dask.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path


def make(args) -> dict:
    import hs2p
    from hs2p import SegmentationConfig, SlideSpec, TilingConfig

    start = time.perf_counter()
    tiling = TilingConfig(requested_spacing_um=args.spacing, requested_tile_size_px=args.tile_size,
                          tolerance=0.05, overlap=0.0, backend=args.backend)
    (art,) = hs2p.tile_slides([SlideSpec(sample_id=args.sample_id, image_path=Path(args.slide))],
                              tiling=tiling, segmentation=SegmentationConfig(method="hsv"),
                              output_dir=Path(args.output_dir), save_tiles=args.save_tiles, num_workers=1)
    seconds = time.perf_counter() - start
    meta = json.loads(Path(art.coordinates_meta_path).read_text())
    tiles_dir = Path(art.coordinates_meta_path).parent
    manifest = tiles_dir / f"{args.sample_id}.tiles.manifest.csv"

    def path(p):
        return str(p) if p is not None and Path(p).exists() else None

    return {"sample_id": art.sample_id, "num_tiles": int(art.num_tiles), "seconds": round(seconds, 3),
            "hs2p_version": version("hs2p"), "pillow_version": version("pillow"),
            "tiles_dir": str(tiles_dir), "npz": path(art.coordinates_npz_path),
            "meta": path(art.coordinates_meta_path), "tar": path(art.tiles_tar_path),
            "manifest": path(manifest) if args.save_tiles else None, "backend": art.backend,
            "read_level": meta["tiling"]["read_level"], "read_tile_size_px": meta["tiling"]["read_tile_size_px"],
            "tile_size_lv0": meta["tiling"]["tile_size_lv0"], "base_spacing_um": meta["slide"]["base_spacing_um"]}


def tile(args):
    settings = json.loads(args.settings)
    if isinstance(settings, list):
        return [tile_one(args.slide, args.sample_id, Path(args.output_dir) / str(i), one)
                for i, one in enumerate(settings)]
    return tile_one(args.slide, args.sample_id, Path(args.output_dir), settings)


def tile_one(slide: str, sample_id: str, output_dir: Path, settings: dict) -> dict:
    import numpy as np

    import hs2p
    from hs2p import FilterConfig, SegmentationConfig, SlideSpec, TilingConfig
    from hs2p.configs.models import DEFAULT_MASK_SAMPLING
    from dataclasses import replace

    tile_size = int(settings.get("tile_size", 224))
    tiling = TilingConfig(requested_spacing_um=float(settings.get("spacing", 0.5)), requested_tile_size_px=tile_size,
                          tolerance=float(settings.get("tolerance", 0.05)), overlap=float(settings.get("overlap", 0.0)),
                          backend=settings.get("backend", "openslide"))
    segmentation = SegmentationConfig(**{"method": "hsv", **settings.get("segmentation", {})})
    filtering = FilterConfig(**{"ref_tile_size": tile_size, **settings.get("filtering", {})})
    masks = replace(DEFAULT_MASK_SAMPLING, min_coverage={"tissue": float(settings.get("min_coverage", 0.01))})
    start = time.perf_counter()
    mask = settings.get("mask_path")
    spec = SlideSpec(sample_id=sample_id, image_path=Path(slide), mask_path=None if mask is None else Path(mask),
                     spacing_at_level_0=settings.get("spacing_at_level_0"))
    (art,) = hs2p.tile_slides([spec], tiling=tiling,
                              segmentation=segmentation, filtering=filtering, masks=masks,
                              output_dir=output_dir, num_workers=1)
    seconds = time.perf_counter() - start
    meta = json.loads(Path(art.coordinates_meta_path).read_text())
    x = y = fractions = []
    if art.coordinates_npz_path is not None and Path(art.coordinates_npz_path).exists():
        with np.load(art.coordinates_npz_path) as data:
            x, y = data["x"].tolist(), data["y"].tolist()
            fractions = data["tissue_fractions"].tolist()
    return {"num_tiles": int(art.num_tiles), "x": x, "y": y, "tissue_fractions": fractions, "meta": meta,
            "npz": None if art.coordinates_npz_path is None else str(art.coordinates_npz_path),
            "meta_path": str(art.coordinates_meta_path), "seconds": round(seconds, 3)}


def annotate(args) -> dict:
    import hs2p
    from hs2p import FilterConfig, SegmentationConfig, SlideSpec, TilingConfig
    from hs2p.configs.models import MaskSamplingConfig

    settings = json.loads(args.settings)
    tile_size = int(settings.get("tile_size", 224))
    tiling = TilingConfig(requested_spacing_um=float(settings.get("spacing", 0.5)), requested_tile_size_px=tile_size,
                          tolerance=float(settings.get("tolerance", 0.05)), overlap=float(settings.get("overlap", 0.0)),
                          backend=settings.get("backend", "openslide"), mask_backend=settings.get("mask_backend", "auto"))
    filtering = FilterConfig(**{"ref_tile_size": tile_size, **settings.get("filtering", {})})
    masks = MaskSamplingConfig(**settings["masks"])
    results = hs2p.tile_slide(SlideSpec(sample_id="s", image_path=Path(args.slide), mask_path=Path(args.mask)),
                              tiling=tiling, segmentation=SegmentationConfig(method="hsv"), filtering=filtering,
                              masks=masks, num_workers=1)
    return {("merged" if name is None else name): {"x": [int(v) for v in r.x], "y": [int(v) for v in r.y],
                                                   "tissue_fractions": [float(v) for v in r.tissue_fractions]}
            for name, r in results.items()}


def load(args) -> dict:
    import hs2p

    npz = Path(args.npz) if args.npz not in ("", "none") else None
    result = hs2p.load_tiling_result(npz, Path(args.meta))
    return {"sample_id": result.sample_id, "x": [int(v) for v in result.x], "y": [int(v) for v in result.y],
            "tile_index": [int(v) for v in result.tile_index],
            "tissue_fractions": [float(v) for v in result.tissue_fractions],
            "read_level": int(result.read_level), "read_tile_size_px": int(result.read_tile_size_px),
            "tile_size_lv0": int(result.tile_size_lv0), "requested_tile_size_px": int(result.requested_tile_size_px),
            "requested_spacing_um": float(result.requested_spacing_um), "step_px_lv0": int(result.step_px_lv0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("slide")
    m.add_argument("sample_id")
    m.add_argument("output_dir")
    m.add_argument("--spacing", type=float, default=0.5)
    m.add_argument("--tile-size", type=int, default=224)
    m.add_argument("--save-tiles", action="store_true")
    m.add_argument("--backend", default="openslide")
    t = sub.add_parser("tile")
    t.add_argument("slide")
    t.add_argument("sample_id")
    t.add_argument("output_dir")
    t.add_argument("settings")
    a = sub.add_parser("annotate")
    for name in ("slide", "mask", "output_dir", "settings"):
        a.add_argument(name)
    ld = sub.add_parser("load")
    ld.add_argument("npz")
    ld.add_argument("meta")
    args = parser.parse_args(argv)
    out = {"make": make, "tile": tile, "annotate": annotate, "load": load}[args.command](args)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
