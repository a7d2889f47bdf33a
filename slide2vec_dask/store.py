"""The run's Zarr store: layout, worker-side writes, and the xarray view.

Layout (Zarr v3, readable with plain xarray)::

    <output_dir>/embeddings.zarr
      tiles/<sample_id>     embedding (tile, feature); coords x, y (tile), level-0 px;
                            tissue_fraction (tile); attrs: provenance, complete
      regions/<sample_id>   hierarchical mode: embedding (region, tile_in_region, feature),
                            region_x, region_y, tile_mask; one region = one block = one chunk
      slides                slide-level models: embedding (slide, feature), coord sample_id;
                            latents (slide, latent, latent_feature) when asked
      patients              patient-level models: embedding (patient, feature), coord patient_id;
                            attrs["slides"]: {patient_id: [sample_id, ...]}
      _staging/<sample_id>  embedding (row, col, feature) on the tile grid, while running
      _slides/<sample_id>   one slide's embedding (and latents) as its worker wrote it
      _patients/<patient_id> one patient's embedding as its worker wrote it

Why a staging grid: a block of k x k tiles is exactly one chunk of the grid
array, so every worker writes its own chunk with no coordination and no data
through the client.  When all blocks of a slide landed, one task on a worker
streams the grid band by band into the flat, row-major ``(tile, feature)``
array users read, removes the staging grid and writes ``complete = True``
last: a crash never leaves anything that looks finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

STORE_NAME = "embeddings.zarr"
STAGING = "_staging"
SLIDE_ROWS = "_slides"
PATIENT_ROWS = "_patients"
_FLAT_CHUNK_BYTES = 8 << 20


def store_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STORE_NAME


def _root(path: str | Path, mode: str = "a"):
    import zarr

    # Never the consolidated view: it is a snapshot, and workers add groups while a run goes on.
    return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)


def init_store(path: Path, run_attrs: dict[str, Any], overwrite: bool) -> None:
    """Create the store, or check that an existing one was made with the same settings."""
    import zarr

    if path.exists() and not overwrite:
        existing = dict(_root(path).attrs).get("run")
        if existing is not None and existing != run_attrs:
            changed = sorted(k for k in set(existing) | set(run_attrs) if existing.get(k) != run_attrs.get(k))
            raise ValueError(
                f"{path} holds a run made with other settings ({', '.join(changed)} differ); "
                "use another output_dir, or ExecutionOptions(overwrite=True) to replace it"
            )
    root = zarr.open_group(str(path), mode="w" if overwrite else "a", zarr_format=3)
    root.attrs["run"] = run_attrs
    if "tiles" not in root:
        root.create_group("tiles")


def is_complete(path: Path, sample_id: str) -> bool:
    root = _root(path)
    key = f"tiles/{sample_id}"
    return key in root and bool(root[key].attrs.get("complete", False))


def num_tiles(path: Path, sample_id: str) -> int:
    return int(_root(path)[f"tiles/{sample_id}"].attrs.get("num_tiles", 0))


def num_regions(path: Path, sample_id: str) -> int:
    return int(_root(path)[f"regions/{sample_id}"].attrs.get("num_regions", 0))


def has_regions(path: Path, sample_id: str) -> bool:
    return f"regions/{sample_id}" in _root(path)


def prepare_slide(path: Path, sample_id: str, grid, staging_shape: tuple[int, int], k: int,
                  feature_dim: int) -> None:
    """Remove any earlier (incomplete) output of the slide; create its staging grid (and regions)."""
    root = _root(path)
    for key in (f"tiles/{sample_id}", f"regions/{sample_id}", f"{STAGING}/{sample_id}"):
        if key in root:
            del root[key]
    if STAGING not in root:
        root.create_group(STAGING)
    root.create_array(f"{STAGING}/{sample_id}", shape=(*staging_shape, feature_dim), chunks=(k, k, feature_dim),
                      dtype="float32", fill_value=np.nan, dimension_names=["row", "col", "feature"])
    if grid.region_tile_multiple is None:
        return
    # Regions are written in place: one region is one block is one chunk, so no staging is needed.
    group = root.create_group(f"regions/{sample_id}")
    n, t = grid.num_regions, k * k
    group.create_array("embedding", shape=(n, t, feature_dim), chunks=(1, t, feature_dim), dtype="float32",
                       fill_value=np.nan, dimension_names=["region", "tile_in_region", "feature"],
                       attributes={"coordinates": "region_x region_y", "long_name": "sub-tile embedding"})
    lv0 = {"units": "pixels (level 0)"}
    _vector(group, "region_x", grid.region_x, {**lv0, "long_name": "region left edge"}, "region")
    _vector(group, "region_y", grid.region_y, {**lv0, "long_name": "region top edge"}, "region")
    mask = group.create_array("tile_mask", shape=(n, t), chunks=(max(1, n), t), dtype="bool", fill_value=False,
                              dimension_names=["region", "tile_in_region"],
                              attributes={"long_name": "sub-tile is a kept tissue tile"})
    if n:
        mask[:] = grid.tile_mask


def write_block(path: str, sample_id: str, block: tuple[int, int], k: int, embeddings: np.ndarray,
                region: int | None = None) -> int:
    """Worker side: one block's embeddings into its own chunk of the staging grid (and its region row)."""
    import zarr

    grid = zarr.open_array(str(Path(path) / STAGING / sample_id), mode="r+")
    r0, c0 = block[0] * k, block[1] * k
    grid[r0 : r0 + embeddings.shape[0], c0 : c0 + embeddings.shape[1], :] = embeddings
    if region is not None:
        regions = zarr.open_array(str(Path(path) / "regions" / sample_id / "embedding"), mode="r+")
        regions[region] = embeddings.reshape(k * k, -1)
    return int(np.isfinite(embeddings[..., 0]).sum())


def finalize_slide(path: str, sample_id: str, plan_path: str, k: int, attrs: dict[str, Any]) -> int:
    """Worker side: staging grid -> flat row-major arrays; ``complete`` is written last."""
    from slide2vec_dask.tiling.grid import TileGrid

    grid = TileGrid.load(plan_path)
    root = _root(path)
    staging = root[f"{STAGING}/{sample_id}"]
    feature_dim = staging.shape[2]
    n = grid.num_tiles
    chunk = max(1, min(n, _FLAT_CHUNK_BYTES // (4 * feature_dim)))
    group = root.create_group(f"tiles/{sample_id}", overwrite=True)
    emb = group.create_array(
        "embedding", shape=(n, feature_dim), chunks=(chunk, feature_dim), dtype="float32", fill_value=np.nan,
        dimension_names=["tile", "feature"],
        attributes={"coordinates": "x y", "long_name": "tile embedding", "encoder": attrs.get("encoder", "")})
    written, pending = 0, []

    def flush(final: bool) -> None:
        nonlocal written, pending
        rows = np.concatenate(pending)
        take = len(rows) if final else len(rows) // chunk * chunk   # chunk-aligned until the last
        emb[written : written + take] = rows[:take]
        written, pending = written + take, [rows[take:]]

    for r0 in range(0, grid.shape[0], k):
        keep = grid.keep[r0 : r0 + k]
        if not keep.any():
            continue
        rows = staging[r0 : r0 + keep.shape[0], : keep.shape[1]][keep]
        if np.isnan(rows[:, 0]).any():
            raise RuntimeError(f"{sample_id}: embeddings of grid rows {r0}..{r0 + keep.shape[0] - 1} never landed")
        pending.append(rows)
        if sum(len(p) for p in pending) >= chunk:
            flush(final=False)
    if pending:
        flush(final=True)
    if written != n:
        raise RuntimeError(f"{sample_id}: wrote {written} tile rows, the plan has {n}")
    rows, cols = grid.rows_cols
    lv0 = {"units": "pixels (level 0)"}
    _vector(group, "x", grid.x, {**lv0, "long_name": "tile left edge"})
    _vector(group, "y", grid.y, {**lv0, "long_name": "tile top edge"})
    _vector(group, "tissue_fraction", grid.tissue_fraction[rows, cols], {"units": "1"})
    del root[f"{STAGING}/{sample_id}"]
    if grid.region_tile_multiple is not None:
        regions = root[f"regions/{sample_id}"]
        regions.attrs.update({**attrs, "num_regions": grid.num_regions, "region_tile_multiple": k,
                              "tile_size_lv0": grid.tile_size_lv0,
                              "sub_tile_order": "row-major: t -> (row t // R, column t % R)"})
        regions.attrs["complete"] = True
    group.attrs.update({**attrs, "num_tiles": n, "tile_size_lv0": grid.tile_size_lv0,
                        "tile_size_lv0_units": "pixels (level 0)",
                        "requested_spacing_um": grid.requested_spacing_um, "spacing_units": "µm/px"})
    group.attrs["complete"] = True
    return n


def _vector(group, name: str, values: np.ndarray, attributes: dict, dim: str = "tile") -> None:
    arr = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),), dtype=values.dtype,
                             dimension_names=[dim], attributes=attributes, fill_value=0)
    if len(values):
        arr[:] = values


def export_flat(path: str, sample_id: str, output_dir: Path, fmt: str) -> list[Path]:
    """The slide as flat files for other tools: tiles (and regions), ``.pt`` + ``.meta.json`` or ``.npz``."""
    root = _root(path)
    group = root[f"tiles/{sample_id}"]
    written = [_export(group, {"x": group["x"][:], "y": group["y"][:]}, output_dir / "tile_embeddings",
                       sample_id, fmt)]
    if f"regions/{sample_id}" in root:
        regions = root[f"regions/{sample_id}"]
        extra = {"region_x": regions["region_x"][:], "region_y": regions["region_y"][:],
                 "tile_mask": regions["tile_mask"][:]}
        written.append(_export(regions, extra, output_dir / "hierarchical_embeddings", sample_id, fmt))
    return written


def _export(group, extra: dict[str, np.ndarray], folder: Path, sample_id: str, fmt: str) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    emb = group["embedding"][:]
    meta = {k: v for k, v in dict(group.attrs).items() if k != "complete"}
    if fmt == "npz":
        target = folder / f"{sample_id}.npz"
        np.savez(target, embedding=emb, meta=json.dumps(meta), **extra)
        return target
    import torch

    target = folder / f"{sample_id}.pt"
    torch.save(torch.from_numpy(emb), target)
    meta.update({k: v.tolist() for k, v in extra.items()})
    (folder / f"{sample_id}.meta.json").write_text(json.dumps(meta))
    return target


def discard_staging(path: Path, sample_id: str) -> None:
    root = _root(path)
    if f"{STAGING}/{sample_id}" in root:
        del root[f"{STAGING}/{sample_id}"]


def consolidate(path: Path) -> None:
    """Drop an empty staging group and consolidate metadata, so readers open the store in one read."""
    import zarr

    import warnings

    root = _root(path)
    if STAGING in root and not list(root[STAGING].keys()):
        del root[STAGING]
    with warnings.catch_warnings():  # zarr notes that consolidation is not in the v3 spec yet; xarray reads it
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def open_embeddings(output_dir: str | Path, chunks: dict | str | None = None):
    """The whole run as an `xarray.DataTree` (lazy; nothing is read until used).

    ``chunks`` goes to xarray: ``{}`` backs every variable with a dask array of the
    store's own chunks, so reductions over many slides run as dask graphs.
    """
    import xarray as xr

    path = store_path(output_dir)
    if not path.exists():
        raise FileNotFoundError(f"no embeddings store at {path}")
    return xr.open_datatree(str(path), engine="zarr", consolidated=None, chunks=chunks)


# -- slide and patient levels ---------------------------------------------------------------
def read_tile_features(path: str | Path, sample_id: str, device: str = "cpu"):
    """Worker side: a finished slide's ``(N, D)`` features as a float32 tensor on ``device``,
    its ``(N, 2)`` level-0 x/y and tile size (level 0).

    The features are copied chunk by chunk into a tensor allocated once on
    the device: on a GPU the host never holds the whole matrix, on a CPU it
    holds it once (plus one chunk), whatever the number of tiles.
    """
    import torch

    group = _root(path, mode="r")[f"tiles/{sample_id}"]
    coords = np.stack([group["x"][:], group["y"][:]], axis=1).astype(np.int64)
    emb = group["embedding"]
    features = torch.empty(emb.shape, dtype=torch.float32, device=device)
    step = max(1, emb.chunks[0])
    for start in range(0, emb.shape[0], step):
        features[start : start + step].copy_(torch.from_numpy(emb[start : start + step]))
    return features, coords, int(group.attrs["tile_size_lv0"])


def _write_row(path: str | Path, where: str, key: str, embedding: np.ndarray, latents: np.ndarray | None,
               attrs: dict[str, Any]) -> None:
    root = _root(path)
    group = root.create_group(f"{where}/{key}", overwrite=True)
    group.create_array("embedding", data=np.asarray(embedding, dtype=np.float32), dimension_names=["feature"])
    if latents is not None:
        group.create_array("latents", data=np.asarray(latents, dtype=np.float32),
                           dimension_names=["latent", "latent_feature"])
    group.attrs.update(attrs)
    group.attrs["complete"] = True


def write_slide_embedding(path: str | Path, sample_id: str, embedding: np.ndarray, latents: np.ndarray | None,
                          attrs: dict[str, Any]) -> None:
    """Worker side: one slide's embedding (and latents) in ``_slides/<id>``; ``complete`` last."""
    _write_row(path, SLIDE_ROWS, sample_id, embedding, latents, attrs)


def write_patient_embedding(path: str | Path, patient_id: str, embedding: np.ndarray, attrs: dict[str, Any]) -> None:
    _write_row(path, PATIENT_ROWS, patient_id, embedding, None, attrs)


def _row_complete(path: str | Path, where: str, key: str) -> bool:
    root = _root(path)
    name = f"{where}/{key}"
    return name in root and bool(root[name].attrs.get("complete", False))


def slide_embedded(path: str | Path, sample_id: str, with_latents: bool = False) -> bool:
    """A finished ``_slides/<id>`` row (holding latents too, when ``with_latents``)."""
    if not _row_complete(path, SLIDE_ROWS, sample_id):
        return False
    return not with_latents or "latents" in _root(path, mode="r")[f"{SLIDE_ROWS}/{sample_id}"]


def patient_embedded(path: str | Path, patient_id: str) -> bool:
    return _row_complete(path, PATIENT_ROWS, patient_id)


def read_slide_embedding(path: str | Path, sample_id: str) -> np.ndarray:
    return _root(path, mode="r")[f"{SLIDE_ROWS}/{sample_id}/embedding"][:]


def read_row(path: str | Path, level: str, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(embedding, latents or None) of one slide (``level="slide"``) or patient."""
    group = _root(path, mode="r")[f"{SLIDE_ROWS if level == 'slide' else PATIENT_ROWS}/{key}"]
    return group["embedding"][:], (group["latents"][:] if "latents" in group else None)


def assemble(path: str | Path, level: str, keys: list[str], with_latents: bool = False,
             attrs: dict[str, Any] | None = None) -> None:
    """``slides`` / ``patients``: the finished rows of ``keys`` (in that order) as one table.

    Rows are small (one vector each), so the client gathers them; ``keys``
    lists every finished row of the store, this run's and earlier ones'.
    """
    root = _root(path)
    name, where, dim = ("slides", SLIDE_ROWS, "slide") if level == "slide" else ("patients", PATIENT_ROWS, "patient")
    if name in root:
        del root[name]
    if not keys:
        return
    rows = [root[f"{where}/{k}"] for k in keys]
    group = root.create_group(name)
    group.create_array("embedding", data=np.stack([r["embedding"][:] for r in rows]),
                       dimension_names=[dim, "feature"],
                       attributes={"coordinates": "sample_id" if level == "slide" else "patient_id",
                                   "long_name": f"{dim} embedding"})
    id_name = "sample_id" if level == "slide" else "patient_id"
    ids = group.create_array(id_name, shape=(len(keys),), dtype=str, dimension_names=[dim])  # UTF-8, any length
    ids[:] = np.array(keys, dtype=object)
    if with_latents and all("latents" in r for r in rows):
        latents = [r["latents"][:] for r in rows]
        if len({lat.shape for lat in latents}) == 1:
            group.create_array("latents", data=np.stack(latents), dimension_names=[dim, "latent", "latent_feature"])
        else:  # variable-length latents stay per slide in _slides/<id>/latents
            group.attrs["latents"] = f"per {dim}, different lengths: see {where}/<id>/latents"
    group.attrs.update(attrs or {})


def finished_rows(path: str | Path, level: str, first: list[str] = ()) -> list[str]:
    """Keys of the finished slide (patient) rows: those of ``first`` in its order, then the rest sorted.

    (The store itself lists groups in no particular order.)
    """
    root = _root(path)
    where = SLIDE_ROWS if level == "slide" else PATIENT_ROWS
    if where not in root:
        return []
    done = {k for k in root[where].group_keys() if bool(root[f"{where}/{k}"].attrs.get("complete", False))}
    return [k for k in first if k in done] + sorted(done - set(first))


def drop(path: str | Path, key: str) -> None:
    root = _root(path)
    if key in root:
        del root[key]


def export_row(path: str | Path, level: str, key: str, output_dir: Path, fmt: str) -> Path:
    """``slide_embeddings/<id>.pt|.npz`` (or ``patient_embeddings/``): one vector (+ latents) per file."""
    import json

    embedding, latents = read_row(path, level, key)
    folder = output_dir / f"{level}_embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    group = _root(path, mode="r")[f"{SLIDE_ROWS if level == 'slide' else PATIENT_ROWS}/{key}"]
    meta = {k: v for k, v in dict(group.attrs).items() if k != "complete"}
    if fmt == "npz":
        target = folder / f"{key}.npz"
        extra = {} if latents is None else {"latents": latents}
        np.savez(target, embedding=embedding, meta=json.dumps(meta), **extra)
        return target
    import torch

    target = folder / f"{key}.pt"
    torch.save(torch.from_numpy(embedding), target)
    if latents is not None:
        torch.save(torch.from_numpy(latents), folder / f"{key}.latents.pt")
    (folder / f"{key}.meta.json").write_text(json.dumps(meta))
    return target


def patient_slides(path: str | Path, patient_id: str) -> list[str]:
    """The slides a stored patient embedding was made from, in order."""
    return list(_root(path, mode="r")[f"{PATIENT_ROWS}/{patient_id}"].attrs.get("sample_ids", []))


def tile_encoder_of(path: str | Path, sample_id: str) -> str:
    """Which tile encoder made a finished slide's tile embeddings (from its attrs)."""
    root = _root(path, mode="r")
    key = f"tiles/{sample_id}"
    if key not in root or not root[key].attrs.get("complete", False):
        raise FileNotFoundError(f"{sample_id}: no finished tile embeddings at {path}/{key}")
    return str(root[key].attrs.get("encoder", ""))
