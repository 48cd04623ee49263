"""Acknowledgements: an operator says "we have seen this alert"; the episode is not re-notified until it resolves.

One hash, ``{P}:alert-acks``, alert id → JSON ``{"by": …, "at": unix seconds, "note": …}``. The alert
service's ``POST /alerts/<id>/ack``, the viewer's ``POST /api/alerts/<id>/ack`` and ``plantsight alerts ack ID``
all write it through `acknowledge`; the alert service reads it before notifying again.
"""

from __future__ import annotations

import json
import time

import redis

from shared.keys import Keys
from shared.messages import Alert, DecodeError


class UnknownAlert(KeyError):
    """No alert with this id is on ``{P}:alerts``."""


def alert_exists(r: redis.Redis, prefix: str, alert_id: str, scan: int = 10000) -> bool:
    """Whether an alert with this id is among the newest `scan` entries of ``{P}:alerts``."""
    for _, fields in r.xrevrange(Keys(prefix).alerts, count=scan):
        try:
            if Alert.from_msgpack(fields.get(b"m", b"")).id == alert_id:
                return True
        except DecodeError:
            continue
    return False


def acknowledge(r: redis.Redis, prefix: str, alert_id: str, by: str, note: str = "", *, check: bool = True) -> dict:
    """Record the acknowledgement (the first one wins; a repeat returns it unchanged)."""
    if check and not alert_exists(r, prefix, alert_id):
        raise UnknownAlert(alert_id)
    key, record = Keys(prefix).alert_acks, {"by": by, "at": time.time(), "note": note}
    r.hsetnx(key, alert_id, json.dumps(record))
    return json.loads(r.hget(key, alert_id))


def acknowledgement(r: redis.Redis, prefix: str, alert_id: str) -> dict | None:
    raw = r.hget(Keys(prefix).alert_acks, alert_id)
    return json.loads(raw) if raw else None


def acknowledgements(r: redis.Redis, prefix: str) -> dict[str, dict]:
    return {k.decode(): json.loads(v) for k, v in r.hgetall(Keys(prefix).alert_acks).items()}
