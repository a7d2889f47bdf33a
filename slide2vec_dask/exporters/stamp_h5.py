"""STAMP features (``format="stamp-h5"``): coordinates in micrometres, as STAMP's loader wants.

::

    <dest>/stamp/<encoder>/<sample_id>.h5
        feats  (N, D) float32
        coords (N, 2) float64   µm from the slide's origin: level-0 px x level-0 spacing
        attrs: unit="um", tile_size_um, tile_size_px, extractor, encoder, feat_type="tile",
               mpp (µm/px of the tiles), level0_mpp
    <dest>/stamp/<model>/slide/<sample_id>.h5      feats (D,), feat_type="slide"
    <dest>/stamp/<model>/patient/<patient_id>.h5   feats (D,), feat_type="patient"

STAMP refuses pixel coordinates unless ``tile_size_um`` says how large a tile is;
``stamp_version`` is not written (STAMP refuses files newer than itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slide2vec_dask.exporters._base import RowSource, TileSource, atomic, safe_name
from slide2vec_dask.exporters.registry import ExportFormat

FORMAT = ExportFormat("stamp-h5", roots=("stamp",), extra="h5", requires=("h5py",), layout=1)


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    return [Path(dest) / "stamp" / safe_name(src.encoder) / f"{src.sample_id}.h5"]


def write_tiles(src: TileSource, files: list[Path]) -> None:
    h5py = FORMAT.need("h5py")
    spacing = src.slide_spacing_um

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            src.write_features(f, "feats")
            f.create_dataset("coords", data=src.xy().astype(np.float64) * spacing)
            f.attrs.update({"unit": "um", "tile_size_um": src.tile_size_lv0 * spacing,
                            "tile_size_px": src.tile_size_px, "extractor": src.encoder, "encoder": src.encoder,
                            "feat_type": "tile", "mpp": src.requested_spacing_um, "level0_mpp": spacing,
                            "name": src.sample_id})

    atomic(files[0], write)


def row_files(src: RowSource, dest: Path) -> list[Path]:
    return [Path(dest) / "stamp" / safe_name(src.model) / src.level / f"{src.key}.h5"]


def write_row(src: RowSource, files: list[Path]) -> None:
    h5py = FORMAT.need("h5py")
    embedding = src.embedding()

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("feats", data=embedding)
            f.attrs.update({"encoder": src.model, "extractor": src.model, "feat_type": src.level, "name": src.key})

    atomic(files[0], write)
