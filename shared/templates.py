"""Webhook body templates: Jinja2 in a sandbox, rendered per alert, the result must be JSON.

A template lets the webhook speak a CMMS work-order API instead of plantsight's own alert JSON.
The sandbox keeps a template from reaching Python internals (the file is config, but config
is often edited by people who are not developers); autoescape is off because the output is
JSON, not HTML: quote strings with ``|tojson``. ``check_template`` renders a sample alert so
a broken template stops ``plantsight config check`` and the alert service at start, naming the file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from shared.messages import Alert


def alert_json(alert: Alert) -> dict:
    """The alert as a JSON object: the wire fields (docs/wire-format.md)."""
    return dict(alert.to_dict())


def episode_of(alert: Alert) -> str:
    """The id of the episode an alert belongs to: its firing alert's id (resolved alerts carry it as a label)."""
    return str(alert.labels.get("episode") or alert.id)


def iso_time(ts_ns: int | float) -> str:
    """RFC 3339 UTC with milliseconds, as Alertmanager, Slack and Teams read it."""
    when = datetime.fromtimestamp(ts_ns / 1e9, tz=timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_ENV = SandboxedEnvironment(autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_tojson = _ENV.filters["tojson"]


def _strict_tojson(env, value, indent=None):
    """``|tojson`` that names a missing variable instead of failing on the Undefined object."""
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    return _tojson(env, value, indent)


_strict_tojson.jinja_pass_arg = _tojson.jinja_pass_arg
_ENV.filters["tojson"] = _strict_tojson


class TemplateError(ValueError):
    """A template that cannot be read, parsed or rendered to JSON; the message names the file."""


def context(alert: Alert, links: dict[str, str | None], sink: str) -> dict:
    """The variables a template sees (documented in docs/alerts.md, "Sinks")."""
    return {"alert": alert_json(alert), "episode": episode_of(alert), "time": iso_time(alert.ts),
            "snapshot_url": links.get("snapshot"), "alert_url": links.get("page"), "sink": sink}


def load(path: Path) -> jinja2.Template:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TemplateError(f"template {path}: cannot read it: {e.strerror or e}") from None
    try:
        tpl = _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template {path}, line {e.lineno}: {e.message}") from None
    tpl.name = str(path)
    return tpl


def render(tpl: jinja2.Template, ctx: dict) -> bytes:
    """The body bytes; raises TemplateError when rendering fails or the result is not JSON."""
    try:
        text = tpl.render(ctx)
    except Exception as e:  # undefined variables, sandbox violations, whatever the template's own code raises
        raise TemplateError(f"template {tpl.name}: {type(e).__name__}: {e}") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise TemplateError(f"template {tpl.name} did not render JSON: {e.msg} at line {e.lineno} "
                            f"column {e.colno} (quote strings with |tojson)") from None
    return text.encode()


def sample_alert() -> Alert:
    return Alert(id="00000000-0000-5000-8000-000000000000", rule="sample-rule", severity="warning",
                 state="firing", camera="sample-camera", task="thermal", ts=1_700_000_000_000_000_000,
                 value=1.0, threshold=0.5, message='a "sample" alert', frame_id="1700000000000-0",
                 evidence="evidence/00000000-0000-5000-8000-000000000000",
                 labels={"episode": "00000000-0000-5000-8000-000000000000", "zone": "sample-zone",
                         "model": "sample@1", "seq": "1"})


def check_template(path: Path) -> None:
    """Raise TemplateError unless the file parses and renders a sample alert to JSON."""
    sample = sample_alert()
    render(load(path), context(sample, {"snapshot": "https://viewer.example/api/alerts/x/snapshot.jpg",
                                        "page": "https://viewer.example/alerts/x"}, "sample-sink"))
