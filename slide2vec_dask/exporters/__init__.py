"""Exports: the run's store as the files other tools read, one module per format.

(The package is ``exporters`` so that ``slide2vec_dask.export`` stays the function.)

========================  ===========================================================
format                    module (its docstring gives the layout; its ``FORMAT`` the rest)
========================  ===========================================================
``trident-h5``            `trident_h5`   TRIDENT / Patho-Bench patch features
``clam-h5``               `clam_h5`      CLAM ``h5_files`` + ``pt_files``
``stamp-h5``              `stamp_h5`     STAMP features, coordinates in µm
``anndata``               `anndata_`     one ``.h5ad`` per slide
``spatialdata``           `spatialdata_` one SpatialData zarr per slide (LazySlide / wsidata)
``geojson``               `geojson`      QuPath tiles and tissue
``pt`` / ``npz``          `flat`         slide2vec's flat files (the store's own writer)
========================  ===========================================================

Every export reads the store (never the encoder), writes each file beside its
target and renames it into place, and is skipped when already current (see
`_base`: a sidecar records which published group it was made from).  The worker
that finishes a slide calls `export_slide`; `export` does the same for a
finished run, from the driver or the command line.

Each module declares its format (`registry.ExportFormat`: name, extra, folders,
layout version); `registry` finds them, so a new format is one new module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from slide2vec_dask.exporters import registry
from slide2vec_dask.exporters._base import RowSource, TileSource, forget, is_current, record
from slide2vec_dask.exporters.flat import is_flat
from slide2vec_dask.exporters.registry import ExportFormat
from slide2vec_dask.store import EmbeddingStore
from slide2vec_dask.store.output_dir import check_output_dir, sweep

__all__ = ["ExportFormat", "FORMATS", "check_available", "current_files", "export", "export_slide", "export_row",
           "flat_first", "formats_of", "sweep_temporaries"]


def __getattr__(name: str):
    if name == "FORMATS":   # the registry's names, found when first asked (after this package is imported)
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def formats_of(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"pt"``, ``["pt", "trident-h5"]`` or None as a tuple of known format names."""
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else tuple(value)
    known = registry.names()
    unknown = [n for n in names if n not in known]
    if unknown or not all(isinstance(n, str) for n in names):
        raise ValueError(f"unknown output format(s) {unknown or list(names)}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def check_available(formats: Iterable[str]) -> None:
    """Import what the formats need now: a missing extra is an ImportError naming it, before any work."""
    for name in formats_of(tuple(formats)):
        fmt = registry.get(name)
        for module in fmt.requires:
            fmt.need(module)


def sweep_temporaries(dest: str | Path, formats: Iterable[str]) -> int:
    """Remove what writers killed mid-export left (hidden temporaries of dead processes on this host)."""
    roots = {r for name in formats_of(tuple(formats)) for r in registry.get(name).roots}
    return sum(sweep(Path(dest) / r) for r in sorted(roots) if (Path(dest) / r).is_dir())


def _dest(store, dest) -> Path:
    return Path(dest) if dest is not None else Path(store.output_dir)


def export_slide(store, sample_id: str, formats: Iterable[str], dest: str | Path | None = None,
                 force: bool = False) -> list[Path]:
    """A finished slide's tile embeddings in each format; files already current are left alone."""
    formats = formats_of(tuple(formats))
    if not formats:
        return []
    src = TileSource.open(store, sample_id)
    return [p for fmt in formats for p in _one(registry.get(fmt), src, _dest(store, dest), force, tiles=True)]


def export_row(store, level: str, key: str, formats: Iterable[str], dest: str | Path | None = None,
               force: bool = False) -> list[Path]:
    """A stored slide (``level="slide"``) or patient embedding in each format that has a place for it."""
    formats = formats_of(tuple(formats))
    if not formats:
        return []
    src = RowSource.open(store, level, key)
    return [p for fmt in formats for p in _one(registry.get(fmt), src, _dest(store, dest), force, tiles=False)]


def _one(fmt: ExportFormat, src, dest: Path, force: bool, tiles: bool) -> list[Path]:
    writer = fmt.writer
    files = writer.tile_files(src, dest) if tiles else writer.row_files(src, dest)
    if not files:
        return []
    if force or not is_current(files, src.source_id, fmt.name, fmt.layout):
        try:
            forget(files)
            (writer.write_tiles if tiles else writer.write_row)(src, files)
            record(files, src.source_id, fmt.name, fmt.layout)
        except ImportError:
            raise
        except Exception as exc:
            name = src.sample_id if tiles else src.key
            raise RuntimeError(f"{name}: writing its {fmt.name} export {files[0]} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    return files


def current_files(store, level: str, key: str, formats: Iterable[str], dest=None) -> list[Path] | None:
    """The export files of a stored slide's tiles (``level="tile"``) or row when every one is current;
    None when any must be (re)written.  Cheap: small JSON reads, nothing opened."""
    formats = formats_of(tuple(formats))
    src = TileSource.open(store, key) if level == "tile" else RowSource.open(store, level, key)
    out: list[Path] = []
    for name in formats:
        fmt = registry.get(name)
        w = fmt.writer
        files = w.tile_files(src, _dest(store, dest)) if level == "tile" else w.row_files(src, _dest(store, dest))
        if files and not is_current(files, src.source_id, fmt.name, fmt.layout):
            return None
        out += files
    return out


def flat_first(paths: Iterable[Path | str], level: str) -> str:
    """Of a row's export files, the one its artifact names: slide2vec's flat file when there
    (`flat.is_flat`), else the first; ``""`` when there are none.  The one rule for every caller."""
    paths = [str(p) for p in paths]
    flat = [p for p in paths if is_flat(p, level)]
    return (flat or paths or [""])[0]


def export(output_dir: str | Path, format: str | Sequence[str], *, samples: Sequence[str] | None = None,
           dest: str | Path | None = None, force: bool = False) -> list[Path]:
    """Write a run's embeddings (``<output_dir>/embeddings.zarr``) in ``format`` (one name or several).

    ``samples``: the sample ids to export (default: every finished slide); their slide
    rows and their patients' rows are exported too where the format has a place for
    them.  ``dest``: where the files go (default ``output_dir``).  Files already current
    are skipped unless ``force``.  Returns the paths, written or already there.  A destination
    that is a file, read-only or cannot be made raises `OutputDirError` before anything is written.
    """
    formats = formats_of(format)
    if not formats:
        raise ValueError(f"no export format given; known: {', '.join(registry.names())}")
    store = EmbeddingStore(output_dir)
    if not store.path.exists():
        raise FileNotFoundError(f"no embeddings store at {store.path}: run the pipeline with "
                                f"ExecutionOptions(output_dir={str(output_dir)!r}) first")
    store.check_layout()
    check_output_dir(_dest(store, dest), "export destination" if dest is not None else "output_dir")
    finished, rows, patients = store.finished_slides(), store.slide_rows(), store.patient_rows()
    if samples is None:
        wanted = sorted(finished | rows)
    else:
        wanted = list(dict.fromkeys(samples))
        unknown = [s for s in wanted if s not in finished and s not in rows]
        if unknown:
            raise ValueError(f"not in the store {store.path}: {unknown[:5]}"
                             + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                             + f"; finished slides: {len(finished)}")
    written: list[Path] = []
    for sid in wanted:
        if sid in finished:
            written += export_slide(store, sid, formats, dest, force)
        if sid in rows:
            written += export_row(store, "slide", sid, formats, dest, force)
    chosen = set(wanted)
    for pid in sorted(patients):
        if samples is None or chosen & set(store.patient_slides(pid)):
            written += export_row(store, "patient", pid, formats, dest, force)
    sweep_temporaries(_dest(store, dest), formats)
    return written
