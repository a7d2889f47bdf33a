"""`EmbeddingStore`: the one object that knows the run's layout on disk.

Layout (Zarr v3, readable with plain xarray)::

    <output_dir>/embeddings.zarr          what users open: only finished things;
                            attrs: run (the settings), layout (`schema.LAYOUT_VERSION`)
      tiles/<sample_id>     embedding (tile, feature); coords x, y (tile), level-0 px;
                            tissue_fraction (tile); attrs: provenance; with annotation bags
                            (masks with classes) also coverage (tile, class), in_bag (tile, bag)
                            and the class / bag names (each tile once, however many bags)
      regions/<sample_id>   hierarchical mode: embedding (region, tile_in_region, feature),
                            region_x, region_y, tile_mask; one region = one block = one chunk
      slides                slide-level models: embedding (slide, feature), coord sample_id;
                            latents (slide, latent, latent_feature) when asked
      patients              patient-level models: embedding (patient, feature), coord patient_id;
                            attrs["slides"]: {patient_id: [sample_id, ...]}
      _slides/<sample_id>   one slide's embedding (and latents) as its worker wrote it
      _patients/<patient_id> one patient's embedding as its worker wrote it
    <output_dir>/.slide2vec-work/         work in progress, never part of the user's view
      staging/<run>/<sample_id>   one .npy per block: (rows, cols, feature), NaN where no tile is kept;
                            one folder per run, so tasks a killed client left running on its
                            cluster never touch the blocks of the run that resumes after it
      publish/, trash/      groups being built, groups being replaced

Why it is laid out so:

* Every block's embeddings are written by the worker that made them into a
  file of their own, so workers never write the same thing, nothing goes
  through the client, and a rerun of a block rewrites the same values.
  Finalisation streams them band by band into the flat row-major arrays.
* Every finished group is built aside and *renamed* into the store: a group
  under ``tiles/``, ``regions/``, ``_slides/`` or ``_patients/`` is complete
  by being there with what its writer writes (`schema.COMPLETE_ATTRS`).  A
  crash, a user opening the store mid-run, or a task run
  twice after a lost worker never sees half a group; a second finalisation
  of a slide finds it published and does nothing.
* Metadata is consolidated per finished group, never for the whole store:
  a store-wide snapshot is stale as soon as another slide lands, and costs
  memory and a root ``zarr.json`` that grow with the cohort.  So the store
  opens the same way mid-run, after a crash and after the run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from slide2vec_dask.store import schema
from slide2vec_dask.store.output_dir import describe_os_error
from slide2vec_dask.store.tile_archive import write_archive
from slide2vec_dask.tiling.archive import archive_path, in_plan_order
from slide2vec_dask.tiling.tile_list import bands, block_members, load_plan

STORE_NAME = "embeddings.zarr"
WORK_NAME = ".slide2vec-work"
SLIDE_ROWS = "_slides"
PATIENT_ROWS = "_patients"
_FLAT_CHUNK_BYTES = 8 << 20
logger = logging.getLogger("slide2vec_dask")
_ROWS = {"slide": (SLIDE_ROWS, "slides", "slide", "sample_id"),
         "patient": (PATIENT_ROWS, "patients", "patient", "patient_id")}
#: The folder in which stores of layout 1 staged their blocks, inside the store.
_OLD_STAGING = "_staging"


class StoreLayoutError(ValueError):
    """The store was written in a layout this release does not read (older or newer)."""


def store_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STORE_NAME


def _open_group(path: Path, mode: str = "a"):
    import zarr

    # Never the consolidated view: it is a snapshot, and workers add groups while a run goes on.
    return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)


class EmbeddingStore:
    """The run's store under ``output_dir``; small and picklable, so tasks carry it.

    The client asks it what is done and assembles the tables; workers write
    blocks, finalise slides and write slide/patient rows through it.
    """

    def __init__(self, output_dir: str | Path, run: str = ""):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / STORE_NAME
        self.work = self.output_dir / WORK_NAME
        self.run = run       # names this run's staging folder (a Pipeline run gives each run its own)

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.output_dir)!r}, run={self.run!r})"

    def __reduce__(self):
        return EmbeddingStore, (str(self.output_dir), self.run)

    # -- names users see (nobody else spells them) ------------------------------------------
    @staticmethod
    def tiles_group(sample_id: str) -> str:
        return f"tiles/{sample_id}"

    @staticmethod
    def regions_group(sample_id: str) -> str:
        return f"regions/{sample_id}"

    @staticmethod
    def table_group(level: str) -> str:
        """``"slides"`` or ``"patients"``: the table that holds one row per slide (patient)."""
        return _ROWS[level][1]

    # -- the run -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def check_layout(self) -> None:
        """Refuse a store of another layout (reads only); every reader entry asks this first.

        A store that records none is of today's layout when nothing of the older one is in it
        (no ``_staging/``, every group complete by today's rule): it was written by a release
        from before layouts were recorded, and the next run records it.
        """
        if not self.exists():
            return
        found = _attrs(self.path).get(schema.LAYOUT_ATTR)
        if found == schema.LAYOUT_VERSION:
            return
        todo = ("rerun with ExecutionOptions(overwrite=True) (CLI: execution.overwrite=true) to replace it, "
                "or use a new output_dir")
        if found is not None:
            raise StoreLayoutError(
                f"{self.path} has store layout {found!r}; this release of slide2vec-dask reads layout "
                f"{schema.LAYOUT_VERSION} only (a newer layout needs a newer release): {todo}")
        old = self._older_layout()
        if old:
            raise StoreLayoutError(
                f"{self.path} was written in an older store layout (before layout {schema.LAYOUT_VERSION}): "
                f"{old}; its embeddings cannot be trusted as complete: {todo}")

    def _older_layout(self) -> str:
        """What in an unrecorded store belongs to the older layout ("" when nothing does)."""
        if (self.path / _OLD_STAGING).exists():
            return f"it holds {_OLD_STAGING}/ (blocks staged inside the store)"
        for where, kind in (("tiles", "tiles"), ("regions", "regions"), (SLIDE_ROWS, "rows"), (PATIENT_ROWS, "rows")):
            for name in _groups(self.path / where):
                missing = _missing(_attrs(self.path / where / name), kind)
                if missing:
                    return f"{where}/{name} lacks {', '.join(missing)}"
        return ""

    def check_run(self, run_attrs: dict[str, Any]) -> None:
        """Refuse to add to a store of another layout, or made with other settings (reads only)."""
        if not self.exists():
            return
        self.check_layout()
        existing = _attrs(self.path).get("run")
        if existing is not None and existing != run_attrs:
            changed = sorted(k for k in set(existing) | set(run_attrs) if existing.get(k) != run_attrs.get(k))
            raise ValueError(
                f"{self.path} holds a run made with other settings ({', '.join(changed)} differ); "
                "use another output_dir, or ExecutionOptions(overwrite=True) to replace it")

    def begin_run(self, run_attrs: dict[str, Any], overwrite: bool) -> str | None:
        """Create the store, or check that the existing one was made with the same settings.

        ``overwrite`` (a real ``True``: the options refuse anything else) replaces an
        existing store; what it removed is returned (and logged), None when nothing.
        """
        import zarr

        removed = None
        if not overwrite:
            self.check_run(run_attrs)
        elif self.exists():
            removed = (f"overwrite=True: replaced the store {self.path} ({len(self.finished_slides())} slides' "
                       f"tile embeddings, {len(self.slide_rows())} slide and {len(self.patient_rows())} patient "
                       "embeddings)")
            logger.warning(removed)
        if overwrite:
            shutil.rmtree(self.work, ignore_errors=True)
        root = zarr.open_group(str(self.path), mode="w" if overwrite else "a", zarr_format=3,
                               use_consolidated=False)
        if dict(root.attrs).get("run") != run_attrs:
            root.attrs["run"] = run_attrs
        if dict(root.attrs).get(schema.LAYOUT_ATTR) != schema.LAYOUT_VERSION:   # new, or checked above
            root.attrs[schema.LAYOUT_ATTR] = schema.LAYOUT_VERSION
        if "tiles" not in root:
            root.create_group("tiles")
        self._drop_consolidated()
        for sub in ("staging", "publish", "trash"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        return removed

    def finish_run(self) -> None:
        """Consolidate the store's metadata (plain xarray then opens it in one read); tidy the work area."""
        self._consolidate_root()
        shutil.rmtree(self.work / "publish", ignore_errors=True)
        shutil.rmtree(self.work / "trash", ignore_errors=True)
        staging = self.work / "staging"
        if not staging.is_dir():
            return
        for entry in staging.iterdir():
            if entry.name != (self.run or "shared"):   # blocks of a crashed or killed run: a slide always restarts clean
                shutil.rmtree(entry, ignore_errors=True)
        mine = staging / (self.run or "shared")
        if mine.is_dir():
            # Left by a finalisation whose worker was lost after publishing: the slide is complete.
            for sample_id in self.finished_slides() & {e.name for e in mine.iterdir()}:
                self.discard_staging(sample_id)
            if not any(mine.iterdir()):
                mine.rmdir()
        if not any(staging.iterdir()):
            shutil.rmtree(self.work, ignore_errors=True)

    def _consolidate_root(self) -> None:
        """Zarr's consolidated metadata for the whole store, *streamed* into the root ``zarr.json``.

        ``zarr.consolidate_metadata`` holds every node's metadata in memory at once:
        a 90 MB peak on the client at 2000 slides (measured), growing with the cohort.
        Written node by node instead (a consolidated slide group contributes its own
        entries, no walk inside), memory stays flat; the file is what zarr writes.
        """
        meta = self.path / "zarr.json"
        doc = json.loads(meta.read_text())
        doc.pop("consolidated_metadata", None)
        tmp = meta.with_name(f".zarr.json.{uuid.uuid4().hex}")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc)[:-1] + ', "consolidated_metadata": {"kind": "inline", '
                    '"must_understand": false, "metadata": {')
            for i, (key, node) in enumerate(_nodes(self.path)):
                f.write(("," if i else "") + json.dumps(key) + ": " + json.dumps(node))
            f.write("}}}")
        os.replace(tmp, meta)

    def _drop_consolidated(self) -> None:
        """An older store's root-level consolidated metadata: a snapshot that would hide new slides."""
        meta = self.path / "zarr.json"
        doc = json.loads(meta.read_text())
        if doc.pop("consolidated_metadata", None) is not None:
            _write_json(meta, doc)

    # -- what is done (client side: a listing and one small JSON read per group, never a zarr open) --
    def finished_slides(self) -> set[str]:
        """Sample ids whose tile embeddings are published, complete, under ``tiles/``."""
        return _published(self.path / "tiles", "tiles")

    def slide_rows(self) -> set[str]:
        return _published(self.path / SLIDE_ROWS, "rows")

    def patient_rows(self) -> set[str]:
        return _published(self.path / PATIENT_ROWS, "rows")

    def is_complete(self, sample_id: str) -> bool:
        return not _missing(self.tile_attrs(sample_id), "tiles")

    def has_row(self, level: str, key: str) -> bool:
        return not _missing(self.row_attrs(level, key), "rows")

    def row_has_latents(self, level: str, key: str) -> bool:
        return (self.path / _ROWS[level][0] / key / "latents" / "zarr.json").is_file()

    def row_attrs(self, level: str, key: str) -> dict[str, Any]:
        return _attrs(self.path / _ROWS[level][0] / key)

    def fingerprints(self, where: str, key: str) -> dict[str, Any]:
        """The source-file fingerprints recorded with a slide's ``"tiles"`` or ``"slide"`` row."""
        attrs = self.tile_attrs(key) if where == "tiles" else self.row_attrs(where, key)
        return {k: v for k, v in attrs.items() if k.endswith("_fingerprint")}

    def provenance(self, sample_id: str, patient_id: str = "") -> list[dict[str, Any]]:
        """Every record of which files this slide's stored outputs came from (tiles, slide row, patient row)."""
        records = [self.tile_attrs(sample_id), self.row_attrs("slide", sample_id)]
        if patient_id:
            records.append(self.row_attrs("patient", patient_id).get("slide_fingerprints", {}).get(sample_id, {}))
        return [r for r in records if r]

    def patient_slides(self, patient_id: str) -> list[str]:
        """The slides a stored patient embedding was made from, in order."""
        return list(self.row_attrs("patient", patient_id).get("sample_ids", []))

    def tile_attrs(self, sample_id: str) -> dict[str, Any]:
        return _attrs(self.path / "tiles" / sample_id)

    def num_tiles(self, sample_id: str) -> int:
        return int(self.tile_attrs(sample_id).get("num_tiles", 0))

    def has_regions(self, sample_id: str) -> bool:
        return not _missing(_attrs(self.path / "regions" / sample_id), "regions")

    def num_regions(self, sample_id: str) -> int:
        return int(_attrs(self.path / "regions" / sample_id).get("num_regions", 0))

    def tile_encoder(self, sample_id: str) -> str:
        """Which tile encoder made a finished slide's tile embeddings."""
        if not self.is_complete(sample_id):
            raise FileNotFoundError(f"{sample_id}: no finished tile embeddings at {self.path}/tiles/{sample_id}")
        return str(self.tile_attrs(sample_id).get("encoder", ""))

    # -- the tile stage (worker side) ---------------------------------------------------------
    def _staging(self, sample_id: str) -> Path:
        return self.work / "staging" / (self.run or "shared") / sample_id

    def prepare_slide(self, sample_id: str) -> None:
        """An empty staging folder for the slide; unfinished output of earlier runs goes."""
        if not self.is_complete(sample_id):   # (a slide redone over older results keeps them until it lands)
            self._retire(self.path / "regions" / sample_id)   # of a slide whose tiles never got published
        self._retire(self._staging(sample_id))
        self._staging(sample_id).mkdir(parents=True)

    def write_block(self, sample_id: str, block: tuple[int, int], tiles: np.ndarray,
                    region: np.ndarray | None = None) -> int:
        """One block's tile rows (its tiles in plan order; NaN rows count as missing), and in
        hierarchical mode its whole region, each into its own file; the tile count.

        Staging is private, so it is a plain ``.npy`` per block, renamed into place:
        a zarr chunk write costs ~4 ms of metadata reads, compression and event-loop
        hops per block (measured), this a fraction of one.
        """
        if region is not None:
            self._stage(sample_id, f"{block[0]}-{block[1]}.region.npy", region)
        self._stage(sample_id, f"{block[0]}-{block[1]}.npy", tiles)
        return int(np.isfinite(tiles[..., 0]).sum())

    def _stage(self, sample_id: str, name: str, values: np.ndarray) -> None:
        target = self._staging(sample_id) / name
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(values, dtype=np.float32))
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(tmp.parent, exc) from exc

    def write_block_dense(self, sample_id: str, block: tuple[int, int], grids: np.ndarray) -> None:
        """One block's token grids ``(n, token_y, token_x, feature)`` (``save_dense``), in their own dtype."""
        target = self._staging(sample_id) / f"{block[0]}-{block[1]}.dense.npy"
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(grids))
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(tmp.parent, exc) from exc

    def write_block_tiles(self, sample_id: str, block: tuple[int, int], blobs: list[bytes]) -> None:
        """One block's tiles as JPEG bytes (``on_the_fly=False``), staged for the slide's archive."""
        target = self._staging(sample_id) / f"{block[0]}-{block[1]}.jpegs.npz"
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, data=data, sizes=np.array([len(b) for b in blobs], dtype=np.int64))
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise write_error(tmp.parent, exc) from exc

    def _staged_tiles(self, sample_id: str, block: tuple[int, int]) -> list[bytes]:
        """One block's staged JPEGs (`write_block_tiles`), in the order its tiles were cut."""
        path = self._staging(sample_id) / f"{block[0]}-{block[1]}.jpegs.npz"
        if not path.exists():
            raise RuntimeError(f"{sample_id}: the tiles of block {block} never reached the archive")
        with np.load(path) as staged:
            data, sizes = staged["data"].tobytes(), staged["sizes"]
        ends = np.cumsum(sizes)
        return [data[e - n : e] for n, e in zip(sizes.tolist(), ends.tolist())]

    def finalize_slide(self, sample_id: str, plan_path: str, k: int, attrs: dict[str, Any],
                       archive_dir: str | None = None) -> dict[str, int]:
        """Block files -> flat row-major ``tiles/<id>`` (and ``regions/<id>``), published by rename.

        Safe to run twice or concurrently: a slide already published from the same
        file (its fingerprint) is left as it is; one published from an earlier version
        of the file is replaced by this one, in one rename, only now that it is built.
        With ``archive_dir`` (``on_the_fly=False``) the slide's tile archive is written
        there first, from its staged JPEGs.
        """
        grid = load_plan(plan_path)
        done = {"num_tiles": grid.num_tiles, "num_regions": grid.num_regions if grid.region_tile_multiple else 0}
        prints = {k: v for k, v in attrs.items() if k.endswith("_fingerprint")}

        def published() -> bool:
            archived = archive_dir is None or archive_path(archive_dir, sample_id).is_file()
            return archived and self.is_complete(sample_id) and self.fingerprints("tiles", sample_id) == prints

        if published():
            return done
        try:
            tiles, regions = self._build(self._staging(sample_id), sample_id, grid, k, attrs)
            if archive_dir is not None:
                blobs = in_plan_order(grid, k, lambda block: self._staged_tiles(sample_id, block))
                write_archive(Path(archive_dir), sample_id, grid, blobs, attrs)
        except FileNotFoundError:
            if published():   # another run of this task published it meanwhile
                return done
            raise
        except OSError as exc:   # (a full disk, said plainly, as staging says it)
            raise write_error(self.path, exc) from exc
        stale = (self.path / "tiles" / sample_id).exists()   # complete, or not: replaced either way
        dense = self._build_dense(self._staging(sample_id), sample_id, grid, k, attrs)
        if dense is not None:   # before the tiles: a published tiles group means the slide is whole
            self._publish(dense, self.path / "dense" / sample_id, replace=True)
        elif stale:
            self._retire(self.path / "dense" / sample_id)
        if regions is not None:
            self._publish(regions, self.path / "regions" / sample_id, replace=True)
        elif stale:
            self._retire(self.path / "regions" / sample_id)
        self._publish(tiles, self.path / "tiles" / sample_id, replace=stale)
        self.discard_staging(sample_id)
        return done

    def _build(self, staging: Path, sample_id: str, grid, k: int, attrs: dict[str, Any]) -> tuple[Path, Path | None]:
        """The slide's groups, built aside from its block files (a band of blocks in memory at a time)."""
        import zarr

        if not staging.is_dir():
            raise FileNotFoundError(f"{sample_id}: no staged blocks at {staging}")
        n = grid.num_tiles
        feature_dim = int(attrs["feature_dim"])
        chunk = max(1, min(n, _FLAT_CHUNK_BYTES // (4 * feature_dim)))
        tmp = self._scratch()
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        emb = group.create_array(
            "embedding", shape=(n, feature_dim), chunks=(chunk, feature_dim), dtype="float32", fill_value=np.nan,
            dimension_names=list(schema.TILE_DIMS),
            attributes={"coordinates": "x y", **schema.TILE_EMBEDDING_ATTRS, "encoder": attrs.get("encoder", "")})
        hierarchical = grid.layout == "grid" and grid.region_tile_multiple is not None
        regions, region_emb = (self._regions_group(grid, k, feature_dim, attrs) if hierarchical
                               else (None, None))
        written, pending = 0, []

        def flush(final: bool) -> None:
            nonlocal written, pending
            rows = np.concatenate(pending)
            take = len(rows) if final else len(rows) // chunk * chunk   # chunk-aligned until the last
            emb[written : written + take] = rows[:take]
            written, pending = written + take, [rows[take:]]

        for rows in _staged_rows(staging, sample_id, grid, k, feature_dim, region_emb):
            if len(rows):
                pending.append(rows)
            if sum(len(p) for p in pending) >= chunk:
                flush(final=False)
        if pending:
            flush(final=True)
        if written != n:
            raise RuntimeError(f"{sample_id}: wrote {written} tile rows, the plan has {n}")
        _vector(group, "x", grid.x, schema.TILE_COORDS["x"])
        _vector(group, "y", grid.y, schema.TILE_COORDS["y"])
        _vector(group, "tissue_fraction", grid.kept_tissue_fraction, schema.TISSUE_FRACTION_ATTRS)
        if getattr(grid, "member", None) is not None:
            _bag_tables(group, grid)
        group.update_attributes({**attrs, "num_tiles": n, "tile_size_lv0": grid.tile_size_lv0,
                                 "tile_size_lv0_units": schema.LEVEL0_PX, "build_id": uuid.uuid4().hex,
                                 "requested_spacing_um": grid.requested_spacing_um, "spacing_units": "µm/px",
                                 "complete": True})
        _consolidate(tmp)
        if regions is not None:
            _consolidate(regions)
        return tmp, regions

    def _build_dense(self, staging: Path, sample_id: str, grid, k: int, attrs: dict[str, Any]) -> Path | None:
        """``dense/<id>`` built aside from the blocks' staged token grids (None when none were staged).

        ``embedding (tile, token_y, token_x, feature)``, one chunk per tile (a tile's grid is
        one read), rows in the tiles group's order; ``x``/``y`` as there.
        """
        import zarr

        members = list(zip(*block_members(grid, k)))
        staged = [staging / f"{b[0]}-{b[1]}.dense.npy" for b, _ in members]
        if not any(p.exists() for p in staged):
            return None
        first = np.load(next(p for p in staged if p.exists()), mmap_mode="r")
        _, gh, gw, dim = first.shape
        n = grid.num_tiles
        tmp = self._scratch()
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        emb = group.create_array(
            "embedding", shape=(n, gh, gw, dim), chunks=(1, gh, gw, dim), dtype=first.dtype, fill_value=np.nan,
            dimension_names=list(schema.DENSE_DIMS), attributes={"coordinates": "x y", **schema.DENSE_EMBEDDING_ATTRS})
        for path, (block, index) in zip(staged, members):
            if not path.exists():
                raise RuntimeError(f"{sample_id}: the token grids of block {block} never landed")
            values = np.load(path)
            if len(values) != len(index):
                raise RuntimeError(f"{sample_id}: block {block} staged {len(values)} grids for {len(index)} tiles")
            if len(index):
                emb.oindex[np.asarray(index)] = values
        _vector(group, "x", grid.x, schema.TILE_COORDS["x"])
        _vector(group, "y", grid.y, schema.TILE_COORDS["y"])
        token = grid.tile_size_lv0 / gw
        group.update_attributes({**attrs, "num_tiles": n, "tile_size_lv0": grid.tile_size_lv0,
                                 "token_grid": [int(gh), int(gw)], "token_size_lv0": token,
                                 "feature_kind": "patch_features", "dtype": str(first.dtype),
                                 "build_id": uuid.uuid4().hex, "complete": True})
        _consolidate(tmp)
        return tmp

    def _regions_group(self, grid, k: int, feature_dim: int, attrs: dict[str, Any]):
        import zarr

        tmp = self._scratch()
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        n, t = grid.num_regions, k * k
        emb = group.create_array("embedding", shape=(n, t, feature_dim), chunks=(1, t, feature_dim),
                                 dtype="float32", fill_value=np.nan, dimension_names=list(schema.REGION_DIMS),
                                 attributes={"coordinates": "region_x region_y", **schema.REGION_EMBEDDING_ATTRS})
        _vector(group, "region_x", grid.region_x, schema.REGION_COORDS["region_x"], "region")
        _vector(group, "region_y", grid.region_y, schema.REGION_COORDS["region_y"], "region")
        mask = group.create_array("tile_mask", shape=(n, t), chunks=(max(1, n), t), dtype="bool", fill_value=False,
                                  dimension_names=list(schema.REGION_MASK_DIMS), attributes=schema.TILE_MASK_ATTRS)
        if n:
            mask[:] = grid.tile_mask
        group.update_attributes({**attrs, "num_regions": n, "region_tile_multiple": k,
                                 "tile_size_lv0": grid.tile_size_lv0, "sub_tile_order": schema.SUB_TILE_ORDER,
                                 "complete": True})
        return tmp, emb

    def discard_staging(self, sample_id: str) -> None:
        shutil.rmtree(self._staging(sample_id), ignore_errors=True)

    # -- the slide and patient stages (worker side) ------------------------------------------
    def read_tile_features(self, sample_id: str, device: str = "cpu"):
        """A finished slide's ``(N, D)`` features as a float32 tensor on ``device``,
        its ``(N, 2)`` level-0 x/y and tile size (level 0).

        The features are copied chunk by chunk into a tensor allocated once on
        the device: on a GPU the host never holds the whole matrix, on a CPU it
        holds it once (plus one chunk), whatever the number of tiles.
        """
        import torch

        group = _open_group(self.path / "tiles" / sample_id, mode="r")
        coords = np.stack([group["x"][:], group["y"][:]], axis=1).astype(np.int64)
        emb = group["embedding"]
        features = torch.empty(emb.shape, dtype=torch.float32, device=device)
        step = max(1, emb.chunks[0])
        for start in range(0, emb.shape[0], step):
            features[start : start + step].copy_(torch.from_numpy(emb[start : start + step]))
        return features, coords, int(group.attrs["tile_size_lv0"])

    def write_row(self, level: str, key: str, embedding: np.ndarray, latents: np.ndarray | None,
                  attrs: dict[str, Any]) -> None:
        """One slide's (patient's) vector, built aside and published over any older row."""
        import zarr

        tmp = self._scratch()
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.create_array("embedding", data=np.asarray(embedding, dtype=np.float32), dimension_names=["feature"])
        if latents is not None:
            group.create_array("latents", data=np.asarray(latents, dtype=np.float32),
                               dimension_names=["latent", "latent_feature"])
        group.update_attributes({**attrs, "build_id": uuid.uuid4().hex, "complete": True})
        _consolidate(tmp)
        self._ensure_group(_ROWS[level][0])
        self._publish(tmp, self.path / _ROWS[level][0] / key, replace=True)

    def read_row(self, level: str, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(embedding, latents or None) of one slide (``level="slide"``) or patient."""
        group = _open_group(self.path / _ROWS[level][0] / key, mode="r")
        return group["embedding"][:], (group["latents"][:] if "latents" in group else None)

    def drop_tiles(self, sample_id: str) -> None:
        """A slide/patient-level run's tile embeddings, once they were not asked to be kept."""
        for where in ("tiles", "regions", "dense"):
            self._retire(self.path / where / sample_id)

    def drop_row(self, level: str, key: str) -> None:
        self._retire(self.path / _ROWS[level][0] / key)

    # -- tables (client side, at the end of a run) -------------------------------------------
    def finished_rows(self, level: str, first: list[str] = ()) -> list[str]:
        """Keys of the finished slide (patient) rows: those of ``first`` in its order, then the rest sorted."""
        done = _published(self.path / _ROWS[level][0], "rows")
        return [k for k in first if k in done] + sorted(done - set(first))

    def assemble(self, level: str, keys: list[str], with_latents: bool = False,
                 attrs: dict[str, Any] | None = None) -> None:
        """``slides`` / ``patients``: the finished rows of ``keys`` (in that order) as one table."""
        where, name, dim, id_name = _ROWS[level]
        root = _open_group(self.path)
        if name in root:
            del root[name]
        if not keys:
            return
        rows = [root[f"{where}/{k}"] for k in keys]
        group = root.create_group(name)
        group.create_array("embedding", data=np.stack([r["embedding"][:] for r in rows]),
                           dimension_names=[dim, "feature"],
                           attributes={"coordinates": id_name, "long_name": f"{dim} embedding"})
        ids = group.create_array(id_name, shape=(len(keys),), dtype=str, dimension_names=[dim])  # UTF-8, any length
        ids[:] = np.array(keys, dtype=object)
        if with_latents and all("latents" in r for r in rows):
            latents = [r["latents"][:] for r in rows]
            if len({lat.shape for lat in latents}) == 1:
                group.create_array("latents", data=np.stack(latents),
                                   dimension_names=[dim, "latent", "latent_feature"])
            else:  # variable-length latents stay per slide in _slides/<id>/latents
                group.attrs["latents"] = f"per {dim}, different lengths: see {where}/<id>/latents"
        group.update_attributes(attrs or {})
        _consolidate(self.path / name)

    # -- reading for exports -----------------------------------------------------------------
    def run_attrs(self) -> dict[str, Any]:
        """The settings the run was made with (``begin_run``'s record)."""
        return dict(_attrs(self.path).get("run", {}))

    def open_tiles(self, sample_id: str):
        """A finished slide's ``tiles/<id>`` group (read-only zarr)."""
        if not self.is_complete(sample_id):
            raise FileNotFoundError(f"{sample_id}: no finished tile embeddings at {self.path}/tiles/{sample_id}")
        return _open_group(self.path / "tiles" / sample_id, mode="r")

    def open_row(self, level: str, key: str):
        """One slide's (patient's) stored row, ``_slides/<id>`` (``_patients/<id>``), read-only."""
        if not self.has_row(level, key):
            raise FileNotFoundError(f"{key}: no {level} embedding at {self.path}/{_ROWS[level][0]}/{key}")
        return _open_group(self.path / _ROWS[level][0] / key, mode="r")

    def source_id(self, level: str, key: str) -> str:
        """What identifies the stored group an export is made from (``level``: tile, slide, patient).

        The group's ``build_id`` (new at every publication); groups of older stores have
        none, so their directory inode and metadata mtime stand in (a republished group
        is a new directory).  An export recorded with another id is stale.
        """
        folder = self.path / "tiles" / key if level == "tile" else self.path / _ROWS[level][0] / key
        attrs = _attrs(folder)
        if attrs.get("build_id"):
            return str(attrs["build_id"])
        meta = (folder / "zarr.json").stat()
        return f"{folder.stat().st_ino}-{meta.st_mtime_ns}"

    # -- the user's view ---------------------------------------------------------------------
    def open(self, chunks: dict | str | None = None):
        """The store as an `xarray.DataTree` (lazy); works mid-run and after a crash too."""
        import xarray as xr

        if not self.path.exists():
            raise FileNotFoundError(f"no embeddings store at {self.path}")
        self.check_layout()
        # Consolidated once a run ended; mid-run or after a crash, group by group.
        return xr.open_datatree(str(self.path), engine="zarr", consolidated=self.is_consolidated(), chunks=chunks)

    def is_consolidated(self) -> bool:
        try:
            return json.loads((self.path / "zarr.json").read_text()).get("consolidated_metadata") is not None
        except OSError:
            return False

    # -- publishing ---------------------------------------------------------------------------
    def _scratch(self) -> Path:
        folder = self.work / "publish"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex

    def _ensure_group(self, name: str) -> None:
        meta = self.path / name / "zarr.json"
        if not meta.exists():
            meta.parent.mkdir(parents=True, exist_ok=True)
            _write_json(meta, {"zarr_format": 3, "node_type": "group", "attributes": {}})

    def _retire(self, target: Path) -> None:
        """Move ``target`` out of the way (one rename), then delete it."""
        trash = self.work / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        dest = trash / uuid.uuid4().hex
        try:
            os.rename(target, dest)
        except FileNotFoundError:
            return
        shutil.rmtree(dest, ignore_errors=True)

    def _publish(self, built: Path, target: Path, replace: bool) -> None:
        """Rename a finished group into the store.  First one wins unless ``replace``."""
        self._ensure_group(target.parent.relative_to(self.path).as_posix())
        if replace:
            self._retire(target)
        try:
            os.rename(built, target)
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(built, ignore_errors=True)   # an identical group got there first


def write_error(folder: Path, exc: OSError) -> OSError:
    """A write failure said plainly, with its folder and no ``[Errno N]``: numpy and zarr report a
    full disk as '... requested and ... written', with no errno at all."""
    code = exc.errno
    reason = describe_os_error(exc) if code else str(exc)
    try:
        if code is None and shutil.disk_usage(folder).free < (1 << 20):
            code, reason = errno.ENOSPC, describe_os_error(OSError(errno.ENOSPC, ""))
    except OSError:
        pass
    error = OSError(f"cannot write in {folder}: {reason}")   # one argument: str() is the message alone
    error.errno = code
    return error


def _staged_rows(staging: Path, sample_id: str, plan, k: int, feature_dim: int, region_emb=None):
    """The plan's tile rows in order, a band of blocks at a time, from the blocks' staged files.

    Each block's file holds its tiles in plan order (`tiling.tile_list.block_members`),
    and a band (one row of blocks) is a contiguous run of the plan's order, so a band at
    a time is all that is in memory.  In hierarchical mode each block is one region,
    written to ``region_emb`` in row-major order.
    """
    region = 0
    for band in bands(*block_members(plan, k)):
        lo = min(int(index.min()) for _, index in band)
        hi = max(int(index.max()) for _, index in band) + 1
        rows = np.full((hi - lo, feature_dim), np.nan, dtype=np.float32)
        for block, index in band:
            path = staging / f"{block[0]}-{block[1]}.npy"
            if not path.exists():
                raise RuntimeError(f"{sample_id}: the embeddings of block {block} never landed")
            rows[index - lo] = np.load(path)
            if region_emb is not None:
                region_emb[region] = np.load(staging / f"{block[0]}-{block[1]}.region.npy")
                region += 1
        if np.isnan(rows[:, 0]).any():
            raise RuntimeError(f"{sample_id}: embeddings of tiles {lo}..{hi - 1} never landed")
        yield rows


def _consolidate(group_dir: Path) -> None:
    """Consolidate one finished group's metadata before it is published.

    Mid-run (no store-wide snapshot yet) a slide then opens in one read; opening 2000
    slides took 7.7 s with no consolidation, 4.9 s per group, 3.5 s store-wide (measured).
    The store-wide pass at the end reuses these entries instead of walking the groups.
    """
    import warnings

    import zarr

    with warnings.catch_warnings():   # zarr notes that consolidation is not in the v3 spec yet; xarray reads it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(group_dir))


_EMPTY = {"kind": "inline", "must_understand": False, "metadata": {}}


def _nodes(root: Path):
    """(key, metadata) of every node below ``root``, as zarr's consolidated metadata lists them."""
    stack = [("", root)]
    while stack:
        prefix, folder = stack.pop()
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = os.path.join(entry.path, "zarr.json")
            if entry.name.startswith(".") or not entry.is_dir() or not os.path.isfile(path):
                continue
            with open(path) as f:
                doc = json.load(f)
            key = prefix + entry.name
            inner = doc.pop("consolidated_metadata", None)
            if doc.get("node_type") != "group":
                yield key, doc
                continue
            yield key, {**doc, "consolidated_metadata": _EMPTY}
            if inner and inner.get("metadata"):   # a consolidated group: its own entries, no walk inside
                for sub, node in inner["metadata"].items():
                    yield f"{key}/{sub}", node
            else:
                stack.append((key + "/", Path(entry.path)))


def _published(folder: Path, kind: str) -> set[str]:
    """The groups under ``folder`` complete by the rule for ``kind`` (one small JSON read each)."""
    return {name for name in _groups(folder) if not _missing(_attrs(folder / name), kind)}


def _groups(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if e.is_dir() and os.path.isfile(os.path.join(e.path, "zarr.json"))]
    except FileNotFoundError:
        return []


def _missing(attrs: dict[str, Any], kind: str) -> list[str]:
    """What of its writer's attributes a group of ``kind`` lacks (``complete`` must be true): [] when complete."""
    return [k for k in schema.COMPLETE_ATTRS[kind] if k not in attrs or (k == "complete" and attrs[k] is not True)]


def _attrs(group_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((group_dir / "zarr.json").read_text()).get("attributes", {})
    except (FileNotFoundError, ValueError):   # absent, or damaged: nothing it says can be trusted
        return {}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _bag_tables(group, grid) -> None:
    """Annotation sampling: ``coverage (tile, class)``, ``in_bag (tile, bag)`` and the ``class`` / ``bag`` names."""
    for dim, names in (("class", grid.meta["classes"]), ("bag", grid.meta["bags"])):
        arr = group.create_array(dim, shape=(len(names),), dtype=str, dimension_names=[dim], fill_value="")
        if names:
            arr[:] = np.asarray(names, dtype=str)
    for name, values, dims, attributes in (("coverage", grid.class_coverage, schema.COVERAGE_DIMS, schema.COVERAGE_ATTRS),
                                           ("in_bag", grid.member, schema.BAG_DIMS, schema.BAG_ATTRS)):
        arr = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)), max(1, values.shape[1])),
                                 dtype=values.dtype, dimension_names=list(dims), attributes=attributes,
                                 fill_value=0)
        if values.size:
            arr[:] = values


def _vector(group, name: str, values: np.ndarray, attributes: dict, dim: str = "tile") -> None:
    arr = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),), dtype=values.dtype,
                             dimension_names=[dim], attributes=attributes, fill_value=0)
    if len(values):
        arr[:] = values


def open_embeddings(output_dir: str | Path, chunks: dict | str | None = None):
    """The whole run as an `xarray.DataTree` (lazy; nothing is read until used).

    Works while a run is going and after a crash: only finished slides are
    in the store.  ``chunks`` goes to xarray: ``{}`` backs every variable
    with a dask array of the store's own chunks.
    """
    return EmbeddingStore(output_dir).open(chunks=chunks)
