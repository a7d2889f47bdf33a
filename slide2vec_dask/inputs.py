"""Slides as the API accepts them: paths, dicts, manifest rows, and their ids.

A manifest (a CSV of slides) is checked completely before any work starts;
`SlideInput` is one slide in the form every later stage takes; a file's
fingerprint says which file a result came from (below)."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from slide2vec_dask.slide import remote
from slide2vec_dask.slide.dicomweb import series_of
from slide2vec_dask.slide.omezarr import is_zarr_name, metadata
from slide2vec_dask.slide.remote import RemotePath, is_url, location

REQUIRED = ("sample_id", "image_path")
OPTIONAL = ("mask_path", "spacing_at_level_0", "patient_id")
# Letters, digits and . _ - (not leading with a dot, nor a dash: see check_sample_id): safe as a
# Zarr key and a file name everywhere.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# File systems stop at 255 bytes a name.  The longest names written for an id are
# ``<id>.coordinates.meta.json`` (a tile archive's) and ``.<id>.geojson.source.json`` (an
# export's sidecar): the id + 22 and + 21 characters.  Temporaries are cut to 255 whatever
# the id and host (`store.output_dir.tmp_name`); the plan's ``.<id>.<pid>.tmp.npz`` is the
# id + 17.  So an id may have 255 - 22 = 233 characters; 200 keeps 33 for names to come.
MAX_ID_LENGTH = 200
# Names the store gives a meaning (a group's metadata file) or that file systems refuse.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
RESERVED_IDS = ("zarr.json",)


def check_sample_id(sample_id: str, where: str, what: str = "sample_id") -> None:
    """Ids name store groups and files: safe characters, a length that fits, no reserved name."""
    if not sample_id:
        raise ValueError(f"{where}: empty {what}")
    if sample_id.startswith("-"):
        raise ValueError(f"{where}: {what} {sample_id!r} starts with '-', which a spreadsheet opening "
                         "process_list.csv reads as a formula and a command line as an option; "
                         "rename it to start with a letter, a digit or '_'")
    if not _SAFE_ID.match(sample_id) or sample_id in (".", ".."):
        raise ValueError(
            f"{where}: {what} {sample_id!r} is not safe as a store key or file name; "
            "use letters, digits, '.', '_' and '-' only (no '/', '..', spaces or control characters)"
        )
    if len(sample_id) > MAX_ID_LENGTH:
        raise ValueError(f"{where}: {what} {sample_id[:40]!r}... is {len(sample_id)} characters long; "
                         f"the limit is {MAX_ID_LENGTH} (the files named after it must fit a file system's "
                         "255-byte names)")
    if sample_id.lower() in RESERVED_IDS or sample_id.split(".")[0].lower() in _WINDOWS_DEVICES:
        raise ValueError(f"{where}: {what} {sample_id!r} is a name the store or a file system reserves "
                         f"({', '.join(RESERVED_IDS)}, Windows device names like CON or NUL); rename the slide")


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a manifest CSV as slide dicts (relative paths resolved against the manifest's folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; a manifest needs {list(REQUIRED)} "
                             f"and may have {list(OPTIONAL)} (found {columns})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            rows.append((line, row))
    slides = [_slide(path, line, row) for line, row in rows]
    validate_slides(slides, [f"{path}:{line}" for line, _ in rows])
    return slides


def _slide(manifest: Path, line: int, row: dict[str, str]) -> dict[str, Any]:
    where = f"{manifest}:{line}"
    if not row.get("image_path"):
        raise ValueError(f"{where}: empty image_path")
    slide: dict[str, Any] = {"sample_id": row.get("sample_id", ""),
                             "image_path": _resolve(manifest, row["image_path"])}
    if row.get("mask_path"):
        slide["mask_path"] = _resolve(manifest, row["mask_path"])
    if row.get("spacing_at_level_0"):
        try:
            spacing = float(row["spacing_at_level_0"])
        except ValueError:
            spacing = float("nan")
        if not math.isfinite(spacing) or spacing <= 0:
            raise ValueError(f"{where}: spacing_at_level_0 must be a positive number of µm/px, "
                             f"got {row['spacing_at_level_0']!r}")
        slide["spacing_at_level_0"] = spacing
    if row.get("patient_id"):
        slide["patient_id"] = row["patient_id"]
    return slide


def _resolve(manifest: Path, value: str) -> Path | RemotePath:
    if is_url(value) or value.lower().startswith("file://"):
        return location(value)   # the run's storage_options join it in SlideInput.parse
    p = Path(value).expanduser()
    return p if p.is_absolute() else (manifest.parent / p)


def validate_slides(slides: Sequence[dict[str, Any]], where: Sequence[str]) -> None:
    """Ids present, safe and unique; raises before any work starts."""
    seen: dict[str, str] = {}
    for slide, place in zip(slides, where):
        sid = str(slide.get("sample_id", ""))
        check_sample_id(sid, place)
        if sid in seen:
            raise ValueError(f"{place}: duplicate sample_id {sid!r} (first at {seen[sid]})")
        seen[sid] = place
        if slide.get("patient_id"):
            check_sample_id(str(slide["patient_id"]), place, "patient_id")


@dataclass
class SlideInput:
    """One slide as the API accepts it: a path, or a dict with the manifest's columns.

    A path may be a URL (s3://, gs://, https://...): it becomes a `RemotePath` carrying
    ``storage_options`` (the run's), read in place by `slide.open_slide`.
    """

    image_path: Path | RemotePath
    sample_id: str
    mask_path: Path | RemotePath | None = None
    spacing_at_level_0: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, slide: Any, *, spacing_at_level_0: float | None = None, mask_path=None,
              sample_id: str | None = None, storage_options: Mapping[str, Any] | None = None) -> "SlideInput":
        if isinstance(slide, SlideInput):
            return slide
        if isinstance(slide, Mapping):
            if "image_path" not in slide:
                raise ValueError(f"a slide dict needs an 'image_path' key, got keys {sorted(slide)}")
            d = dict(slide)
            path = location(d.pop("image_path"), storage_options)
            sid = d.pop("sample_id", None) or sample_id or path.stem
            mask = d.pop("mask_path", None) or mask_path
            spacing = d.pop("spacing_at_level_0", None)
            spacing = spacing if spacing is not None else spacing_at_level_0
            return cls(path, str(sid), location(mask, storage_options) if mask else None,
                       None if spacing is None else float(spacing), d)
        if isinstance(slide, (str, Path)):
            path = location(slide, storage_options)
            return cls(path, sample_id or path.stem, location(mask_path, storage_options) if mask_path else None,
                       spacing_at_level_0)
        raise TypeError(f"a slide is a path or a dict with 'image_path', got {type(slide).__name__}")


# -- fingerprints ----------------------------------------------------------------------------
# A slide file replaced, truncated or re-exported after its run must not keep
# its old embeddings, and a saved plan must never be laid over another file's
# pixels.  Hashing whole slides (gigabytes) is out of the question, so the
# fingerprint is the size plus a hash of the file's first and last 64 KiB:
# that covers a TIFF's header, its first directory and usually its last one,
# which hold the tile offsets and byte counts, so any re-encoding, rewrite or
# truncation changes it.  The mtime is recorded too, but not compared: a copy
# (``cp``, ``rsync`` without ``-t``) changes it and nothing else.  A folder
# (DICOM, MRXS's data folder) is fingerprinted by its listing: names, sizes.
# An object at a URL is fingerprinted alike, in two range requests (the same digest as the
# same bytes on disk), plus what the store says of its version (ETag, generation, version id):
# see `_remote`.
_EDGE = 64 << 10
#: What a store says of an object's version, compared when both fingerprints have it.
_VERSION_KEYS = ("etag", "generation", "versionid", "version_id", "md5hash")


def fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size", "mtime_ns", "digest"}`` of a slide or mask file (or folder), or of an object at a URL
    (then with the store's ``version``: its ETag, generation... when it gives one)."""
    if is_url(path):
        return _remote(location(path))
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        h.update(f.read(_EDGE))
        if stat.st_size > _EDGE:
            f.seek(max(_EDGE, stat.st_size - _EDGE))
            h.update(f.read(_EDGE))
    companion = path.with_suffix("")
    if path.suffix.lower() == ".mrxs" and companion.is_dir():   # MRXS keeps its pixels next to it
        h.update(_folder(companion)["digest"].encode())
    return {"size": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns), "digest": h.hexdigest()}


def _remote(path: RemotePath) -> dict[str, Any]:
    """The fingerprint of an object at a URL, without reading it whole: its size and the digest
    of its first and last 64 KiB (two range requests), and the store's version tag."""
    if series_of(path) is not None:   # a DICOMweb series: its UIDs name it, and DICOM never reuses a UID
        return {"size": 0, "mtime_ns": 0, "digest": hashlib.blake2b(str(path).encode(), digest_size=16).hexdigest()}
    if is_zarr_name(path):   # an OME-Zarr: many chunk objects; its metadata names the levels
        try:
            meta = metadata(path)
        except FileNotFoundError:
            raise
        except Exception as exc:   # noqa: BLE001
            failure = remote.access_error(path, "its Zarr metadata could not be read", exc)
        else:
            return {"size": len(meta), "mtime_ns": 0, "digest": hashlib.blake2b(meta, digest_size=16).hexdigest()}
        raise failure
    source = remote.RemoteFile(path)
    size = source.size
    edges = [(0, min(size, _EDGE))]
    if size > _EDGE:
        edges.append((max(_EDGE, size - _EDGE), size))
    h = hashlib.blake2b(digest_size=16)
    for chunk in source.fetch(edges):
        h.update(chunk)
    version = {k: v for k, v in remote.identity(path, source.info).items() if k in _VERSION_KEYS}
    return {"size": int(size), "mtime_ns": 0, "digest": h.hexdigest(), **({"version": version} if version else {})}


def _folder(path: Path) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    size = 0
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            size += st.st_size
            h.update(f"{entry.name}\0{st.st_size}\n".encode())
    return {"size": size, "mtime_ns": int(path.stat().st_mtime_ns), "digest": h.hexdigest()}


def changed(recorded: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """Why ``current`` is not the file ``recorded`` describes (None: the same, or nothing recorded)."""
    if not recorded or current is None:
        return None
    if recorded.get("size") != current.get("size"):
        return f"its size changed ({recorded.get('size')} -> {current.get('size')} bytes)"
    if recorded.get("digest") != current.get("digest"):
        return "its content changed (same size)"
    before, now = recorded.get("version") or {}, current.get("version") or {}
    for key in sorted(set(before) & set(now)):
        if before[key] != now[key]:
            return f"the store says it is another version of the object ({key} {before[key]} -> {now[key]})"
    return None


def slide_fingerprints(image_path, mask_path=None) -> dict[str, Any]:
    """The attributes a slide's outputs carry: its image's (and mask's) fingerprint."""
    out = {"image_fingerprint": fingerprint(image_path)}
    if mask_path:
        out["mask_fingerprint"] = fingerprint(mask_path)
    return out


def current_fingerprints(image_path, mask_path=None) -> dict[str, Any] | None:
    """`slide_fingerprints`, or None when a file cannot be read (the slide's own run will say why)."""
    try:
        return slide_fingerprints(image_path, mask_path)
    except OSError:
        return None


def why_stale(attrs: dict[str, Any], current: dict[str, Any] | None) -> str | None:
    """Why outputs carrying ``attrs`` no longer describe the files ``current`` fingerprints (None: they do).

    Outputs with no fingerprint (made before they were recorded) are trusted.
    """
    if current is None or not attrs.get("image_fingerprint"):
        return None
    for key, what in (("image_fingerprint", "slide file"), ("mask_fingerprint", "mask file")):
        recorded, now = attrs.get(key), current.get(key)
        if recorded is None and now is None:
            continue
        if recorded is None:
            return f"a {what} is given now, and was not when its embeddings were made"
        if now is None:
            return f"its {what} is no longer given"
        reason = changed(recorded, now)
        if reason:
            return f"the {what} changed since its embeddings were made: {reason}"
    return None
