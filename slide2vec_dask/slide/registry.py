"""The reader registry: which backends exist, which are installed, and which one opens a file.

In the style of xarray's backend entrypoints: each reader lives in one module
that ends with ``READER = ReaderSpec(...)`` — its name, the library it needs
and the extra that installs it, how well it reads a given file, and how to
open it.  `auto` asks every installed reader how well it reads the file and
opens it with the best.  A reader is added by writing its module and naming it
in `_BUILTIN` (or, from another package, an entry point in the
``slide2vec_dask.readers`` group pointing at its ``READER``).

Nothing here imports a reader's library: a name is listed, and a backend asked
for by name says what to install, without the library being present.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

#: Built-in readers, by name, in the order `auto` breaks ties.
_BUILTIN = {
    "tifffile": "slide2vec_dask.slide.tiff",
    "openslide": "slide2vec_dask.slide.openslide_backend",
    "vips": "slide2vec_dask.slide.vips_backend",
    "cucim": "slide2vec_dask.slide.cucim_backend",
    "asap": "slide2vec_dask.slide.asap_backend",
    "dicomweb": "slide2vec_dask.slide.dicomweb",
    "omezarr": "slide2vec_dask.slide.omezarr",
    "pil": "slide2vec_dask.slide.plain_image",
}
ENTRY_POINT_GROUP = "slide2vec_dask.readers"
#: A claim this high ends the search (the tifffile backend on the TIFFs it decodes natively).
CERTAIN = 100


@dataclass(frozen=True)
class ReaderSpec:
    """What a reader module declares about itself."""

    name: str
    requires: str                               # import name of the library it needs
    install: str                                # what to install when that library is missing
    claims: Callable[["Probe"], int]            # how well it reads the file: 0 cannot, higher is better
    open: Callable[[Path], object]              # -> a `Reader`; raises UnreadableSlideError for bad files
    formats: str = ""                           # one line for errors and docs
    # How well it reads a slide at a URL (a `remote.RemotePath`) in place; None: local files only.
    claims_url: Callable[[str], int] | None = None

    def available(self) -> bool:
        return importlib.util.find_spec(self.requires) is not None


class Probe:
    """What a file is, found out once and shared by every reader's claim.

    ``damage`` says what is wrong with a file that starts as a format but breaks
    off (a truncated TIFF): no reader claims it, and the error says this.
    """

    def __init__(self, path: Path):
        self.path = path
        self.damage = ""

    @cached_property
    def tiff(self):
        """The parsed TIFF header (tifffile), or None when the file is not a TIFF or has no readable page."""
        import tifffile

        try:
            tif = tifffile.TiffFile(self.path)
        except Exception as exc:   # noqa: BLE001 - not a TIFF (or too damaged to be one)
            if _starts_as_tiff(self.path):
                self.damage = f"it starts as a TIFF but its header cannot be read ({type(exc).__name__}: {exc})"
            return None
        if len(tif.pages) == 0:   # the first image directory lies past the end: a cut-off file
            tif.close()
            self.damage = (f"it starts as a TIFF but holds no readable image directory within its "
                           f"{self.path.stat().st_size} bytes: the file is truncated")
            return None
        return tif

    @cached_property
    def openslide_format(self) -> str | None:
        """OpenSlide's vendor name for the file, or None (also when OpenSlide is not installed)."""
        if importlib.util.find_spec("openslide") is None:
            return None
        import openslide

        try:
            return openslide.OpenSlide.detect_format(str(self.path))
        except Exception:   # noqa: BLE001
            return None

    def close(self) -> None:
        tif = self.__dict__.get("tiff")
        if tif is not None:
            tif.close()


@functools.lru_cache(maxsize=1)
def _entry_point_modules() -> dict[str, str]:
    """Readers other packages register, read once per process (``_entry_point_modules.cache_clear()``
    re-reads): scanning every installed distribution's metadata took 40-200 ms, on every slide opened."""
    try:
        return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:   # noqa: BLE001 - broken third-party metadata must not stop the built-ins
        return {}


def backend_names() -> tuple[str, ...]:
    """Every backend a user may ask for: ``auto`` first, then each registered reader."""
    return ("auto", *_BUILTIN, *(n for n in _entry_point_modules() if n not in _BUILTIN))


def get(name: str) -> ReaderSpec:
    """The reader registered as ``name``; ValueError naming the choices when there is none."""
    target = _BUILTIN.get(name) or _entry_point_modules().get(name)
    if target is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or "READER")


def readers() -> list[ReaderSpec]:
    return [get(name) for name in backend_names()[1:]]


def require(name: str) -> ReaderSpec:
    """The reader ``name``, installed: ImportError saying what to install when its library is missing."""
    spec = get(name)
    if not spec.available():
        raise ImportError(f"backend={name!r} needs the {spec.requires!r} package, which is not installed: "
                          f"{spec.install}")
    return spec


def choose(path: Path) -> tuple[ReaderSpec | None, str]:
    """The installed reader that reads ``path`` best (auto), or None when none claims it; and
    what the probe found wrong with the file (``""`` when nothing).

    A claim that fails counts as no claim: a reader that cannot even look at the file cannot read it.
    """
    probe = Probe(path)
    try:
        best, best_score = None, 0
        for spec in readers():
            if not spec.available():
                continue
            try:
                score = spec.claims(probe)
            except Exception as exc:   # noqa: BLE001 - a damaged file breaks a probe; say so, try the others
                probe.damage = probe.damage or f"the {spec.name} reader's probe failed ({type(exc).__name__}: {exc})"
                continue
            if score >= CERTAIN:   # no later reader can do better: skip their probes (and imports)
                return spec, probe.damage
            if score > best_score:
                best, best_score = spec, score
        return best, probe.damage
    finally:
        probe.close()


def choose_url(path, backend: str = "auto") -> tuple[ReaderSpec | None, str]:
    """The reader for a slide at a URL: ``backend``, or (auto) the installed one that claims it best;
    or None and why not.

    Only readers that read in place (byte ranges, DICOMweb, Zarr chunks) take URLs: a reader of
    local files asked for a URL is refused, never fed a silent local copy.
    """
    if backend != "auto":
        spec = require(backend)
        if spec.claims_url is None:
            in_place = [s.name for s in readers() if s.claims_url is not None]
            return None, (f"backend={backend!r} reads local files only; slides at a URL are read in place by "
                          f"{', '.join(in_place)} (backend='auto' picks); for {backend} copy the slide to local "
                          "disk or mount the bucket (mountpoint-s3, gcsfuse) and give the local path")
        return spec, ""
    scored = [(spec.claims_url(path), -i, spec) for i, spec in enumerate(readers())
              if spec.claims_url is not None and spec.available()]
    score, _, spec = max(scored, key=lambda t: t[:2], default=(0, 0, None))
    if spec is None or score <= 0:
        return None, "no installed reader reads slides at this URL"
    return spec, ""


def _starts_as_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False
