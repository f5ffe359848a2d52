"""A real HTTP server on 127.0.0.1 for the image-by-URL tests (http.server in its own
threads), serving files with Range support and ETags, counting what it is asked, and
misbehaving on request: 404s, stalling after the headers, breaking a body off midway.

Tests synchronise on its events (``arrived``: a request came in; ``stalled``: it is holding a
response), never on sleeps."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    # Paths answered with 404.
    missing: set[str] = field(default_factory=set)
    # Send the headers, then nothing until ``release`` is set (a stalled server).
    stall: bool = False
    # Break the connection off after this many body bytes, for the first N full requests.
    break_after: int | None = None
    breaks_left: int = 0
    # Answer every request with the whole file (a server without Range support).
    ignore_range: bool = False
    # Wait for ``pace`` before each 64 KiB of the body (a download held by the server) ...
    pace: threading.Event | None = None
    # ... after sending this many bytes of it freely (then ``ImageServer.held`` is set).
    free_bytes: int = 0


@dataclass
class Seen:
    path: str
    range: str | None
    if_range: str | None


class ImageServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour = Behaviour()
        self.requests: list[Seen] = []
        self.arrived = threading.Event()
        self.stalled = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path``; its sha256 hex."""
        self.files[path] = data
        return hashlib.sha256(data).hexdigest()

    def gets(self, path: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(Seen(path, h.headers.get("Range"), h.headers.get("If-Range")))
        self.arrived.set()
        b = self.behaviour
        data = self.files.get(path)
        if data is None or path in b.missing:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        start = 0
        wanted = h.headers.get("Range")
        if (
            wanted
            and wanted.startswith("bytes=")
            and h.headers.get("If-Range") in (None, etag)
            and not b.ignore_range
        ):
            start = int(wanted[len("bytes=") :].split("-", 1)[0])
        body = data[start:]
        if start:
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if b.stall:
            self.stalled.set()
            self.release.wait(60)
            return
        if b.break_after is not None and b.breaks_left > 0:
            b.breaks_left -= 1
            h.wfile.write(body[: b.break_after])
            h.wfile.flush()
            h.close_connection = True
            return
        step = 64 * 1024
        for offset in range(0, len(body), step):
            if b.pace is not None and offset >= b.free_bytes:
                self.held.set()
                b.pace.wait(30)
            try:
                h.wfile.write(body[offset : offset + step])
            except (BrokenPipeError, ConnectionResetError):
                return

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.behaviour.pace is not None:
            self.behaviour.pace.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)


@contextmanager
def image_server() -> Iterator[ImageServer]:
    server = ImageServer().start()
    try:
        yield server
    finally:
        server.stop()
