"""What the deploy/ tests read: the deployment files' paths, the PromQL of rules and dashboards, compose's
variables and the Dockerfile's instructions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.paths import ROOT

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "plantsight.rules.yml"
RULE_TESTS = PROM / "tests" / "plantsight.rules.test.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "compose" / "plantsight.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"
RUNNABLE = ("ingest", "preprocess", "infer", "alert", "viewer")  # every `plantsight run` service
REQUIRED_ALERTS = {"ServiceDown", "CameraDown", "FrameDropRateHigh", "ConsumerLagHigh", "NoResults",
                   "DeadLettersRising", "InferenceSlow"}
PROMETHEUS_OWN = {"up", "ALERTS"}  # series Prometheus makes itself
CRDS = {"PodMonitor", "ScaledObject", "TriggerAuthentication"}  # unknown to kubernetes-validate
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${camera}": ".+", "$camera": ".+"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "atan2", "inf", "nan"}


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} is not installed (apt-get install {package}; .ci/run does it)")
    return path


def run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, **kw)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# --- PromQL of the rules and dashboards -------------------------------------------------------
def rules_doc() -> dict:
    return load_yaml(RULES)


def all_rules() -> list[dict]:
    return [rule for group in rules_doc()["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in all_rules() if "record" in r}


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL with Grafana's variables substituted) of every panel target."""
    out = []
    for path in DASHBOARDS:
        for node in walk(json.loads(path.read_text())):
            if isinstance(node.get("expr"), str) and node["expr"].strip():
                expr = node["expr"]
                for var, value in GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                out.append((f"{path.name}: {node['expr']}", expr))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"{RULES.name}: {r.get('alert') or r.get('record')}", r["expr"]) for r in all_rules()]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or label values)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group(0))
    return names


def grafana_variable_metrics() -> set[str]:
    """Metric names in `label_values(metric, label)` variable queries."""
    out = set()
    for path in DASHBOARDS:
        for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
            q = var.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            out |= set(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", q))
    return out


def compose() -> dict:
    return load_yaml(COMPOSE)


def env_example() -> dict[str, str]:
    return env_file(ROOT / ".env.example")


class MissingVariable(ValueError):
    """``${VAR:?message}`` (or ``${VAR?message}``) with VAR unset (or empty): compose refuses to start."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution of one value, as `docker compose` does it with a .env file:
    ``${VAR}``, ``$VAR``, ``${VAR:-default}`` (unset or empty), ``${VAR-default}`` (unset),
    ``${VAR:?err}``, ``${VAR?err}``, and ``$$`` for a literal ``$``."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg") or ""
        have = env.get(name)
        empty = have is None or (have == "" and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else have
        if op in (":?", "?"):
            if empty:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return have
        return have or ""

    pattern = (r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
               r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
    return re.sub(pattern, one, value)


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a .env file (comments and blank lines skipped), as compose reads them."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose_variables(text: str) -> set[str]:
    braced = re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:]?[-?+][^}]*)?\}", text)
    bare = re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text)
    return set(braced) | set(bare)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def healthcheck_code(test: list[str]) -> str:
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def dockerfile_healthcheck_code() -> str:
    (hc,) = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    return healthcheck_code(["CMD", *json.loads(hc.split(" CMD ", 1)[1])])

