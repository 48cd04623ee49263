"""The Alertmanager sink: plantsight alerts join the plant's routing, grouping, silences and inhibition.

Alertmanager resolves an alert by itself once its ``endsAt`` passes, expecting the client to
post it again while it still fires (as Prometheus does). So a firing episode is posted with
``endsAt`` = now + 4 × ``resend_s``, remembered in the hash ``{P}:sink-state:<sink>`` and
re-posted every ``resend_s`` until its resolved alert is delivered (or given up), which posts
the same labels with ``endsAt`` = the time it resolved. A firing alert that arrives after its
resolve (a restart can reorder them) is posted already ended. If plantsight stops, its alerts end in
Alertmanager four re-post intervals later instead of firing forever; the hash lets a restarted
alert service carry on re-posting.

Labels identify the alert in Alertmanager, so they hold only what stays the same for a whole
episode: alertname (the rule), camera, severity, task, the episode id, and the alert's other
labels except per-frame ones (``seq``, ``model``), which go to the annotations.
"""

from __future__ import annotations

import logging
import re
import time

import httpx

from services.alerting.sinks.base import (
    KEEP_RESOLVED_S,
    Context,
    Delivery,
    EpisodeBook,
    HttpTarget,
    json_bytes,
    links,
    post,
)
from shared.config_sinks import AlertmanagerSinkConfig
from shared.messages import Alert
from shared.templates import episode_of, iso_time

log = logging.getLogger("plantsight.alert.sinks")
PER_FRAME = ("seq", "model")
HORIZON = 4  # re-post intervals an unrefreshed alert stays firing


def label_name(key: str) -> str:
    """Alertmanager label names are [a-zA-Z_][a-zA-Z0-9_]*."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", key)
    return name if re.match(r"^[A-Za-z_]", name) else "_" + name


def am_labels(alert: Alert) -> dict[str, str]:
    labels = {label_name(k): str(v) for k, v in alert.labels.items() if k not in PER_FRAME and str(v) != ""}
    labels.update(alertname=alert.rule, camera=alert.camera, severity=alert.severity, task=alert.task,
                  episode=episode_of(alert), source="plantsight")
    return labels


def am_annotations(alert: Alert, link: dict[str, str | None]) -> dict[str, str]:
    out = {"summary": f"{alert.rule} on camera {alert.camera}", "message": alert.message or alert.rule,
           "value": f"{alert.value:g}", "alert_id": alert.id}
    if alert.threshold is not None:
        out["threshold"] = f"{alert.threshold:g}"
    if alert.frame_id:
        out["frame_id"] = alert.frame_id
    for k in PER_FRAME:
        if alert.labels.get(k) is not None:
            out[k] = str(alert.labels[k])
    if link["snapshot"]:
        out["snapshot"] = link["snapshot"]
    if link["page"]:
        out["evidence"] = link["page"]
    elif alert.evidence:
        out["evidence"] = alert.evidence
    return out


class AlertmanagerSink(HttpTarget):
    def __init__(self, sink: AlertmanagerSinkConfig, ctx: Context):
        super().__init__(sink, ctx)
        self.client = httpx.Client(timeout=sink.timeout_s)
        self.api = sink.url.rstrip("/") + "/api/v2/alerts"
        self.book = EpisodeBook(ctx.r, ctx.state_key(sink))
        self.next_resend = time.monotonic() + sink.resend_s

    def _post(self, alerts: list[dict]) -> None:
        post(self.client, self.api, json_bytes(alerts), {"Content-Type": "application/json", **self.headers})

    def _ends(self) -> str:
        return iso_time((time.time() + HORIZON * self.sink.resend_s) * 1e9)

    def send(self, alert: Alert) -> None:
        ep = episode_of(alert)
        link = links(self.ctx.cfg, alert)
        held = self.book.get(ep)
        if alert.state == "firing":
            doc = {"labels": am_labels(alert), "annotations": am_annotations(alert, link),
                   "startsAt": iso_time(alert.ts)}
            if link["page"]:
                doc["generatorURL"] = link["page"]
            if held is not None and held["state"] == "resolved" and held["ts"] >= alert.ts:
                self._post([{**doc, "endsAt": iso_time(held["ts"])}])  # late: it has resolved already
                return
            self._post([{**doc, "endsAt": self._ends()}])
            self.book.record(ep, alert, doc)
            return
        if held is not None and held["state"] == "firing":  # resolve exactly what was posted, with its start
            doc = held["doc"]
            doc["annotations"].update(message=alert.message or doc["annotations"]["message"],
                                      value=f"{alert.value:g}", resolved_by=alert.id)
        else:  # the firing alert was not delivered here (dead letters, or not yet): resolve by labels
            doc = {"labels": am_labels(alert), "annotations": am_annotations(alert, link)}
        self._post([{**doc, "endsAt": iso_time(alert.ts)}])
        self.book.record(ep, alert, doc)

    def given_up(self, alert: Alert) -> None:
        """A resolve that could not be delivered: stop re-posting, so Alertmanager ends it within the horizon."""
        if alert.state == "resolved":
            self.book.record(episode_of(alert), alert, {})

    def tick(self) -> None:
        if time.monotonic() < self.next_resend:
            return
        self.next_resend = time.monotonic() + self.sink.resend_s
        self.book.prune(KEEP_RESOLVED_S + self.sink.deadline_s)
        held = list(self.book.firing().values())
        if not held:
            return
        ends = self._ends()
        try:
            self._post([{**doc, "endsAt": ends} for doc in held])
        except Delivery as d:  # the next interval tries again; the horizon covers a few misses
            log.warning("sink %s: re-posting %d firing alert(s) failed: %s", self.sink.name, len(held), d.reason)

    def close(self) -> None:
        self.client.close()
