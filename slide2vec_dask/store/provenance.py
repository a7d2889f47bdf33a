"""Which file a result came from: a cheap fingerprint, recorded with every slide's outputs.

A slide file replaced, truncated or re-exported after its run must not keep
its old embeddings, and a saved plan must never be laid over another file's
pixels.  Hashing whole slides (gigabytes) is out of the question, so the
fingerprint is the size plus a hash of the file's first and last 64 KiB:
that covers a TIFF's header, its first directory and usually its last one,
which hold the tile offsets and byte counts, so any re-encoding, rewrite or
truncation changes it.  The mtime is recorded too, but not compared: a copy
(``cp``, ``rsync`` without ``-t``) changes it and nothing else.  A folder
(DICOM, MRXS's data folder) is fingerprinted by its listing: names, sizes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

_EDGE = 64 << 10


def fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size", "mtime_ns", "digest"}`` of a slide or mask file (or folder)."""
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
