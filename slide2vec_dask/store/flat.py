"""slide2vec's flat per-slide files (``output_format="pt" | "npz"``), written from store groups.

Each file is written next to its target and renamed into place, so a
reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _atomic(target: Path, write) -> Path:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _meta(group) -> dict:
    return {k: v for k, v in dict(group.attrs).items() if k != "complete"}


def write_arrays(group, extra: dict[str, np.ndarray], folder: Path, name: str, fmt: str) -> Path:
    """``group["embedding"]`` (+ ``extra`` arrays and the group's attrs) as ``<name>.pt|.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    emb = group["embedding"][:]
    meta = _meta(group)
    if fmt == "npz":
        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, embedding=emb, meta=json.dumps(meta), **extra)
        return _atomic(folder / f"{name}.npz", save)
    import torch

    meta.update({k: v.tolist() for k, v in extra.items()})
    _atomic(folder / f"{name}.meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    return _atomic(folder / f"{name}.pt", lambda tmp: torch.save(torch.from_numpy(emb), tmp))


def write_row(group, folder: Path, name: str, fmt: str) -> Path:
    """One slide (patient) vector, its latents when stored, and its attrs."""
    folder.mkdir(parents=True, exist_ok=True)
    embedding = group["embedding"][:]
    latents = group["latents"][:] if "latents" in group else None
    meta = _meta(group)
    if fmt == "npz":
        extra = {} if latents is None else {"latents": latents}

        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, embedding=embedding, meta=json.dumps(meta), **extra)
        return _atomic(folder / f"{name}.npz", save)
    import torch

    if latents is not None:
        _atomic(folder / f"{name}.latents.pt", lambda tmp: torch.save(torch.from_numpy(latents), tmp))
    _atomic(folder / f"{name}.meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    return _atomic(folder / f"{name}.pt", lambda tmp: torch.save(torch.from_numpy(embedding), tmp))
