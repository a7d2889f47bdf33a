"""slide2vec 7.x's files (``format="pt" | "npz"``): what its users' loaders read, written from the store.

::

    <dest>/tile_embeddings/<sample_id>.pt | .npz   + <sample_id>.meta.json
    <dest>/tiles/<sample_id>.coordinates.npz       + <sample_id>.coordinates.meta.json   (hs2p's)
    <dest>/tile_embeddings/<class>/<sample_id>...  annotation bags (masks with classes): one folder
    <dest>/tiles/<class>/<sample_id>.coordinates.* per class, as slide2vec writes them (merged: the root)
    <dest>/hierarchical_embeddings/<sample_id>.pt | .npz + .meta.json    hierarchical runs (R, T, D)
    <dest>/slide_embeddings/<sample_id>.pt | .npz  + .meta.json          slide-level models
    <dest>/slide_latents/<sample_id>.pt | .npz                           when latents are kept
    <dest>/patient_embeddings/<patient_id>.pt | .npz + .meta.json        patient-level models

A ``.pt`` holds the tensor; an ``.npz`` holds ``features`` (and ``tile_index`` for tiles,
``latents`` in a latents file).  Each sidecar carries slide2vec's keys (``artifact_type``,
``encoder_name``, ``encoder_level``, ``feature_dtype``, ``coordinates_npz_path``, ...), the
feature identity under ``compatibility`` (`compat.identity`) and our own group attributes under
``slide2vec_dask``.  Features are stored in the run's feature dtype (``output_dtype``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.exporters._base import RowSource, TileSource, write_json
from slide2vec_dask.exporters.registry import ExportFormat
from slide2vec_dask.store.output_dir import atomic
from slide2vec_dask.tiling import coordinate_files
from slide2vec_dask.tiling.annotations import bag_plan

LEVEL_FOLDERS = ("tile_embeddings", "tiles", "hierarchical_embeddings", "slide_embeddings", "slide_latents",
                 "patient_embeddings")
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def is_flat_format(formats) -> bool:
    """Whether ``output_format`` (a name or names) asks for slide2vec's files."""
    names = (formats,) if isinstance(formats, str) else tuple(formats or ())
    return bool({"pt", "npz"} & set(names))


def _plain(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k != "complete"}


def _run(store) -> dict:
    return store.run_attrs()


def _dtype(run: dict):
    return DTYPES[(run.get("feature_identity") or {}).get("feature_dtype", "fp32")]


def _save(path: Path, fmt: str, array: np.ndarray, key: str = "features", **extra: np.ndarray) -> Path:
    if fmt == "npz":
        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **{key: array}, **extra)
        return atomic(path, save)
    import torch   # heavy: only pt files need it

    return atomic(path, lambda tmp: torch.save(torch.from_numpy(np.ascontiguousarray(array)), tmp))


def write_coordinates(src: TileSource, folder: Path, bag: str | None = None, index: np.ndarray | None = None,
                      coverage: np.ndarray | None = None) -> list[Path]:
    """hs2p's ``<id>.coordinates.npz`` and ``.meta.json`` for a finished slide, by the tiling's one
    writer: its tiles in the order they were embedded, its saved plan's settings where the plan is
    still there (its tile attrs otherwise); readable by hs2p, slide2vec and ``read_coordinates_from``.
    ``bag``: one annotation bag's tiles (``index``), its class's ``coverage`` as the fractions, as
    hs2p writes a class's coordinates."""
    try:
        plan = src.plan()
    except FileNotFoundError:   # a store moved away from its run folder: the attrs state the geometry
        plan = None
    xy, fraction = src.xy(), src.tissue_fraction()
    if index is not None:
        xy = xy[index]
        fraction = (fraction[index] if len(fraction) == len(src.xy()) else fraction) if coverage is None else coverage
        if plan is not None and getattr(plan, "member", None) is not None:
            plan = bag_plan(plan, bag)
    return coordinate_files.write_coordinates(folder, src.sample_id, plan, src.attrs, order="as_embedded",
                                              tiles=(xy[:, 0], xy[:, 1], fraction))


class Flat:
    """The writer of one of the two names: the layout is shared, the payload type differs."""

    def __init__(self, fmt: str):
        self.fmt = fmt

    def _pair(self, folder: Path, name: str) -> list[Path]:
        return [folder / f"{name}.{self.fmt}", folder / f"{name}.meta.json"]

    # -- tiles --------------------------------------------------------------------------------
    def tile_files(self, src: TileSource, dest: Path) -> list[Path]:
        """Features + sidecar, the coordinates meta, the coordinates npz (hs2p writes none for a
        slide without tiles), then the hierarchical pair for a hierarchical run."""
        dest = Path(dest)
        bags = _bags(src)
        if bags is not None:   # slide2vec's per-class folders: tile_embeddings/<class>/, tiles/<class>/
            files = []
            for bag in bags:
                sub = class_folder(bag)
                tiles, coords = (dest / "tile_embeddings", dest / "tiles") if sub is None else \
                    (dest / "tile_embeddings" / sub, dest / "tiles" / sub)
                files += self._pair(tiles, src.sample_id) + [coords / f"{src.sample_id}.coordinates.npz",
                                                              coords / f"{src.sample_id}.coordinates.meta.json"]
            return files
        files = self._pair(dest / "tile_embeddings", src.sample_id) + [
            dest / "tiles" / f"{src.sample_id}{coordinate_files.META_SUFFIX}"]
        if int(src.attrs.get("num_tiles", 1)):
            files.append(dest / "tiles" / f"{src.sample_id}{coordinate_files.COORDINATES_SUFFIX}")
        if src.store.has_regions(src.sample_id):
            files += self._pair(dest / "hierarchical_embeddings", src.sample_id)
        return files

    def write_tiles(self, src: TileSource, files: list[Path]) -> None:
        run = _run(src.store)
        dtype, attrs = _dtype(run), _plain(src.attrs)
        features = np.asarray(src.group["embedding"][:]).astype(dtype)
        bags = _bags(src)
        if bags is not None:
            self._write_bags(src, files, run, attrs, features, bags)
            return
        _save(files[0], self.fmt, features, tile_index=np.arange(len(features), dtype=np.int64))
        npz, coordinates_meta = write_coordinates(src, files[2].parent)
        meta = self._slide_meta(src, run, attrs)
        meta.update({"artifact_type": "tile_embeddings", "feature_dim": int(features.shape[1]) if features.ndim == 2 else 0,
                     "num_tiles": int(len(features)),
                     "coordinates_npz_path": str(npz.resolve()) if len(features) else None,
                     "coordinates_meta_path": str(coordinates_meta.resolve())})
        write_json(files[1], meta)
        hierarchical = [f for f in files if f.parent.name == "hierarchical_embeddings"]
        if hierarchical:
            group = _regions_group(src)
            emb = np.asarray(group["embedding"][:]).astype(dtype)
            _save(hierarchical[0], self.fmt, emb)
            meta = self._slide_meta(src, run, attrs)
            meta.update({"artifact_type": "hierarchical_embeddings", "feature_dim": int(emb.shape[2]),
                         "num_regions": int(emb.shape[0]), "tiles_per_region": int(emb.shape[1]),
                         "region_x": np.asarray(group["region_x"][:]).tolist(),
                         "region_y": np.asarray(group["region_y"][:]).tolist()})
            write_json(hierarchical[1], meta)

    def _write_bags(self, src: TileSource, files: list[Path], run: dict, attrs: dict, features: np.ndarray,
                    bags: list[str]) -> None:
        """One bag's features, coordinates (its class's coverage as the fractions) and sidecar per bag."""
        member = np.asarray(src.group["in_bag"][:], bool)
        coverage = np.asarray(src.group["coverage"][:], np.float32)
        classes = [str(c) for c in np.asarray(src.group["class"][:])]
        for b, bag in enumerate(bags):
            index = np.flatnonzero(member[:, b])
            own = coverage[index, classes.index(bag)] if bag in classes else \
                np.asarray(src.group["tissue_fraction"][:], np.float32)[index]
            pt, sidecar, coords = files[4 * b], files[4 * b + 1], files[4 * b + 2]
            _save(pt, self.fmt, features[index], tile_index=np.arange(len(index), dtype=np.int64))
            written = write_coordinates(src, coords.parent, bag=bag, index=index, coverage=own)
            meta = self._slide_meta(src, run, attrs)
            meta.update({"annotation": class_folder(bag), "artifact_type": "tile_embeddings",
                         "feature_dim": int(features.shape[1]), "num_tiles": int(len(index)),
                         "coordinates_npz_path": str(written[0].resolve()),
                         "coordinates_meta_path": str(written[1].resolve())})
            write_json(sidecar, meta)

    def _slide_meta(self, src: TileSource, run: dict, attrs: dict) -> dict[str, Any]:
        identity = dict(run.get("feature_identity") or {})
        return {
            "sample_id": src.sample_id, "format": self.fmt, "annotation": None,
            "encoder_name": run.get("model") or attrs.get("encoder"), "encoder_level": run.get("model_level", "tile"),
            "feature_dtype": identity.get("feature_dtype", "fp32"),
            "encoder_input_size_px": identity.get("encoder_input_size_px", src.tile_size_px),
            "image_path": attrs.get("image_path"), "mask_path": attrs.get("mask_path") or None,
            "backend": attrs.get("backend"), "requested_spacing_um": src.requested_spacing_um,
            "requested_tile_size_px": src.tile_size_px, "read_tile_size_px": attrs.get("read_tile_size_px"),
            "tile_size_lv0": src.tile_size_lv0, "tiles_tar_path": attrs.get("tiles_from", ""),
            "compatibility": identity, "slide2vec_dask": attrs,
        }

    # -- slide / patient rows -----------------------------------------------------------------
    def row_files(self, src: RowSource, dest: Path) -> list[Path]:
        files = self._pair(Path(dest) / f"{src.level}_embeddings", src.key)
        if src.store.row_has_latents(src.level, src.key):
            files.append(Path(dest) / "slide_latents" / f"{src.key}.{self.fmt}")
        return files

    def write_row(self, src: RowSource, files: list[Path]) -> None:
        run = _run(src.store)
        dtype, attrs = _dtype(run), _plain(src.attrs)
        emb = np.asarray(src.group["embedding"][:]).astype(dtype)
        _save(files[0], self.fmt, emb)
        if len(files) > 2:
            _save(files[2], self.fmt, np.asarray(src.group["latents"][:]).astype(dtype), key="latents")
        identity = dict(run.get("feature_identity") or {})
        meta: dict[str, Any] = {"artifact_type": f"{src.level}_embeddings", "format": self.fmt,
                                "feature_dim": int(emb.shape[-1]), "encoder_name": attrs.get("model") or run.get("model"),
                                "encoder_level": src.level, "feature_dtype": identity.get("feature_dtype", "fp32"),
                                "compatibility": identity, "slide2vec_dask": attrs}
        if src.level == "patient":
            slides = attrs.get("slides") or attrs.get("sample_ids") or []
            meta.update({"patient_id": src.key, "num_slides": len(slides) if isinstance(slides, list) else 0})
        else:
            meta.update({"sample_id": src.key, "image_path": attrs.get("image_path"),
                         "latent_path": str(files[2].resolve()) if len(files) > 2 else None})
        write_json(files[1], meta)


def class_folder(bag: str | None) -> str | None:
    """slide2vec's folder for a bag: a class gets ``<kind>/<class>/``; tissue, merged and None the flat root."""
    return None if bag in (None, "tissue", "merged") else bag


def _bags(src: TileSource) -> list[str] | None:
    """The slide's annotation bags (None: tissue tiling, one bag), from its attributes (nothing opened)."""
    bags = src.attrs.get("bags")
    return [str(b) for b in bags] if bags else None


def _regions_group(src: TileSource):
    """The slide's ``regions/<id>`` group (read-only)."""
    import zarr

    return zarr.open_group(str(Path(src.store.path) / src.store.regions_group(src.sample_id)), mode="r")


def is_flat(path: Path | str, level: str) -> bool:
    """Whether ``path`` is the flat file of a ``level`` row (``<level>_embeddings/<key>.pt|.npz``)."""
    path = Path(path)
    return path.parent.name == f"{level}_embeddings" and path.suffix in (".pt", ".npz")


def load_meta(path: Path | str) -> dict:
    """A sidecar, read."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


FORMATS = tuple(ExportFormat(name, roots=LEVEL_FOLDERS, writer=Flat(name), layout=2) for name in ("pt", "npz"))
