"""TRIDENT / Patho-Bench patch features (``format="trident-h5"``).

One ``.h5`` per slide, as TRIDENT lays out its job folder::

    <dest>/trident/<mag>x_<px>px_0px_overlap/features_<encoder>/<sample_id>.h5
        features (N, D) float32     attrs: encoder, name
        coords   (N, 2) int64       level-0 pixel (x, y) of each tile's top-left corner;
                                    attrs: patch_size, patch_size_level0, level0_magnification,
                                    target_magnification, overlap, name, level0_width, level0_height
    <dest>/trident/<mag>x_<px>px_0px_overlap/slide_features_<model>/<sample_id>.h5
        features (D,) float32       a slide-level model's embedding

Magnification is 10 µm / spacing (0.5 µm/px -> 20x).  Patients have no place here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slide2vec_dask.exporters._base import RowSource, TileSource, atomic, mag_label, magnification, safe_name
from slide2vec_dask.exporters.registry import ExportFormat

FORMAT = ExportFormat("trident-h5", roots=("trident",), extra="h5", requires=("h5py",), layout=1)


def job_folder(dest: Path, spacing_um: float, tile_size_px: int) -> Path:
    return Path(dest) / "trident" / f"{mag_label(spacing_um)}x_{tile_size_px}px_0px_overlap"


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    folder = job_folder(dest, src.requested_spacing_um, src.tile_size_px) / f"features_{safe_name(src.encoder)}"
    return [folder / f"{src.sample_id}.h5"]


def write_tiles(src: TileSource, files: list[Path]) -> None:
    write_patch_h5(src, files[0], FORMAT)


def coords_attrs(src: TileSource) -> dict:
    attrs = {"patch_size": src.tile_size_px, "patch_size_level0": src.tile_size_lv0,
             "level0_magnification": magnification(src.slide_spacing_um),
             "target_magnification": magnification(src.requested_spacing_um), "overlap": 0,
             "name": src.sample_id, "units": "px (level 0)", "level0_mpp": src.slide_spacing_um,
             "target_mpp": src.requested_spacing_um}
    if src.level0_size is not None:
        attrs["level0_width"], attrs["level0_height"] = src.level0_size
    return attrs


def write_patch_h5(src: TileSource, target: Path, fmt: ExportFormat, extra_coords_attrs: dict | None = None) -> Path:
    """``features`` + ``coords`` (TRIDENT's and CLAM's shared layout), features streamed chunk by chunk."""
    h5py = fmt.need("h5py")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            feats = src.write_features(f, "features")
            feats.attrs.update({"encoder": src.encoder, "name": src.sample_id})
            coords = f.create_dataset("coords", data=src.xy())
            coords.attrs.update({**coords_attrs(src), **(extra_coords_attrs or {})})

    return atomic(target, write)


def row_files(src: RowSource, dest: Path) -> list[Path]:
    if src.level != "slide":
        return []
    run = src.store.run_attrs()
    folder = job_folder(dest, run["requested_spacing_um"], run["requested_tile_size_px"])
    return [folder / f"slide_features_{safe_name(src.model)}" / f"{src.key}.h5"]


def write_row(src: RowSource, files: list[Path]) -> None:
    h5py = FORMAT.need("h5py")
    embedding = src.embedding()

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", data=np.asarray(embedding, dtype=np.float32))
            feats.attrs.update({"encoder": src.model, "name": src.key})

    atomic(files[0], write)
