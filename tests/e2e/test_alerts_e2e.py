"""End to end: the demo's cameras, networks and rules raise an alert of every task within a minute, and a
real HTTP webhook receiver gets each one exactly once, signed, with its evidence on disk.

The config is shared/demo.yaml as `plantsight up --demo` runs it, with a test Redis, free ports, eager CPU
inference (it starts sooner) and one webhook sink added to every rule (the demo itself only logs).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgpack
import pytest
import yaml

from shared.config import DEMO_MODELS
from tests.support.paths import ROOT
from tests.support.pipeline import Up

pytestmark = pytest.mark.slow

SECRET = "e2e-hook-secret-Vb71"
TASKS = ("classify", "detect", "segment", "thermal")


class Receiver:
    """A CMMS stand-in: records every POST and answers 200."""

    def __init__(self):
        self.requests: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/work-orders"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> collections.Counter:
        return collections.Counter(h["Idempotency-Key"] for h, _ in self.requests)


def demo_with_webhook(redis_url: str, prefix: str, service_ports: dict, hook_url: str, evidence: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "shared" / "demo.yaml").read_text())
    cfg["redis"] = {"url": redis_url, "prefix": prefix}
    cfg["services"] = service_ports
    cfg["inference"] = {**cfg["inference"], "device": "cpu", "engine": "eager"}  # no tracing at start: quicker
    cfg["alerts"]["evidence_dir"] = str(evidence)
    # The demo's trained models, but an untrained detector: leaks are rare in the demo's scenes, and an
    # untrained detector sees no equipment, which fires equipment-not-seen within seconds.
    for task in ("classify", "segment", "thermal"):
        cfg["models"][task] = {"path": str(DEMO_MODELS / task)}
    cfg["alerts"]["sinks"].append({"name": "cmms", "type": "webhook", "url": hook_url, "secret_env": "E2E_HOOK_SECRET",
                                   "backoff_s": 0.2, "timeout_s": 5})
    for rule in cfg["alerts"]["rules"]:
        rule["sinks"] = [*rule["sinks"], "cmms"]
    return cfg


def test_the_demo_raises_an_alert_of_every_task_each_delivered_once(r, redis_server, service_ports, tmp_path):
    rx = Receiver()
    evidence = tmp_path / "evidence"
    cfg = demo_with_webhook(redis_server.url, "e2e-alerts", service_ports, rx.url, evidence)
    rules = {rule["name"]: rule["task"] for rule in cfg["alerts"]["rules"]}
    up = Up(cfg, tmp_path, r, {"E2E_HOOK_SECRET": SECRET})

    def alerts() -> list[dict]:
        return [msgpack.unpackb(f[b"m"], raw=False) for _, f in r.xrange(up.keys.alerts)]

    def fired_tasks() -> set[str]:
        return {a["task"] for a in alerts() if a["state"] == "firing" and a["rule"] in rules}

    try:
        up.wait_for(lambda: r.xlen(up.keys.results), 180, "the first result")  # startup: torch imports, models
        first, seen = time.monotonic(), {}
        while set(seen) < set(TASKS) and time.monotonic() - first < 60 and up.proc.poll() is None:
            for task in fired_tasks() - set(seen):
                seen[task] = round(time.monotonic() - first)
            time.sleep(0.5)
        within = time.monotonic() - first
        assert set(seen) == set(TASKS), f"seconds to the first alert of each task: {seen}\n{up.tail()}"
        wanted = [a for a in alerts() if a["rule"] in rules]
        up.wait_for(lambda: {a["id"] for a in wanted} <= set(rx.ids()), 30, "their webhook deliveries")
    finally:
        up.stop()
        rx.server.shutdown()
    assert within < 60, within
    print(f"seconds from the first result to the first alert of each task: {seen}")

    # Exactly once: every alert the receiver got, it got once (the id is the idempotency key) ...
    received = rx.ids()
    assert received and max(received.values()) == 1, received.most_common(3)
    # ... it was a rule alert on {P}:alerts, and it is that alert, signed over the exact body.
    on_stream = {a["id"]: a for a in alerts()}
    for headers, body in rx.requests:
        signed = headers["X-Plantsight-Timestamp"].encode() + b"." + body
        assert headers["X-Plantsight-Signature"] == "sha256=" + hmac.new(SECRET.encode(), signed,
                                                                          hashlib.sha256).hexdigest()
        doc = json.loads(body)
        sent = on_stream[doc["id"]]
        assert doc["rule"] in rules and rules[doc["rule"]] == doc["task"]
        assert (doc["rule"], doc["camera"], doc["state"], doc["value"], doc["frame_id"]) == (
            sent["rule"], sent["camera"], sent["state"], sent["value"], sent["frame_id"])
        if doc["state"] == "firing":  # evidence first: on disk before the alert went out, named by the alert
            assert doc["evidence"] == doc["id"]
            facts = json.loads((evidence / doc["id"] / "evidence.json").read_text())
            assert facts["id"] == doc["id"] and facts["alert"]["rule"] == doc["rule"]
            assert (evidence / doc["id"] / "snapshot.jpg").is_file()
    assert {doc_task for doc_task in (json.loads(b)["task"] for h, b in rx.requests)} >= set(TASKS)
