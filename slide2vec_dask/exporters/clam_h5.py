"""CLAM patch features (``format="clam-h5"``): what CLAM's ``extract_features_fp.py`` leaves.

::

    <dest>/clam/<encoder>/h5_files/<sample_id>.h5   features (N, D) float32, coords (N, 2) int64
                                                    level-0 px top-left (TRIDENT's layout, plus
                                                    patch_level and downsample in coords.attrs)
    <dest>/clam/<encoder>/pt_files/<sample_id>.pt   the same features as a torch tensor, which
                                                    CLAM's MIL datasets load by default

Slide and patient embeddings have no place in CLAM.
"""

from __future__ import annotations

from pathlib import Path

from slide2vec_dask.exporters._base import TileSource, atomic, safe_name
from slide2vec_dask.exporters.registry import ExportFormat
from slide2vec_dask.exporters.trident_h5 import write_patch_h5

FORMAT = ExportFormat("clam-h5", roots=("clam",), extra="h5", requires=("h5py",), layout=1)


def tile_files(src: TileSource, dest: Path) -> list[Path]:
    folder = Path(dest) / "clam" / safe_name(src.encoder)
    return [folder / "h5_files" / f"{src.sample_id}.h5", folder / "pt_files" / f"{src.sample_id}.pt"]


def write_tiles(src: TileSource, files: list[Path]) -> None:
    import torch   # heavy: imported when a CLAM export is written, not when formats are listed

    level = int(src.attrs.get("read_level", 0))
    write_patch_h5(src, files[0], FORMAT, {"patch_level": level,
                                         "downsample": src.tile_size_lv0 / src.tile_size_px})
    features = torch.from_numpy(src.features())
    atomic(files[1], lambda tmp: torch.save(features, tmp))


def row_files(src, dest: Path) -> list[Path]:
    return []
