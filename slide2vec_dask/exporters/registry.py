"""The export formats: each module of this package declares its own, and this is the one list.

A format module ends with ``FORMAT = ExportFormat(...)`` (or ``FORMATS = (...)`` when one
module serves several names, as `flat` does ``pt`` and ``npz``).  The list is found by
walking the package (``pkgutil.iter_modules`` over its ``__path__``), so adding a format is
adding one module; `config` validates ``output_format`` against it, the command line offers
it, and the temporaries sweep walks the folders it names.  Modules whose name starts with
``_`` are helpers and are not walked.

Discovery imports every format module, which imports only numpy and the standard library:
the libraries a format writes with (h5py, anndata, torch) are imported when it writes.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

PACKAGE = "slide2vec_dask.exporters"


@dataclass(frozen=True)
class ExportFormat:
    """What a format module declares about itself.

    The writer (the declaring module unless ``writer`` is given) has ``tile_files(src, dest)``,
    ``write_tiles(src, files)``, ``row_files(src, dest)`` and, when ``row_files`` can name
    files, ``write_row(src, files)`` (`_base.TileSource` / `_base.RowSource` are what they read).
    """

    name: str                       # the ``output_format`` / ``--format`` value
    roots: tuple[str, ...]          # top-level folders it writes under the output dir (swept for temporaries)
    extra: str | None = None        # the pip extra that installs what it needs: slide2vec-dask[<extra>]
    requires: tuple[str, ...] = ()  # modules that extra provides, imported up front by `check_available`
    layout: int = 1                 # bump when the files change: exports of an older layout are rewritten
    writer: Any = None              # None: the module that declares it (filled in by discovery)

    def need(self, module: str):
        """Import ``module`` or say which extra to install for this format."""
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"the {self.name!r} export needs {module}, which is not installed: "
                              f"pip install 'slide2vec-dask[{self.extra}]'") from exc


def formats() -> dict[str, ExportFormat]:
    """Every declared format by name, sorted (found once per package path)."""
    return _discover(tuple(importlib.import_module(PACKAGE).__path__))


def names() -> tuple[str, ...]:
    return tuple(formats())


def get(name: str) -> ExportFormat:
    try:
        return formats()[name]
    except KeyError:
        raise ValueError(f"unknown output format {name!r}; known: {', '.join(names())}") from None


@lru_cache(maxsize=None)
def _discover(path: tuple[str, ...]) -> dict[str, ExportFormat]:
    found: dict[str, ExportFormat] = {}
    origin: dict[str, str] = {}
    for info in pkgutil.iter_modules(list(path)):
        if info.name.startswith("_") or info.name == "registry":
            continue
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        declared = getattr(module, "FORMATS", None) or ((module.FORMAT,) if hasattr(module, "FORMAT") else ())
        for fmt in declared:
            if not isinstance(fmt, ExportFormat):
                raise TypeError(f"{module.__name__}: FORMAT(S) must be ExportFormat, got {fmt!r}")
            if fmt.name in found:
                raise ValueError(f"export format {fmt.name!r} is declared twice "
                                 f"({origin[fmt.name]} and {module.__name__})")
            found[fmt.name] = fmt if fmt.writer is not None else dataclasses.replace(fmt, writer=module)
            origin[fmt.name] = module.__name__
    return dict(sorted(found.items()))
