"""What every sink shares: the delivery error, links to the evidence, the HTTP post, the rate limit.

A sink *target* turns one alert into one delivery (an HTTP request, an MQTT publish) and raises
``Delivery`` when it fails; the worker (``worker.py``) owns retries, the deadline, the rate limit
and the dead letters, so each target stays a small translation from an alert to a wire format.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from dataclasses import dataclass

import httpx
import redis

from shared.config import Config
from shared.config_sinks import HttpSinkConfig, Sink
from shared.keys import Keys
from shared.messages import Alert
from shared.templates import episode_of


class Delivery(Exception):
    """A delivery that failed; ``retry`` says whether trying again may help, ``after_s`` how soon (429)."""

    def __init__(self, reason: str, retry: bool, after_s: float | None = None):
        super().__init__(reason)
        self.reason, self.retry, self.after_s = reason, retry, after_s


@dataclass
class Context:
    """What a target may need besides its own config: the whole config, Redis and the key prefix."""

    cfg: Config
    r: redis.Redis
    prefix: str

    def state_key(self, sink: Sink) -> str:
        """A hash a stateful sink (mqtt, alertmanager) keeps its firing episodes in."""
        return Keys(self.prefix).sink_state(sink.name)


class Target:
    """One sink type. ``send`` delivers or raises ``Delivery``; the rest are optional hooks."""

    def __init__(self, sink: Sink, ctx: Context):
        self.sink, self.ctx = sink, ctx

    def send(self, alert: Alert) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Called about twice a second between alerts (re-posting, reconnecting)."""

    def given_up(self, alert: Alert) -> None:
        """Called after ``alert`` went to the dead letters."""

    def close(self) -> None:
        pass


class HttpTarget(Target):
    """A sink type that POSTs over HTTP(S): its configured headers are resolved once, at start."""

    def __init__(self, sink: HttpSinkConfig, ctx: Context):
        super().__init__(sink, ctx)
        self.headers = sink.http_headers()  # ${NAME} read now: a missing variable stops the start, named


def links(cfg: Config, alert: Alert) -> dict[str, str | None]:
    """The viewer's snapshot and alert page for the alert's episode, when ``alerts.public_url`` is set.

    A resolved alert links to its episode's firing alert: that is the one with evidence.
    """
    base = (cfg.alerts.public_url or "").rstrip("/")
    if not base:
        return {"snapshot": None, "page": None}
    ep = episode_of(alert)
    return {"snapshot": f"{base}/api/alerts/{ep}/snapshot.jpg", "page": f"{base}/alerts/{ep}"}


def describe(alert: Alert) -> str:
    """One line for chat messages: what, where, how much."""
    value = f"{alert.value:g}" + (f" (threshold {alert.threshold:g})" if alert.threshold is not None else "")
    zone = alert.labels.get("zone")
    where = f"camera {alert.camera}" + (f", zone {zone}" if zone else "")
    return f"{alert.message or alert.rule} — {where}, value {value}"


def retry_after(resp: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date), if any."""
    raw = resp.headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    """POST and classify the answer: 5xx, 429 and network errors may be retried; other 4xx are final."""
    try:
        resp = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as e:
        raise Delivery(f"{type(e).__name__}", retry=True) from e
    if resp.status_code >= 500 or resp.status_code == 429:
        try:
            after = retry_after(resp) if resp.status_code == 429 else None
        except (TypeError, ValueError):
            after = None
        raise Delivery(f"HTTP {resp.status_code}", retry=True, after_s=after)
    if resp.status_code >= 400:  # the receiver's answer is kept with the dead letter
        raise Delivery(f"HTTP {resp.status_code}: {resp.text[:300]}", retry=False)
    return resp


def json_bytes(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()  # ASCII: \u escapes, same bytes everywhere


class TokenBucket:
    """``rate_per_min`` deliveries a minute with bursts of ``burst``; ``take`` waits for a token, never drops.

    ``wait`` is the sleep to use (the worker's, which wakes on shutdown); ``take`` returns False
    when the wait was cut short by shutdown.
    """

    def __init__(self, rate_per_min: float, burst: int, clock=time.monotonic):
        self.rate = rate_per_min / 60.0
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, wait) -> bool:
        while True:
            with self.lock:
                self._refill()
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return True
                need = (1.0 - self.tokens) / self.rate
            if wait(need):
                return False


KEEP_RESOLVED_S = 3600.0  # how long (plus the sink's deadline) a resolved episode is remembered against late alerts


class EpisodeBook:
    """A stateful sink's episodes in a Redis hash, newest state per episode winning.

    Across a restart an alert left pending can arrive after newer ones (the next alert service
    claims it only once it has been idle ``claim_idle_ms``), so a late ``firing`` must not undo
    the ``resolved`` already recorded: a resolved episode stays as a marker, dropped by ``prune``
    once no late alert can still come.
    """

    def __init__(self, r: redis.Redis, key: str):
        self.r, self.key = r, key

    def get(self, field: str) -> dict | None:
        raw = self.r.hget(self.key, field)
        return json.loads(raw) if raw else None

    def record(self, field: str, alert: Alert, doc: dict) -> bool:
        """Store ``doc`` as the episode's state unless a newer alert of it is stored; True if stored."""
        held = self.get(field)
        if held is not None and (held["ts"], held["state"] == "resolved") > (alert.ts, alert.state == "resolved"):
            return False
        self.r.hset(self.key, field, json.dumps({"state": alert.state, "ts": alert.ts, "at": time.time(),
                                                 "doc": doc}))
        return True

    def firing(self, prefix: str = "") -> dict[str, dict]:
        """field → doc of the firing episodes whose field starts with ``prefix``."""
        out = {}
        for field, raw in self.r.hgetall(self.key).items():
            field = field.decode()
            if field.startswith(prefix):
                held = json.loads(raw)
                if held["state"] == "firing":
                    out[field] = held["doc"]
        return out

    def prune(self, older_than_s: float) -> int:
        """Forget resolved episodes recorded more than ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        old = [f for f, raw in self.r.hgetall(self.key).items()
               if (held := json.loads(raw))["state"] == "resolved" and held["at"] < cutoff]
        return self.r.hdel(self.key, *old) if old else 0
