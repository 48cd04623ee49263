"""The typed config: the example loads, every error names its key, env overrides, secrets stay secret."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.config import ConfigError, OnFull, load_config
from tests.support.environment import env_without_plantsight

PLANTSIGHT = Path(sys.executable).with_name("plantsight")

EXAMPLE = """\
redis:
  url: redis://127.0.0.1:6379/0        # rediss:// and passwords work too
  prefix: plantsight
cameras:
  - id: kiln-1
    source: synthetic://thermal         # rtsp://…, /dev/video0, 0, file.mp4, /path/to/folder, synthetic://<scene>
    fps: 10
    tasks: [thermal]
    on_full: drop_oldest                # drop_oldest | drop_newest | block
  - id: line-2
    source: synthetic://surface
    fps: 15
    tasks: [classify, segment]
models:                                 # a trained model directory, or an architecture name for an untrained net
  classify: {path: models/classify}
  detect:   {arch: simple_yolo}
  segment:  {path: models/segment}
  thermal:  {path: models/thermal}
services:                               # HTTP port of each service (/metrics, /healthz, /readyz)
  ingest: {port: 9101}
  infer: {port: 9103}
inference:
  device: auto                          # auto | cpu | cuda | cuda:1
  max_batch: 16
  max_wait_ms: 20
alerts:
  rules:
    - name: kiln-overheat
      task: thermal
      when: "max_k >= 450"              # a field of the task's result, a comparison, a number
      for_frames: 3
      cooldown_s: 60
      severity: critical
      sinks: [maintenance]
  sinks:
    - name: maintenance
      type: webhook
      url: http://cmms.local/hooks/plantsight
      secret_env: PLANTSIGHT_WEBHOOK_SECRET   # HMAC-SHA256 of the body in X-Plantsight-Signature
"""

REDIS_PASSWORD = "pw-Zq8vR2kLx0"
WEBHOOK_SECRET = "whsec-9fK3mT7pQa"
URL_PASSWORD = "urlpw-Hn4cW6"


@pytest.fixture
def example(tmp_path) -> Path:
    path = tmp_path / "plantsight.yaml"
    path.write_text(EXAMPLE)
    return path


def data() -> dict:
    return yaml.safe_load(EXAMPLE)


def error_of(mutate=None, environ=None) -> str:
    d = data()
    if mutate:
        mutate(d)
    with pytest.raises(ConfigError) as info:
        load_config(data=d, environ=environ or {})
    return str(info.value)


def test_design_example_is_valid(example):
    cfg = load_config(example, environ={})
    assert cfg.redis.url == "redis://127.0.0.1:6379/0"
    assert cfg.redis.prefix == "plantsight"
    assert cfg.redis.secret() is None
    assert [(c.id, c.source, c.fps, c.tasks, c.on_full) for c in cfg.cameras] == [
        ("kiln-1", "synthetic://thermal", 10.0, ["thermal"], OnFull.drop_oldest),
        ("line-2", "synthetic://surface", 15.0, ["classify", "segment"], OnFull.drop_oldest)]
    assert cfg.tasks() == ["classify", "segment", "thermal"]
    assert cfg.models["classify"].path == Path("models/classify")
    assert cfg.models["detect"].arch == "simple_yolo" and cfg.models["detect"].path is None
    # services not named keep their default ports
    assert {name: cfg.port(name) for name in ("ingest", "preprocess", "infer", "alert", "viewer")} == {
        "ingest": 9101, "preprocess": 9102, "infer": 9103, "alert": 9104, "viewer": 8080}
    assert (cfg.inference.device, cfg.inference.max_batch, cfg.inference.max_wait_ms) == ("auto", 16, 20)
    rule = cfg.alerts.rules[0]
    assert (rule.name, rule.task, rule.when, rule.for_frames, rule.cooldown_s, rule.severity, rule.sinks) == (
        "kiln-overheat", "thermal", "max_k >= 450", 3, 60.0, "critical", ["maintenance"])
    sink = cfg.alerts.sinks[0]
    assert (sink.name, sink.type, sink.url, sink.secret_env) == (
        "maintenance", "webhook", "http://cmms.local/hooks/plantsight", "PLANTSIGHT_WEBHOOK_SECRET")


def test_unknown_key_is_named():
    msg = error_of(lambda d: d["cameras"][0].update(fsp=10))
    assert "cameras[0].fsp: unknown key" in msg
    assert "1 problem(s)" in msg


def test_unknown_section_is_named():
    assert "inferance: unknown key" in error_of(lambda d: d.update(inferance={"max_batch": 4}))


def test_wrong_type_names_the_key():
    msg = error_of(lambda d: d["cameras"][1].update(fps="fast"))
    assert "cameras[1].fps: Input should be a valid number" in msg
    msg = error_of(lambda d: d["inference"].update(max_batch="many"))
    assert "inference.max_batch: Input should be a valid integer" in msg


def test_every_problem_is_listed():
    def two(d):
        d["cameras"][0]["fps"] = 0
        d["inference"]["device"] = "tpu"
    msg = error_of(two)
    assert "2 problem(s)" in msg
    assert "cameras[0].fps: Input should be greater than 0" in msg
    assert "inference.device: String should match pattern" in msg


def test_bad_on_full():
    msg = error_of(lambda d: d["cameras"][0].update(on_full="drop_all"))
    assert "cameras[0].on_full: Input should be 'drop_oldest', 'drop_newest' or 'block'" in msg


def test_duplicate_camera_ids():
    msg = error_of(lambda d: d["cameras"][1].update(id="kiln-1"))
    assert "cameras[1].id 'kiln-1' is used twice" in msg


def test_rule_naming_a_missing_sink():
    msg = error_of(lambda d: d["alerts"]["rules"][0].update(sinks=["maintenance", "pager"]))
    assert "rules[0] (kiln-overheat) names sink 'pager', which is not in alerts.sinks" in msg


@pytest.mark.parametrize("when", ["__import__('os')", "max_k >= 450; rm", "max_k >= 450 or open('/etc/passwd')",
                                  "().__class__", "max_k > -'a'", ""])
def test_rule_condition_outside_the_language(when):
    msg = error_of(lambda d: d["alerts"]["rules"][0].update(when=when))
    assert "alerts.rules[0].when: rule 'kiln-overheat': " in msg


def test_env_overrides(example):
    cfg = load_config(example, environ={"PLANTSIGHT_INFERENCE__MAX_BATCH": "4",
                                        "PLANTSIGHT_REDIS__URL": "redis://10.0.0.5:6380/2",
                                        "PLANTSIGHT_REDIS__PREFIX": "plantsight:{line-a}",
                                        "UNRELATED__MAX_BATCH": "9", "PLANTSIGHT_NO_SECTION": "x"})
    assert cfg.inference.max_batch == 4
    assert isinstance(cfg.inference.max_batch, int)
    assert cfg.redis.url == "redis://10.0.0.5:6380/2"
    assert cfg.redis.prefix == "plantsight:{line-a}"
    assert cfg.inference.max_wait_ms == 20  # untouched keys keep the file's values
    assert load_config(example, environ={}).inference.max_batch == 16


def test_env_override_errors_name_the_key(example):
    with pytest.raises(ConfigError, match=r"inference\.max_batch: Input should be a valid integer"):
        load_config(example, environ={"PLANTSIGHT_INFERENCE__MAX_BATCH": "lots"})
    with pytest.raises(ConfigError, match=r"redis\.url: must start with redis://, rediss:// or unix://"):
        load_config(example, environ={"PLANTSIGHT_REDIS__URL": "http://127.0.0.1:6379"})


def _secret_env() -> dict:
    return {"PLANTSIGHT_REDIS__PASSWORD": REDIS_PASSWORD, "PLANTSIGHT_WEBHOOK_SECRET": WEBHOOK_SECRET}


def test_secrets_are_used_but_never_shown(example, monkeypatch):
    monkeypatch.setenv("PLANTSIGHT_WEBHOOK_SECRET", WEBHOOK_SECRET)  # secret_env is read when signing
    cfg = load_config(example, environ=_secret_env())
    assert cfg.redis.secret() == REDIS_PASSWORD
    assert cfg.alerts.sinks[0].signing_secret() == WEBHOOK_SECRET
    masked = cfg.masked()
    assert masked["redis"]["password"] == "**********"
    shown = "\n".join([repr(cfg), str(cfg), repr(cfg.redis), json.dumps(masked), yaml.safe_dump(masked)])
    assert REDIS_PASSWORD not in shown
    assert WEBHOOK_SECRET not in shown


def test_password_in_the_redis_url_is_masked(example):
    cfg = load_config(example, environ={"PLANTSIGHT_REDIS__URL": f"redis://ops:{URL_PASSWORD}@10.0.0.5:6379/0"})
    assert cfg.redis.url == f"redis://ops:{URL_PASSWORD}@10.0.0.5:6379/0"  # the client still gets it
    assert cfg.masked()["redis"]["url"] == "redis://***@10.0.0.5:6379/0"
    for shown in (repr(cfg), str(cfg), repr(cfg.redis), json.dumps(cfg.masked())):
        assert URL_PASSWORD not in shown


def _cli(path: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PLANTSIGHT), "config", "check", str(path)], capture_output=True, text=True,
                          env={**env_without_plantsight(), **(extra_env or {})}, timeout=60)


def test_cli_config_check_masks_secrets(example):
    env = {**_secret_env(), "PLANTSIGHT_REDIS__URL": f"redis://:{URL_PASSWORD}@127.0.0.1:6379/0"}
    proc = _cli(example, env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for secret in (REDIS_PASSWORD, WEBHOOK_SECRET, URL_PASSWORD):
        assert secret not in out
    printed = yaml.safe_load(proc.stdout)
    assert printed == load_config(example, environ=env).masked()
    assert printed["redis"]["password"] == "**********"
    assert printed["redis"]["url"] == "redis://***@127.0.0.1:6379/0"
    assert printed["alerts"]["sinks"][0]["secret_env"] == "PLANTSIGHT_WEBHOOK_SECRET"
    assert f"{example}: OK (2 cameras, tasks: classify, segment, thermal)" in proc.stderr


def test_cli_config_check_bad_file(tmp_path):
    bad = copy.deepcopy(data())
    bad["cameras"][0]["fsp"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = _cli(path)
    assert proc.returncode == 2
    assert "cameras[0].fsp: unknown key" in proc.stderr
    assert proc.stdout == ""


def test_cli_config_check_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "plantsight.yaml"
    proc = _cli(path)
    assert proc.returncode == 2
    assert f"{path}: config file not found" in proc.stderr


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: config file not found$"):
        load_config(path, environ={})


def test_invalid_yaml_and_non_mapping_name_the_path(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("cameras: [\n  - id: x\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(broken))}: not valid YAML"):
        load_config(broken, environ={})
    listing = tmp_path / "list.yaml"
    listing.write_text("- redis\n- cameras\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(listing))}: the top level must be a mapping of sections$"):
        load_config(listing, environ={})


# --- alert rules: zones, params and overrides, lifecycle fields ----------------------------------

def with_zone(d, zones=None, **rule):
    d["cameras"][0]["zones"] = zones if zones is not None else {"burner": [[10, 10], [60, 10], [60, 50], [10, 50]]}
    d["alerts"]["rules"][0].update(rule)


def test_rule_lifecycle_zone_and_params_load():
    d = data()
    with_zone(d, zone="burner", when="max_k >= limit", resolve_when="max_k < 430",
              params={"limit": 450}, overrides={"kiln-1": {"limit": 470}}, for_s=2.5, clear_frames=3,
              repeat_s=600, window_s=30)
    cfg = load_config(data=d, environ={})
    rule = cfg.alerts.rules[0]
    assert (rule.zone, rule.for_s, rule.clear_frames, rule.repeat_s, rule.window_s, rule.resolve_when) == (
        "burner", 2.5, 3, 600.0, 30.0, "max_k < 430")
    assert cfg.cameras[0].zones == {"burner": [(10, 10), (60, 10), (60, 50), (10, 50)]}
    assert rule.params_for("kiln-1") == {"limit": 470} and rule.params_for("line-2") == {"limit": 450}
    assert cfg.rule_cameras(rule) == ["kiln-1"]  # a zone rule runs on the cameras that define the zone


@pytest.mark.parametrize("mutate, want", [
    (lambda d: d["alerts"]["rules"][0].update(when="max_k >= 450 and count.leak >= 1"),
     "alerts.rules[0].when: rule 'kiln-overheat': unknown field 'count.leak' for task thermal"),
    (lambda d: d["alerts"]["rules"][0].update(resolve_when="max_k <"),
     "alerts.rules[0].resolve_when: rule 'kiln-overheat': cannot parse 'max_k <'"),
    (lambda d: d["alerts"]["rules"][0].update(resolve_when="maxk < 430"),
     "alerts.rules[0].resolve_when: rule 'kiln-overheat': unknown field 'maxk' for task thermal"),
    (lambda d: d["alerts"]["rules"][0].update(when="max_k >= limit"),
     "unknown field 'limit' for task thermal"),
    (lambda d: d["alerts"]["rules"][0].update(params={"max_k": 3}),
     "alerts.rules[0].params: rule 'kiln-overheat': param 'max_k' is also a field of thermal"),
    (lambda d: d["alerts"]["rules"][0].update(params={"limit": 450}, overrides={"kiln-1": {"limt": 470}}),
     "rule 'kiln-overheat': overrides.kiln-1 sets 'limt', which is not in params (limit)"),
    (lambda d: d["alerts"]["rules"][0].update(params={"limit": 450}, overrides={"kiln-9": {"limit": 470}}),
     "alerts.rules[0] (kiln-overheat) names camera 'kiln-9', which is not in cameras"),
    (lambda d: d["alerts"]["rules"][0].update(cameras=["kiln-1", "kiln-7"]),
     "alerts.rules[0] (kiln-overheat) names camera 'kiln-7', which is not in cameras"),
    (lambda d: with_zone(d, zone="burnr"),
     "alerts.rules[0] (kiln-overheat): unknown zone 'burnr': no thermal camera defines it"),
    (lambda d: with_zone(d, zone="burner", cameras=["kiln-1", "line-2"]),
     "alerts.rules[0] (kiln-overheat): unknown zone 'burner' on camera 'line-2' (its zones: none)"),
    (lambda d: with_zone(d, zones={"a": [[0, 0], [10, 0]]}), "cameras[0].zones: zone 'a' needs at least 3"),
    (lambda d: with_zone(d, zones={"a": [[0, 0], [10, 10], [20, 20]]}), "zone 'a' has no area"),
    (lambda d: with_zone(d, zones={"a": [[0, 0], [-1, 10], [20, 20]]}), "zone 'a': points are frame pixels"),
    (lambda d: with_zone(d, zones={"a b": [[0, 0], [0, 10], [20, 20]]}), "zone name 'a b'"),
    (lambda d: d["alerts"]["rules"][0].update(task="classify", when="prob > 0.9", zone="x"),
     "a classify rule judges the whole image and cannot have a zone"),
    (lambda d: d["alerts"]["rules"][0].update(clear_frames=0), "alerts.rules[0].clear_frames: Input should be"),
    (lambda d: d["alerts"]["rules"][0].update(for_s=-1), "alerts.rules[0].for_s: Input should be"),
    (lambda d: d["alerts"]["rules"][0].update(repeat_after=5), "alerts.rules[0].repeat_after: unknown key"),
])
def test_rule_errors_name_the_rule_and_the_key(mutate, want):
    assert want in error_of(mutate)


def test_rule_references_are_not_checked_without_cameras():
    # An alert service may run from a config holding the rules alone.
    d = data()
    d["cameras"] = []
    d["alerts"]["rules"][0].update(cameras=["kiln-9"])
    assert load_config(data=d, environ={}).alerts.rules[0].cameras == ["kiln-9"]


def test_health_alert_settings():
    d = data()
    d["alerts"].update(consumer_lag_max=200, consumer_lag_for_s=5, deadletter_max=3, deadletter_window_s=60)
    a = load_config(data=d, environ={}).alerts
    assert (a.consumer_lag_max, a.consumer_lag_for_s, a.deadletter_max, a.deadletter_window_s) == (200, 5.0, 3, 60.0)
    assert "alerts.deadletter_window_s: Input should be greater than 0" in error_of(
        lambda d: d["alerts"].update(deadletter_window_s=0))
