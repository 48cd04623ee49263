"""Alert sinks: each reads ``{P}:alerts`` through its own consumer group and delivers at least once.

The alert id is the idempotency key. Webhooks carry ``X-Plantsight-Signature: sha256=<hex>``,
the HMAC-SHA256 of the exact body bytes with the sink's secret, and retry 5xx, 429 and network
errors with exponential backoff and jitter, up to ``retries`` times within ``deadline_s``; other
4xx answers are final. A delivery that gives up goes to the dead-letter stream with the reason
(and the receiver's answer). On shutdown an undelivered alert stays pending, so the next alert
service (or another replica) delivers it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time

import httpx

from services.alerting.health import HEALTH_RULES
from shared import metrics
from shared.config import Config, Sink
from shared.messages import Alert, DecodeError
from shared.streams import DeadLetters, Entry, GroupReader, Outbox, REDIS_DOWN

log = logging.getLogger("plantsight.alert.sinks")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def alert_json(alert: Alert) -> dict:
    return {k: v for k, v in alert.to_dict().items()}


class Delivery(Exception):
    """A delivery that failed; ``retry`` says whether trying again may help."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


class WebhookSink:
    def __init__(self, sink: Sink):
        self.sink = sink
        self.secret = sink.signing_secret()
        self.client = httpx.Client(timeout=sink.timeout_s)

    def send(self, alert: Alert) -> None:
        body = json.dumps(alert_json(alert), separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.id,
                   "X-Plantsight-Timestamp": str(int(time.time())), **self.sink.headers}
        if self.secret:
            headers["X-Plantsight-Signature"] = sign(self.secret, body)
        try:
            resp = self.client.post(self.sink.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            raise Delivery(f"{type(e).__name__}", retry=True) from e
        if resp.status_code >= 500 or resp.status_code == 429:
            raise Delivery(f"HTTP {resp.status_code}", retry=True)
        if resp.status_code >= 400:  # the receiver's answer is kept with the dead letter
            raise Delivery(f"HTTP {resp.status_code}: {resp.text[:300]}", retry=False)

    def close(self) -> None:
        self.client.close()


class LogSink:
    def __init__(self, sink: Sink):
        self.sink = sink

    def send(self, alert: Alert) -> None:
        log.warning("ALERT %s %s %s camera=%s value=%s threshold=%s %s", alert.state.upper(), alert.severity,
                    alert.rule, alert.camera, alert.value, alert.threshold, alert.message)

    def close(self) -> None:
        pass


SHUTDOWN = "shutdown before delivery"
SINK_TYPES = {"webhook": WebhookSink, "log": LogSink}


class SinkWorker(threading.Thread):
    """Delivers the alerts addressed to one sink, in order, with retries; acks after delivery or give-up."""

    def __init__(self, cfg: Config, sink: Sink, reader: GroupReader, dead: DeadLetters, stop: threading.Event):
        super().__init__(name=f"sink-{sink.name}", daemon=True)
        self.cfg, self.sink, self.reader, self.dead, self.stop = cfg, sink, reader, dead, stop
        self.target = SINK_TYPES[sink.type](sink)
        self.rules = {r.name for r in cfg.alerts.rules if sink.name in r.sinks}
        if sink.name in cfg.alerts.camera_offline_sinks:
            self.rules |= set(HEALTH_RULES)
        for outcome in ("delivered", "retried", "failed"):
            metrics.SINK_DELIVERIES.labels(sink=sink.name, outcome=outcome)

    def run(self) -> None:
        ready = False
        while not self.stop.is_set():
            try:
                if not ready:
                    self.reader.setup()
                    ready = True
                for entry in self.reader.read(count=16, block_ms=500):
                    self.handle(entry)
            except REDIS_DOWN as e:
                ready = False
                log.warning("sink %s: Redis unavailable (%s)", self.sink.name, e)
                self.stop.wait(1.0)
        self.target.close()

    def handle(self, entry: Entry) -> None:
        box = Outbox(self.reader.r)
        try:
            alert = Alert.from_msgpack(entry.payload)
        except DecodeError as e:
            self.reader.reject(box, entry, "decode_error", str(e))
            box.commit()
            return
        if alert.rule in self.rules:
            outcome = self.deliver(alert)
            if outcome is SHUTDOWN:
                return  # left pending: delivered after the restart
            if outcome is not None:
                self.dead.add(box, self.reader.stream, entry, "delivery_failed", f"sink {self.sink.name}: {outcome}")
        self.reader.ack(box, [entry.id])
        box.commit()

    def deliver(self, alert: Alert) -> str | None:
        """None when delivered; the reason when it gave up."""
        s = self.sink
        delay, deadline = s.backoff_s, time.monotonic() + s.deadline_s
        for attempt in range(s.retries + 1):
            try:
                self.target.send(alert)
                metrics.SINK_DELIVERIES.labels(sink=s.name, outcome="delivered").inc()
                return None
            except Delivery as d:
                last = d.reason
                if not d.retry or attempt == s.retries or time.monotonic() > deadline:
                    break
                metrics.SINK_DELIVERIES.labels(sink=s.name, outcome="retried").inc()
                log.warning("sink %s: alert %s: %s; retry %d in %.1f s", s.name, alert.id, d.reason, attempt + 1, delay)
                if self.stop.wait(delay * random.uniform(0.5, 1.0)):
                    return SHUTDOWN
                delay = min(delay * 2, s.backoff_max_s)
        metrics.SINK_DELIVERIES.labels(sink=s.name, outcome="failed").inc()
        log.error("sink %s: giving up on alert %s: %s", s.name, alert.id, last)
        return last
