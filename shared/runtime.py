"""The one service loop: signals, two-stage shutdown, Redis reconnects, /metrics, /healthz, /readyz.

A service subclasses ``Service`` and implements ``setup`` (connect-time work such as creating
groups, re-run after every reconnect) and ``step`` (one bounded unit of work). The first SIGTERM
or SIGINT stops taking new work and lets the step in hand finish (bounded by ``drain_s``); a
second signal exits at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import metrics
from shared.config import Config
from shared.streams import REDIS_DOWN, Names, connect, publish_stream_metrics

log = logging.getLogger("plantsight")


def _malloc_trim():
    """glibc's malloc_trim, or None: gives freed heap pages back to the system."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


MALLOC_TRIM = _malloc_trim()
TRIM_EVERY_S = 30.0


def setup_logging(level: str = "INFO", service: str = "plantsight") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s")


class _Handler(BaseHTTPRequestHandler):
    service: "Service"

    def do_GET(self):  # noqa: N802 (http.server API)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, code = generate_latest(), CONTENT_TYPE_LATEST, 200
        elif path == "/healthz":
            ok = self.service.healthy()
            body, ctype, code = (b"ok\n" if ok else b"stalled\n"), "text/plain", 200 if ok else 503
        elif path == "/readyz":
            ok = self.service.ready()
            body, ctype, code = (b"ready\n" if ok else b"not ready\n"), "text/plain", 200 if ok else 503
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # scrapes every few seconds would flood the log
        pass


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
        self.names = Names(cfg.redis.prefix)
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

    # --- health -------------------------------------------------------------------
    def healthy(self) -> bool:
        return time.monotonic() - self._beat < max(30.0, self.drain_s * 3)

    def ready(self) -> bool:
        return self._connected and not self.stop.is_set()

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
        if self.http:
            self.http.shutdown()
        self.log.info("%s stopped", self.name)
        return 0
