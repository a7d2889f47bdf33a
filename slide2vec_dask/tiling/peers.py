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

from slide2vec_dask.tiling.archive import ARCHIVE_FOLDER, ARCHIVE_SUFFIX, archive_path, max_member_bytes
from slide2vec_dask.tiling.grid import choose_level
from slide2vec_dask.tiling.tile_list import TileList, check_inside, check_shape, checked_positions, columns

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
    height, width = slide.level_shapes[0]
    check_inside(xy, choice.tile_size_lv0, int(width), int(height), f"{sample_id}: {path}")
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
    where = f"{sample_id}: {path}"
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("x", "y") if k not in data]
        if missing:
            raise ValueError(f"{where} is not a coordinates file (no {', '.join(missing)} arrays)")
        x, y, *fraction = columns(data, ("x", "y", *(["tissue_fractions"] if "tissue_fractions" in data else [])),
                                  where)
        xy = checked_positions(np.stack([x, y], axis=1), where)
    fraction = fraction[0] if fraction else np.full(len(xy), np.nan, np.float32)
    stem = path.name.removesuffix(".npz").removesuffix(".coordinates")
    tiling = _hs2p_meta(path.with_name(f"{stem}.coordinates.meta.json"), path.name, sample_id)["tiling"]
    return xy, tiling["tile_size_lv0"], fraction, (tiling["requested_tile_size_px"], tiling["requested_spacing_um"])


def _hs2p_meta(meta_path: Path, companion: str, sample_id: str) -> dict:
    if not meta_path.is_file():
        raise FileNotFoundError(f"{sample_id}: {meta_path} is missing; hs2p writes it next to {companion} and "
                                "it says which tile size and spacing the tiles were made for")
    where = f"{sample_id}: {meta_path}"
    try:
        meta = json.loads(meta_path.read_text())
        tiling = meta["tiling"]
        for key in ("tile_size_lv0", "requested_tile_size_px", "requested_spacing_um"):
            tiling[key]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{where} is not hs2p tiling metadata ({exc!r})") from None
    for key in ("tile_size_lv0", "requested_tile_size_px"):   # (checked here once: NaN, 0, 1e300 or "x" reach no int())
        tiling[key] = whole(tiling[key], f"tiling.{key}", where)
    tiling["read_level"] = whole(tiling.get("read_level", 0), "tiling.read_level", where, low=0)
    for key in ("requested_spacing_um", "read_spacing_um"):
        if key in tiling:
            tiling[key] = positive(tiling[key], f"tiling.{key}", where)
    return meta


def whole(value, what: str, where: str, low: int = 1, high: int = 2**31) -> int:
    """``value`` as an int in ``[low, high]``, or a ValueError naming ``where`` and ``what``."""
    number = positive(value, what, where, allow_zero=low <= 0)
    if number != round(number) or not low <= number <= high:
        raise ValueError(f"{where}: {what} is {value!r}; expected a whole number from {low} to {high}")
    return int(number)


def positive(value, what: str, where: str, allow_zero: bool = False) -> float:
    """``value`` as a finite positive float (or 0, when allowed), or a ValueError naming ``where`` and ``what``."""
    try:
        number = float(np.ravel(value)[0]) if np.ndim(value) else float(value)
    except (TypeError, ValueError, IndexError):
        number = float("nan")
    if not np.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{where}: {what} is {value!r}; expected a finite positive number")
    return number


def _patch_h5(path: Path, sample_id: str, slide):
    try:
        import h5py
    except ImportError:
        raise ImportError(f"{sample_id}: reading {path.name} needs h5py: pip install 'slide2vec-dask[h5]'") from None
    where = f"{sample_id}: {path}"
    with h5py.File(path, "r") as f:
        if not isinstance(f.get("coords"), h5py.Dataset):
            raise ValueError(f"{where} has no 'coords' dataset (a CLAM / TRIDENT patch file has one)")
        coords = f["coords"]
        check_shape(coords.shape, where)   # before reading it: the shape is all a header costs
        xy = checked_positions(coords[()], where)
        attrs = dict(coords.attrs)
    if "patch_size_level0" in attrs:                       # TRIDENT
        tile_lv0 = whole(attrs["patch_size_level0"], "coords.attrs['patch_size_level0']", where)
    elif "patch_size" in attrs:                            # CLAM: the size at patch_level
        level = whole(attrs.get("patch_level", 0), "coords.attrs['patch_level']", where, low=0)
        ds = attrs.get("downsample")
        if ds is None:
            if level >= slide.level_count:
                raise ValueError(f"{sample_id}: {path.name} was patched at level {level}; the slide has "
                                 f"{slide.level_count} levels")
            ds = slide.level_downsamples[level]
        ds = positive(ds, "coords.attrs['downsample']", where)
        tile_lv0 = round(whole(attrs["patch_size"], "coords.attrs['patch_size']", where) * ds)
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
    _check_made_for(sample_id, tar.name, (tiling["requested_tile_size_px"], tiling["requested_spacing_um"]),
                    tile_size_px, spacing_um)
    index, xy = _manifest(manifest, sample_id)
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
    limit = max_member_bytes(tile_size_px)
    huge = [(f"{i:06d}.jpg", m[1]) for i, m in zip(index, located) if m[1] > limit]
    if huge:   # refused before a byte of it is read: a header may declare gigabytes
        raise ValueError(f"{sample_id}: {tar}: the member {huge[0][0]} declares {huge[0][1]} bytes ({len(huge)} "
                         f"such); a {tile_size_px} px JPEG tile takes at most {limit}: the archive is damaged or "
                         "not a tile archive")
    dims = _dimensions(slide)
    if dims is not None:
        check_inside(xy, tiling["tile_size_lv0"], *dims, f"{sample_id}: {manifest}")
    level = tiling["read_level"]
    downsamples = slide.get("level_downsamples") or [1.0]
    ds = downsamples[level] if level < len(downsamples) else 1.0
    fraction = np.full(len(xy), np.nan, np.float32)
    coordinates = tar.with_name(f"{sample_id}.coordinates.npz")
    if coordinates.is_file():   # hs2p's tissue fractions, by position
        with np.load(coordinates, allow_pickle=False) as data:
            if "tissue_fractions" in data:
                known = {(int(a), int(b)): float(f) for a, b, f in zip(data["x"], data["y"], data["tissue_fractions"])}
                fraction = np.array([known.get((int(a), int(b)), np.nan) for a, b in xy], np.float32)
    return TileList(level=level, level_downsample=float(np.ravel(ds)[0]),
                    slide_spacing_um=float(slide.get("base_spacing_um") or tiling.get("read_spacing_um") or spacing_um),
                    read_spacing_um=float(tiling.get("read_spacing_um", spacing_um)),
                    requested_spacing_um=float(spacing_um), requested_tile_size_px=int(tile_size_px),
                    read_tile_size_px=int(tile_size_px), tile_size_lv0=tiling["tile_size_lv0"],
                    xy=xy, fraction=fraction, archive=str(tar),
                    member_offset=np.array([m[0] for m in located], np.int64).reshape(-1),
                    member_size=np.array([m[1] for m in located], np.int64).reshape(-1),
                    meta={"sample_id": sample_id, "tiles_from": str(tar),
                          **({"level0_width": dims[0], "level0_height": dims[1]} if dims else {})})


def _manifest(manifest: Path, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The manifest's tile indices and checked positions."""
    where = f"{sample_id}: {manifest}"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        index = np.array([int(r["tile_index"]) for r in rows], dtype=np.int64)
        xy = np.array([[int(r["x"]), int(r["y"])] for r in rows], dtype=np.int64).reshape(len(rows), 2)
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{where} needs tile_index, x, y columns of integers ({exc!r})") from None
    return index, checked_positions(xy, where)


def _dimensions(slide: dict) -> tuple[int, int] | None:
    """Level 0's (width, height) as hs2p's meta states them, when it states two whole numbers (ours may
    hold None: an archive written without its slide's size)."""
    dims = slide.get("dimensions") if isinstance(slide, dict) else None
    try:
        w, h = (int(v) for v in dims)
    except (TypeError, ValueError, OverflowError):
        return None
    return (w, h) if w > 0 and h > 0 and [w, h] == list(dims) else None
