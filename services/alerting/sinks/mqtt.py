"""The MQTT sink: each alert to a topic per camera and rule, and a retained state topic per camera.

Publishing waits for the broker's PUBACK (QoS 1; PUBCOMP for QoS 2) before the worker acks the
stream entry, so an alert the broker did not take is retried, not lost. A connection that drops
is made again on the next delivery, through the worker's backoff, so a broker outage is paced
with jitter like any other failed delivery and reported with the broker's own reason.

The state topic (``state_topic``, default ``plantsight/<camera>/state``) holds, retained, the
camera's firing episodes and its last state change, so a dashboard that subscribes late sees at
once what is wrong with each camera. The firing set lives in ``{P}:sink-state:<sink>`` so a
restarted alert service publishes the same picture.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
import uuid
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from services.alerting.sinks.base import KEEP_RESOLVED_S, Context, Delivery, EpisodeBook, Target, json_bytes, links
from shared.config import ConfigError
from shared.config_sinks import MqttSinkConfig
from shared.messages import Alert
from shared.templates import alert_json, episode_of, iso_time

log = logging.getLogger("plantsight.alert.sinks")
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def topic_for(template: str, alert: Alert) -> str:
    """Fill ``{camera}``, ``{rule}``, ``{severity}``, ``{state}``, ``{task}`` (checked at config load)."""
    values = {"camera": alert.camera, "rule": alert.rule, "severity": alert.severity, "state": alert.state,
              "task": alert.task}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def state_entry(alert: Alert, link: dict[str, str | None]) -> dict:
    out = {"id": alert.id, "rule": alert.rule, "severity": alert.severity, "task": alert.task,
           "since": iso_time(alert.ts), "value": alert.value, "threshold": alert.threshold, "message": alert.message}
    if alert.labels.get("zone"):
        out["zone"] = alert.labels["zone"]
    if link["snapshot"]:
        out["snapshot_url"], out["alert_url"] = link["snapshot"], link["page"]
    return out


class MqttSink(Target):
    def __init__(self, sink: MqttSinkConfig, ctx: Context):
        super().__init__(sink, ctx)
        url = urlsplit(sink.url)
        self.tls = url.scheme == "mqtts"
        self.host, self.port = url.hostname or "127.0.0.1", url.port or (8883 if self.tls else 1883)
        self.where = f"{url.scheme}://{self.host}:{self.port}"
        self.username, self.password = sink.username, sink.broker_password()
        self.client_id = sink.client_id or f"plantsight-{sink.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.client: mqtt.Client | None = None
        self.book = EpisodeBook(ctx.r, ctx.state_key(sink))
        self.next_prune = 0.0
        self.tls_context = None
        if self.tls:
            try:
                self.tls_context = ssl.create_default_context(
                    cafile=str(sink.tls_ca_file) if sink.tls_ca_file else None)
            except (OSError, ssl.SSLError) as e:  # a missing or unreadable CA file: a config problem, said at start
                raise ConfigError(f"sink {sink.name}: tls_ca_file {sink.tls_ca_file}: {e.strerror or e}") from None

    def _drop(self) -> None:
        if self.client is not None:
            try:
                self.client.disconnect()
            finally:
                self.client.loop_stop()
                self.client = None

    def _connect(self) -> mqtt.Client:
        """The connected client; a fresh one when the last connection went (no stale queued messages)."""
        if self.client is not None and self.client.is_connected():
            return self.client
        self._drop()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, reconnect_on_failure=False)
        c.connect_timeout = self.sink.timeout_s
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.tls_context is not None:
            c.tls_set_context(self.tls_context)  # verifies the broker's certificate and host name
        answered, answer = threading.Event(), []

        def on_connect(client, userdata, flags, reason_code, properties):
            answer.append(reason_code)
            answered.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            answer.append(reason_code)
            answered.set()

        c.on_connect, c.on_disconnect = on_connect, on_disconnect
        try:
            c.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS handshake (ssl.SSLError is an OSError)
            raise Delivery(f"mqtt broker {self.where}: {e}", retry=True) from e
        c.loop_start()
        self.client = c
        if not answered.wait(self.sink.timeout_s):
            self._drop()
            raise Delivery(f"mqtt broker {self.where}: no CONNACK within {self.sink.timeout_s:g} s", retry=True)
        if answer[0].is_failure:
            self._drop()
            raise Delivery(f"mqtt broker {self.where} refused the connection: {answer[0]}", retry=True)
        log.info("sink %s: connected to %s as %s", self.sink.name, self.where, self.client_id)
        return c

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        c = self._connect()
        info = c.publish(topic, payload, qos=self.sink.qos, retain=retain)
        try:
            info.wait_for_publish(self.sink.timeout_s)
        except (RuntimeError, ValueError) as e:
            self._drop()
            raise Delivery(f"mqtt publish to {topic!r}: {e}", retry=True) from None
        if not info.is_published():
            self._drop()  # a broker that does not answer: start over on a new connection
            raise Delivery(f"mqtt publish to {topic!r}: no acknowledgement within {self.sink.timeout_s:g} s",
                           retry=True)

    def send(self, alert: Alert) -> None:
        link = links(self.ctx.cfg, alert)
        doc = {**alert_json(alert), "episode": episode_of(alert), "time": iso_time(alert.ts),
               "snapshot_url": link["snapshot"], "alert_url": link["page"]}
        self._publish(topic_for(self.sink.topic, alert), json_bytes(doc), retain=False)
        if self.sink.state_topic:
            self._publish(topic_for(self.sink.state_topic, alert), json_bytes(self.camera_state(alert, link)),
                          retain=True)

    def camera_state(self, alert: Alert, link: dict[str, str | None]) -> dict:
        """Record the change in the camera's episodes, then its whole state for the retained topic."""
        self.book.record(f"{alert.camera}|{episode_of(alert)}", alert,
                         state_entry(alert, link) if alert.state == "firing" else {})
        firing = sorted(self.book.firing(f"{alert.camera}|").values(), key=lambda e: (e["since"], e["id"]))
        return {"camera": alert.camera, "firing": firing, "count": len(firing),
                "last": {"id": alert.id, "episode": episode_of(alert), "rule": alert.rule, "state": alert.state,
                         "time": iso_time(alert.ts)}}

    def tick(self) -> None:
        if time.monotonic() >= self.next_prune:
            self.next_prune = time.monotonic() + 60
            self.book.prune(KEEP_RESOLVED_S + self.sink.deadline_s)

    def close(self) -> None:
        self._drop()
