"""Pipeline-health alerts per camera: offline (no frames), frozen (same image), black (dark image).

Judged from the camera status that ingest keeps in ``{P}:cameras`` (so a stalled ingest also
reads as offline). They go through the same episode state and alert stream as the configured
rules, so they fire once per episode and resolve when the camera recovers.
"""

from __future__ import annotations

import json
import time

import redis

from shared.config import Config
from shared.messages import Alert
from shared.streams import Names

from services.alerting.state import EpisodeStore

OFFLINE, FROZEN, BLACK = "camera-offline", "camera-frozen", "camera-black"
HEALTH_RULES = {OFFLINE: "critical", FROZEN: "warning", BLACK: "warning"}
CHECK_EVERY_S = 1.0


def camera_status_key(names: Names) -> str:
    return f"{names.prefix}:cameras"


class CameraHealth:
    def __init__(self, cfg: Config, names: Names, store: EpisodeStore):
        self.cfg, self.names, self.store = cfg, names, store
        self.cameras = {c.id: c for c in cfg.cameras}
        self.started = time.time()  # a camera never seen gets its full grace from here
        self.next_check = 0.0

    def _change(self, rule: str, camera: str, firing: bool, value: float, threshold: float | None,
                message: str, frame_id: str = "") -> list[Alert]:
        """Fire or resolve ``rule`` for ``camera`` when its state changes."""
        ep = self.store.get(rule, camera)
        if firing == ep.firing:
            return []
        now = time.time()
        if firing:
            ep.firing, ep.last_fired = True, now
            ep.alert_id = Alert.identity(rule, camera, f"{int(now * 1000)}")
            alert_id, state = ep.alert_id, "firing"
        else:
            ep.firing = False
            alert_id, state = Alert.identity(rule + ":resolved", camera, f"{int(now * 1000)}"), "resolved"
        self.store.touch(rule, camera)
        return [Alert(id=alert_id, rule=rule, severity=HEALTH_RULES[rule], state=state, camera=camera,
                      task="pipeline", ts=time.time_ns(), value=round(value, 1), threshold=threshold,
                      message=message, frame_id=frame_id, labels={"episode": ep.alert_id})]

    def check(self, r: redis.Redis) -> list[Alert]:
        """Offline, frozen and black checks, at most once a second."""
        now = time.time()
        if now < self.next_check:
            return []
        self.next_check = now + CHECK_EVERY_S
        out: list[Alert] = []
        statuses = {k.decode(): json.loads(v) for k, v in r.hgetall(camera_status_key(self.names)).items()}
        for cam in self.cameras.values():
            status = statuses.get(cam.id, {})
            limit = self.cfg.alerts.camera_offline_s
            if limit:
                last = max(status.get("last_frame") or 0.0, self.started)
                quiet = now - last
                out += self._change(OFFLINE, cam.id, quiet >= limit, quiet, limit,
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
                out += self._change(rule, cam.id, firing, now - since if since else 0.0, after, msg)
        return out
