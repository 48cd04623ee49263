"""deploy/prometheus, deploy/grafana and deploy/alertmanager checked with promtool and amtool, and against
the /metrics of a running pipeline (the compose demo config under `plantsight up`).

The compose file and Dockerfile are in test_compose.py, Kubernetes in test_k8s.py. A test whose tool is
missing skips and says which package brings it (.ci/run installs Debian's `prometheus` and
`prometheus-alertmanager`; kubectl comes from the Kubernetes apt repository).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.config import load_config
from tests.support.deploy import (COMPOSE, COMPOSE_CONFIG, DASHBOARDS, DEPLOY, PROM, PROMETHEUS_OWN, REQUIRED_ALERTS,
                                  RULE_TESTS, RULES, RUNNABLE, all_rules, compose, dashboard_exprs,
                                  dockerfile_healthcheck_code, grafana_variable_metrics, healthcheck_code, load_yaml,
                                  metric_names, need, recorded_names, rule_exprs, run, walk)
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.ports import ports
from tests.support.redis_server import redis_binary


def test_metric_name_extraction_understands_promql():
    expr = ('sum by (camera, le) (rate(plantsight_frames_total{stage="ingest", x=~"a|b"}[5m])) / on (camera) '
            'group_left(task) (plantsight_model_info > bool 0) or histogram_quantile(0.95, '
            'sum(rate(plantsight_batch_size_bucket[1m] offset 5m)) by (le)) * 1e-3 unless up')
    assert metric_names(expr) == {"plantsight_frames_total", "plantsight_model_info", "plantsight_batch_size_bucket",
                                  "up"}


# --- Prometheus -------------------------------------------------------------------------------
def test_promtool_check_config():
    promtool = need("promtool", "prometheus")
    res = run([promtool, "check", "config", PROM / "prometheus.yml"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr  # rules/*.yml is found relative to the config


def test_promtool_check_rules():
    promtool = need("promtool", "prometheus")
    res = run([promtool, "check", "rules", RULES])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(all_rules())} rules found" in res.stdout


def test_promtool_rule_unit_tests_pass():
    promtool = need("promtool", "prometheus")
    res = run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    assert REQUIRED_ALERTS <= alerts
    firing, silent = set(), set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown not firing"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_alerts_have_annotations_and_runbook_sections():
    runbook = (DEPLOY / "RUNBOOK.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", runbook, re.M)}
    for rule in all_rules():
        if "alert" not in rule:
            continue
        ann = rule.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= set(ann), rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), rule["alert"]
        path, _, anchor = ann["runbook_url"].partition("#")
        assert (ROOT / path).resolve() == (DEPLOY / "RUNBOOK.md").resolve(), ann["runbook_url"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in deploy/RUNBOOK.md"


def test_recording_rules_the_issue_asks_for():
    exprs = {r["record"]: r["expr"] for r in all_rules() if "record" in r}
    assert 'rate(plantsight_frames_total{stage="ingest"}[1m])' in exprs["plantsight:camera_fps:rate1m"]
    assert "plantsight_frames_dropped_total" in exprs["plantsight:camera_drop_ratio:rate5m"]
    quantiles = [e for e in exprs.values() if "plantsight_end_to_end_seconds_bucket" in e]
    assert {q for e in quantiles for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} == {"0.50", "0.95", "0.99"}


def test_every_promql_expression_parses():
    promtool = need("promtool", "prometheus")
    exprs = rule_exprs() + dashboard_exprs()
    assert len(exprs) > 30
    for where, expr in exprs:
        assert "$" not in expr, f"unsubstituted Grafana variable in {where}"
    doc = {"groups": [{"name": "parse-check", "rules": [{"record": f"check:expr_{i}", "expr": e}
                                                        for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump(doc))
        res = run([promtool, "check", "rules", path])
    listing = "\n".join(f"{i}: {w}" for i, (w, _) in enumerate(exprs))
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\nexpressions:\n{listing}"
    assert f"{len(exprs)} rules found" in res.stdout


def test_promtool_rejects_a_broken_expression():
    """The parse check above would catch a bad panel (the wrapper is not a no-op)."""
    promtool = need("promtool", "prometheus")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
            {"record": "check:bad", "expr": "sum by (camera (rate(plantsight_frames_total[5m]))"}]}]}))
        assert run([promtool, "check", "rules", path]).returncode != 0


def test_scrape_config_matches_compose_services_and_ports():
    prom = load_yaml(PROM / "prometheus.yml")
    compose = load_yaml(COMPOSE)["services"]
    cfg = load_config(COMPOSE_CONFIG, environ={"REDIS_PASSWORD": "x"})
    names_to_port = {}
    for name, svc in compose.items():
        aliases = (svc.get("networks") or {}).get("default", {}) or {}
        for dns_name in [name, *aliases.get("aliases", [])]:
            if "PLANTSIGHT_PORT" in (svc.get("environment") or {}):
                names_to_port.setdefault(dns_name, set()).add(int(svc["environment"]["PLANTSIGHT_PORT"]))
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for service in RUNNABLE:
        job = jobs[f"plantsight-{service}"]
        (sd,) = job["dns_sd_configs"]
        assert sd["type"] == "A" and sd["port"] == cfg.port(service)
        for name in sd["names"]:
            assert names_to_port.get(name) == {cfg.port(service)}, f"{name}: no compose service on port {sd['port']}"


# --- Grafana ----------------------------------------------------------------------------------
def test_dashboards_and_provisioning_fit_together():
    ds = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    prom_uid = next(d["uid"] for d in ds["datasources"] if d["type"] == "prometheus")
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "plantsight.yml")["providers"][0]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert (ROOT / mounts[provider["options"]["path"]]).resolve() == DASHBOARDS[0].parent.resolve()
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
    uids = set()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids
        uids.add(dash["uid"])
        for node in walk(dash.get("panels", [])):
            if isinstance(node.get("datasource"), dict) and node["datasource"].get("type") == "prometheus":
                assert node["datasource"]["uid"] == prom_uid, f"{path.name}: {node.get('title')}"
    assert {"plantsight-overview", "plantsight-camera"} <= uids


def test_overview_dashboard_shows_what_the_issue_lists():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "plantsight-overview.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for needle in ('plantsight_frames_total{stage="ingest"}', "plantsight_frames_dropped_total",
                   "plantsight_stream_length", "plantsight_consumer_lag", "plantsight_consumer_pending",
                   "plantsight_batch_size", "plantsight_inference_seconds", "plantsight_alerts_total",
                   "plantsight_camera_up", "up{"):
        assert needle in exprs, needle
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (task, le) (rate(plantsight_end_to_end_seconds_bucket" in exprs


def test_camera_dashboard_filters_every_panel_by_camera():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "plantsight-camera.json").read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "camera"]
    assert "label_values(plantsight_camera_up, camera)" in json.dumps(var["query"])
    targets = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert targets and all('camera=~"$camera"' in t["expr"] for t in targets)


# --- Alertmanager -----------------------------------------------------------------------------
def test_amtool_check_config():
    amtool = need("amtool", "prometheus-alertmanager")
    res = run([amtool, "check-config", DEPLOY / "alertmanager" / "alertmanager.yml"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    am = load_yaml(DEPLOY / "alertmanager" / "alertmanager.yml")
    hooks = [w["url"] for r in am["receivers"] for w in r.get("webhook_configs", [])]
    assert hooks and am["route"]["receiver"] in {r["name"] for r in am["receivers"]}


# --- a running pipeline -----------------------------------------------------------------------
class Pipeline:
    """`plantsight up` with the compose demo config against a password-protected redis-server (the viewer
    with a token of its own, evidence in the test's directory instead of the compose volume /evidence)."""

    def __init__(self, tmp: Path):
        self.password = "deploy-test-secret"
        redis_port, *svc_ports = ports(len(RUNNABLE) + 1)
        self.ports = dict(zip(RUNNABLE, svc_ports))
        self.redis = subprocess.Popen([redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                       "--dir", str(tmp), "--save", "", "--appendonly", "no",
                                       "--requirepass", self.password],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=redis_port, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        env = {**env_without_plantsight(), "REDIS_PASSWORD": self.password,
               "PLANTSIGHT_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0",
               "PLANTSIGHT_REDIS__PREFIX": f"deploytest{redis_port}",
               "PLANTSIGHT_INFERENCE__DEVICE": "cpu", "PLANTSIGHT_INFERENCE__THREADS": "1",
               "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": "deploy-test-operator-token",
               "PLANTSIGHT_ALERTS__EVIDENCE_DIR": str(tmp / "evidence"),
               **{f"PLANTSIGHT_SERVICES__{s.upper()}__PORT": str(p) for s, p in self.ports.items()}}
        self.log_path = tmp / "up.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(COMPOSE_CONFIG)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def text(self, service: str) -> str | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.ports[service]}/metrics", timeout=5).text
        except httpx.TransportError:
            return None

    def sample_names(self) -> dict[str, set[str]]:
        out = {}
        for service in RUNNABLE:
            text = self.text(service) or ""
            out[service] = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        return out

    def wait_for(self, names: set[str], timeout: float) -> set[str]:
        """Wait until every name has a sample in some service's /metrics; returns what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = names - set().union(*self.sample_names().values())
            if not missing or time.monotonic() > deadline:
                return missing
            if self.proc.poll() is not None:
                pytest.fail(f"plantsight up exited with {self.proc.returncode}\n{self.tail()}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.redis.terminate()
        self.redis.wait(10)


def used_metric_names() -> set[str]:
    names = set()
    for _, expr in rule_exprs() + dashboard_exprs():
        names |= metric_names(expr)
    return (names | grafana_variable_metrics()) - recorded_names() - PROMETHEUS_OWN


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("deploy-pipeline"))
    try:
        p.missing = p.wait_for(used_metric_names(), timeout=90)
        yield p
    finally:
        p.stop()


@pytest.mark.slow
def test_dashboards_and_rules_use_only_exported_metrics(pipeline):
    used = used_metric_names()
    assert len(used) >= 15
    assert all(n.startswith("plantsight_") for n in used), used
    assert pipeline.missing == set(), (f"used in deploy/ but not exported by a running pipeline: "
                                       f"{sorted(pipeline.missing)}\n{pipeline.tail()}")
    recorded_used = set()
    for _, expr in dashboard_exprs():
        recorded_used |= {n for n in metric_names(expr) if ":" in n}
    assert recorded_used <= recorded_names(), "dashboards use recording rules that do not exist"


@pytest.mark.slow
def test_dashboards_show_every_exported_plantsight_metric(pipeline):
    families = set()
    for text in (pipeline.text(s) or "" for s in RUNNABLE):
        families |= {f.name for f in text_string_to_metric_families(text)
                     if f.name.startswith("plantsight_") and not f.name.endswith("_created")}
    shown = set()
    for _, expr in dashboard_exprs():
        shown |= metric_names(expr)
    shown_families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in shown}
    assert len(families) >= 17
    assert families - shown_families == set(), "exported but on no dashboard"


@pytest.mark.slow
def test_promtool_check_metrics_on_every_service(pipeline):
    promtool = need("promtool", "prometheus")
    for service in RUNNABLE:
        text = pipeline.text(service)
        assert text and "plantsight_" in text, service
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), f"{service}:\n{res.stdout}{res.stderr}"


@pytest.mark.slow
def test_health_endpoints_and_container_healthchecks(pipeline):
    compose_code = healthcheck_code(compose()["services"]["ingest"]["healthcheck"]["test"])
    for service, port in pipeline.ports.items():
        for path in ("/healthz", "/readyz"):  # the k8s probes and the compose/Dockerfile healthchecks
            assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 200, (service, path)
        for code in (compose_code, dockerfile_healthcheck_code()):
            res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PLANTSIGHT_PORT": str(port)},
                                 capture_output=True, timeout=15)
            assert res.returncode == 0, (service, res.stderr)
    closed = ports(1)[0]
    res = subprocess.run([sys.executable, "-c", compose_code], env={**os.environ, "PLANTSIGHT_PORT": str(closed)},
                         capture_output=True, timeout=15)
    assert res.returncode != 0  # a service that does not answer is unhealthy
