"""The one typed configuration of plantsight (DESIGN §7).

Loaded once at start from a YAML file, then overridden by ``PLANTSIGHT_<SECTION>__<KEY>``
environment variables. Every error names the key and the reason. Secrets are ``SecretStr``
so they never show in reprs, logs or ``plantsight config check``.
"""

from __future__ import annotations

import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

TASKS = ("classify", "detect", "segment", "thermal")
Task = Literal["classify", "detect", "segment", "thermal"]
SERVICES = ("ingest", "preprocess", "infer", "alert", "viewer")
DEFAULT_PORTS = {"ingest": 9101, "preprocess": 9102, "infer": 9103, "alert": 9104, "viewer": 8080}
ENV_PREFIX = "PLANTSIGHT_"


class ConfigError(ValueError):
    """A configuration problem; the message names the key (``cameras[1].fps``) and the reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnFull(str, Enum):
    drop_oldest = "drop_oldest"
    drop_newest = "drop_newest"
    block = "block"


def _read_secret(value: SecretStr | None, env: str | None, file: Path | None) -> str | None:
    """A secret given inline, by environment variable name or by file (file wins, then env)."""
    if file is not None:
        return file.read_text().strip()
    if env:
        return os.environ.get(env)
    return value.get_secret_value() if value is not None else None


class RedisConfig(Strict):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = Field("plantsight", pattern=r"^[A-Za-z0-9_.:{}-]+$")
    username: str | None = Field(None, description="Redis 6 ACL user (default: the 'default' user)")
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    socket_timeout_s: float = Field(5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    def secret(self) -> str | None:
        return _read_secret(self.password, self.password_env, self.password_file)

    def masked_url(self) -> str:
        return re.sub(r"//([^@/]*)@", "//***@", self.url)

    def __repr_args__(self):  # a password may sit in the URL: never show it in a repr
        for key, value in super().__repr_args__():
            yield key, (self.masked_url() if key == "url" else value)


class CameraConfig(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    source: str
    fps: float = Field(10.0, gt=0, le=240)
    tasks: list[Task] = Field(min_length=1)
    on_full: OnFull = OnFull.drop_oldest
    queue: int = Field(8, ge=1, description="frames of this camera that may wait for preprocess")
    max_age_ms: int | None = Field(None, gt=0, description="frames older than this at a stage are dropped as stale")
    roi: tuple[int, int, int, int] | None = Field(None, description="x, y, w, h in frame pixels")
    max_frames: int | None = Field(None, ge=1, description="stop the camera after this many frames")
    loop: bool = True
    jpeg_quality: int = Field(90, ge=10, le=100)
    frozen_s: float = Field(30.0, ge=0, description="camera-frozen alert after the same image this long (0: off)")
    black_s: float = Field(10.0, ge=0, description="camera-black alert after a dark image this long (0: off)")
    black_level: float = Field(10.0, ge=0, le=255, description="mean 8-bit level below which an image is black")

    @field_validator("roi")
    @classmethod
    def _roi(cls, v):
        if v is not None and (v[2] <= 0 or v[3] <= 0 or v[0] < 0 or v[1] < 0):
            raise ValueError("roi needs x >= 0, y >= 0, w > 0, h > 0")
        return v


class ModelConfig(Strict):
    path: Path | None = None
    arch: str | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.arch is None):
            raise ValueError("give exactly one of 'path' (a model directory) or 'arch' (an untrained network)")
        return self


class ServicePort(Strict):
    port: int = Field(ge=1, le=65535)
    replicas: int = Field(1, ge=1, le=64)


def _default_services() -> dict[str, ServicePort]:
    return {name: ServicePort(port=port) for name, port in DEFAULT_PORTS.items()}


class StreamsConfig(Strict):
    frames_maxlen: int = Field(2000, ge=10)
    prepared_maxlen: int = Field(2000, ge=10)
    results_maxlen: int = Field(10000, ge=10)
    prepared_backlog: int = Field(32, ge=1, description="preprocess pauses while an infer group lags this much")
    alerts_max_age_s: int = Field(30 * 86400, ge=60)
    deadletter_max_age_s: int = Field(7 * 86400, ge=60)
    claim_idle_ms: int = Field(30000, ge=100)
    max_deliveries: int = Field(3, ge=1)
    read_block_ms: int = Field(200, ge=1)
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024)


class InferenceConfig(Strict):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: int = Field(20, ge=0)
    threads: int | None = Field(None, ge=1)


class Rule(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: Task
    when: str
    for_frames: int = Field(1, ge=1)
    cooldown_s: float = Field(60.0, ge=0)
    severity: Literal["info", "warning", "critical"] = "warning"
    cameras: list[str] | None = None
    sinks: list[str] = Field(default_factory=list)
    message: str | None = None

    @field_validator("when")
    @classmethod
    def _parse(cls, v: str, info: ValidationInfo) -> str:
        from shared.rules import RuleError, compile_condition  # the one parser; imported late to keep config light

        try:
            compile_condition(v)
        except RuleError as e:  # name the rule, not only its index
            raise ValueError(f"rule {info.data.get('name', '?')!r}: {e}") from None
        return v


class Sink(Strict):
    name: str
    type: Literal["webhook", "log"]
    url: str | None = None
    secret: SecretStr | None = None
    secret_env: str | None = None
    secret_file: Path | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(10, ge=0)
    backoff_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    deadline_s: float = Field(900.0, gt=0, description="give up (dead-letter) after trying this long")

    @model_validator(mode="after")
    def _url(self):
        if self.type == "webhook" and not (self.url and re.match(r"^https?://", self.url)):
            raise ValueError("a webhook sink needs url: http(s)://…")
        return self

    def signing_secret(self) -> str | None:
        return _read_secret(self.secret, self.secret_env, self.secret_file)


class AlertsConfig(Strict):
    camera_offline_s: float = Field(60.0, ge=0, description="built-in camera-offline alert after this long without frames (0: off)")
    camera_offline_sinks: list[str] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    sinks: list[Sink] = Field(default_factory=list)

    @model_validator(mode="after")
    def _refs(self):
        names = {s.name for s in self.sinks}
        for s in self.camera_offline_sinks:
            if s not in names:
                raise ValueError(f"camera_offline_sinks names sink {s!r}, which is not in alerts.sinks")
        for i, rule in enumerate(self.rules):
            for s in rule.sinks:
                if s not in names:
                    raise ValueError(f"rules[{i}] ({rule.name}) names sink {s!r}, which is not in alerts.sinks")
        return self


class Config(Strict):
    redis: RedisConfig = RedisConfig()
    cameras: list[CameraConfig] = Field(default_factory=list)
    models: dict[Task, ModelConfig] = Field(default_factory=dict)
    services: dict[str, ServicePort] = Field(default_factory=_default_services)
    streams: StreamsConfig = StreamsConfig()
    inference: InferenceConfig = InferenceConfig()
    alerts: AlertsConfig = AlertsConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("services")
    @classmethod
    def _services(cls, v: dict[str, ServicePort]) -> dict[str, ServicePort]:
        unknown = set(v) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown service {sorted(unknown)[0]!r}; known: {', '.join(SERVICES)}")
        return {**_default_services(), **v}

    @model_validator(mode="after")
    def _cameras(self):
        seen = set()
        for i, cam in enumerate(self.cameras):
            if cam.id in seen:
                raise ValueError(f"cameras[{i}].id {cam.id!r} is used twice")
            seen.add(cam.id)
        return self

    def tasks(self) -> list[str]:
        """Tasks some camera is routed to, in the fixed order of TASKS."""
        used = {t for cam in self.cameras for t in cam.tasks}
        return [t for t in TASKS if t in used]

    def model(self, task: str) -> ModelConfig:
        return self.models.get(task) or ModelConfig(arch=DEFAULT_ARCH[task])

    def port(self, service: str) -> int:
        return self.services[service].port

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data with every secret masked."""
        data = json.loads(self.model_dump_json())  # SecretStr dumps as '**********'
        data["redis"]["url"] = self.redis.masked_url()  # a password may sit in the URL
        return data


DEFAULT_ARCH = {"classify": "simple_cnn", "detect": "simple_yolo", "segment": "unet_small", "thermal": "thermal_cnn"}


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {len(err.errors())} problem(s) in the configuration"]
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see DESIGN §7 / README for the keys)"
        lines.append(f"  {_loc(e['loc'])}: {msg}")
    return "\n".join(lines)


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def apply_env(data: dict, environ: Mapping[str, str]) -> dict:
    """``PLANTSIGHT_REDIS__URL=…`` sets ``redis.url``; values are parsed as YAML scalars/lists."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if path[-1] in ("password", "secret", "url", "prefix", "source"):
            value = raw  # strings that YAML might turn into something else
        _set_path(data, path, value)
    return data


def load_config(path: str | Path | None = None, *, data: dict | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the config (file or dict), with environment overrides; raises ConfigError."""
    origin = str(path) if path else "config"
    if data is None:
        data = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"{p}: config file not found")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from e
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = apply_env(json.loads(json.dumps(data, default=str)), os.environ if environ is None else environ)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, origin)) from None


def demo_models_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where `make demo-models` puts the demo's trained models (the user's cache directory)."""
    env = os.environ if environ is None else environ
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(env.get("PLANTSIGHT_DEMO_MODELS") or cache / "plantsight" / "demo-models")


def demo_config(environ: Mapping[str, str] | None = None) -> Config:
    """The built-in demo: two synthetic cameras per task, a log sink, and the trained demo models
    where `make demo-models` has made them (untrained networks otherwise)."""
    data = yaml.safe_load((Path(__file__).with_name("demo.yaml")).read_text())
    trained = demo_models_dir(environ)
    for task in TASKS:
        if (trained / task / "model.json").is_file():
            data["models"][task] = {"path": str(trained / task)}
    return load_config(data=data, environ=environ)
