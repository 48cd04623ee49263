"""The webhook sink: the alert as JSON (or a template's JSON), signed with HMAC-SHA256 and a timestamp.

Signed material is ``<timestamp>.<body>``: the ``X-Plantsight-Timestamp`` header (unix seconds),
a dot, then the exact body bytes. Signing the timestamp lets a receiver refuse replays of an
old, validly signed request (check that the timestamp is within a few minutes of its clock).
Each attempt is signed afresh, so a retry carries a new timestamp but the same ``Idempotency-Key``.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx

from services.alerting.sinks.base import Context, Delivery, HttpTarget, json_bytes, links, post
from shared import templates
from shared.config import ConfigError
from shared.config_sinks import WebhookSinkConfig
from shared.messages import Alert
from shared.templates import alert_json


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, timestamp + "." + body)."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class WebhookSink(HttpTarget):
    def __init__(self, sink: WebhookSinkConfig, ctx: Context):
        super().__init__(sink, ctx)
        self.secret = sink.signing_secret()
        self.template = None
        if sink.template is not None:
            try:
                templates.check_template(sink.template)
                self.template = templates.load(sink.template)
            except templates.TemplateError as e:
                raise ConfigError(f"sink {sink.name}: {e}") from None
        self.client = httpx.Client(timeout=sink.timeout_s)

    def body(self, alert: Alert) -> bytes:
        if self.template is None:
            return json_bytes(alert_json(alert))
        try:
            return templates.render(self.template, templates.context(alert, links(self.ctx.cfg, alert), self.sink.name))
        except templates.TemplateError as e:  # the same alert renders the same way: retrying cannot help
            raise Delivery(str(e), retry=False) from None

    def send(self, alert: Alert) -> None:
        body = self.body(alert)
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "plantsight-alerts",
                   **self.headers, "Idempotency-Key": alert.id, "X-Plantsight-Timestamp": stamp}
        if self.secret:
            headers["X-Plantsight-Signature"] = sign(self.secret, stamp, body)
        post(self.client, self.sink.url, body, headers)

    def close(self) -> None:
        self.client.close()
