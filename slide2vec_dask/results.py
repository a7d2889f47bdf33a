"""What the API returns: plain containers with an xarray view."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.store import schema


@dataclass
class EmbeddedSlide:
    """One slide's tile embeddings (row ``i`` is the tile at ``x[i], y[i]``, level 0)."""

    sample_id: str
    tile_embeddings: Any                  # torch.Tensor (N, D) float32
    x: np.ndarray                         # (N,) int64, level-0 px of each tile's top-left corner
    y: np.ndarray
    tile_size_lv0: int
    image_path: Path
    mask_path: Path | None = None
    slide_embedding: Any = None           # (D,) for slide-level models
    latents: Any = None
    mask_preview_path: Path | None = None
    tiling_preview_path: Path | None = None
    attrs: dict = field(default_factory=dict)
    # Hierarchical mode (PreprocessingConfig(region_tile_multiple=R)): regions of R x R tiles.
    # Sub-tile t of a region sits at (region_x + (t % R) * tile_size_lv0, region_y + (t // R) * tile_size_lv0).
    hierarchical_embeddings: Any = None   # torch.Tensor (regions, R*R, D)
    region_x: np.ndarray | None = None    # (regions,) int64, level 0
    region_y: np.ndarray | None = None
    tile_mask: np.ndarray | None = None   # (regions, R*R) bool: True where the sub-tile is a kept tissue tile
    region_tile_multiple: int | None = None

    @property
    def num_tiles(self) -> int:
        return int(len(self.x))

    def to_xarray(self):
        """``embedding (tile, feature)`` with level-0 ``x``/``y`` coordinates and provenance attrs.

        In hierarchical mode: ``embedding (region, tile_in_region, feature)`` with
        ``region_x``/``region_y`` and ``tile_mask``.
        """
        import xarray as xr

        if self.hierarchical_embeddings is not None:
            return self._regions_xarray()
        emb = self.tile_embeddings
        values = emb.numpy() if hasattr(emb, "numpy") else np.asarray(emb)
        return xr.Dataset(
            {"embedding": (schema.TILE_DIMS, values, schema.TILE_EMBEDDING_ATTRS)},
            coords={name: ("tile", getattr(self, name), attrs) for name, attrs in schema.TILE_COORDS.items()},
            attrs={
                "sample_id": self.sample_id,
                "image_path": str(self.image_path),
                "mask_path": "" if self.mask_path is None else str(self.mask_path),
                "tile_size_lv0": self.tile_size_lv0,
                **self.attrs,
            },
        )

    def _regions_xarray(self):
        import xarray as xr

        return xr.Dataset(
            {"embedding": (schema.REGION_DIMS, np.asarray(self.hierarchical_embeddings),
                           schema.REGION_EMBEDDING_ATTRS),
             "tile_mask": (schema.REGION_MASK_DIMS, self.tile_mask, schema.TILE_MASK_ATTRS)},
            coords={name: ("region", getattr(self, name), attrs) for name, attrs in schema.REGION_COORDS.items()},
            attrs={"sample_id": self.sample_id, "image_path": str(self.image_path),
                   "mask_path": "" if self.mask_path is None else str(self.mask_path),
                   "tile_size_lv0": self.tile_size_lv0, "region_tile_multiple": self.region_tile_multiple,
                   "sub_tile_order": schema.SUB_TILE_ORDER, **self.attrs},
        )


@dataclass
class EmbeddedPatient:
    """One patient's embedding and the slide embeddings it was made from."""

    patient_id: str
    patient_embedding: Any                # torch.Tensor (D,)
    slide_embeddings: dict                # {sample_id: torch.Tensor (D_slide,)} in the patient's slide order


@dataclass
class TileArtifact:
    """Where one slide's tile embeddings were written."""

    sample_id: str
    num_tiles: int
    store_path: Path               # the run's Zarr store
    group: str                     # "tiles/<sample_id>" inside it
    coordinates_path: Path | None = None
    flat_path: Path | None = None  # tile_embeddings/<id>.pt|.npz when output_format asks


@dataclass
class HierarchicalArtifact:
    """Where one slide's region embeddings (regions, R*R, D) were written."""

    sample_id: str
    num_regions: int
    store_path: Path
    group: str                     # "regions/<sample_id>"
    flat_path: Path | None = None  # hierarchical_embeddings/<id>.pt|.npz when output_format asks


@dataclass
class SlideArtifact:
    """Where one slide's slide-level embedding was written."""

    sample_id: str
    feature_dim: int
    store_path: Path
    group: str                     # "slides" (row sample_id) inside the store
    flat_path: Path | None = None  # slide_embeddings/<id>.pt|.npz when output_format asks
    has_latents: bool = False


@dataclass
class PatientArtifact:
    """Where one patient's embedding was written."""

    patient_id: str
    sample_ids: list[str]
    feature_dim: int
    store_path: Path
    group: str                     # "patients" (row patient_id) inside the store
    flat_path: Path | None = None  # patient_embeddings/<id>.pt|.npz when output_format asks


@dataclass
class RunResult:
    """What `Pipeline.run` produced: artifacts, and one `SlideOutcome` per slide (also in process_list.csv)."""

    tile_artifacts: list[TileArtifact]
    process_list_path: Path
    store_path: Path
    hierarchical_artifacts: list = field(default_factory=list)
    slide_artifacts: list = field(default_factory=list)
    patient_artifacts: list = field(default_factory=list)
    num_failed: int = 0
    num_skipped: int = 0
    outcomes: list = field(default_factory=list)   # one SlideOutcome per slide, in input order
    report: dict | None = None                     # the run report (also <output_dir>/run_report.json)
    report_path: Path | None = None

    @property
    def num_succeeded(self) -> int:
        return sum(o.status == "success" for o in self.outcomes)

    @property
    def failed(self) -> list:
        """The failed slides' outcomes (each with its error)."""
        return [o for o in self.outcomes if o.status == "failed"]


# A cell a spreadsheet would evaluate (OWASP's CSV injection rule) gets a leading "'".
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell that Excel or LibreOffice shows and never runs: ids and paths come from
    users' manifests (``=cmd|' /C calc'!A0``); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


PROCESS_LIST_COLUMNS = ["sample_id", "image_path", "mask_path", "patient_id", "status", "error_type", "error",
                        "num_tiles", "plan_seconds", "embed_seconds", "store_group", "coordinates_path",
                        "flat_path", "note"]


@dataclass
class SlideOutcome:
    """What happened to one slide of a run: one row of ``process_list.csv``.

    ``status``: ``success``, ``skipped`` (complete in the store already) or
    ``failed`` (``error_type`` / ``error`` say why); while a run goes on also
    ``pending``, ``planning``, ``running``, ``aggregating``, ``waiting for patient``.
    """

    sample_id: str
    image_path: str
    mask_path: str = ""
    patient_id: str = ""
    status: str = "pending"
    error_type: str = ""
    error: str = ""
    num_tiles: int = 0
    num_regions: int = 0
    plan_seconds: float = 0.0
    embed_seconds: float = 0.0
    store_group: str = ""
    coordinates_path: str = ""
    flat_paths: list = field(default_factory=list)   # tile (and region) files, output_format
    slide_flat_path: str = ""
    patient_flat_path: str = ""
    note: str = ""            # what a user should know about a success: redone because its file changed, 0 tiles

    @property
    def ok(self) -> bool:
        return self.status in ("success", "skipped")

    def fail(self, exc: BaseException) -> None:
        self.status, self.error_type, self.error = "failed", type(exc).__name__, str(exc).replace("\n", " ")

    def csv_row(self) -> dict[str, Any]:
        """The outcome as a row of ``process_list.csv``, each cell safe to open in a spreadsheet."""
        paths = [p for p in (*self.flat_paths, self.slide_flat_path, self.patient_flat_path) if p]
        row = {c: getattr(self, c) for c in PROCESS_LIST_COLUMNS if c != "flat_path"}
        row["flat_path"] = ";".join(str(p) for p in paths)
        return {c: csv_cell(v) for c, v in row.items()}
