"""One thread per sink: read ``{P}:alerts`` through the group ``sink-<name>``, deliver, ack or dead-letter.

Retries back off exponentially with jitter (``backoff_s`` doubling up to ``backoff_max_s``, each
wait a random 50–100 % of it, or the receiver's ``Retry-After``) and stop after ``retries`` or when
``deadline_s`` has passed since the first attempt. The rate limit (``rate_per_min``, bursts of
``burst``) spaces attempts, retries included: an alert over the limit waits, it is not dropped.
While an alert waits, its stream entry is re-claimed every third of ``claim_idle_ms`` so that
another replica does not take it over as abandoned and deliver it twice. On shutdown an
undelivered alert stays pending, so the next alert service (or another replica) delivers it.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from services.alerting.health import HEALTH_RULES
from services.alerting.sinks.base import Context, Delivery, Target, TokenBucket
from services.alerting.sinks.registry import make_target
from shared import metrics
from shared.config import Config
from shared.config_sinks import Sink
from shared.messages import Alert, DecodeError
from shared.streams.connection import REDIS_DOWN
from shared.streams.outbox import Outbox
from shared.streams.reader import DeadLetters, Entry, GroupReader

log = logging.getLogger("plantsight.alert.sinks")
SHUTDOWN = "shutdown before delivery"


class SinkWorker(threading.Thread):
    """Delivers the alerts addressed to one sink, in order, with retries; acks after delivery or give-up."""

    def __init__(self, cfg: Config, sink: Sink, reader: GroupReader, dead: DeadLetters, stop: threading.Event):
        super().__init__(name=f"sink-{sink.name}", daemon=True)
        self.cfg, self.sink, self.reader, self.dead, self.stop = cfg, sink, reader, dead, stop
        self.target: Target = make_target(sink, Context(cfg, reader.r, cfg.redis.prefix))
        self.bucket = TokenBucket(sink.rate_per_min, sink.burst) if sink.rate_per_min else None
        self.rules = {r.name for r in cfg.alerts.rules if sink.name in r.sinks}
        if sink.name in cfg.alerts.camera_offline_sinks:
            self.rules |= set(HEALTH_RULES)
        self.holding: Entry | None = None
        self.held_at = 0.0
        for outcome in ("delivered", "retried", "failed"):
            metrics.SINK_DELIVERIES.labels(sink=sink.name, outcome=outcome)

    def run(self) -> None:
        ready = False
        while not self.stop.is_set():
            try:
                if not ready:
                    self.reader.setup()
                    ready = True
                for entry in self.reader.read(count=1, block_ms=500):  # one at a time: a batch would sit idle
                    self.handle(entry)
                self.tick()
            except REDIS_DOWN as e:
                ready = False
                log.warning("sink %s: Redis unavailable (%s)", self.sink.name, e)
                self.stop.wait(1.0)
        self.target.close()

    def tick(self) -> None:
        try:
            self.target.tick()
        except REDIS_DOWN:
            raise
        except Exception:  # re-posting is best effort: the next tick tries again
            log.exception("sink %s: periodic work failed", self.sink.name)

    def handle(self, entry: Entry) -> None:
        box = Outbox(self.reader.r)
        try:
            alert = Alert.from_msgpack(entry.payload)
        except DecodeError as e:
            self.reader.reject(box, entry, "decode_error", str(e))
            box.commit()
            return
        if alert.rule in self.rules:
            self.holding, self.held_at = entry, time.monotonic()
            try:
                outcome = self.deliver(alert)
            finally:
                self.holding = None
            if outcome is SHUTDOWN:
                return  # left pending: delivered after the restart
            if outcome is not None:
                self.dead.add(box, self.reader.stream, entry, "delivery_failed", f"sink {self.sink.name}: {outcome}")
                box.on_commit(lambda: self.target.given_up(alert))
        self.reader.ack(box, [entry.id])
        box.commit()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, keeping the held entry ours; True when shutdown cut it short."""
        end = time.monotonic() + max(0.0, seconds)
        keep = max(0.1, self.reader.claim_idle_ms / 3000)
        while True:
            now = time.monotonic()
            if self.holding is not None and now - self.held_at >= keep:
                self.reader.r.xclaim(self.reader.stream, self.reader.group, self.reader.consumer, 0,
                                     [self.holding.id], justid=True)  # resets its idle time
                self.held_at = now
            left = end - now
            if left <= 0:
                return self.stop.is_set()
            if self.stop.wait(min(left, keep)):
                return True

    def attempt(self, alert: Alert) -> Delivery | None:
        """One try: None when delivered, else why not."""
        try:
            self.target.send(alert)
            return None
        except Delivery as d:
            return d
        except REDIS_DOWN:
            raise  # the run loop waits for Redis; the alert stays pending
        except Exception as e:  # a bug or a surprise in one sink must not stop its thread
            log.exception("sink %s: alert %s: unexpected error", self.sink.name, alert.id)
            return Delivery(f"{type(e).__name__}: {e}", retry=True)

    def deliver(self, alert: Alert) -> str | None:
        """None when delivered, SHUTDOWN when stopped first, else the reason it gave up."""
        s = self.sink
        delay, deadline, last = s.backoff_s, None, "not tried"
        for attempt in range(s.retries + 1):
            if self.bucket is not None and not self.bucket.take(self.wait):
                return SHUTDOWN
            deadline = deadline or time.monotonic() + s.deadline_s  # waiting for the rate limit is not failing
            d = self.attempt(alert)
            if d is None:
                metrics.SINK_DELIVERIES.labels(sink=s.name, outcome="delivered").inc()
                return None
            last = d.reason
            if not d.retry or attempt == s.retries:
                break
            pause = delay * random.uniform(0.5, 1.0) if d.after_s is None else min(d.after_s, s.backoff_max_s)
            if time.monotonic() + pause > deadline:
                last = f"{d.reason} (deadline of {s.deadline_s:g} s reached)"
                break
            metrics.SINK_DELIVERIES.labels(sink=s.name, outcome="retried").inc()
            log.warning("sink %s: alert %s: %s; retry %d in %.1f s", s.name, alert.id, d.reason, attempt + 1, pause)
            if self.wait(pause):
                return SHUTDOWN
            delay = min(delay * 2, s.backoff_max_s)
        metrics.SINK_DELIVERIES.labels(sink=s.name, outcome="failed").inc()
        log.error("sink %s: giving up on alert %s: %s", s.name, alert.id, last)
        return last
