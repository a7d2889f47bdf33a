"""Where a preset's weights come from, as data: one record, one resolver, one cache-key rule.

Every preset, tile or slide or patient level, declares a `Weights` record
(timm's ``pretrained_cfg`` idea: the hub repo, the file names it publishes,
whether it is gated, its licence, an optional pinned revision) and, when the
user passes one, a local ``checkpoint_path``.  Three things then follow
from the record alone, the same way for every model:

* `Weights.resolve` - the local file to load: ``checkpoint_path`` when set,
  else the first of ``files`` found in the Hugging Face cache or on the hub
  (`slide2vec_dask.encoders.hub`, which reads ``HF_HOME`` / ``HF_HUB_CACHE``,
  ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` at call time, on the worker);
* `Weights.cache_key` - the key under which workers cache the built module:
  the preset, its output variant, where the weights come from, and a digest
  of whatever else shapes the module;
* `Weights.info` - the fields a spec's ``info`` reports.

Nothing here imports torch or touches the network until `resolve` runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from slide2vec_dask.encoders.hub import fetch_hub_file

UNKNOWN_LICENCE = "see the model card"


@dataclass(frozen=True)
class Weights:
    """A published checkpoint: hub repo, its weight file names (first found wins), terms of use."""

    hub_id: str
    files: tuple[str, ...]
    gated: bool = False
    licence: str = UNKNOWN_LICENCE
    revision: str | None = None
    checkpoint_path: str | None = None
    repo_type: str = "model"  # "dataset" for weights published inside a dataset repo

    def __post_init__(self) -> None:
        if isinstance(self.files, str) or not self.files:
            raise ValueError(f"Weights({self.hub_id!r}): files must be a non-empty tuple of file names")
        if self.repo_type not in ("model", "dataset"):
            raise ValueError(f"Weights({self.hub_id!r}): repo_type must be 'model' or 'dataset'")

    @property
    def url(self) -> str:
        kind = "" if self.repo_type == "model" else "datasets/"
        return f"https://huggingface.co/{kind}{self.hub_id}"

    @property
    def source(self) -> str:
        """The local file, or ``hf://repo[@revision]``: what the cache key and provenance name."""
        if self.checkpoint_path is not None:
            return self.checkpoint_path
        kind = "" if self.repo_type == "model" else "datasets/"
        return f"hf://{kind}{self.hub_id}" + (f"@{self.revision}" if self.revision else "")

    def with_checkpoint(self, preset: str, checkpoint_path: str | Path | None) -> "Weights":
        """This record with a user's local file (checked now, on the client, with a clear error)."""
        if checkpoint_path is None:
            return dataclasses.replace(self, checkpoint_path=None)
        path = Path(checkpoint_path).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"preset {preset!r}: checkpoint not found: {path}")
        return dataclasses.replace(self, checkpoint_path=str(path))

    def resolve(self, preset: str, checkpoint_path: str | Path | None = None) -> Path:
        """The file to load: ``checkpoint_path`` (the argument, else the record's), else the hub cache / the hub."""
        local = checkpoint_path if checkpoint_path is not None else self.checkpoint_path
        if local is not None:
            return Path(local)
        return fetch_hub_file(preset, self.hub_id, self.files, gated=self.gated, revision=self.revision,
                              repo_type=self.repo_type)

    def cache_key(self, preset: str, variant: str | None, *config) -> str:
        """``preset:variant:source:digest``; ``config`` is whatever else shapes the built module."""
        digest = hashlib.sha1(repr((config, self.files, self.revision, self.repo_type)).encode()).hexdigest()[:12]
        return f"{preset}:{variant or 'default'}:{self.source}:{digest}"

    def info(self) -> dict:
        return {"hub_id": self.hub_id, "url": self.url, "gated": self.gated, "licence": self.licence,
                "revision": self.revision, "repo_type": self.repo_type, "checkpoint_path": self.checkpoint_path, "hub_files": list(self.files)}

    def describe_files(self) -> str:
        """``a or b of https://huggingface.co/repo``: for error messages."""
        return f"{' or '.join(self.files)} of {self.url}"
