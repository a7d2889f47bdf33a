"""What every exporter shares: a finished slide (or row) as read from the store, atomic
writes, and the rule that says an export is up to date.

Up to date means: the file(s) exist and their *sidecar* (``.<name>.source.json`` next
to the first file) names the same source group and the same layout version.  The
source is `EmbeddingStore.source_id`: a ``build_id`` minted each time a group is
published, so a slide re-embedded under ``overwrite=True`` makes its exports stale
even when its metadata is byte for byte the same.  The sidecar is written *after*
every file of the export is renamed into place, so a crash in between leaves an
export that the next run redoes, never one that claims to be current.  Temporary
files are hidden (``.<name>.<host tag>-<pid>-<token>.tmp``, `store.output_dir.tmp_name`: at most
255 bytes whatever the id and host name); those of dead processes on this host are swept
once per run (`store.output_dir.sweep`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.store.output_dir import atomic
from slide2vec_dask.tiling.tile_list import load_plan


# -- names ------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A model name as a folder name (``hf-hub:org/model`` -> ``hf-hub_org_model``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def magnification(spacing_um: float) -> float:
    """The objective magnification a spacing stands for, by the usual convention 10 µm / spacing
    (0.25 µm/px ≈ 40×, 0.5 ≈ 20×)."""
    return round(10.0 / float(spacing_um), 2)


def mag_label(spacing_um: float) -> str:
    mag = magnification(spacing_um)
    return f"{mag:g}"


# -- what is read ------------------------------------------------------------------------------
@dataclass
class TileSource:
    """A finished slide's tiles group: arrays read on demand, attrs, and where it came from."""

    store: Any
    sample_id: str
    attrs: dict
    source_id: str
    _group: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, store, sample_id: str) -> "TileSource":
        """Cheap (one small JSON read): arrays are opened only when an export is written."""
        if not store.is_complete(sample_id):
            raise FileNotFoundError(f"{sample_id}: no finished tile embeddings in {store.path}")
        return cls(store, sample_id, store.tile_attrs(sample_id), store.source_id("tile", sample_id))

    @property
    def group(self):
        if self._group is None:
            self._group = self.store.open_tiles(self.sample_id)
        return self._group

    # arrays
    @property
    def num_tiles(self) -> int:
        return int(self.group["embedding"].shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.group["embedding"].shape[1])

    def features(self) -> np.ndarray:
        return np.asarray(self.group["embedding"][:], dtype=np.float32)

    def write_features(self, h5file, name: str):
        """The ``(N, D)`` float32 features as dataset ``name`` of an open h5 file, streamed chunk by
        chunk over the stored chunks (large slides never sit in memory twice); the dataset."""
        emb = self.group["embedding"]
        out = h5file.create_dataset(name, shape=(self.num_tiles, self.feature_dim), dtype="float32")
        step = max(1, emb.chunks[0])
        for start in range(0, emb.shape[0], step):
            out[start : start + step] = np.asarray(emb[start : start + step], dtype=np.float32)
        return out

    def xy(self) -> np.ndarray:
        """(N, 2) int64 level-0 pixel (x, y) of each tile's top-left corner, in store order."""
        return np.stack([self.group["x"][:], self.group["y"][:]], axis=1).astype(np.int64)

    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self.group["tissue_fraction"][:], dtype=np.float32)

    # geometry and units
    @property
    def encoder(self) -> str:
        return str(self.attrs.get("encoder", "") or "encoder")

    @property
    def tile_size_lv0(self) -> int:
        return int(self.attrs["tile_size_lv0"])

    @property
    def tile_size_px(self) -> int:
        """Tile side in pixels at the requested spacing (what the encoder saw)."""
        if "requested_tile_size_px" in self.attrs:
            return int(self.attrs["requested_tile_size_px"])
        return int(self.plan().requested_tile_size_px)

    @property
    def requested_spacing_um(self) -> float:
        return float(self.attrs["requested_spacing_um"])

    @property
    def slide_spacing_um(self) -> float:
        """Level-0 spacing (µm/px): from the tile attrs, or (older stores) from the saved plan."""
        if "slide_spacing_um" in self.attrs:
            return float(self.attrs["slide_spacing_um"])
        return float(self.plan().slide_spacing_um)

    @property
    def level0_size(self) -> tuple[int, int] | None:
        """(width, height) of level 0, when the store recorded it (runs before it did not)."""
        if "level0_width" in self.attrs:
            return int(self.attrs["level0_width"]), int(self.attrs["level0_height"])
        return None

    def plan(self):
        """The slide's saved plan (`TileGrid`, or `TileList` for free positions), where the pipeline puts it."""
        path = Path(self.store.output_dir) / "coordinates" / f"{self.sample_id}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{self.sample_id}: the store's tile attrs lack the slide geometry and the "
                                    f"saved plan {path} is gone; rerun the slide with overwrite=True")
        return load_plan(path)


@dataclass
class RowSource:
    """A stored slide (``level="slide"``) or patient embedding."""

    store: Any
    level: str
    key: str
    attrs: dict
    source_id: str
    _group: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, store, level: str, key: str) -> "RowSource":
        """Cheap (one small JSON read): the row's arrays are opened only when an export is written."""
        if not store.has_row(level, key):
            raise FileNotFoundError(f"{key}: no {level} embedding in {store.path}")
        return cls(store, level, key, store.row_attrs(level, key), store.source_id(level, key))

    @property
    def group(self):
        if self._group is None:
            self._group = self.store.open_row(self.level, self.key)
        return self._group

    def embedding(self) -> np.ndarray:
        return np.asarray(self.group["embedding"][:], dtype=np.float32)

    @property
    def model(self) -> str:
        return str(self.attrs.get("model", "") or "model")


# -- atomic writes: store.output_dir's ------------------------------------------------------
def write_json(target: Path, doc: Any) -> Path:
    return atomic(target, lambda tmp: tmp.write_text(json.dumps(doc)))


# -- the up-to-date rule ----------------------------------------------------------------------
def sidecar(primary: Path) -> Path:
    return primary.with_name(f".{primary.name}.source.json")


def is_current(files: list[Path], source_id: str, fmt: str, layout: int) -> bool:
    try:
        doc = json.loads(sidecar(files[0]).read_text())
    except (OSError, ValueError):
        return False
    return (doc.get("source") == source_id and doc.get("format") == fmt and doc.get("layout") == layout
            and all(f.exists() for f in files))


def record(files: list[Path], source_id: str, fmt: str, layout: int) -> None:
    write_json(sidecar(files[0]), {"source": source_id, "format": fmt, "layout": layout,
                                   "files": [f.name for f in files]})


def forget(files: list[Path]) -> None:
    """Before rewriting: the export no longer claims to be current (a crash mid-rewrite is redone)."""
    sidecar(files[0]).unlink(missing_ok=True)
