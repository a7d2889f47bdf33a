"""Coordinates and tile archives other tools wrote, as plans: hs2p / slide2vec, CLAM, TRIDENT.

* hs2p (slide2vec's tiler): ``<id>.coordinates.npz`` (``tile_index, x, y,
  tissue_fractions``, level-0 px) with ``<id>.coordinates.meta.json`` (the
  tile size and spacing it was made for), and, with ``save_tiles``,
  ``<id>.tiles.tar`` (one JPEG per tile, ``%06d.jpg`` by tile index, at the
  requested tile size) with ``<id>.tiles.manifest.csv`` (``tile_index, x, y``).
* CLAM / TRIDENT: a patch ``.h5`` whose ``coords`` (N, 2) hold level-0 (x, y);
  TRIDENT states ``patch_size_level0``, CLAM ``patch_size`` at ``patch_level``.

The run's own request (spacing and tile size) decides the level read; a file
made for other tiles is refused, naming both, rather than read at the wrong size.
"""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np

from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER, ARCHIVE_SUFFIX, archive_path
from slide2vec_dask.tiling.grid import choose_level
from slide2vec_dask.tiling.tile_list import TileList

def coordinates_file(source: Path, sample_id: str) -> Path:
    """The slide's coordinates under ``source`` (a file is taken as it is)."""
    if not source.is_dir():
        return source
    names = (f"{sample_id}.npz", f"{sample_id}.coordinates.npz", f"{sample_id}.h5", f"{sample_id}_patches.h5")
    for folder in (source, source / "coordinates", source / ARCHIVE_FOLDER, source / "patches"):   # ours first
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"{sample_id}: no saved coordinates in {source} (read_coordinates_from looks for "
        f"{', '.join(names)}, also under coordinates/, tiles/ and patches/)")


def is_own_plan(path: Path) -> bool:
    if path.suffix != ".npz":
        return False
    with np.load(path, allow_pickle=False) as data:
        return "params" in data


def peer_coordinates(path: Path, sample_id: str, slide, spacing_um: float, tile_size_px: int,
                     tolerance: float) -> TileList:
    """A peer's coordinates file as a plan over ``slide`` at the run's spacing and tile size."""
    if path.suffix == ".h5":
        xy, tile_lv0, fraction, made_for = _patch_h5(path, sample_id, slide)
    else:
        xy, tile_lv0, fraction, made_for = _hs2p_npz(path, sample_id)
    if made_for is not None:
        _check_made_for(sample_id, path.name, made_for, tile_size_px, spacing_um)
    choice = choose_level(slide.level_spacings, slide.level_downsamples, spacing_um, tile_size_px, tolerance,
                          sample=sample_id)
    if abs(choice.tile_size_lv0 - tile_lv0) > max(1, 0.01 * tile_lv0):
        raise ValueError(f"{sample_id}: the tiles of {path.name} cover {tile_lv0} level-0 px; this run's "
                         f"{tile_size_px} px tiles at {spacing_um:g} µm/px cover {choice.tile_size_lv0} on this slide "
                         f"({slide.spacing:g} µm/px at level 0): set requested_spacing_um / "
                         "requested_tile_size_px to what the coordinates were made for")
    return TileList(level=choice.level, level_downsample=float(slide.level_downsamples[choice.level]),
                    slide_spacing_um=float(slide.spacing), read_spacing_um=float(choice.read_spacing_um),
                    requested_spacing_um=float(spacing_um), requested_tile_size_px=int(tile_size_px),
                    read_tile_size_px=int(choice.read_tile_size_px), tile_size_lv0=int(choice.tile_size_lv0),
                    xy=xy, fraction=fraction,
                    meta={"sample_id": sample_id, "image_path": str(slide.path), "coordinates_from": str(path)})


def _check_made_for(sample_id: str, name: str, made_for: tuple[int, float], tile_size_px: int,
                    spacing_um: float) -> None:
    want_tile, want_spacing = made_for
    if want_tile != tile_size_px or abs(want_spacing - spacing_um) > 1e-6 * spacing_um:
        raise ValueError(f"{sample_id}: {name} was made for {want_tile} px tiles at {want_spacing:g} µm/px; "
                         f"this run asks for {tile_size_px} px at {spacing_um:g} µm/px (set "
                         "PreprocessingConfig requested_tile_size_px / requested_spacing_um to match, or tile again)")


def _hs2p_npz(path: Path, sample_id: str):
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("x", "y") if k not in data]
        if missing:
            raise ValueError(f"{sample_id}: {path} is not a coordinates file (no {', '.join(missing)} arrays)")
        xy = np.stack([data["x"], data["y"]], axis=1).astype(np.int64)
        fraction = (data["tissue_fractions"] if "tissue_fractions" in data
                    else np.full(len(xy), np.nan, np.float32))
    stem = path.name.removesuffix(".npz").removesuffix(".coordinates")
    tiling = _hs2p_meta(path.with_name(f"{stem}.coordinates.meta.json"), path.name, sample_id)["tiling"]
    return xy, int(tiling["tile_size_lv0"]), fraction, (int(tiling["requested_tile_size_px"]),
                                                       float(tiling["requested_spacing_um"]))


def _hs2p_meta(meta_path: Path, companion: str, sample_id: str) -> dict:
    if not meta_path.is_file():
        raise FileNotFoundError(f"{sample_id}: {meta_path} is missing; hs2p writes it next to {companion} and "
                                "it says which tile size and spacing the tiles were made for")
    try:
        meta = json.loads(meta_path.read_text())
        tiling = meta["tiling"]
        for key in ("tile_size_lv0", "requested_tile_size_px", "requested_spacing_um"):
            tiling[key]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{sample_id}: {meta_path} is not hs2p tiling metadata ({exc!r})") from None
    return meta


def _patch_h5(path: Path, sample_id: str, slide):
    try:
        import h5py
    except ImportError:
        raise ImportError(f"{sample_id}: reading {path.name} needs h5py: pip install 'slide2vec-dask[h5]'") from None
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{sample_id}: {path} has no 'coords' dataset (a CLAM / TRIDENT patch file has one)")
        coords = f["coords"]
        xy = np.asarray(coords[:], dtype=np.int64).reshape(-1, 2)
        attrs = dict(coords.attrs)
    if "patch_size_level0" in attrs:                       # TRIDENT
        tile_lv0 = int(attrs["patch_size_level0"])
    elif "patch_size" in attrs:                            # CLAM: the size at patch_level
        level = int(attrs.get("patch_level", 0))
        ds = attrs.get("downsample")
        if ds is None:
            if level >= slide.level_count:
                raise ValueError(f"{sample_id}: {path.name} was patched at level {level}; the slide has "
                                 f"{slide.level_count} levels")
            ds = slide.level_downsamples[level]
        tile_lv0 = round(int(attrs["patch_size"]) * float(np.ravel(ds)[0]))
    else:
        raise ValueError(f"{sample_id}: {path}'s coords have neither patch_size_level0 (TRIDENT) nor patch_size "
                         "(CLAM) attributes, so the tile size is unknown")
    return xy, tile_lv0, np.full(len(xy), np.nan, np.float32), None


# -- tile archives ------------------------------------------------------------------------------
def archive_files(source: Path, sample_id: str) -> tuple[Path, Path, Path]:
    """(tar, manifest, meta) of the slide's archive under ``source``, all three present."""
    for folder in (source, source / ARCHIVE_FOLDER):
        tar = archive_path(folder, sample_id)
        if tar.is_file():
            break
    else:
        raise FileNotFoundError(f"{sample_id}: no tile archive {sample_id}{ARCHIVE_SUFFIX} in {source} or "
                                f"{source / 'tiles'} (read_tiles_from)")
    manifest = tar.with_name(f"{sample_id}.tiles.manifest.csv")
    meta = tar.with_name(f"{sample_id}.coordinates.meta.json")
    for needed in (manifest, meta):   # (named here, so the message says what goes with the tar)
        if not needed.is_file():
            raise FileNotFoundError(f"{sample_id}: {needed} is missing; it goes with {tar.name} (hs2p writes both)")
    return tar, manifest, meta


def archive_plan(source: Path, sample_id: str, spacing_um: float, tile_size_px: int) -> TileList:
    """A tile archive as a plan: positions from its manifest, each tile's JPEG member located in the tar."""
    tar, manifest, meta_path = archive_files(source, sample_id)
    meta = _hs2p_meta(meta_path, tar.name, sample_id)
    tiling, slide = meta["tiling"], meta.get("slide", {})
    _check_made_for(sample_id, tar.name, (int(tiling["requested_tile_size_px"]),
                                          float(tiling["requested_spacing_um"])), tile_size_px, spacing_um)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        index = np.array([int(r["tile_index"]) for r in rows], dtype=np.int64)
        xy = np.array([[int(r["x"]), int(r["y"])] for r in rows], dtype=np.int64).reshape(-1, 2)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{sample_id}: {manifest} needs tile_index, x, y columns of integers ({exc!r})") from None
    members = {}
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if m.isfile():
                    members[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"{sample_id}: {tar} is not a readable tar archive ({exc})") from None
    located = [members.get(f"{i:06d}.jpg") for i in index]
    missing = [int(i) for i, m in zip(index, located) if m is None]
    if missing:
        raise ValueError(f"{sample_id}: {tar.name} lacks the tiles {missing[:5]} its manifest lists "
                         f"({len(missing)} missing); write the archive again")
    level = int(tiling.get("read_level", 0))
    downsamples = slide.get("level_downsamples") or [1.0]
    ds = downsamples[level] if level < len(downsamples) else 1.0
    fraction = np.full(len(xy), np.nan, np.float32)
    coordinates = tar.with_name(f"{sample_id}.coordinates.npz")
    if coordinates.is_file():   # hs2p's tissue fractions, by position
        with np.load(coordinates, allow_pickle=False) as data:
            if "tissue_fractions" in data:
                known = {(int(a), int(b)): float(f) for a, b, f in zip(data["x"], data["y"], data["tissue_fractions"])}
                fraction = np.array([known.get((int(a), int(b)), np.nan) for a, b in xy], np.float32)
    dims = slide.get("dimensions")
    return TileList(level=level, level_downsample=float(np.ravel(ds)[0]),
                    slide_spacing_um=float(slide.get("base_spacing_um") or tiling.get("read_spacing_um") or spacing_um),
                    read_spacing_um=float(tiling.get("read_spacing_um", spacing_um)),
                    requested_spacing_um=float(spacing_um), requested_tile_size_px=int(tile_size_px),
                    read_tile_size_px=int(tile_size_px), tile_size_lv0=int(tiling["tile_size_lv0"]),
                    xy=xy, fraction=fraction, archive=str(tar),
                    member_offset=np.array([m[0] for m in located], np.int64).reshape(-1),
                    member_size=np.array([m[1] for m in located], np.int64).reshape(-1),
                    meta={"sample_id": sample_id, "tiles_from": str(tar),
                          **({"level0_width": int(dims[0]), "level0_height": int(dims[1])} if dims else {})})
