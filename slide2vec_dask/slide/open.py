"""`open_slide`: pick a backend, open lazily, give errors a user can act on."""

from __future__ import annotations

from pathlib import Path

from slide2vec_dask.slide import omezarr, registry, remote
from slide2vec_dask.slide.base import Slide, UnreadableSlideError, make_reader


def open_slide(path: str | Path, backend: str = "auto", spacing_at_level_0: float | None = None,
               storage_options: dict | None = None) -> Slide:
    """Open a whole-slide image without decoding any pixels.

    ``backend="auto"`` asks every installed reader (`slide.registry`) how well
    it reads the file and takes the best: tifffile for SVS, generic TIFF and
    OME-TIFF (fast tile decoding), OpenSlide for everything else.  A DICOM WSI
    folder opens through OpenSlide, an OME-Zarr folder through zarr.  ``spacing_at_level_0`` (µm/px) overrides
    what the file says.

    A URL (``s3://``, ``gs://``, ``https://``..., any fsspec protocol; ``dicomweb+https://``
    for a DICOMweb series) is read in place by a reader that reads byte ranges or the
    protocol (`registry.choose_url`); ``storage_options`` are fsspec's for it.
    """
    path = remote.location(path, storage_options)
    if isinstance(path, remote.RemotePath):
        return Slide(path, make_reader(path, backend), spacing_at_level_0)
    if not path.exists():
        raise FileNotFoundError(f"slide not found: {path}")
    if path.is_dir() and omezarr.is_zarr_folder(path):   # an OME-Zarr is a folder too
        backend = "omezarr" if backend == "auto" else backend
    elif path.is_dir():
        path, backend = _folder_slide(path, backend)
    return Slide(path, make_reader(path, backend), spacing_at_level_0)


def _folder_slide(folder: Path, backend: str) -> tuple[Path, str]:
    """A DICOM WSI folder opens as its series (OpenSlide reads it from any one of its files)."""
    dicom = next((f for f in sorted(folder.iterdir())[:200] if f.is_file() and _is_dicom(f)), None)
    if dicom is None:
        raise UnreadableSlideError(f"{folder} is a directory, not a slide file (for MRXS pass the .mrxs file; "
                                   "a DICOM WSI folder holds .dcm files, and this one holds none)")
    if backend not in ("auto", "openslide"):
        raise UnreadableSlideError(f"{folder} is a DICOM WSI folder, which only backend='openslide' (or 'auto') "
                                   f"reads, not backend={backend!r}")
    try:
        registry.require("openslide")
    except ImportError as exc:
        raise UnreadableSlideError(f"{folder} is a DICOM WSI folder; reading it needs OpenSlide 4: {exc}") from exc
    import openslide

    if openslide.OpenSlide.detect_format(str(dicom)) != "dicom":
        raise UnreadableSlideError(
            f"{folder} is a DICOM folder but OpenSlide does not read {dicom.name} as a whole-slide image "
            "(it needs the VL Whole Slide Microscopy series, e.g. as wsidicomizer writes it; "
            f"OpenSlide {openslide.__library_version__} reads DICOM from 4.0 on)"
        )
    return dicom, "openslide"


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False
