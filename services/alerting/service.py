"""alert: evaluate rules on results, write alert state changes to ``{P}:alerts``, deliver to sinks.

A rule fires after ``for_frames`` consecutive hits on one camera, at most once per
``cooldown_s``, and resolves on the first frame where its condition no longer holds. The alert,
the rule state it changed (``{P}:alert-state``) and the acknowledgement of the result that
caused it are written in one MULTI, so a crash never repeats nor loses an alert. Each sink then
reads ``{P}:alerts`` through its own consumer group (``sink-<name>``). Pipeline-health alerts
(camera offline, frozen, black) come from ``health.py`` through the same path.
"""

from __future__ import annotations

import time

from shared import metrics
from shared.config import Rule
from shared.messages import Alert, DecodeError, Result
from shared.rules import compile_condition, fields_of, threshold_of, value_of
from shared.runtime import Service
from shared.streams import DeadLetters, GroupReader, Names, Outbox, Producer

from services.alerting.health import HEALTH_RULES, CameraHealth
from services.alerting.sinks import SinkWorker
from services.alerting.state import EpisodeStore

STAGE = "alert"


class AlertService(Service):
    name = "alert"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        s = cfg.streams
        self.dead = DeadLetters(self.r, self.names, s.deadletter_max_age_s, STAGE)
        self.reader = GroupReader(self.r, self.names.results, Names.ALERT, self.consumer, dead=self.dead,
                                  count=64, block_ms=s.read_block_ms, claim_idle_ms=s.claim_idle_ms,
                                  max_deliveries=s.max_deliveries, max_bytes=s.max_message_bytes)
        self.alerts = Producer(self.r, self.names.alerts, max_age_s=s.alerts_max_age_s)
        self.rules = [(rule, compile_condition(rule.when)) for rule in cfg.alerts.rules]
        self.state = EpisodeStore(self.r, f"{self.names.prefix}:alert-state")
        self.health = CameraHealth(cfg, self.names, self.state)
        self.sinks = [SinkWorker(cfg, sink, self.sink_reader(sink.name), self.dead, self.stop)
                      for sink in cfg.alerts.sinks]
        for rule in cfg.alerts.rules:
            metrics.ALERTS.labels(rule=rule.name, severity=rule.severity)
        for rule, severity in HEALTH_RULES.items():
            metrics.ALERTS.labels(rule=rule, severity=severity)
        metrics.precreate_stage(STAGE)

    def sink_reader(self, name: str) -> GroupReader:
        s = self.cfg.streams
        return GroupReader(self.r, self.names.alerts, f"sink-{name}", self.consumer, dead=self.dead, count=16,
                           block_ms=500, claim_idle_ms=s.claim_idle_ms, max_deliveries=s.max_deliveries,
                           max_bytes=s.max_message_bytes)

    def setup(self) -> None:
        self.state.load()  # after a restart or a failed commit: Redis holds the truth
        self.reader.setup()
        for w in self.sinks:
            w.reader.setup()
            if not w.is_alive():
                w.start()

    def streams(self) -> set[str]:
        return {self.names.results, self.names.alerts, self.names.deadletter}

    def step(self) -> None:
        entries = self.reader.read()
        box = Outbox(self.r)
        for alert in self.health.check(self.r):
            self.write_alert(box, alert)
        for entry in entries:
            try:
                result = Result.from_msgpack(entry.payload, self.cfg.streams.max_message_bytes)
            except DecodeError as e:
                self.dead.add(box, self.names.results, entry, "decode_error", str(e))
                continue
            for alert in self.evaluate(result):
                self.write_alert(box, alert)
        self.reader.ack(box, [e.id for e in entries])
        self.state.save(box)
        try:
            box.commit()
        except Exception:
            self.state.forget()  # in-memory state ran ahead of Redis: reload it when Redis is back
            raise

    def write_alert(self, box: Outbox, alert: Alert) -> None:
        self.alerts.add(alert.to_msgpack(), cam=alert.camera, task=alert.task, box=box)
        if alert.state == "firing":
            box.on_commit(lambda: metrics.ALERTS.labels(rule=alert.rule, severity=alert.severity).inc())

    def evaluate(self, result: Result) -> list[Alert]:
        """Alerts (firing or resolved) this result causes, updating the per-camera rule state."""
        fields = None
        out = []
        for rule, cond in self.rules:
            if rule.task != result.task or (rule.cameras and result.camera not in rule.cameras):
                continue
            fields = fields if fields is not None else fields_of(result.task, result.out)
            ep = self.state.get(rule.name, result.camera)
            hit = cond(fields)
            ep.hits = ep.hits + 1 if hit else 0
            now = time.time()
            if hit and not ep.firing and ep.hits >= rule.for_frames and now - ep.last_fired >= rule.cooldown_s:
                ep.firing, ep.last_fired = True, now
                ep.alert_id = Alert.identity(rule.name, result.camera, result.frame_id)
                out.append(self.alert(rule, result, fields, "firing", ep.alert_id))
            elif not hit and ep.firing:
                ep.firing = False
                out.append(self.alert(rule, result, fields, "resolved", ep.alert_id))
            self.state.touch(rule.name, result.camera)
        return out

    def alert(self, rule: Rule, result: Result, fields: dict, state: str, episode: str) -> Alert:
        value = value_of(rule.when, fields)
        text = rule.message or f"{rule.name}: {rule.when} on camera {result.camera}"
        alert_id = episode if state == "firing" else Alert.identity(rule.name + ":resolved", result.camera,
                                                                     result.frame_id)
        return Alert(id=alert_id, rule=rule.name, severity=rule.severity, state=state, camera=result.camera,
                     task=result.task, ts=result.ts, value=value, threshold=threshold_of(rule.when),
                     message=text, frame_id=result.frame_id,
                     labels={"episode": episode, "model": result.model, "seq": str(result.seq)})

    def close(self) -> None:
        for w in self.sinks:
            w.join(timeout=5)
