"""The ASAP backend, by name only: ASAP's ``multiresolutionimageinterface`` is not on PyPI.

Listed so that ``backend="asap"`` says what to do instead of "unknown
backend": without the library it says where ASAP comes from; with it, that
this release has no reader for it yet (every format ASAP reads, OpenSlide or
tifffile reads too).  `auto` never picks it.
"""

from __future__ import annotations

from pathlib import Path

from slide2vec_dask.slide.registry import ReaderSpec


def _open(path: Path):
    raise NotImplementedError(
        f"{path}: backend='asap' has no reader in this release although ASAP is installed; "
        "use backend='auto', 'tifffile' or 'openslide', which read the formats ASAP does"
    )


READER = ReaderSpec(
    name="asap", requires="multiresolutionimageinterface",
    install="ASAP is not on PyPI: install it from its GitHub releases (computationalpathologygroup/ASAP), "
            "or use backend='openslide', which reads the same formats",
    claims=lambda probe: 0, open=_open, formats="(none: refused)",
)
