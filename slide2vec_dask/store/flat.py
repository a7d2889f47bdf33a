"""slide2vec's flat per-slide files (``output_format="pt" | "npz"``), written from store groups.

Each file is written next to its target and renamed into place, so a
reader (or a crash) never sees half a file.  The writer is the exports' own
(`store.output_dir.atomic`): its temporaries name their host and pid, so those
a killed writer leaves are found by `store.output_dir.sweep` like any export's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slide2vec_dask.store.output_dir import atomic


def _meta(group) -> dict:
    return {k: v for k, v in dict(group.attrs).items() if k != "complete"}


def write_arrays(group, extra: dict[str, np.ndarray], folder: Path, name: str, fmt: str) -> Path:
    """``group["embedding"]`` (+ ``extra`` arrays and the group's attrs) as ``<name>.pt|.npz``."""
    emb = group["embedding"][:]
    meta = _meta(group)
    if fmt == "npz":
        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, embedding=emb, meta=json.dumps(meta), **extra)
        return atomic(folder / f"{name}.npz", save)
    import torch   # heavy: only pt files need it

    meta.update({k: v.tolist() for k, v in extra.items()})
    atomic(folder / f"{name}.meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    return atomic(folder / f"{name}.pt", lambda tmp: torch.save(torch.from_numpy(emb), tmp))


def write_row(group, folder: Path, name: str, fmt: str) -> Path:
    """One slide (patient) vector, its latents when stored, and its attrs."""
    embedding = group["embedding"][:]
    latents = group["latents"][:] if "latents" in group else None
    meta = _meta(group)
    if fmt == "npz":
        extra = {} if latents is None else {"latents": latents}

        def save(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, embedding=embedding, meta=json.dumps(meta), **extra)
        return atomic(folder / f"{name}.npz", save)
    import torch   # heavy: only pt files need it

    if latents is not None:
        atomic(folder / f"{name}.latents.pt", lambda tmp: torch.save(torch.from_numpy(latents), tmp))
    atomic(folder / f"{name}.meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))
    return atomic(folder / f"{name}.pt", lambda tmp: torch.save(torch.from_numpy(embedding), tmp))
