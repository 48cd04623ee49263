"""The one service loop: signals, two-stage shutdown, Redis reconnects, /metrics, /healthz, /readyz.

A service subclasses ``Service`` and implements ``setup`` (connect-time work such as creating
groups, re-run after every reconnect) and ``step`` (one bounded unit of work). The first SIGTERM
or SIGINT stops taking new work and lets the step in hand finish (bounded by ``drain_s``); a
second signal exits at once.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from urllib.parse import parse_qs, urlsplit

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import metrics
from shared.config import Config
from shared.streams import REDIS_DOWN, Names, connect, publish_stream_metrics

log = logging.getLogger("plantsight")


def libc() -> ctypes.CDLL | None:
    """glibc, for the heap settings below; None elsewhere (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim():
    """glibc's malloc_trim, or None: gives freed heap pages back to the system."""
    return getattr(libc(), "malloc_trim", None)


MALLOC_TRIM = _malloc_trim()
TRIM_EVERY_S = 30.0


def keep_tensor_heap() -> bool:
    """glibc heap settings for a process that runs a network on the CPU (infer); False where not glibc.

    The services' environment fixes the mmap threshold at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so each
    activation tensor of a batch was a fresh mmap whose pages faulted in again on every batch: 37,000
    page faults and ~130 ms of system time per resnet18 batch of 8 on a two-core box, a third of the
    model's time. Here large blocks come from the heap and stay there between batches; the service loop's
    ``malloc_trim`` every ``TRIM_EVERY_S`` still hands idle pages back, so the RSS stays flat.
    """
    c = libc()
    if c is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(c.mallopt(m_mmap_max, 0)) and bool(c.mallopt(m_trim_threshold, 512 << 20))


def setup_logging(level: str = "INFO", service: str = "plantsight") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s")


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


MAX_REQUEST_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    service: "Service"
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


def services_key(prefix: str) -> str:
    return f"{prefix}:services"


def service_heartbeats(r: redis.Redis, prefix: str, stale_s: float = 15.0) -> list[dict]:
    """Every process's last heartbeat, newest state first; ``up`` is false when it is older than `stale_s`
    (entries of processes silent for an hour are removed)."""
    now, out, gone = time.time(), [], []
    for field_, raw in r.hgetall(services_key(prefix)).items():
        try:
            beat = json.loads(raw)
        except ValueError:
            gone.append(field_)
            continue
        age = now - float(beat.get("ts", 0))
        if age > 3600:
            gone.append(field_)
            continue
        beat.update(id=field_.decode(), age_s=round(age, 1), up=age <= stale_s)
        out.append(beat)
    if gone:
        r.hdel(services_key(prefix), *gone)
    return sorted(out, key=lambda b: (b["service"], b["replica"], b["id"]))


class Service:
    """Base of every plantsight process."""

    name = "service"
    drain_s = 10.0
    stats_every_s = 2.0

    def __init__(self, cfg: Config, *, replica: int = 0, port: int | None = None):
        self.cfg = cfg
        self.replica = replica
        self.port = cfg.port(self.name) if port is None else port
        self.consumer = f"{self.name}-{os.uname().nodename}-{os.getpid()}"
        self.names = Names.for_config(cfg)
        self.stop = threading.Event()
        self.log = logging.getLogger(f"plantsight.{self.name}")
        self.r = connect(cfg.redis)
        self._connected = False
        self._beat = time.monotonic()
        self._signals = 0
        self._next_stats = 0.0
        self._next_trim = time.monotonic() + TRIM_EVERY_S
        self.http: ThreadingHTTPServer | None = None

    # --- for subclasses -------------------------------------------------------------
    def setup(self) -> None:
        """Create groups and other Redis state; called at start and after every reconnect."""

    def step(self) -> None:
        """One bounded unit of work (read a batch, process, write, ack)."""
        self.stop.wait(0.5)

    def streams(self) -> set[str]:
        """Streams whose gauges this service exports."""
        return set()

    def close(self) -> None:
        """Release resources after the loop has ended."""

    def handle_http(self, req: HttpRequest) -> HttpResponse | None:
        """Routes beyond /metrics, /healthz and /readyz (None: 404). Runs on the HTTP server's threads."""
        return None

    # --- health -------------------------------------------------------------------
    def healthy(self) -> bool:
        return time.monotonic() - self._beat < max(30.0, self.drain_s * 3)

    def ready(self) -> bool:
        return self._connected and not self.stop.is_set()

    def heartbeat(self) -> None:
        """``{P}:services`` holds each running process's last word, so anyone (the viewer, an operator
        with redis-cli) sees every replica on every host without knowing where it runs."""
        self.r.hset(services_key(self.names.prefix), self.consumer, json.dumps({
            "service": self.name, "replica": self.replica, "host": os.uname().nodename, "pid": os.getpid(),
            "port": self.port, "ready": self.ready(), "healthy": self.healthy(), "ts": time.time()}))

    # --- loop ---------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self._signals += 1
        if self._signals > 1:
            self.log.warning("second signal: exiting now")
            os._exit(128 + signum)
        self.log.info("%s: finishing the work in hand (up to %.0f s), signal again to exit now",
                      signal.Signals(signum).name, self.drain_s)
        self.stop.set()
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        time.sleep(self.drain_s)
        self.log.error("did not stop within %.0f s: exiting", self.drain_s)
        os._exit(1)

    def start_http(self) -> None:
        handler = type("Handler", (_Handler,), {"service": self})
        self.http = ThreadingHTTPServer(("0.0.0.0", self.port), handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, name="http", daemon=True).start()

    def _connect(self) -> None:
        self.r.ping()
        self.setup()
        self._connected = True
        metrics.REDIS_UP.labels(service=self.name).set(1)

    def run(self) -> int:
        try:
            from setproctitle import setproctitle

            setproctitle(f"plantsight {self.name}")
        except ImportError:  # optional nicety
            log.debug("setproctitle not installed")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start_http()
        self.log.info("%s serving /metrics /healthz /readyz on port %d", self.name, self.port)
        delay = 0.2
        while not self.stop.is_set():
            self._beat = time.monotonic()
            try:
                if not self._connected:
                    self._connect()
                    self.log.info("connected to Redis at %s", self.cfg.redis.masked_url())
                    delay = 0.2
                self.step()
                if time.monotonic() >= self._next_stats:
                    self._next_stats = time.monotonic() + self.stats_every_s
                    publish_stream_metrics(self.r, self.names, self.cfg, self.streams())
                    self.heartbeat()
                if MALLOC_TRIM and time.monotonic() >= self._next_trim:
                    # Batches of changing sizes leave freed pages in malloc arenas; hand them back
                    # so a months-long run keeps a flat RSS.
                    self._next_trim = time.monotonic() + TRIM_EVERY_S
                    MALLOC_TRIM(0)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                self.log.warning("consumer group missing (Redis lost its data?): creating it again")
                self._connected = False
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as e:
                self.log.error("Redis at %s refused the credentials (%s); check redis.password_env / "
                               "password_file", self.cfg.redis.masked_url(), e)
                self.close()
                return 2
            except REDIS_DOWN as e:
                if self._connected or delay == 0.2:
                    self.log.warning("cannot reach Redis at %s (%s); retrying with backoff",
                                     self.cfg.redis.masked_url(), e)
                self._connected = False
                metrics.REDIS_UP.labels(service=self.name).set(0)
                self.stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 10.0)
        self.close()
        try:
            self.r.hdel(services_key(self.names.prefix), self.consumer)  # a clean stop is not a failure
        except (*REDIS_DOWN, redis.RedisError):
            pass
        if self.http:
            self.http.shutdown()
        self.log.info("%s stopped", self.name)
        return 0
