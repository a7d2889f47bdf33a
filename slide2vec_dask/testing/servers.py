"""Real servers on 127.0.0.1 for tests and benchmarks of slides read at a URL.

`RangeServer`: a plain HTTP server of a folder with single byte-range requests,
ETags, a request log, and faults on demand (403, a stop after N requests).
`S3Server`: moto's S3 in server mode.  `DelayProxy`: a TCP proxy that adds a
round-trip latency without capping throughput.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(SimpleHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:   # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        name = self.path.split("?")[0].lstrip("/")
        owner.log.append((self.command, name, self.headers.get("Range")))
        if owner.stop_after is not None and len(owner.log) > owner.stop_after:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if name in owner.forbidden:
            return self._status(403)
        path = owner.root / name
        if not path.is_file():
            return self._status(404)
        size = path.stat().st_size
        start, end = 0, size
        match = _RANGE.match(self.headers.get("Range", "") or "")
        if match:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size:
                return self._status(416, {"Content-Range": f"bytes */{size}"})
        self.send_response(206 if match else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{_etag(path)}"')
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                self.wfile.write(os.pread(f.fileno(), end - start, start))

    def _status(self, code: int, headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _etag(path: Path) -> str:
    st = path.stat()
    return hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "RangeServer"


class RangeServer:
    """Serves ``root`` on 127.0.0.1 with byte ranges; ``log`` lists (method, name, range) per request."""

    def __init__(self, root: str | Path, port: int = 0):
        self.root = Path(root)
        self.forbidden: set[str] = set()
        self.stop_after: int | None = None     # requests after this many are cut (the server "goes away")
        self.log: list[tuple[str, str, str | None]] = []
        self._port = port
        self._server: _HTTPServer | None = None
        self.start()

    def start(self) -> "RangeServer":
        self._server = _HTTPServer(("127.0.0.1", self._port), _Handler)
        self._server.owner = self
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def gets(self, name: str | None = None) -> int:
        return sum(1 for method, n, _ in self.log if method == "GET" and (name is None or n == name))


class S3Server:
    """moto's S3 on 127.0.0.1 (``pip install "moto[server]"``); ``storage_options`` reach it with s3fs."""

    SECRET = "moto-secret-never-stored"

    def __init__(self, port: int = 0):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        # Fail fast when the server is gone: one attempt, short timeouts (s3fs still retries a few times).
        return {"key": "testing", "secret": self.SECRET, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": "us-east-1"},
                "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 1}}}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key=self.SECRET, region_name="us-east-1")

    def stop(self) -> None:
        self._server.stop()


class DelayProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port`` that delays every byte by half of ``rtt_s`` each way.

    Chunks are stamped when read and sent when due, so latency is added without limiting throughput.
    """

    def __init__(self, target_port: int, rtt_s: float, port: int = 0):
        self.target_port, self.delay = target_port, rtt_s / 2
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        queue: deque = deque()
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with ready:
                    queue.append((time.monotonic() + self.delay, data))
                    ready.notify()
                if not data:
                    return

        def write() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
