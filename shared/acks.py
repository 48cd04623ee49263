"""Acknowledgements: an operator says "we have seen this alert"; the episode is not re-notified until it resolves.

One hash, ``{P}:alert-acks``, alert id → JSON ``{"by": …, "at": unix seconds, "note": …, "verdict": …,
"rule": …, "camera": …}``. ``verdict`` is the operator's judgement of the alert, one of `VERDICTS` or null;
``rule`` and ``camera`` are the alert's, so the verdicts can be counted per rule without the alert log
(which is trimmed). The alert service's ``POST /alerts/<id>/ack``, the viewer's ``POST /api/alerts/<id>/ack``
and ``plantsight alerts ack ID`` all write it through `acknowledge`; the alert service reads it before
notifying again and counts the verdicts (``plantsight_alert_verdicts_total``) from it.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import redis

from shared.keys import Keys
from shared.messages import Alert, DecodeError

VERDICTS = ("confirmed", "false_alarm")  # the alert was right / there was nothing to see


class UnknownAlert(KeyError):
    """No alert with this id is on ``{P}:alerts``."""


class BadVerdict(ValueError):
    """A verdict that is not one of `VERDICTS`."""


def check_verdict(verdict) -> str | None:
    """``verdict`` itself when it is None (no verdict) or one of `VERDICTS`; else `BadVerdict` naming it."""
    if verdict is None or (isinstance(verdict, str) and verdict in VERDICTS):
        return verdict
    raise BadVerdict(f"verdict {repr(verdict)[:60]} is not one of: {', '.join(VERDICTS)}")


def find_alert(r: redis.Redis, prefix: str, alert_id: str, scan: int = 10000) -> Alert | None:
    """The alert with this id among the newest `scan` entries of ``{P}:alerts``, or None."""
    for _, fields in r.xrevrange(Keys(prefix).alerts, count=scan):
        try:
            alert = Alert.from_msgpack(fields.get(b"m", b""))
        except DecodeError:
            continue
        if alert.id == alert_id:
            return alert
    return None


def alert_exists(r: redis.Redis, prefix: str, alert_id: str, scan: int = 10000) -> bool:
    """Whether an alert with this id is among the newest `scan` entries of ``{P}:alerts``."""
    return find_alert(r, prefix, alert_id, scan) is not None


def acknowledge(r: redis.Redis, prefix: str, alert_id: str, by: str, note: str = "", *, verdict: str | None = None,
                check: bool = True) -> dict:
    """Record the acknowledgement and return the stored record.

    The first acknowledgement wins: a repeat returns it unchanged, except that a verdict may be added to
    an acknowledgement that has none (an operator acknowledges first and judges later). A verdict once
    set stays. `BadVerdict` for a verdict not in `VERDICTS`; `UnknownAlert` for an alert not on
    ``{P}:alerts`` (with ``check=False`` such an alert is acknowledged all the same, its rule and camera null).
    """
    verdict = check_verdict(verdict)
    alert = find_alert(r, prefix, alert_id)
    if check and alert is None:
        raise UnknownAlert(alert_id)
    rule, camera = (alert.rule, alert.camera) if alert else (None, None)
    key = Keys(prefix).alert_acks
    # Read, decide and write under WATCH: two operators acknowledging (or judging) the same alert at once
    # must not both win. A write to any other alert's acknowledgement only makes this loop go round again.
    with r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.hget(key, alert_id)
                stored = json.loads(raw) if raw else None
                if stored is None:
                    record = {"by": by, "at": time.time(), "note": note, "verdict": verdict, "rule": rule,
                              "camera": camera}
                elif verdict is None or stored.get("verdict") is not None:
                    pipe.unwatch()
                    return stored
                else:
                    record = {**stored, "verdict": verdict, "rule": stored.get("rule") or rule,
                              "camera": stored.get("camera") or camera}
                pipe.multi()
                pipe.hset(key, alert_id, json.dumps(record))
                pipe.execute()
                return record
            except redis.WatchError:
                continue


def acknowledgement(r: redis.Redis, prefix: str, alert_id: str) -> dict | None:
    raw = r.hget(Keys(prefix).alert_acks, alert_id)
    return json.loads(raw) if raw else None


def acknowledgements(r: redis.Redis, prefix: str) -> dict[str, dict]:
    return {k.decode(): json.loads(v) for k, v in r.hgetall(Keys(prefix).alert_acks).items()}


def verdict_counts(r: redis.Redis, prefix: str) -> Counter:
    """(rule, verdict) → how many acknowledgements carry that verdict; a record that is not a JSON object
    (written by hand, say) is skipped rather than failing the count."""
    counts: Counter = Counter()
    for raw in r.hvals(Keys(prefix).alert_acks):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("verdict") in VERDICTS:
            counts[(str(record.get("rule") or ""), record["verdict"])] += 1
    return counts
