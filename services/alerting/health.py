"""Pipeline-health alerts: camera offline, frozen or black; a consumer group lagging; dead letters growing.

Camera health is judged from the status that ingest keeps in ``{P}:cameras`` (so a stalled ingest
also reads as offline); lag from each consumer group of the pipeline's streams (sinks included); dead
letters from the entries ``{P}:deadletter`` gained in the last ``deadletter_window_s``. They go through
the same lifecycle (`state.advance`), episode state and alert stream as the configured rules, so they
fire once per episode and resolve when the pipeline recovers.
"""

from __future__ import annotations

import json
import time

import redis

from services.alerting.state import FIRE, RESOLVE, EpisodeStore, Lifecycle, advance
from shared.config import Config
from shared.keys import Keys
from shared.messages import Alert
from shared.streams.groups import group_position

OFFLINE, FROZEN, BLACK = "camera-offline", "camera-frozen", "camera-black"
LAG, DEADLETTERS = "consumer-lag", "deadletter-growing"
HEALTH_RULES = {OFFLINE: "critical", FROZEN: "warning", BLACK: "warning", LAG: "warning", DEADLETTERS: "warning"}
PIPELINE = "pipeline"  # the camera field of alerts about the pipeline rather than one camera
CHECK_EVERY_S = 1.0
PIPELINE_EVERY_S = 5.0  # lag on Redis 6.2 is counted with XRANGE: not every second
COUNT_CAP = 100000


class CameraHealth:
    def __init__(self, cfg: Config, keys: Keys, store: EpisodeStore):
        self.cfg, self.keys, self.store = cfg, keys, store
        self.cameras = {c.id: c for c in cfg.cameras}
        self.started = time.time()  # a camera never seen gets its full grace from here
        self.next_check = 0.0
        self.next_pipeline = 0.0
        self.lag_life = Lifecycle(for_s=cfg.alerts.consumer_lag_for_s)

    def _observe(self, rule: str, camera: str, hit: bool, value: float, threshold: float | None, message: str,
                 *, scope: str = "", life: Lifecycle = Lifecycle(), labels: dict | None = None) -> list[Alert]:
        """One observation of a health condition; the alert when its episode fires or resolves."""
        ep = self.store.get(rule, camera, scope)
        now = time.time()
        before = (ep.hits, ep.firing, ep.since)
        change = advance(ep, life, hit, not hit, now, now)
        if (ep.hits, ep.firing, ep.since) != before:
            self.store.touch(rule, camera, scope)
        if change not in (FIRE, RESOLVE):
            return []
        stamp = f"{scope}:{int(now * 1000)}"
        if change == FIRE:
            ep.alert_id = ep.last_id = Alert.identity(rule, camera, stamp)
            alert_id, state = ep.alert_id, "firing"
        else:
            alert_id, state = Alert.identity(rule + ":resolved", camera, stamp), "resolved"
        return [Alert(id=alert_id, rule=rule, severity=HEALTH_RULES[rule], state=state, camera=camera,
                      task=PIPELINE, ts=time.time_ns(), value=round(float(value), 1), threshold=threshold,
                      message=message, labels={"episode": ep.alert_id, **(labels or {})})]

    def check(self, r: redis.Redis) -> list[Alert]:
        """Camera checks at most once a second; lag and dead letters every few seconds."""
        now = time.time()
        if now < self.next_check:
            return []
        self.next_check = now + CHECK_EVERY_S
        out = self.cameras_check(r, now)
        if now >= self.next_pipeline:
            self.next_pipeline = now + PIPELINE_EVERY_S
            out += self.lag_check(r) + self.deadletter_check(r, now)
        return out

    def cameras_check(self, r: redis.Redis, now: float) -> list[Alert]:
        out: list[Alert] = []
        statuses = {k.decode(): json.loads(v) for k, v in r.hgetall(self.keys.cameras).items()}
        for cam in self.cameras.values():
            status = statuses.get(cam.id, {})
            limit = self.cfg.alerts.camera_offline_s
            if limit:
                last = max(status.get("last_frame") or 0.0, self.started)
                quiet = now - last
                out += self._observe(OFFLINE, cam.id, quiet >= limit, quiet, limit,
                                     f"no frames from camera {cam.id} for {quiet:.0f} s" if quiet >= limit
                                     else f"camera {cam.id} delivers frames again")
            for rule, since_key, after in ((FROZEN, "frozen_since", cam.frozen_s), (BLACK, "black_since", cam.black_s)):
                if not after:
                    continue
                since = status.get(since_key) or 0
                firing = bool(since) and now - since >= after
                what = "shows the same image" if rule == FROZEN else "is black"
                msg = (f"camera {cam.id} {what} for {now - since:.0f} s" if firing
                       else f"camera {cam.id} shows a live image again")
                out += self._observe(rule, cam.id, firing, now - since if since else 0.0, after, msg)
        return out

    def groups(self) -> list[tuple[str, str]]:
        """(stream, group) of every consumer group of the pipeline, the sinks' included."""
        pairs = [(s, g) for s, g in self.keys.all(self.cfg.tasks()) if g]
        return pairs + [(self.keys.alerts, f"sink-{s.name}") for s in self.cfg.alerts.sinks]

    def lag_check(self, r: redis.Redis) -> list[Alert]:
        bound = self.cfg.alerts.consumer_lag_max
        if not bound:
            return []
        out: list[Alert] = []
        for stream, group in self.groups():
            pos = group_position(r, stream, group, limit=max(bound + 1, 1))  # past the bound, the count may stop
            lag, hit = pos.lag, pos.lag > bound
            how_many = f"at least {lag}" if pos.at_least else f"{lag}"
            msg = (f"consumer group {group} lags {how_many} entries behind {stream}" if hit
                   else f"consumer group {group} has caught up on {stream}")
            out += self._observe(LAG, PIPELINE, hit, lag, bound, msg, scope=group, life=self.lag_life,
                                 labels={"stream": stream, "group": group})
        return out

    def deadletter_check(self, r: redis.Redis, now: float) -> list[Alert]:
        bound, window = self.cfg.alerts.deadletter_max, self.cfg.alerts.deadletter_window_s
        if not bound:
            return []
        since_ms = int((now - window) * 1000)
        new = len(r.xrange(self.keys.deadletter, min=f"{since_ms}-0", max="+", count=COUNT_CAP))
        hit = new >= bound
        msg = (f"{new} new dead letters in {self.keys.deadletter} in the last {window:g} s" if hit
               else f"no more than {bound - 1} new dead letters in the last {window:g} s")
        return self._observe(DEADLETTERS, PIPELINE, hit, new, bound, msg,
                             labels={"stream": self.keys.deadletter})
