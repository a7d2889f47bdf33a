"""The OME-Zarr backend (OME-NGFF 0.4 on Zarr v2, 0.5 on Zarr v3), local or at a URL.

Levels are the first ``multiscales`` entry's datasets, finest first; spacing is the
level-0 ``scale`` of the x axis (converted from the axis' unit to µm); pixels are read
through zarr, which fetches a region's chunks concurrently (over fsspec at a URL).
8-bit images with 1, 3 or 4 channels (a ``c`` axis, or an RGB last axis) are read; other
axes (``t``, ``z``) are taken at their first index.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from slide2vec_dask.slide.base import usable_spacing
from slide2vec_dask.slide.registry import ReaderSpec
from slide2vec_dask.slide.remote import RemotePath, access_error

_UM_PER_UNIT = {"meter": 1e6, "centimeter": 1e4, "millimeter": 1e3, "micrometer": 1.0, "micron": 1.0,
                "nanometer": 1e-3, "angstrom": 1e-4}


class OmeZarrReader:
    backend = "omezarr"
    vendor = "ome-zarr"

    def __init__(self, path: Path | RemotePath):
        import zarr

        self.path = path
        if isinstance(path, RemotePath):
            options = copy.deepcopy(path.storage_options) or None   # the drivers edit nested options in place
            group = zarr.open_group(str(path), mode="r", storage_options=options)
        else:
            group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        ome = attrs.get("ome", attrs)   # 0.5 nests it under "ome"
        multiscales = ome.get("multiscales")
        if not multiscales:
            raise ValueError("it is a Zarr group without OME-NGFF 'multiscales' metadata")
        meta = multiscales[0]
        self.version = str(ome.get("version") or meta.get("version") or "")
        axes = [a if isinstance(a, dict) else {"name": a} for a in meta.get("axes") or []]
        names = [a["name"].lower() for a in axes]
        self._arrays = [group[d["path"]] for d in meta["datasets"]]
        first = self._arrays[0]
        if not names:   # NGFF 0.3 and older: 5D tczyx
            names = ["t", "c", "z", "y", "x"][-first.ndim:]
        if "y" not in names or "x" not in names or len(names) != first.ndim:
            raise ValueError(f"axes {names} do not fit its {first.ndim}-d arrays with a y and an x axis")
        if first.dtype != np.uint8:
            raise ValueError(f"it holds {first.dtype} pixels; this reader reads 8-bit RGB or grey")
        self._names = names
        channels = first.shape[names.index("c")] if "c" in names else 1
        if channels not in (1, 3, 4):
            raise ValueError(f"it has {channels} channels; this reader reads RGB(A) or grey (1, 3 or 4)")
        self.level_shapes = [(a.shape[names.index("y")], a.shape[names.index("x")]) for a in self._arrays]
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = [((h0 / h) + (w0 / w)) / 2 for h, w in self.level_shapes]
        self.spacing_um = _spacing(meta, axes, names)

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        index = tuple(slice(y, y + height) if n == "y" else slice(x, x + width) if n == "x"
                      else slice(None) if n == "c" else 0 for n in self._names)
        if isinstance(self.path, RemotePath):
            failure = None
            try:
                block = np.asarray(self._arrays[level][index])
            except Exception as exc:   # noqa: BLE001 - the store's and the network's errors
                failure = access_error(self.path, f"reading level {level} at ({x}, {y}) failed", exc)
            if failure is not None:
                raise failure   # unchained: library errors need not pickle back from a worker
        else:
            block = np.asarray(self._arrays[level][index])
        kept = [n for n in self._names if n in ("c", "y", "x")]
        if "c" in kept:
            block = np.moveaxis(block, kept.index("c"), -1)
        else:
            block = block[..., None]
        if block.shape[-1] == 1:
            return np.repeat(block, 3, axis=-1)
        return np.ascontiguousarray(block[..., :3])

    def close(self) -> None:
        pass


def _spacing(meta: dict, axes: list[dict], names: list[str]) -> float | None:
    """µm/px at level 0: the first dataset's x scale, times the multiscale-wide scale, in µm."""
    scale = 1.0
    for transforms in (meta["datasets"][0].get("coordinateTransformations") or [],
                       meta.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == len(names):
                scale *= float(t["scale"][names.index("x")])
    unit = (axes[names.index("x")].get("unit") or "micrometer").lower() if axes else "micrometer"
    factor = _UM_PER_UNIT.get(unit)
    return None if factor is None else usable_spacing(scale * factor)


def is_zarr_name(path) -> bool:
    return str(path).rstrip("/").lower().endswith(".zarr")


def is_zarr_folder(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zattrs").is_file() or (path / ".zgroup").is_file()


def metadata(path: RemotePath) -> bytes:
    """The group's metadata document (``zarr.json``, or ``.zattrs``): what a fingerprint of a
    remote OME-Zarr hashes (its chunks are many small objects; the metadata names the levels)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(str(path), **copy.deepcopy(path.storage_options))
    for name in ("zarr.json", ".zattrs"):
        try:
            return fs.cat_file(f"{root.rstrip('/')}/{name}")
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{path}: no zarr.json or .zattrs: not an OME-Zarr")


def _claims(probe) -> int:
    return 100 if probe.path.is_dir() and is_zarr_folder(probe.path) else 0


def _claims_url(path: RemotePath) -> int:
    return 100 if is_zarr_name(path) else 0


def _open(path: Path | RemotePath) -> OmeZarrReader:
    failure = None
    try:
        return OmeZarrReader(path)
    except (KeyError, json.JSONDecodeError) as exc:
        failure = ValueError(f"{path}: its OME-NGFF metadata is incomplete ({type(exc).__name__}: {exc})")
    except Exception as exc:   # noqa: BLE001
        if type(exc).__name__ in ("GroupNotFoundError", "NodeNotFoundError", "FileNotFoundError"):
            failure = FileNotFoundError(f"{path}: no Zarr group there ({exc}); check the path")
        elif isinstance(path, RemotePath) and not isinstance(exc, ValueError):
            failure = access_error(path, "its Zarr metadata could not be read", exc)
        else:
            raise
    raise failure


READER = ReaderSpec(
    name="omezarr", requires="zarr", install="pip install zarr", claims=_claims, open=_open,
    formats="OME-Zarr (OME-NGFF 0.4 / 0.5 multiscales), local or at a URL", claims_url=_claims_url,
)
