"""Alert episode state, kept in Redis so a restarted alert service neither repeats nor forgets an alert.

An episode is one (rule, camera, scope) — the scope is the rule's zone, or the consumer group of a
lag alert, or "" — and `advance` is the one lifecycle every alert goes through, configured rules and
pipeline-health alerts alike: ``for_frames``/``for_s`` matching before it fires, ``cooldown_s``
between firings, ``clear_frames`` clearing frames before it resolves, ``repeat_s`` re-notification.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import redis

from shared.streams.outbox import Outbox

FIRE, REPEAT, RESOLVE = "fire", "repeat", "resolve"


@dataclass(frozen=True)
class Lifecycle:
    """How an episode moves; a configured rule gives its own, health alerts use the defaults."""

    for_frames: int = 1
    for_s: float = 0.0
    cooldown_s: float = 0.0
    clear_frames: int = 1
    repeat_s: float = 0.0

    @classmethod
    def of(cls, rule) -> "Lifecycle":
        return cls(rule.for_frames, rule.for_s, rule.cooldown_s, rule.clear_frames, rule.repeat_s)


@dataclass
class Episode:
    """Per (rule, camera, scope) state."""

    hits: int = 0  # consecutive matching frames
    firing: bool = False
    alert_id: str = ""  # the firing alert of the episode: its identity, in every later alert's labels
    last_fired: float = float("-inf")  # wall-clock seconds, so cooldowns survive restarts
    since: float | None = None  # when the condition started holding (capture time for rules)
    clears: int = 0  # consecutive clearing frames while firing
    notified: float = float("-inf")  # wall clock of the last firing or repeat notification
    repeats: int = 0
    last_id: str = ""  # the newest notification of the episode (the firing alert or a repeat)


def advance(ep: Episode, life: Lifecycle, hit: bool, clear: bool, t: float, now: float) -> str | None:
    """Move ``ep`` on one observation; FIRE, REPEAT (re-notify is due), RESOLVE or None.

    ``hit``: the firing condition holds; ``clear``: the resolving condition holds (``not hit``
    unless the rule has ``resolve_when``). ``t`` is the observation's time (capture time for
    results) and measures ``for_s``; ``now`` is the wall clock and measures cooldown and repeats.
    """
    if not ep.firing:
        if not hit:
            ep.hits, ep.since = 0, None
            return None
        ep.hits += 1
        if ep.since is None:
            ep.since = t
        if ep.hits >= life.for_frames and t - ep.since >= life.for_s and now - ep.last_fired >= life.cooldown_s:
            ep.firing, ep.last_fired, ep.notified, ep.clears, ep.repeats = True, now, now, 0, 0
            return FIRE
        return None
    if clear:
        ep.clears += 1
        if ep.clears >= life.clear_frames:
            ep.firing, ep.hits, ep.since, ep.clears = False, 0, None, 0
            return RESOLVE
        return None
    ep.clears = 0
    if life.repeat_s and now - ep.notified >= life.repeat_s:
        return REPEAT  # the caller decides (an acknowledged episode is not re-notified) and calls `repeated`
    return None


def repeated(ep: Episode, now: float, alert_id: str | None) -> None:
    """Record a re-notification (``alert_id``) or, with None, a skipped one (the episode is acknowledged)."""
    ep.notified = now
    if alert_id:
        ep.repeats += 1
        ep.last_id = alert_id


Key = tuple[str, str, str]
_FIELDS = {f.name for f in fields(Episode)}


def _field(key: Key) -> str:
    rule, camera, scope = key
    return f"{rule}|{camera}|{scope}" if scope else f"{rule}|{camera}"


def _num(v) -> float:
    return float("-inf") if v is None else float(v)


class EpisodeStore:
    """Episodes in memory, written to the hash ``key`` in the same MULTI as the alerts they caused."""

    def __init__(self, r: redis.Redis, key: str):
        self.r, self.key = r, key
        self.episodes: dict[Key, Episode] = {}
        self.dirty: set[Key] = set()

    def load(self) -> None:
        self.episodes.clear()
        self.dirty.clear()
        for field, raw in self.r.hgetall(self.key).items():
            rule, _, rest = field.decode().partition("|")
            camera, _, scope = rest.partition("|")
            data = {k: v for k, v in json.loads(raw).items() if k in _FIELDS}  # older/newer states load too
            for k in ("last_fired", "notified"):
                data[k] = _num(data.get(k))
            self.episodes[(rule, camera, scope)] = Episode(**data)

    def get(self, rule: str, camera: str, scope: str = "") -> Episode:
        return self.episodes.setdefault((rule, camera, scope), Episode())

    def touch(self, rule: str, camera: str, scope: str = "") -> None:
        self.dirty.add((rule, camera, scope))

    def save(self, box: Outbox) -> None:
        if self.dirty:
            out = {}
            for key in self.dirty:
                data = asdict(self.episodes[key])
                for k in ("last_fired", "notified"):
                    data[k] = None if math.isinf(data[k]) else data[k]
                out[_field(key)] = json.dumps(data)
            box.pipe.hset(self.key, mapping=out)
            self.dirty = set()

    def forget(self) -> None:
        """Drop what is in memory; ``load`` brings back what Redis holds."""
        self.episodes.clear()
        self.dirty.clear()
