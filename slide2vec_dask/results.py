"""What the API returns: plain containers with an xarray view."""

from __future__ import annotations

import dataclasses
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
    # slide2vec 7.x: the bag's annotation class (tissue-only sampling here), the square size the
    # encoder saw, and the transform record of the feature identity
    annotation: str | None = "tissue"
    encoder_input_size_px: int | None = None
    transform: dict | None = None
    # annotation sampling (PreprocessingConfig(masks=...)): each sampled class's share of each tile
    class_coverage: np.ndarray | None = None   # (N, C) float32
    classes: tuple[str, ...] = ()

    @property
    def num_tiles(self) -> int:
        return int(len(self.x))

    def bag(self, name: str, index: np.ndarray) -> "EmbeddedSlide":
        """The tiles ``index`` of this slide as the bag ``name`` (one annotation class, or 'merged')."""
        return dataclasses.replace(self, tile_embeddings=self.tile_embeddings[index], x=self.x[index],
                                   y=self.y[index], annotation=name,
                                   class_coverage=None if self.class_coverage is None else self.class_coverage[index],
                                   attrs={**self.attrs, "annotation": name})

    def as_regions(self) -> "EmbeddedSlide":
        """Hierarchical results as slide2vec 7.x gives them: ``tile_embeddings`` ``(R, T, D)`` and
        ``x`` / ``y`` the regions' level-0 corners (the flat tiles stay reachable through
        ``hierarchical_embeddings[tile_mask]``)."""
        if self.hierarchical_embeddings is not None:
            self.tile_embeddings, self.x, self.y = self.hierarchical_embeddings, self.region_x, self.region_y
        return self

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
        variables = {"embedding": (schema.TILE_DIMS, values, schema.TILE_EMBEDDING_ATTRS)}
        coords = {name: ("tile", getattr(self, name), attrs) for name, attrs in schema.TILE_COORDS.items()}
        if self.class_coverage is not None:
            variables["coverage"] = (schema.COVERAGE_DIMS, self.class_coverage, schema.COVERAGE_ATTRS)
            coords["class"] = ("class", list(self.classes))
        return xr.Dataset(
            variables,
            coords=coords,
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


class EmbeddedSlides(list):
    """`Model.embed_slides`'s result: a list of `EmbeddedSlide` in input order that also indexes as
    slide2vec 7.x's ``dict[sample_id][annotation]``.

    ``result[0]`` is the first slide; ``result["s1"]`` is ``{"tissue": EmbeddedSlide}``;
    ``keys()`` / ``values()`` / ``items()`` / ``get()`` / ``in`` work by sample id.  Iterating
    yields the slides themselves, and a slide used as a key stands for its sample id, so 7.x's
    ``for sid in result: result[sid][...]`` keeps working.
    """

    def __getitem__(self, key):
        if isinstance(key, EmbeddedSlide):
            key = key.sample_id
        if isinstance(key, str):
            bags = {s.annotation or "tissue": s for s in list.__iter__(self) if s.sample_id == key}
            if not bags:
                raise KeyError(key)
            return bags
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(s.sample_id for s in list.__iter__(self)))

    def values(self) -> list[dict]:
        return [self[k] for k in self.keys()]

    def items(self) -> list[tuple[str, dict]]:
        return [(k, self[k]) for k in self.keys()]

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        if isinstance(key, str):
            return key in self.keys()
        return super().__contains__(key)


@dataclass
class EmbeddedPatient:
    """One patient's embedding and the slide embeddings it was made from."""

    patient_id: str
    patient_embedding: Any                # torch.Tensor (D,)
    slide_embeddings: dict                # {sample_id: torch.Tensor (D_slide,)} in the patient's slide order


class _Located:
    """slide2vec 7.x's artifact fields: ``path`` (the pt/npz file when one was written, else the
    store group), ``metadata_path`` (its ``.meta.json``, else the group's ``zarr.json``),
    ``format`` (``pt``, ``npz`` or ``zarr``) and ``metadata`` (that file, read)."""

    @property
    def path(self) -> Path:
        return Path(self.flat_path) if self.flat_path is not None else Path(self.store_path) / self.group

    @property
    def metadata_path(self) -> Path:
        if self.flat_path is not None:
            return Path(self.flat_path).with_suffix(".meta.json")
        return Path(self.store_path) / self.group / "zarr.json"

    @property
    def format(self) -> str:
        return Path(self.flat_path).suffix.lstrip(".") if self.flat_path is not None else "zarr"

    @property
    def metadata(self) -> dict:
        import json

        doc = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        return doc.get("attributes", doc) if self.flat_path is None else doc


@dataclass
class TileArtifact(_Located):
    """Where one slide's tile embeddings were written (slide2vec 7.x: `TileEmbeddingArtifact`)."""

    sample_id: str
    num_tiles: int
    store_path: Path               # the run's Zarr store
    group: str                     # "tiles/<sample_id>" inside it
    coordinates_path: Path | None = None
    flat_path: Path | None = None  # tile_embeddings/<id>.pt|.npz when output_format asks
    feature_dim: int | None = None
    annotation: str | None = None  # 7.x: None for tissue-only sampling (the flat folder root)


@dataclass
class HierarchicalArtifact(_Located):
    """Where one slide's region embeddings (regions, R*R, D) were written (7.x: `HierarchicalEmbeddingArtifact`)."""

    sample_id: str
    num_regions: int
    store_path: Path
    group: str                     # "regions/<sample_id>"
    flat_path: Path | None = None  # hierarchical_embeddings/<id>.pt|.npz when output_format asks
    feature_dim: int | None = None
    tiles_per_region: int | None = None
    annotation: str | None = None


@dataclass
class SlideArtifact(_Located):
    """Where one slide's slide-level embedding was written (7.x: `SlideEmbeddingArtifact`)."""

    sample_id: str
    feature_dim: int
    store_path: Path
    group: str                     # "slides" (row sample_id) inside the store
    flat_path: Path | None = None  # slide_embeddings/<id>.pt|.npz when output_format asks
    has_latents: bool = False
    annotation: str | None = None

    @property
    def latent_path(self) -> Path | None:
        """``slide_latents/<id>.pt|.npz`` next to the flat file, when latents were kept."""
        if not self.has_latents or self.flat_path is None:
            return None
        flat = Path(self.flat_path)
        return flat.parent.parent / "slide_latents" / flat.name


@dataclass
class PatientArtifact(_Located):
    """Where one patient's embedding was written (7.x: `PatientEmbeddingArtifact`)."""

    patient_id: str
    sample_ids: list[str]
    feature_dim: int
    store_path: Path
    group: str                     # "patients" (row patient_id) inside the store
    flat_path: Path | None = None  # patient_embeddings/<id>.pt|.npz when output_format asks

    @property
    def num_slides(self) -> int:
        return len(self.sample_ids)


# slide2vec 7.x's names for the same records
TileEmbeddingArtifact = TileArtifact
HierarchicalEmbeddingArtifact = HierarchicalArtifact
SlideEmbeddingArtifact = SlideArtifact
PatientEmbeddingArtifact = PatientArtifact


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
                        "flat_path", "note",
                        # slide2vec 7.x's columns its users' scripts read (tissue-only: one bag per slide)
                        "annotation", "tiling_status", "feature_status", "feature_path", "coordinates_npz_path",
                        "coordinates_meta_path"]


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
    bags: dict = field(default_factory=dict)   # annotation sampling: {bag: its tiles}; empty for tissue tiling
    bag_colors: dict | None = None             # masks.colors (the QC gallery draws each bag in its class's)

    @property
    def ok(self) -> bool:
        return self.status in ("success", "skipped")

    def fail(self, exc: BaseException) -> None:
        self.status, self.error_type, self.error = "failed", type(exc).__name__, str(exc).replace("\n", " ")

    def csv_row(self) -> dict[str, Any]:
        """The outcome as a row of ``process_list.csv``, each cell safe to open in a spreadsheet."""
        paths = [p for p in (*self.flat_paths, self.slide_flat_path, self.patient_flat_path) if p]
        row = {c: getattr(self, c) for c in PROCESS_LIST_COLUMNS[:PROCESS_LIST_COLUMNS.index("annotation")]
               if c != "flat_path"}
        row["flat_path"] = ";".join(str(p) for p in paths)
        state = "success" if self.ok else self.status
        planned = self.ok or self.num_tiles > 0
        coords = [str(p) for p in self.flat_paths if str(p).endswith(".coordinates.npz")]
        features = [str(p) for p in self.flat_paths if "tile_embeddings" in str(p) and str(p).endswith((".pt", ".npz"))]
        row.update({"annotation": "tissue", "tiling_status": "success" if planned else state, "feature_status": state,
                    "feature_path": features[0] if features else "",
                    "coordinates_npz_path": coords[0] if coords else "",
                    "coordinates_meta_path": coords[0].replace(".coordinates.npz", ".coordinates.meta.json") if coords else ""})
        return {c: csv_cell(v) for c, v in row.items()}

    def csv_rows(self) -> list[dict[str, Any]]:
        """``process_list.csv``'s rows for the slide: one, or one per annotation bag (slide2vec's
        ``annotation`` column names the class; ``num_tiles`` and the paths are the bag's)."""
        row = self.csv_row()
        if not self.bags:
            return [row]
        rows = []
        for bag, count in self.bags.items():
            folders = ("tile_embeddings", "tiles") if bag in ("tissue", "merged") else (bag,)   # slide2vec's layout
            mine = [str(p) for p in self.flat_paths if Path(p).parent.name in folders]
            coords = [p for p in mine if p.endswith(".coordinates.npz")]
            features = [p for p in mine if "tile_embeddings" in p and p.endswith((".pt", ".npz"))]
            rows.append({**row, "annotation": csv_cell(bag), "num_tiles": int(count),
                         "flat_path": csv_cell(";".join(mine)), "feature_path": csv_cell(features[0] if features else ""),
                         "coordinates_npz_path": csv_cell(coords[0] if coords else ""),
                         "coordinates_meta_path": csv_cell(coords[0].replace(".coordinates.npz", ".coordinates.meta.json")
                                                           if coords else "")})
        return rows
