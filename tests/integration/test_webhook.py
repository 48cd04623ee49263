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


def run_sink(redis_server, prefix, url, alerts: list[Alert], wait_for, consumer="test-sink", claim_idle_ms=60000,
             timeout=30, **sink_opts):
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
    reader = GroupReader(r, names.alerts, "sink-cmms", consumer, dead=dead, count=16, block_ms=100,
                         claim_idle_ms=claim_idle_ms, max_deliveries=3, max_bytes=1 << 20)
    stop = threading.Event()
    worker = SinkWorker(cfg, cfg.alerts.sinks[0], reader, dead, stop)
    worker.start()
    deadline = time.monotonic() + timeout
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
    assert fields[b"reason"] == b"delivery_failed"
    assert fields[b"detail"] == b'sink cmms: HTTP 400: {"error": "unknown asset tag"}'
    assert Alert.from_msgpack(fields[b"m"]).id == alert(1).id


def test_an_unreachable_receiver_is_retried_then_dead_lettered(redis_server, r, prefix):
    url = f"http://127.0.0.1:{free_port()}/nothing-listens-here"
    r2, names = run_sink(redis_server, prefix, url, [alert(3)], lambda r_, n: r_.xlen(n.deadletter) >= 1,
                         retries=2)
    letters = r2.xrange(names.deadletter)
    assert len(letters) == 1 and letters[0][1][b"reason"] == b"delivery_failed"
    assert b"ConnectError" in letters[0][1][b"detail"]


def test_a_slow_receiver_times_out_and_the_alert_is_retried(redis_server, r, prefix):
    rx = Receiver([200, 200], delays=[1.5, 0])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert(4)], lambda r_, n: len(rx.requests) >= 2 and acked(r_, n),
                             timeout_s=0.5)
    finally:
        rx.close()
    assert len(rx.requests) == 2 and r2.xlen(names.deadletter) == 0
    assert rx.requests[0][1]["Idempotency-Key"] == rx.requests[1][1]["Idempotency-Key"] == alert(4).id


def test_an_alert_raised_while_the_receiver_is_down_arrives_after_a_restart(redis_server, r, prefix):
    """The first sink worker stops while retrying; the next one (a new consumer) claims and delivers it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    r2, names = run_sink(redis_server, prefix, url, [alert(5)], lambda r_, n: False, consumer="alert-old",
                         timeout=1.5, retries=100, backoff_s=0.2)
    assert r2.xpending(names.alerts, "sink-cmms")["pending"] == 1  # not given up, not acknowledged
    assert r2.xlen(names.deadletter) == 0
    rx = Receiver([], port=port)
    try:
        run_sink(redis_server, prefix, url, [], lambda r_, n: len(rx.requests) >= 1 and acked(r_, n),
                 consumer="alert-new", claim_idle_ms=200)
    finally:
        rx.close()
    assert len(rx.requests) == 1
    assert json.loads(rx.requests[0][2])["id"] == alert(5).id
    assert r2.xlen(names.deadletter) == 0
