"""Slack and Microsoft Teams incoming webhooks: a short, readable message with the evidence links.

Both services fetch nothing from plantsight: the snapshot and the alert page are links to the
viewer (``alerts.public_url``), which people open from the plant network. An image block would
make Slack refuse the whole message when the viewer is not reachable from the internet.
"""

from __future__ import annotations

import httpx

from services.alerting.sinks.base import Context, HttpTarget, describe, json_bytes, links, post
from shared.config_sinks import SlackSinkConfig, TeamsSinkConfig
from shared.messages import Alert
from shared.templates import iso_time

ICON = {"critical": "🔴", "warning": "🟠", "info": "🔵"}


def title(alert: Alert) -> str:
    if alert.state == "resolved":
        return f"✅ RESOLVED {alert.rule} on {alert.camera}"
    return f"{ICON.get(alert.severity, '⚪')} {alert.severity.upper()} {alert.rule} on {alert.camera}"


def facts(alert: Alert) -> list[tuple[str, str]]:
    out = [("Camera", alert.camera), ("Rule", alert.rule), ("Severity", alert.severity), ("State", alert.state),
           ("Task", alert.task), ("Value", f"{alert.value:g}")]
    if alert.threshold is not None:
        out.append(("Threshold", f"{alert.threshold:g}"))
    if alert.labels.get("zone"):
        out.append(("Zone", str(alert.labels["zone"])))
    out.append(("Time", iso_time(alert.ts)))
    return out


def slack_escape(text: str) -> str:
    """Slack's mrkdwn reserves &, < and > (links are <url|label>)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(alert: Alert, link: dict[str, str | None]) -> dict:
    """``text`` (the notification and fallback) plus Block Kit blocks."""
    fields = [{"type": "mrkdwn", "text": f"*{k}*\n{slack_escape(v)}"} for k, v in facts(alert)]
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": title(alert)[:150], "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(describe(alert))}},
        {"type": "section", "fields": fields[:10]},  # Slack allows at most 10 fields
    ]
    if link["page"]:
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Snapshot"}, "url": link["snapshot"],
             "action_id": "snapshot"},
            {"type": "button", "text": {"type": "plain_text", "text": "Alert page"}, "url": link["page"],
             "action_id": "alert-page"}]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"plantsight alert `{alert.id}`"}]})
    text = f"{title(alert)}: {describe(alert)}"
    if link["snapshot"]:
        text += f" <{link['snapshot']}|snapshot>"
    return {"text": text, "blocks": blocks}


def teams_message(alert: Alert, link: dict[str, str | None]) -> dict:
    """An Adaptive Card in the message envelope that Teams incoming webhooks and Workflows accept."""
    color = "Good" if alert.state == "resolved" else ("Attention" if alert.severity == "critical" else "Warning")
    card: dict = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard", "version": "1.4",
        "msteams": {"width": "Full"},
        "body": [
            {"type": "TextBlock", "text": title(alert), "weight": "Bolder", "size": "Medium", "color": color,
             "wrap": True},
            {"type": "TextBlock", "text": describe(alert), "wrap": True},
            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in facts(alert)]},
        ],
    }
    if link["page"]:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Snapshot", "url": link["snapshot"]},
                           {"type": "Action.OpenUrl", "title": "Alert page", "url": link["page"]}]
    return {"type": "message", "summary": title(alert),
            "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None,
                             "content": card}]}


class _ChatSink(HttpTarget):
    build = staticmethod(slack_message)

    def __init__(self, sink: SlackSinkConfig | TeamsSinkConfig, ctx: Context):
        super().__init__(sink, ctx)
        self.client = httpx.Client(timeout=sink.timeout_s)

    def send(self, alert: Alert) -> None:
        body = json_bytes(self.build(alert, links(self.ctx.cfg, alert)))
        post(self.client, self.sink.url, body, {"Content-Type": "application/json", **self.headers})

    def close(self) -> None:
        self.client.close()


class SlackSink(_ChatSink):
    build = staticmethod(slack_message)


class TeamsSink(_ChatSink):
    build = staticmethod(teams_message)
