"""The one typed configuration of plantsight (docs/configuration.md, generated from this schema).

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
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator

from shared.config_base import ConfigError, Strict
from shared.config_sinks import SINK_KINDS, Sink
from shared.names import DEFAULT_PORTS, SERVICES, TASKS
from shared.rules import RuleError, check_names, compile_condition, known_field
from shared.secret import read_secret

Task = Literal[TASKS]
ENV_PREFIX = "PLANTSIGHT_"


class OnFull(str, Enum):
    drop_oldest = "drop_oldest"
    drop_newest = "drop_newest"
    block = "block"


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
        return read_secret(value=self.password, env=self.password_env, file=self.password_file, what="password_file")

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
    zones: dict[str, list[tuple[float, float]]] = Field(
        default_factory=dict, description="named polygons [[x, y], ...] in original frame pixels (rule.zone)")

    @field_validator("roi")
    @classmethod
    def _roi(cls, v):
        if v is not None and (v[2] <= 0 or v[3] <= 0 or v[0] < 0 or v[1] < 0):
            raise ValueError("roi needs x >= 0, y >= 0, w > 0, h > 0")
        return v

    @field_validator("zones")
    @classmethod
    def _zones(cls, v):
        for name, points in v.items():
            if not re.match(r"^[A-Za-z0-9_.-]+$", name):
                raise ValueError(f"zone name {name!r}: use letters, digits, '_', '.', '-'")
            if len(points) < 3:
                raise ValueError(f"zone {name!r} needs at least 3 points [x, y], got {len(points)}")
            if any(x < 0 or y < 0 for x, y in points):
                raise ValueError(f"zone {name!r}: points are frame pixels, x >= 0 and y >= 0")
            area = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))
            if area == 0:
                raise ValueError(f"zone {name!r} has no area (its points lie on one line)")
        return v


class ModelConfig(Strict):
    path: Path | None = None
    arch: str | None = None
    shadow: Path | None = Field(None, description="a candidate model directory infer runs beside the live model "
                                                  "on the same frames; its results go to {P}:shadow, never to "
                                                  "alerting (docs/operations.md#shadow-models)")
    shadow_share: float = Field(1.0, gt=0, le=1, description="fraction of the task's frames the shadow model runs on")

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
    threads: int | None = Field(None, ge=1, description="torch threads per infer process; null: torch's default, "
                                                       "or on the CPU the cores shared out among infer's replicas")
    # How the network runs (services/inference/engine.py; defaults measured by `plantsight bench`).
    engine: Literal["auto", "eager", "torchscript", "onnx", "int8"] = Field(
        "auto", description="auto: frozen TorchScript trace on CPU, eager on CUDA")
    amp: Literal["auto", "fp16", "bf16", "off"] = Field("auto",
                                                        description="autocast dtype; auto: fp16 on CUDA, off on CPU")
    channels_last: bool | None = Field(None, description="NHWC memory layout for convolutions (null: on CUDA only)")
    compile: bool = Field(False, description="torch.compile the eager network (needs a C compiler on CPU)")
    cuda_graphs: bool = Field(False, description="CUDA only: replay a captured graph per batch size")
    batch_buckets: bool | None = Field(None, description="pad each batch up to a power of two (or max_batch) so "
                                                         "every size runs warm; null: on CUDA only")
    decode: Literal["preprocess", "infer"] = Field(
        "preprocess", description="infer: preprocess routes the JPEG bytes and infer decodes+resizes the batch on "
                                  "its device (torchvision.io.decode_jpeg on CUDA)")
    read_from: Literal["prepared", "frames"] = Field(
        "prepared", description="frames: infer reads {P}:frames itself (group infer-<task>) and does preprocess's "
                                "work in its reader thread, JPEG decoded there: no preprocess process, one Redis "
                                "hop and one copy of each frame fewer")
    model_poll_s: float = Field(2.0, ge=0, description="how often infer looks for a new model version (0: never)")


Param = float | str


class Rule(Strict):
    """One alert rule (docs/alerts.md has the table of fields and an example per task)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    task: Task
    params: dict[str, Param] = Field(default_factory=dict, description="named thresholds used in when/resolve_when")
    when: str
    for_frames: int = Field(1, ge=1, description="consecutive matching frames before firing")
    for_s: float = Field(0.0, ge=0, description="and the condition held this long (capture time) before firing")
    cooldown_s: float = Field(60.0, ge=0, description="at most one firing per this long per camera (and zone)")
    resolve_when: str | None = Field(None, description="resolve when this holds (hysteresis); default: not `when`")
    clear_frames: int = Field(1, ge=1, description="consecutive clearing frames before resolving")
    repeat_s: float = Field(0.0, ge=0, description="re-notify a firing, unacknowledged episode this often (0: never)")
    window_s: float = Field(60.0, gt=0, description="thermal: seconds over which rise_k_per_min is measured")
    zone: str | None = Field(None, description="a zone of the camera (cameras[].zones) the rule looks at")
    overrides: dict[str, dict[str, Param]] = Field(default_factory=dict, description="camera id -> params for it")
    severity: Literal["info", "warning", "critical"] = "warning"
    cameras: list[str] | None = None
    sinks: list[str] = Field(default_factory=list)
    message: str | None = None

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict, info: ValidationInfo) -> dict:
        task = info.data.get("task")
        for name in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name) or name in ("and", "or", "not", "True", "False"):
                raise ValueError(f"rule {info.data.get('name', '?')!r}: param name {name!r} must be an identifier")
            if task and known_field(task, name):
                raise ValueError(f"rule {info.data.get('name', '?')!r}: param {name!r} is also a field of {task}")
        return v

    @field_validator("when", "resolve_when")
    @classmethod
    def _parse(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        try:
            cond = compile_condition(v)
            if info.data.get("task"):
                check_names(cond, info.data["task"], info.data.get("params") or {})
        except RuleError as e:  # name the rule, not only its index
            raise ValueError(f"rule {info.data.get('name', '?')!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _refs(self):
        for camera, values in self.overrides.items():
            unknown = sorted(set(values) - set(self.params))
            if unknown:
                raise ValueError(f"rule {self.name!r}: overrides.{camera} sets {unknown[0]!r}, which is not in params "
                                 f"({', '.join(sorted(self.params)) or 'none declared'})")
        if self.zone is not None and self.task == "classify":
            raise ValueError(f"rule {self.name!r}: a classify rule judges the whole image and cannot have a zone")
        return self

    def params_for(self, camera: str) -> dict[str, Param]:
        """The rule's params with the camera's overrides applied."""
        return {**self.params, **self.overrides.get(camera, {})}


class AlertsConfig(Strict):
    camera_offline_s: float = Field(60.0, ge=0,
                                    description="built-in camera-offline alert after this long without frames (0: off)")
    camera_offline_sinks: list[str] = Field(default_factory=list, description="sinks of every pipeline-health alert")
    consumer_lag_max: int = Field(5000, ge=0, description="consumer-lag alert when a group lags more entries (0: off)")
    consumer_lag_for_s: float = Field(30.0, ge=0, description="… for this long")
    deadletter_max: int = Field(10, ge=0, description="deadletter-growing alert at this many new dead letters (0: off)")
    deadletter_window_s: float = Field(300.0, gt=0, description="… within this many seconds")
    rules: list[Rule] = Field(default_factory=list)
    sinks: list[Sink] = Field(default_factory=list)
    evidence_dir: Path = Field(Path("evidence"), description="snapshot.jpg, clip.mp4, evidence.json per alert id")
    evidence_max_age_days: float = Field(30.0, gt=0, description="evidence older than this is deleted")
    evidence_max_mb: float = Field(2048.0, gt=0, description="oldest evidence deleted beyond this total")
    clip_before_s: float = Field(5.0, ge=0, description="seconds of video before the alert's frame")
    clip_after_s: float = Field(3.0, ge=0, description="seconds of video after the alert's frame")
    public_url: str | None = Field(None, description="the viewer's address as people reach it (links in messages)")

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

    @model_validator(mode="after")
    def _rule_refs(self):
        """Cameras, zones and overrides a rule names exist (checked only when cameras are configured:
        an alert service may run with the rules alone)."""
        cams = {c.id: c for c in self.cameras}
        if not cams:
            return self
        for i, rule in enumerate(self.alerts.rules):
            where = f"alerts.rules[{i}] ({rule.name})"
            for cam in (rule.cameras or []) + list(rule.overrides):
                if cam not in cams:
                    raise ValueError(f"{where} names camera {cam!r}, which is not in cameras")
            if rule.zone is None:
                continue
            if rule.cameras:
                for cam in rule.cameras:
                    if rule.zone not in cams[cam].zones:
                        raise ValueError(f"{where}: unknown zone {rule.zone!r} on camera {cam!r} "
                                         f"(its zones: {', '.join(cams[cam].zones) or 'none'})")
            elif not any(rule.zone in c.zones and rule.task in c.tasks for c in self.cameras):
                raise ValueError(f"{where}: unknown zone {rule.zone!r}: no {rule.task} camera defines it")
        return self

    def rule_cameras(self, rule: Rule) -> list[str] | None:
        """Cameras a rule applies to: those listed, else (zone rules) the cameras defining its zone; None: all."""
        if rule.cameras:
            return list(rule.cameras)
        if rule.zone is not None:
            return [c.id for c in self.cameras if rule.zone in c.zones]
        return None

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


def _loc(loc: tuple) -> tuple[str, str | None]:
    """(``alerts.sinks[0].url``, the sink kind when the location passed through one)."""
    out, kind = "", None
    for prev, part in zip((None, *loc), loc):
        if isinstance(prev, int) and part in SINK_KINDS:  # pydantic names the union member taken: not a key
            kind = part
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)", kind


def _format(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {len(err.errors())} problem(s) in the configuration"]
    for e in err.errors():
        where, kind = _loc(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = (f"unknown key for a {kind} sink" if kind else "unknown key") + \
                " (check the spelling; docs/configuration.md lists the keys)"
        lines.append(f"  {where}: {msg}")
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


DEMO_MODELS = Path(__file__).with_name("demo_models")  # shared/training/demo_models.py makes them


def demo_models_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The demo's trained models: those that come with plantsight, or ``$PLANTSIGHT_DEMO_MODELS``."""
    env = os.environ if environ is None else environ
    return Path(env.get("PLANTSIGHT_DEMO_MODELS") or DEMO_MODELS)


def demo_config(environ: Mapping[str, str] | None = None) -> Config:
    """The built-in demo: two synthetic cameras per task, a log sink, and the trained demo models (a task
    whose model directory is missing there runs its untrained network)."""
    data = yaml.safe_load((Path(__file__).with_name("demo.yaml")).read_text())
    trained = demo_models_dir(environ)
    for task in TASKS:
        if (trained / task / "model.json").is_file():
            data["models"][task] = {"path": str(trained / task)}
    return load_config(data=data, environ=environ)
