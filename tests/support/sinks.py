"""For the alert sinks' tests: an HTTP receiver with scripted answers, and a sink worker run over an alert stream."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.alerting.sinks import SinkWorker
from shared.config import load_config
from shared.keys import Keys
from shared.messages import Alert
from shared.streams.connection import connect, ensure_group
from shared.streams.reader import DeadLetters, GroupReader


class Receiver:
    """An HTTP server answering with scripted status codes and recording every request."""

    def __init__(self, statuses: list[int], delays: list[float] | None = None, port: int = 0):
        self.statuses, self.delays, self.requests = list(statuses), list(delays or []), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), body))
                if outer.delays:
                    time.sleep(outer.delays.pop(0))  # a slow receiver
                code = outer.statuses.pop(0) if outer.statuses else 200
                answer = b'{"error": "unknown asset tag"}' if code == 400 else b""
                self.send_response(code)
                if code == 429:
                    self.send_header("Retry-After", "1")  # slow down: longer than backoff_s
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class RunningSink:
    """A SinkWorker for the sink ``cmms`` over a fresh alert stream; ``until`` waits, ``stop`` ends it."""

    def __init__(self, redis_server, prefix, url, alerts: list[Alert], consumer="test-sink", claim_idle_ms=60000,
                 sink_type="webhook", alerts_cfg=None, **sink_opts):
        sink = {"name": "cmms", "type": sink_type, "url": url, "backoff_s": 0.2, "timeout_s": 1.0, **sink_opts}
        if sink_type == "webhook":
            sink.setdefault("secret_env", "PS_HOOK_SECRET")
        cfg = load_config(data={
            "redis": {"url": redis_server.url, "prefix": prefix},
            "alerts": {"rules": [{"name": "hot", "task": "thermal", "when": "max_k > 400", "sinks": ["cmms"]}],
                       "sinks": [sink], **(alerts_cfg or {})}},
            environ={})
        self.r = connect(cfg.redis)
        self.keys = Keys(prefix)
        for a in alerts:
            self.add(a)
        ensure_group(self.r, self.keys.alerts, "sink-cmms")  # before ``until`` asks about it (the worker would, later)
        dead = DeadLetters(self.r, self.keys, 3600, "alert")
        reader = GroupReader(self.r, self.keys.alerts, "sink-cmms", consumer, dead=dead, count=16, block_ms=100,
                             claim_idle_ms=claim_idle_ms, max_deliveries=3, max_bytes=1 << 20)
        self.halt = threading.Event()
        self.worker = SinkWorker(cfg, cfg.alerts.sinks[0], reader, dead, self.halt)
        self.worker.start()

    def add(self, a: Alert) -> None:
        self.r.xadd(self.keys.alerts, {"m": a.to_msgpack()})

    def until(self, check, timeout=30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self.r, self.keys):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.halt.set()
        self.worker.join(10)
        assert not self.worker.is_alive()


def run_sink(redis_server, prefix, url, alerts: list[Alert], wait_for, timeout=30, **opts):
    """Run a sink over ``alerts`` until ``wait_for(r, names)`` (or ``timeout``); returns (r, names)."""
    sink = RunningSink(redis_server, prefix, url, alerts, **opts)
    try:
        sink.until(wait_for, timeout)
    finally:
        sink.stop()
    return sink.r, sink.keys


def acked(r, names) -> bool:
    return r.xpending(names.alerts, "sink-cmms")["pending"] == 0 and r.xinfo_groups(names.alerts)[0][
        "last-delivered-id"] != b"0-0"
