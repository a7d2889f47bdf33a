"""The DICOMweb backend: a DICOM WSI series read from a server (a PACS, the Imaging Data Commons,
Google's Healthcare API) through wsidicom's DICOMweb client, frame by frame (WADO-RS).

A series is named by a URL ``dicomweb+https://HOST/PREFIX/studies/<StudyUID>/series/<SeriesUID>``
(``dicomweb+http://`` for a server on loopback); a plain ``https://`` URL of that shape is
taken as DICOMweb too.  ``storage_options`` may give ``headers`` (e.g. an ``Authorization``
header), ``token`` (a bearer token), ``username`` / ``password``, and ``max_attempts``
(dicomweb-client's retries of a failed request, 5 by default, over ~30 s).
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np

from slide2vec_dask.slide.base import usable_spacing
from slide2vec_dask.slide.registry import ReaderSpec
from slide2vec_dask.slide.remote import RemotePath, access_error

_SERIES = re.compile(r"^(?:dicomweb\+)?(https?)://(.+?)/studies/([0-9.]+)/series/([0-9.]+)/?$", re.IGNORECASE)


def series_of(url: str) -> tuple[str, str, str] | None:
    """``(server root URL, study UID, series UID)`` of a DICOMweb series URL, or None."""
    match = _SERIES.match(str(url))
    if match is None:
        return None
    scheme, root, study, series = match.groups()
    return f"{scheme.lower()}://{root}", study, series


class DicomWebReader:
    backend = "dicomweb"
    vendor = "dicom"

    def __init__(self, path: RemotePath):
        from dicomweb_client.api import DICOMwebClient
        from wsidicom import WsiDicom, WsiDicomWebClient

        root, study, series = series_of(path)
        self.path = path
        web = DICOMwebClient(root, session=_session(path.storage_options))
        if path.storage_options.get("max_attempts"):   # dicomweb-client retries 5 times over ~30 s by default
            web.set_http_retry_params(max_attempts=int(path.storage_options["max_attempts"]))
        if not web.search_for_instances(study_instance_uid=study, series_instance_uid=series, limit=1):
            raise FileNotFoundError(f"{path}: no such series (the server lists no instances of it); check the "
                                    "study and series UIDs")
        client = WsiDicomWebClient(web)
        with warnings.catch_warnings():   # pydicom: bulk data (an ICC profile) left on the server, as we want
            warnings.filterwarnings("ignore", message="No bulk data URI handler")
            self._wsi = WsiDicom.open_web(client, study, series)
        levels = list(self._wsi.levels)
        if not levels:
            raise ValueError(f"series {series} of study {study} holds no whole-slide pyramid")
        self._levels = [lv.level for lv in levels]    # wsidicom's level numbers (log2 of the downsample)
        self.level_shapes = [(lv.size.height, lv.size.width) for lv in levels]
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = [((h0 / h) + (w0 / w)) / 2 for h, w in self.level_shapes]
        mpp = levels[0].mpp
        self.spacing_um = usable_spacing(None if mpp is None else float(mpp.width))

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        # Concurrent reads of one slide, as the worker's threads make them: wsidicom locks its frame
        # cache; pixel-exact with 4 threads against Orthanc (and each read is one WADO-RS request).
        image = self._wsi.read_region((x, y), self._levels[level], (width, height))
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        self._wsi.close()


class _NoBulkDataNotice(logging.Filter):
    """pydicom logs (besides warning) that it left bulk data (an ICC profile) on the server: as we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No bulk data URI handler" not in record.getMessage()


_QUIET = _NoBulkDataNotice()
logging.getLogger("pydicom").addFilter(_QUIET)


def _session(options: dict):
    import requests

    session = requests.Session()
    session.headers.update(options.get("headers") or {})
    if options.get("token"):
        session.headers["Authorization"] = f"Bearer {options['token']}"
    if options.get("username"):
        session.auth = (options["username"], options.get("password", ""))
    return session


def _claims(probe) -> int:
    return 0   # local files: OpenSlide reads a DICOM folder


def _claims_url(path: RemotePath) -> int:
    return 100 if series_of(path) is not None else 0


def _open(path: RemotePath) -> DicomWebReader:
    if not isinstance(path, RemotePath):
        raise ValueError(f"{path}: the dicomweb backend reads a series from a DICOMweb server, given as "
                         "dicomweb+https://HOST/PREFIX/studies/<StudyUID>/series/<SeriesUID>")
    failure = None
    try:
        return DicomWebReader(path)
    except Exception as exc:   # noqa: BLE001 - requests', dicomweb-client's and wsidicom's errors
        chain = _chain(exc)
        if isinstance(exc, FileNotFoundError):
            raise
        if any(type(e).__name__ == "WsiDicomNotFoundError" for e in chain):
            failure = FileNotFoundError(f"{path}: the series holds no whole-slide pyramid ({exc})")
        elif any(_from_server(e) for e in chain):
            failure = access_error(path, "the DICOMweb server did not give the series", exc)
        else:
            raise
    raise failure   # outside the handler: no chained library error (they need not pickle)


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _from_server(exc: BaseException) -> bool:
    """Whether the server, not the data, failed: an HTTP error status or no connection."""
    import requests

    return isinstance(exc, (requests.HTTPError, requests.ConnectionError, requests.Timeout, OSError))


READER = ReaderSpec(
    name="dicomweb", requires="wsidicom", install="pip install wsidicom", claims=_claims, open=_open,
    formats="DICOM WSI series on a DICOMweb server (WADO-RS frames)", claims_url=_claims_url,
)
