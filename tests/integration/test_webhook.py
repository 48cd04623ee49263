"""The webhook sink against a real HTTP server: signature, idempotency key, retries with backoff, give-up."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.alerting.sinks import SinkWorker
from shared.config import load_config
from shared.messages import Alert
from shared.streams import DeadLetters, GroupReader, Names, connect
from tests.conftest import free_port

SECRET = "hook-secret-for-tests"


class Receiver:
    """An HTTP server answering with scripted status codes and recording every request."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.requests = list(statuses), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), body))
                code = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def run_sink(redis_server, prefix, url, alerts: list[Alert], wait_for, **sink_opts):
    cfg = load_config(data={
        "redis": {"url": redis_server.url, "prefix": prefix},
        "alerts": {"rules": [{"name": "hot", "task": "thermal", "when": "max_k > 400", "sinks": ["cmms"]}],
                   "sinks": [{"name": "cmms", "type": "webhook", "url": url, "secret_env": "PS_HOOK_SECRET",
                              "backoff_s": 0.2, "timeout_s": 1.0, **sink_opts}]}},
        environ={})
    r = connect(cfg.redis)
    names = Names(prefix)
    for a in alerts:
        r.xadd(names.alerts, {"m": a.to_msgpack()})
    dead = DeadLetters(r, names, 3600, "alert")
    reader = GroupReader(r, names.alerts, "sink-cmms", "test-sink", dead=dead, count=16, block_ms=100,
                         claim_idle_ms=60000, max_deliveries=3, max_bytes=1 << 20)
    stop = threading.Event()
    worker = SinkWorker(cfg, cfg.alerts.sinks[0], reader, dead, stop)
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not wait_for(r, names):
        time.sleep(0.05)
    stop.set()
    worker.join(10)
    return r, names


def alert(n: int = 0) -> Alert:
    return Alert(id=Alert.identity("hot", "kiln-1", f"1-{n}"), rule="hot", severity="critical", state="firing",
                 camera="kiln-1", task="thermal", ts=1_700_000_000_000_000_000 + n, value=455.5, threshold=400.0,
                 message="kiln too hot", frame_id=f"1-{n}")


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("PS_HOOK_SECRET", SECRET)


def acked(r, names) -> bool:
    return r.xpending(names.alerts, "sink-cmms")["pending"] == 0 and r.xinfo_groups(names.alerts)[0][
        "last-delivered-id"] != b"0-0"


def test_delivery_is_signed_and_retried_with_backoff(redis_server, r, prefix):
    rx = Receiver([500, 503, 200])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert()], lambda r_, n: len(rx.requests) >= 3 and acked(r_, n))
    finally:
        rx.close()
    assert len(rx.requests) == 3
    times = [t for t, _, _ in rx.requests]
    # Exponential backoff with jitter in [0.5, 1) of 0.2 s, then 0.4 s.
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2
    _, headers, body = rx.requests[-1]
    want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Plantsight-Signature"] == want
    assert headers["Idempotency-Key"] == alert().id
    assert {rx.requests[i][1]["Idempotency-Key"] for i in range(3)} == {alert().id}
    doc = json.loads(body)
    assert doc["rule"] == "hot" and doc["camera"] == "kiln-1" and doc["value"] == 455.5 and doc["state"] == "firing"
    assert r2.xlen(names.deadletter) == 0
    assert acked(r2, names)


def test_a_400_is_final_and_dead_lettered(redis_server, r, prefix):
    rx = Receiver([400])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert(1), alert(2)],
                             lambda r_, n: r_.xlen(n.deadletter) >= 1 and len(rx.requests) >= 2 and acked(r_, n))
    finally:
        rx.close()
    assert len(rx.requests) == 2  # no retry of the 400; the second alert went through
    letters = r2.xrange(names.deadletter)
    assert len(letters) == 1
    fields = letters[0][1]
    assert fields[b"reason"] == b"delivery_failed" and b"HTTP 400" in fields[b"detail"]
    assert Alert.from_msgpack(fields[b"m"]).id == alert(1).id


def test_an_unreachable_receiver_is_retried_then_dead_lettered(redis_server, r, prefix):
    url = f"http://127.0.0.1:{free_port()}/nothing-listens-here"
    r2, names = run_sink(redis_server, prefix, url, [alert(3)], lambda r_, n: r_.xlen(n.deadletter) >= 1,
                         retries=2)
    letters = r2.xrange(names.deadletter)
    assert len(letters) == 1 and letters[0][1][b"reason"] == b"delivery_failed"
    assert b"ConnectError" in letters[0][1][b"detail"]
