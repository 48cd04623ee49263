"""Where alerts go: one config class per sink kind, chosen by its ``type`` key.

Each kind takes only its own keys and checks them at load, so a key that belongs to another kind (a
``template`` on a Slack sink, ``headers`` on an MQTT sink) is refused by name instead of ignored. Adding a
kind is one class here, one entry in ``Sink`` and one target in ``services/alerting/sinks``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Mapping, Union

from pydantic import Field, SecretStr, model_validator

from shared.config_base import ConfigError, Strict
from shared.secret import read_secret
from shared.templates import TemplateError, check_template

_HEADER_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SinkConfig(Strict):
    """What every sink has: a name rules refer to, and how its deliveries are retried and paced."""

    name: str
    timeout_s: float = Field(5.0, gt=0, description="one delivery attempt's time limit")
    retries: int = Field(10, ge=0, description="attempts after the first before the alert is dead-lettered")
    backoff_s: float = Field(0.5, gt=0, description="first wait between attempts (doubles, with jitter)")
    backoff_max_s: float = Field(30.0, gt=0, description="longest wait between attempts")
    deadline_s: float = Field(900.0, gt=0, description="give up (dead-letter) after trying this long")
    rate_per_min: float | None = Field(None, gt=0, description="at most this many deliveries a minute (the rest wait)")
    burst: int = Field(1, ge=1, description="deliveries that may go at once before rate_per_min spaces them")


class HttpSinkConfig(SinkConfig):
    """A sink that POSTs to an HTTP(S) endpoint."""

    url: str = Field(description="http(s)://… endpoint")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="extra request headers; ${NAME} is read from the environment")

    @model_validator(mode="after")
    def _http_url(self):
        if not re.match(r"^https?://", self.url):
            raise ValueError(f"{'an' if self.type[0] in 'aeiou' else 'a'} {self.type} sink needs url: http(s)://…")
        return self

    def http_headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """``headers`` with each ``${NAME}`` read from the environment, so a token stays out of the
        file and out of ``config check``; raises ConfigError naming a variable that is not set."""
        env = os.environ if environ is None else environ

        def value(m: re.Match) -> str:
            if m.group(1) not in env:
                raise ConfigError(f"sink {self.name}: header uses ${{{m.group(1)}}}, which is not set")
            return env[m.group(1)]

        return {k: _HEADER_VAR.sub(value, v) for k, v in self.headers.items()}


class WebhookSinkConfig(HttpSinkConfig):
    """The alert as JSON (or a template's JSON), signed with HMAC-SHA256 when a secret is set."""

    type: Literal["webhook"]
    secret: SecretStr | None = Field(None, description="signing secret (prefer secret_env or secret_file)")
    secret_env: str | None = Field(None, description="environment variable holding the signing secret")
    secret_file: Path | None = Field(None, description="file holding the signing secret")
    template: Path | None = Field(None, description="a Jinja2 template file for the JSON body")

    @model_validator(mode="after")
    def _template(self):
        if self.template is not None:
            try:
                check_template(self.template)
            except TemplateError as e:
                raise ValueError(str(e)) from None
        return self

    def signing_secret(self) -> str | None:
        return read_secret(value=self.secret, env=self.secret_env, file=self.secret_file, what="secret_file")


class SlackSinkConfig(HttpSinkConfig):
    """A Slack incoming webhook."""

    type: Literal["slack"]


class TeamsSinkConfig(HttpSinkConfig):
    """A Microsoft Teams incoming webhook."""

    type: Literal["teams"]


class AlertmanagerSinkConfig(HttpSinkConfig):
    """Prometheus Alertmanager's v2 API: firing alerts re-posted every ``resend_s``, resolved ones ended."""

    type: Literal["alertmanager"]
    resend_s: float = Field(60.0, gt=0, description="re-post firing alerts this often")


class MqttSinkConfig(SinkConfig):
    """Publishes to an MQTT broker: one message per alert, and a retained state per camera."""

    type: Literal["mqtt"]
    url: str = Field(description="mqtt://host:port or mqtts://host:port (TLS)")
    topic: str = Field("plantsight/{camera}/{rule}", description="topic template ({camera}, {rule}, {severity}, "
                                                                 "{state}, {task})")
    state_topic: str | None = Field("plantsight/{camera}/state",
                                    description="retained per-camera state topic ({camera}; null: none)")
    qos: Literal[0, 1, 2] = 1
    username: str | None = None
    password: SecretStr | None = Field(None, description="broker password (prefer password_env or password_file)")
    password_env: str | None = None
    password_file: Path | None = None
    tls_ca_file: Path | None = Field(None, description="CA certificate for mqtts:// (default: the system's)")
    client_id: str | None = Field(None, description="default: plantsight-<sink>-<pid>-<random>")

    @model_validator(mode="after")
    def _mqtt(self):
        if not re.match(r"^mqtts?://[^/]+", self.url):
            raise ValueError("an mqtt sink needs url: mqtt://host:port or mqtts://host:port")
        for key, allowed in (("topic", ("camera", "rule", "severity", "state", "task")), ("state_topic", ("camera",))):
            for word in re.findall(r"\{([^{}]*)\}", getattr(self, key) or ""):
                if word not in allowed:
                    raise ValueError(f"{key} has {{{word}}}; it may use {', '.join('{%s}' % a for a in allowed)}")
            if re.search(r"[+#]", getattr(self, key) or ""):
                raise ValueError(f"{key}: MQTT wildcards + and # cannot be published to")
        return self

    def broker_password(self) -> str | None:
        return read_secret(value=self.password, env=self.password_env, file=self.password_file, what="password_file")


class LogSinkConfig(SinkConfig):
    """A line in the alert service's log: for the demo and for trying rules out."""

    type: Literal["log"]


SINK_CONFIGS = (WebhookSinkConfig, SlackSinkConfig, TeamsSinkConfig, AlertmanagerSinkConfig, MqttSinkConfig,
                LogSinkConfig)
SINK_KINDS = tuple(cls.model_fields["type"].annotation.__args__[0] for cls in SINK_CONFIGS)
Sink = Annotated[Union[SINK_CONFIGS], Field(discriminator="type")]
