"""Alert episode state, kept in Redis so a restarted alert service neither repeats nor forgets an alert."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis

from shared.streams import Outbox


@dataclass
class Episode:
    """Per (rule, camera) state: consecutive hits, whether an alert is firing, and when it last fired."""

    hits: int = 0
    firing: bool = False
    alert_id: str = ""
    last_fired: float = float("-inf")  # wall-clock seconds, so cooldowns survive restarts
    since: float = 0.0  # health rules: when the condition started (0: not now)


class EpisodeStore:
    """Episodes in memory, written to the hash ``key`` in the same MULTI as the alerts they caused."""

    def __init__(self, r: redis.Redis, key: str):
        self.r, self.key = r, key
        self.episodes: dict[tuple[str, str], Episode] = {}
        self.dirty: set[tuple[str, str]] = set()

    def load(self) -> None:
        self.episodes.clear()
        self.dirty.clear()
        for field, raw in self.r.hgetall(self.key).items():
            rule, _, camera = field.decode().partition("|")
            data = json.loads(raw)
            data["last_fired"] = float(data.get("last_fired") if data.get("last_fired") is not None else "-inf")
            self.episodes[(rule, camera)] = Episode(**data)

    def get(self, rule: str, camera: str) -> Episode:
        return self.episodes.setdefault((rule, camera), Episode())

    def touch(self, rule: str, camera: str) -> None:
        self.dirty.add((rule, camera))

    def save(self, box: Outbox) -> None:
        if self.dirty:
            fields = {}
            for rule, camera in self.dirty:
                data = asdict(self.episodes[(rule, camera)])
                data["last_fired"] = None if data["last_fired"] == float("-inf") else data["last_fired"]
                fields[f"{rule}|{camera}"] = json.dumps(data)
            box.pipe.hset(self.key, mapping=fields)
            self.dirty = set()

    def forget(self) -> None:
        """Drop what is in memory; ``load`` brings back what Redis holds."""
        self.episodes.clear()
        self.dirty.clear()
