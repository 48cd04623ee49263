"""The HTTP side of every service: /metrics, /healthz and /readyz, and the service's own pages.

The server runs on threads of its own beside the service loop. A service answers its own routes in
``handle_http``; a route it does not know is a 404, and one that raises is a 500 without taking the
service down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_REQUEST_BYTES = 1 << 20


@dataclass
class HttpRequest:
    """One HTTP request as a service's `handle_http` sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass
class HttpResponse:
    """A reply; ``body`` may be an iterator of chunks (a live stream, ended when the client goes)."""

    code: int = 200
    body: bytes | Iterable[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class Served(Protocol):
    """What the server asks of the service it serves."""

    log: logging.Logger

    def healthy(self) -> bool: ...

    def ready(self) -> bool: ...

    def handle_http(self, req: HttpRequest) -> HttpResponse | None: ...


class _Handler(BaseHTTPRequestHandler):
    service: Served
    protocol_version = "HTTP/1.1"

    def _builtin(self, path: str) -> HttpResponse | None:
        if path == "/metrics":
            return HttpResponse(200, generate_latest(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ok = self.service.healthy()
            return HttpResponse(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
        if path == "/readyz":
            ok = self.service.ready()
            return HttpResponse(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        return None

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        resp = self._builtin(url.path) if method == "GET" else None
        if resp is None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BYTES:
                resp = HttpResponse(413, b"request body too large\n")
            else:
                req = HttpRequest(method, url.path, parse_qs(url.query), self.headers,
                                  self.rfile.read(length) if length else b"")
                try:
                    resp = self.service.handle_http(req) or HttpResponse(404, b"not found\n")
                except Exception:  # a bug in one page must not take the service down
                    self.service.log.exception("HTTP %s %s failed", method, url.path)
                    resp = HttpResponse(500, b"internal error\n")
        self.send_response(resp.code)
        self.send_header("Content-Type", resp.content_type)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if isinstance(resp.body, (bytes, bytearray)):
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(resp.body)
            return
        self.send_header("Connection", "close")  # a stream ends when either side closes
        self.close_connection = True
        self.end_headers()
        if method == "HEAD":
            return
        try:
            for chunk in resp.body:
                self.wfile.write(chunk)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the viewer closed the tab
        finally:
            close = getattr(resp.body, "close", None)
            if close:
                close()

    def do_GET(self):  # noqa: N802 (http.server API)
        self._serve("GET")

    def do_HEAD(self):  # noqa: N802
        self._serve("HEAD")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def log_message(self, fmt, *args):  # scrapes every few seconds would flood the log
        pass


def serve(service: Served, port: int) -> ThreadingHTTPServer:
    """Serve ``service`` on ``port`` (all interfaces) from a thread of its own; ``shutdown`` stops it."""
    handler = type("Handler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer(("0.0.0.0", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
