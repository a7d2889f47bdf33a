"""Manifests: a CSV of slides, checked completely before any work starts."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Sequence

REQUIRED = ("sample_id", "image_path")
OPTIONAL = ("mask_path", "spacing_at_level_0", "patient_id")
# Letters, digits and . _ - (not leading with a dot): safe as a Zarr key and a file name everywhere.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
# The longest file name written for an id is a temporary ``.<id>.meta.json.<32 hex>``
# (44 characters more than the id), and file systems stop at 255 bytes.
MAX_ID_LENGTH = 200
# Names the store gives a meaning (a group's metadata file) or that file systems refuse.
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
RESERVED_IDS = ("zarr.json",)


def check_sample_id(sample_id: str, where: str, what: str = "sample_id") -> None:
    """Ids name store groups and files: safe characters, a length that fits, no reserved name."""
    if not sample_id:
        raise ValueError(f"{where}: empty {what}")
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


def _resolve(manifest: Path, value: str) -> Path:
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
