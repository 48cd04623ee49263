"""alert: evaluate rules on results, write alert state changes to ``{P}:alerts``, deliver to sinks.

Every rule runs one episode per (rule, camera, zone) through `state.advance`: it fires after
``for_frames`` consecutive matching frames that also span ``for_s`` seconds of capture time, at most
once per ``cooldown_s``, re-notifies every ``repeat_s`` while firing unless the episode is
acknowledged, and resolves after ``clear_frames`` frames on which ``resolve_when`` (default: not
``when``) holds. Evidence (snapshot, clip, evidence.json) is written before the alert is. The alert,
the episode state it changed (``{P}:alert-state``) and the acknowledgement of the result that caused
it are written in one MULTI, so a crash never repeats nor loses an alert. Each sink then reads
``{P}:alerts`` through its own consumer group (``sink-<name>``). Pipeline-health alerts (camera
offline, frozen, black; consumer lag; dead letters) come from ``health.py`` through the same path.

``POST /alerts/<id>/ack`` (``Authorization: Bearer <operator token>``) acknowledges an alert, with the
operator's verdict if the body gives one; ``plantsight_alert_verdicts_total`` counts the verdicts.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
import time

import cv2
import numpy as np

from services.alerting.evidence import EvidenceStore
from services.alerting.health import HEALTH_RULES, CameraHealth
from services.alerting.sinks import SinkWorker
from services.alerting.state import FIRE, REPEAT, RESOLVE, EpisodeStore, Lifecycle, advance, repeated
from shared import acks, metrics
from shared.config import Rule
from shared.endpoints import HttpRequest, HttpResponse
from shared.imaging import decode_frame
from shared.keys import Keys
from shared.messages import Alert, DecodeError, Frame, Result
from shared.rules import RiseWindow, Zone, compile_condition, fields_of, threshold_of, value_of
from shared.secret import SecretError, secret_from_environ
from shared.service import Service
from shared.streams.outbox import Outbox
from shared.streams.producer import Producer
from shared.streams.reader import DeadLetters, GroupReader

log = logging.getLogger("plantsight.alert")

STAGE = "alert"
PRUNE_EVERY_S = 60.0
TOKEN_ENV = "PLANTSIGHT_VIEWER_OPERATOR_TOKEN"
ACK_PATH = re.compile(r"^/alerts/([A-Za-z0-9_.:-]{1,128})/ack$")


def operator_token(environ=None) -> str | None:
    """The operator token (the viewer's too): ``$PLANTSIGHT_VIEWER_OPERATOR_TOKEN`` or the file named by
    ``$PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE``; None when neither is set (then nobody may acknowledge)."""
    try:
        return secret_from_environ(TOKEN_ENV, environ)
    except SecretError as e:  # loud, but alerts still flow: only acknowledging over HTTP is off
        log.error("%s: acknowledging over HTTP is off", e)
        return None


class CompiledRule:
    """A configured rule, parsed once: its conditions, lifecycle, cameras and zones."""

    def __init__(self, rule: Rule, cameras: list[str] | None, zones: dict[str, Zone]):
        self.rule, self.cameras, self.zones = rule, cameras, zones
        self.when = compile_condition(rule.when)
        self.resolve = compile_condition(rule.resolve_when) if rule.resolve_when else None
        self.life = Lifecycle.of(rule)
        self.reads_rise = "rise_k_per_min" in self.when.names + (self.resolve.names if self.resolve else ())

    def applies(self, result: Result) -> bool:
        return self.rule.task == result.task and (self.cameras is None or result.camera in self.cameras)


class AlertService(Service):
    name = "alert"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        s = cfg.streams
        self.dead = DeadLetters(self.r, self.keys, s.deadletter_max_age_s, STAGE)
        self.reader = GroupReader(self.r, self.keys.results, Keys.ALERT, self.consumer, dead=self.dead,
                                  count=64, block_ms=s.read_block_ms, claim_idle_ms=s.claim_idle_ms,
                                  max_deliveries=s.max_deliveries, max_bytes=s.max_message_bytes)
        self.alerts = Producer(self.r, self.keys.alerts, max_age_s=s.alerts_max_age_s)
        cams = {c.id: c for c in cfg.cameras}
        self.rules = []
        for rule in cfg.alerts.rules:
            zones = {cid: Zone(rule.zone, c.zones[rule.zone]) for cid, c in cams.items()
                     if rule.zone is not None and rule.zone in c.zones}
            self.rules.append(CompiledRule(rule, cfg.rule_cameras(rule), zones))
        self.rise_keep_s = max([c.rule.window_s for c in self.rules if c.reads_rise], default=0.0)
        self.rises: dict[tuple[str, str], RiseWindow] = {}
        self.state = EpisodeStore(self.r, self.keys.alert_state)
        self.health = CameraHealth(cfg, self.keys, self.state)
        self.sinks = [SinkWorker(cfg, sink, self.sink_reader(sink.name), self.dead, self.stop)
                      for sink in cfg.alerts.sinks]
        self.evidence = EvidenceStore(cfg, self.r)
        self.next_prune = 0.0
        self.token = operator_token()
        for rule in cfg.alerts.rules:
            metrics.ALERTS.labels(rule=rule.name, severity=rule.severity)
        for rule, severity in HEALTH_RULES.items():
            metrics.ALERTS.labels(rule=rule, severity=severity)
        metrics.ALERT_VERDICTS.watch(lambda: acks.verdict_counts(self.r, self.keys.prefix),
                                     [rule.name for rule in cfg.alerts.rules] + list(HEALTH_RULES), acks.VERDICTS)
        metrics.precreate_stage(STAGE)

    def sink_reader(self, name: str) -> GroupReader:
        s = self.cfg.streams
        return GroupReader(self.r, self.keys.alerts, f"sink-{name}", self.consumer, dead=self.dead, count=16,
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
        return {self.keys.results, self.keys.alerts, self.keys.deadletter}

    def step(self) -> None:
        entries = self.reader.read()
        box = Outbox(self.r)
        for alert in self.health.check(self.r):
            self.write_alert(box, alert, None)
        for entry in entries:
            try:
                result = Result.from_msgpack(entry.payload, self.cfg.streams.max_message_bytes)
            except DecodeError as e:
                self.dead.add(box, self.keys.results, entry, "decode_error", str(e))
                continue
            for alert in self.evaluate(result):
                self.write_alert(box, alert, result)
        self.reader.ack(box, [e.id for e in entries])
        self.state.save(box)
        try:
            box.commit()
        except Exception:
            self.state.forget()  # in-memory state ran ahead of Redis: reload it when Redis is back
            raise
        self.tend_evidence()

    # --- evidence -------------------------------------------------------------------
    def capture(self, alert: Alert, result: Result | None) -> Alert:
        """The alert with its evidence directory, written before the alert is (a firing alert only)."""
        if alert.state != "firing":
            return alert
        try:
            where = self.evidence.capture(alert, result)
        except Exception:  # an alert without its picture is better than no alert
            self.log.exception("evidence for alert %s (%s on %s) failed", alert.id, alert.rule, alert.camera)
            return alert
        return dataclasses.replace(alert, evidence=where or "")

    def tend_evidence(self) -> None:
        try:
            self.evidence.finish()
            if time.monotonic() >= self.next_prune:
                self.next_prune = time.monotonic() + PRUNE_EVERY_S
                self.evidence.prune()
        except Exception:
            self.log.exception("evidence upkeep failed")

    def write_alert(self, box: Outbox, alert: Alert, result: Result | None) -> None:
        alert = self.capture(alert, result)
        self.alerts.add(alert.to_msgpack(), cam=alert.camera, task=alert.task, box=box)
        if alert.state == "firing" and "repeat" not in alert.labels:  # episodes, not notifications
            box.on_commit(lambda: metrics.ALERTS.labels(rule=alert.rule, severity=alert.severity).inc())

    # --- rules ----------------------------------------------------------------------
    def frame_kelvin(self, result: Result) -> np.ndarray | None:
        """The result's radiometric frame in kelvin, while it is still in ``{P}:frames``; else None."""
        try:
            entries = self.r.xrange(self.keys.frames, min=result.frame_id, max=result.frame_id, count=1)
            if not entries:
                return None
            frame = Frame.from_msgpack(entries[0][1][b"m"], self.cfg.streams.max_message_bytes)
            if frame.dtype != "uint16":
                return None
            return decode_frame(frame)[:, :, 0].astype(np.float32) / 100.0
        except (DecodeError, KeyError, ValueError) as e:
            self.log.warning("frame %s of camera %s: %s", result.frame_id, result.camera, e)
            return None

    def fields_for(self, result: Result, zone: Zone | None, cache: dict) -> dict:
        """The result's fields over the whole frame or one zone (computed once per result and zone)."""
        key = zone.name if zone else ""
        if key in cache:
            return cache[key]
        kelvin = mask = None
        if zone is not None and result.task == "thermal":
            if "kelvin" not in cache:
                cache["kelvin"] = self.frame_kelvin(result)
            kelvin = cache["kelvin"]
        if zone is not None and result.task == "segment" and result.out.get("mask"):
            if "mask" not in cache:
                raw = np.frombuffer(result.out["mask"], np.uint8)
                cache["mask"] = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE) if raw.size else None
            mask = cache["mask"]
        f = fields_of(result.task, result.out, zone, kelvin=kelvin, mask=mask)
        if result.task == "thermal" and self.rise_keep_s:
            window = self.rises.setdefault((result.camera, key), RiseWindow(self.rise_keep_s))
            window.add(result.ts / 1e9, f.get("max_k"))
            f["_rise"] = window
        cache[key] = f
        return f

    def evaluate(self, result: Result, now: float | None = None) -> list[Alert]:
        """Alerts (firing, repeated or resolved) this result causes, updating the episodes it touches."""
        now = time.time() if now is None else now
        t = result.ts / 1e9
        cache: dict = {}
        out = []
        for c in self.rules:
            if not c.applies(result):
                continue
            rule, camera = c.rule, result.camera
            zone = c.zones.get(camera) if rule.zone else None
            if rule.zone and zone is None:
                continue
            params = rule.params_for(camera)
            fields = dict(self.fields_for(result, zone, cache))
            rise = fields.pop("_rise", None)
            if rise is not None:
                fields["rise_k_per_min"] = rise.rate(rule.window_s)
            fields.update(params)
            hit = c.when(fields)
            clear = c.resolve(fields) if c.resolve else not hit
            scope = rule.zone or ""
            ep = self.state.get(rule.name, camera, scope)
            change = advance(ep, c.life, hit, clear, t, now)
            self.state.touch(rule.name, camera, scope)
            where = f"{camera}/{scope}" if scope else camera
            if change == FIRE:
                ep.alert_id = ep.last_id = Alert.identity(rule.name, where, result.frame_id)
                out.append(self.alert(c, result, fields, params, "firing", ep.alert_id, ep.alert_id))
            elif change == REPEAT:
                if self.acknowledged(ep.alert_id, ep.last_id):
                    repeated(ep, now, None)
                else:
                    alert_id = Alert.identity(f"{rule.name}:repeat{ep.repeats + 1}", where, result.frame_id)
                    repeated(ep, now, alert_id)
                    out.append(self.alert(c, result, fields, params, "firing", alert_id, ep.alert_id,
                                          repeat=ep.repeats))
            elif change == RESOLVE:
                alert_id = Alert.identity(rule.name + ":resolved", where, result.frame_id)
                out.append(self.alert(c, result, fields, params, "resolved", alert_id, ep.alert_id))
        return out

    def acknowledged(self, *alert_ids: str) -> bool:
        ids = [i for i in alert_ids if i]
        return bool(ids) and any(self.r.hmget(self.keys.alert_acks, ids))

    def alert(self, c: CompiledRule, result: Result, fields: dict, params: dict, state: str, alert_id: str,
              episode: str, repeat: int = 0) -> Alert:
        rule = c.rule
        where = f"camera {result.camera}" + (f" zone {rule.zone}" if rule.zone else "")
        text = rule.message or f"{rule.name}: {rule.when} on {where}"
        labels = {"episode": episode, "model": result.model, "seq": str(result.seq)}
        if rule.zone:
            labels["zone"] = rule.zone
        if repeat:
            labels["repeat"] = str(repeat)
        if params:
            labels["params"] = json.dumps(params, sort_keys=True, separators=(",", ":"))
        return Alert(id=alert_id, rule=rule.name, severity=rule.severity, state=state, camera=result.camera,
                     task=result.task, ts=result.ts, value=value_of(rule.when, fields, skip=params),
                     threshold=threshold_of(rule.when, params), message=text, frame_id=result.frame_id,
                     labels=labels)

    # --- acknowledge ----------------------------------------------------------------
    def handle_http(self, req: HttpRequest) -> HttpResponse | None:
        m = ACK_PATH.match(req.path)
        if not m:
            return None
        if req.method != "POST":
            return _json(405, {"error": "use POST"}, {"Allow": "POST"})
        given = req.headers.get("Authorization") or ""
        scheme, _, token = given.partition(" ")
        if not self.token or scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.token.encode()):
            why = "no operator token is configured" if not self.token else "a valid operator bearer token is needed"
            return _json(401, {"error": why}, {"WWW-Authenticate": 'Bearer realm="plantsight"'})
        try:
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return _json(400, {"error": "the body must be a JSON object like "
                                        "{\"by\": \"name\", \"note\": \"...\", \"verdict\": \"confirmed\"}"})
        by, note = str(body.get("by") or "operator")[:100], str(body.get("note") or "")[:1000]
        try:
            record = acks.acknowledge(self.r, self.keys.prefix, m.group(1), by, note, verdict=body.get("verdict"))
        except acks.BadVerdict as e:
            return _json(400, {"error": str(e)})
        except acks.UnknownAlert:
            return _json(404, {"error": f"no alert {m.group(1)} on {self.keys.alerts}"})
        self.log.info("alert %s acknowledged by %s (verdict: %s)", m.group(1), record["by"],
                      record.get("verdict") or "none")
        return _json(200, {"id": m.group(1), **record})

    def close(self) -> None:
        for w in self.sinks:
            w.join(timeout=5)
        self.evidence.close()  # clips still recording are recorded again by the next alert service


def _json(code: int, doc: dict, headers: dict | None = None) -> HttpResponse:
    return HttpResponse(code, json.dumps(doc).encode() + b"\n", "application/json", headers or {})
