"""Slides and masks at a URL (s3://, gs://, https://, any fsspec protocol), read in place.

A URL is kept as a `RemotePath`: a ``str`` (the URL, which is all that is ever
shown, logged or stored) that also carries the run's fsspec ``storage_options``
to whatever process opens it.  Credentials come from the environment as fsspec
finds them (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``...) or from those
options; they never appear in ``str()``, ``repr()``, the store or a log line.

`RemoteFile` reads an object in byte ranges only: a TIFF's header through a
small block cache (`RemoteFile.handle`, read once per process: the open slide is
cached), and a block's tiles through `RemoteFile.planned`, which coalesces the
byte ranges a read is about to need into a few concurrent requests.  Nothing
reads a whole object.  Every failure of the store or the network is a
`RemoteAccessError` (an ``OSError``) naming the URL: the slide fails alone and a
rerun retries it.
"""

from __future__ import annotations

import copy
import io
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlparse

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
#: Neighbouring ranges closer than this are fetched as one request (the gap is read and dropped):
#: at 10 ms a round trip and ~100 MB/s, 256 KiB costs less than a request.
MAX_GAP = 256 << 10
#: The most bytes one request fetches (a span of coalesced ranges).
MAX_SPAN = 16 << 20
#: The most bytes a planned read holds at once (the rest is fetched when reached).
WINDOW = 64 << 20
#: Header reads (a TIFF's directories) go through a cache of blocks this big.
HEADER_BLOCK = 256 << 10
HEADER_BLOCKS = 64


class RemoteAccessError(OSError):
    """An object store or server could not give the bytes asked for (missing, refused, cut off, gone)."""


def is_url(value: Any) -> bool:
    """Whether ``value`` names a remote object (``scheme://...``; ``file://`` is a local path)."""
    if isinstance(value, RemotePath):
        return True
    if not isinstance(value, str):
        return False
    match = _SCHEME.match(value)
    return bool(match) and match.group(1).lower() != "file"


class RemotePath(str):
    """A slide's (or mask's) URL, carrying the storage options that reach it.

    It is the URL wherever it is shown or compared (``str``, ``repr``, ``==``);
    the options travel with it when it is pickled to a Dask worker, and nowhere else.
    """

    storage_options: dict

    def __new__(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> "RemotePath":
        self = super().__new__(cls, str(url))
        self.storage_options = dict(storage_options or {})
        return self

    def __reduce__(self):
        return RemotePath, (str(self), self.storage_options)

    def __repr__(self) -> str:
        return f"RemotePath({str.__repr__(self)})"

    @property
    def protocol(self) -> str:
        return _SCHEME.match(self).group(1).lower()

    @property
    def name(self) -> str:
        return PurePosixPath(unquote(urlparse(str(self)).path.rstrip("/"))).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def child(self, name: str) -> "RemotePath":
        """The object ``name`` inside this prefix (an OME-Zarr's ``zarr.json``), same options."""
        return RemotePath(str(self).rstrip("/") + "/" + name, self.storage_options)


_SECRET = re.compile(r"secret|key|token|password|credential|auth", re.IGNORECASE)


def redacted(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` fit to print: values whose names say secret (key, token...) hidden."""
    if options is None:
        return None
    return {k: (redacted(v) if isinstance(v, Mapping) else "<hidden>" if _SECRET.search(str(k)) else v)
            for k, v in options.items()}


def location(value: Any, storage_options: Mapping[str, Any] | None = None) -> Path | RemotePath:
    """A local `Path`, or a `RemotePath` with ``storage_options`` (those it has already win)."""
    if isinstance(value, RemotePath):
        return value if value.storage_options or not storage_options else RemotePath(value, storage_options)
    if isinstance(value, str) and value.lower().startswith("file://"):
        return Path(unquote(urlparse(value).path))
    if is_url(value):
        return RemotePath(value, storage_options)
    return Path(value)


def filesystem(path: RemotePath):
    """The fsspec file system and in-store path for ``path`` (fsspec caches the instances)."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(str(path), **copy.deepcopy(path.storage_options))   # s3fs edits nested options in place
    except ImportError as exc:
        raise ImportError(f"{path}: reading {path.protocol}:// needs fsspec's driver for it ({exc}); e.g. "
                          "pip install s3fs (s3://), gcsfs (gs://), aiohttp (https://)") from exc


def info(path: RemotePath) -> dict[str, Any]:
    """The object's metadata (size, ETag / generation...), one request; `RemoteAccessError` naming it."""
    fs, fs_path = filesystem(path)
    try:
        return fs.info(fs_path)
    except Exception as exc:   # noqa: BLE001 - each store has its own exception types
        failure = access_error(path, "cannot be looked up", exc)
    raise failure   # outside the handler: no chained library error (aiohttp's do not pickle back from a worker)


def access_error(path: str, what: str, exc: BaseException) -> OSError:
    """An ``OSError`` naming the object and what failed: missing and refused stay what they are.

    The library's error is told in the message, not chained: raise it outside the ``except``."""
    detail = f"{type(exc).__name__}: {exc}"
    status = _status(exc)
    if status in (401, 403) or (status is None and isinstance(exc, PermissionError)):
        return PermissionError(f"{path}: access denied ({detail}); check the credentials (the environment's, "
                               "or storage_options) and the bucket's policy")
    cause = exc.__cause__ or exc.__context__
    if status == 404 or (isinstance(exc, FileNotFoundError) and (cause is None or isinstance(cause, FileNotFoundError))):
        return FileNotFoundError(f"{path}: no such object ({detail}); check the URL")
    if isinstance(exc, FileNotFoundError):   # fsspec's http says so for a server that did not answer too
        detail = f"{type(cause).__name__}: {cause}"
    if isinstance(exc, PermissionError):
        return PermissionError(f"{path}: access denied ({detail}); check the credentials (the environment's, "
                               "or storage_options) and the bucket's policy")
    if isinstance(exc, RemoteAccessError):
        return exc
    return RemoteAccessError(f"{path}: {what} ({detail}); the server may be down or the object incomplete: "
                             "rerun to retry the slide")


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status behind an error, looking through its causes (fsspec's http turns a 403 into a
    FileNotFoundError caused by aiohttp's error, which has the status)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for attr in ("status", "code", "status_code"):
            value = getattr(exc, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        exc = exc.__cause__ or exc.__context__
    return None


def coalesce(ranges: list[tuple[int, int]], max_gap: int = MAX_GAP,
             max_span: int = MAX_SPAN) -> list[tuple[int, int]]:
    """``(offset, count)`` ranges as few ``(start, end)`` spans: neighbours less than ``max_gap``
    apart are merged while a span stays within ``max_span`` bytes."""
    spans: list[list[int]] = []
    for offset, count in sorted(r for r in ranges if r[1] > 0):
        end = offset + count
        if spans and offset - spans[-1][1] <= max_gap and max(end, spans[-1][1]) - spans[-1][0] <= max_span:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([offset, end])
    return [(s, e) for s, e in spans]


class RemoteFile:
    """One remote object read in byte ranges, thread-safe (fsspec runs the requests on its IO loop)."""

    def __init__(self, path: RemotePath):
        self.path = path
        self.fs, self.fs_path = filesystem(path)
        self.info = info(path)
        size = self.info.get("size")
        if not isinstance(size, int):
            raise RemoteAccessError(f"{path}: the server does not say how big the object is, so it cannot be "
                                    "read in byte ranges (an HTTP server must send Content-Length)")
        self.size = size
        self.requests = 0          # ranged requests made, for tests and benchmarks
        self.error: OSError | None = None   # the last failed fetch (a parser may have swallowed it)
        self._plan = threading.local()

    # -- fetching ----------------------------------------------------------------------
    def fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, end)`` span, fetched concurrently; all or an error."""
        try:
            return self._fetch(spans)
        except OSError as exc:
            self.error = exc
            raise

    def check(self) -> None:
        """Raise the last failed fetch: a parser that swallows read errors must not hide a server gone."""
        if self.error is not None:   # a fresh copy: the original may sit in the parser's error chain
            raise type(self.error)(*self.error.args)

    def _fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        if not spans:
            return []
        bad = [(s, e) for s, e in spans if e > self.size]
        if bad:
            raise RemoteAccessError(f"{self.path}: bytes {bad[0][0]}-{bad[0][1]} are needed but the object has "
                                    f"{self.size}: it is truncated")
        self.requests += len(spans)
        failure = None
        try:
            data = self.fs.cat_ranges([self.fs_path] * len(spans), [s for s, _ in spans], [e for _, e in spans],
                                      on_error="raise")
        except Exception as exc:   # noqa: BLE001
            failure = access_error(self.path, f"reading {len(spans)} byte range(s) failed", exc)
        if failure is not None:
            raise failure   # unchained, as in `info`
        for (start, end), chunk in zip(spans, data):
            if isinstance(chunk, BaseException):
                raise access_error(self.path, f"reading bytes {start}-{end} failed", chunk)
            if len(chunk) != end - start:
                raise RemoteAccessError(f"{self.path}: asked for bytes {start}-{end}, got {len(chunk)} bytes "
                                        "(the object is truncated, or the server ignores range requests)")
        return data

    def pread(self, count: int, offset: int) -> bytes:
        """``count`` bytes at ``offset``: from the planned read in progress on this thread, else one request."""
        plan = getattr(self._plan, "current", None)
        if plan is not None:
            hit = plan.get(offset, count)
            if hit is not None:
                return hit
        return self.fetch([(offset, offset + count)])[0]

    @contextmanager
    def planned(self, ranges: list[tuple[int, int]]) -> Iterator[None]:
        """Within the block, `pread` of these ``(offset, count)`` ranges is served from a few coalesced
        requests, made when the first of them is read (``WINDOW`` bytes at a time, in order)."""
        previous = getattr(self._plan, "current", None)
        self._plan.current = _Plan(self, ranges)
        try:
            yield
        finally:
            self._plan.current = previous

    def handle(self) -> "_HeaderReader":
        """A seekable binary file for parsers (tifffile): cached blocks, for headers and directories."""
        return _HeaderReader(self)

    def is_current(self) -> bool:
        """Whether the object is still the one opened (size, ETag / generation...): one HEAD request."""
        try:
            return identity(self.path) == identity(self.path, self.info)
        except OSError:
            return True   # unreachable now: the next read says so, with its own error

    def close(self) -> None:
        pass


class _Plan:
    def __init__(self, source: RemoteFile, ranges: list[tuple[int, int]]):
        self.source = source
        self.ranges = [r for r in ranges if r[1] > 0]
        self.position = {r: i for i, r in reversed(list(enumerate(self.ranges)))}
        self.cache: dict[tuple[int, int], bytes] = {}

    def get(self, offset: int, count: int) -> bytes | None:
        key = (offset, count)
        if key in self.cache:
            return self.cache[key]
        start = self.position.get(key)
        if start is None:
            return None
        window, total = [], 0
        for r in self.ranges[start:]:
            if window and total + r[1] > WINDOW:
                break
            window.append(r)
            total += r[1]
        spans = coalesce(window)
        data = dict(zip(spans, self.source.fetch(spans)))
        self.cache = {}
        for off, cnt in window:
            span = next(s for s in spans if s[0] <= off and off + cnt <= s[1])
            self.cache[(off, cnt)] = data[span][off - span[0] : off - span[0] + cnt]
        return self.cache[key]


class _HeaderReader(io.RawIOBase):
    """Seekable reads of a `RemoteFile` through an LRU cache of `HEADER_BLOCK` blocks."""

    def __init__(self, source: RemoteFile):
        super().__init__()
        self.source = source
        self.name = str(source.path)
        self._pos = 0
        self._blocks: "OrderedDict[int, bytes]" = OrderedDict()
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self.source.size - self._pos))
        done = 0
        while done < want:
            block = (self._pos + done) // HEADER_BLOCK
            data = self._block(block)
            start = self._pos + done - block * HEADER_BLOCK
            take = min(want - done, len(data) - start)
            if take <= 0:
                break
            view[done : done + take] = data[start : start + take]
            done += take
        self._pos += done
        return done

    def _block(self, index: int) -> bytes:
        with self._lock:
            data = self._blocks.get(index)
            if data is not None:
                self._blocks.move_to_end(index)
                return data
        start = index * HEADER_BLOCK
        data = self.source.fetch([(start, min(self.source.size, start + HEADER_BLOCK))])[0]
        with self._lock:
            self._blocks[index] = data
            while len(self._blocks) > HEADER_BLOCKS:
                self._blocks.popitem(last=False)
        return data


def identity(path: RemotePath, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What says which version of the object this is, without reading it: size, and the store's
    ETag / generation / version id / last-modified where it gives them (from ``meta``, fs.info's)."""
    meta = info(path) if meta is None else meta
    out: dict[str, Any] = {"size": int(meta.get("size") or 0)}
    for key in ("ETag", "etag", "generation", "VersionId", "version_id", "md5Hash", "LastModified",
                "Last-Modified", "updated", "mtime"):
        value = meta.get(key)
        if value not in (None, ""):
            out[key.lower().replace("-", "_")] = str(value).strip('"')
    return out
