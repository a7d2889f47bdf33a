"""slide2vec's flat files (``format="pt" | "npz"``): the store's own writer (`store.flat`),
under the same up-to-date rule as the other exports.

::

    <dest>/tile_embeddings/<sample_id>.pt (+ .meta.json) | .npz
    <dest>/hierarchical_embeddings/<sample_id>.pt | .npz      hierarchical runs
    <dest>/slide_embeddings/<sample_id>.pt | .npz             slide-level models
    <dest>/patient_embeddings/<patient_id>.pt | .npz          patient-level models
"""

from __future__ import annotations

from pathlib import Path

from slide2vec_dask.exporters._base import RowSource, TileSource
from slide2vec_dask.exporters.registry import ExportFormat

LEVEL_FOLDERS = ("tile_embeddings", "hierarchical_embeddings", "slide_embeddings", "patient_embeddings")


class Flat:
    """The writer of one of the two names: the layout is shared, the file type differs."""

    def __init__(self, fmt: str):
        self.fmt = fmt

    def _names(self, folder: Path, name: str, latents: bool = False) -> list[Path]:
        if self.fmt == "npz":
            return [folder / f"{name}.npz"]
        return [folder / f"{name}.pt", folder / f"{name}.meta.json"] + (
            [folder / f"{name}.latents.pt"] if latents else [])

    def tile_files(self, src: TileSource, dest: Path) -> list[Path]:
        files = self._names(Path(dest) / "tile_embeddings", src.sample_id)
        if src.store.has_regions(src.sample_id):
            files += self._names(Path(dest) / "hierarchical_embeddings", src.sample_id)
        return files

    def write_tiles(self, src: TileSource, files: list[Path]) -> None:
        src.store.export_tiles(src.sample_id, files[0].parent.parent, self.fmt)

    def row_files(self, src: RowSource, dest: Path) -> list[Path]:
        latents = src.store.row_has_latents(src.level, src.key)
        return self._names(Path(dest) / f"{src.level}_embeddings", src.key, latents=latents)

    def write_row(self, src: RowSource, files: list[Path]) -> None:
        src.store.export_row(src.level, src.key, files[0].parent.parent, self.fmt)


def is_flat(path: Path | str, level: str) -> bool:
    """Whether ``path`` is the flat file of a ``level`` row (``<level>_embeddings/<key>.pt|.npz``)."""
    path = Path(path)
    return path.parent.name == f"{level}_embeddings" and path.suffix in (".pt", ".npz")


FORMATS = tuple(ExportFormat(name, roots=LEVEL_FOLDERS, writer=Flat(name), layout=1) for name in ("pt", "npz"))
