"""Sink types by the config's ``type`` key: adding a sink kind is one module and one line here."""

from __future__ import annotations

import logging

from services.alerting.sinks.alertmanager import AlertmanagerSink
from services.alerting.sinks.base import Context, Target
from services.alerting.sinks.chat import SlackSink, TeamsSink
from services.alerting.sinks.mqtt import MqttSink
from services.alerting.sinks.webhook import WebhookSink
from shared.config_sinks import Sink
from shared.messages import Alert

log = logging.getLogger("plantsight.alert.sinks")


class LogSink(Target):
    """A line in the alert service's log: for the demo and for trying rules out."""

    def send(self, alert: Alert) -> None:
        log.warning("ALERT %s %s %s camera=%s value=%s threshold=%s %s", alert.state.upper(), alert.severity,
                    alert.rule, alert.camera, alert.value, alert.threshold, alert.message)


SINK_TYPES: dict[str, type[Target]] = {"webhook": WebhookSink, "log": LogSink, "slack": SlackSink,
                                       "teams": TeamsSink, "mqtt": MqttSink, "alertmanager": AlertmanagerSink}


def make_target(sink: Sink, ctx: Context) -> Target:
    return SINK_TYPES[sink.type](sink, ctx)
