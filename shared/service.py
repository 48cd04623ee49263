"""The one service loop: signals, two-stage shutdown, Redis reconnects, heartbeats, stream gauges.

A service subclasses ``Service`` and implements ``setup`` (connect-time work such as creating
groups, re-run after every reconnect) and ``step`` (one bounded unit of work). The first SIGTERM
or SIGINT stops taking new work and lets the step in hand finish (bounded by ``drain_s``); a
second signal exits at once. Its HTTP endpoints (/metrics, /healthz, /readyz and its own pages)
are served by ``shared.endpoints``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from http.server import ThreadingHTTPServer

import redis

try:
    from setproctitle import setproctitle
except ImportError:  # optional nicety: the process keeps the interpreter's name
    setproctitle = None

from shared import metrics
from shared.config import Config
from shared.endpoints import HttpRequest, HttpResponse, serve
from shared.heap import MALLOC_TRIM, TRIM_EVERY_S
from shared.keys import Keys
from shared.streams.connection import REDIS_DOWN, connect
from shared.streams.stats import publish_stream_metrics


def service_heartbeats(r: redis.Redis, prefix: str, stale_s: float = 15.0) -> list[dict]:
    """Every process's last heartbeat, newest state first; ``up`` is false when it is older than `stale_s`
    (entries of processes silent for an hour are removed)."""
    key = Keys(prefix).services
    now, out, gone = time.time(), [], []
    for field_, raw in r.hgetall(key).items():
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
        r.hdel(key, *gone)
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
        self.keys = Keys.for_config(cfg)
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
        self.r.hset(self.keys.services, self.consumer, json.dumps({
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
        self.http = serve(self, self.port)

    def _connect(self) -> None:
        self.r.ping()
        self.setup()
        self._connected = True
        metrics.REDIS_UP.labels(service=self.name).set(1)

    def run(self) -> int:
        if setproctitle is not None:
            setproctitle(f"plantsight {self.name}")
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
                    publish_stream_metrics(self.r, self.keys, self.cfg, self.streams())
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
            self.r.hdel(self.keys.services, self.consumer)  # a clean stop is not a failure
        except (*REDIS_DOWN, redis.RedisError):
            pass
        if self.http:
            self.http.shutdown()
        self.log.info("%s stopped", self.name)
        return 0
