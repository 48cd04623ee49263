"""docker-compose.yml, .env.example, the Dockerfile and .dockerignore, checked statically and by running
the Redis command and healthcheck the compose file gives."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from services.cli import parser as cli_parser
from services.viewer.auth import Tokens, TokenError
from shared.config import load_config
from shared.names import TASKS
from tests.support.deploy import (COMPOSE, COMPOSE_CONFIG, DEPLOY, DOCKERFILE, RUNNABLE, MissingVariable, compose,
                                  compose_variables, dockerfile_instructions, env_example, healthcheck_code,
                                  interpolate, run)
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.ports import ports
from tests.support.redis_server import redis_binary

TOKEN_VARS = ("PLANTSIGHT_VIEWER_TOKEN", "PLANTSIGHT_VIEWER_OPERATOR_TOKEN")


def test_compose_variables_are_all_in_env_example():
    used = compose_variables(COMPOSE.read_text())
    listed = env_example()
    assert {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", *TOKEN_VARS, "VIEWER_PORT", "VIEWER_PUBLIC_URL"} <= used
    assert used - set(listed) == set(), "variables missing from .env.example"
    assert set(listed) - used == set(), ".env.example lists variables docker-compose.yml does not use"
    assert compose_variables("a ${X:-1} ${Y:?no} ${Z} $W $$NOT") == {"X", "Y", "Z", "W"}


def test_compose_services_run_real_plantsight_services():
    services = compose()["services"]
    seen = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        if not (isinstance(cmd, list) and cmd[:1] == ["run"]):
            continue
        args = cli_parser().parse_args(cmd)  # exits (fails the test) on an unknown service or option
        assert args.service in RUNNABLE, f"{name}: `plantsight run {args.service}` is not available"
        assert name.split("-")[0] == args.service, name
        seen[name] = args.service
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"] if v.startswith("./")}
        assert args.config in mounts, f"{name}: {args.config} is not mounted"
        cfg = load_config(ROOT / mounts[args.config], environ={"REDIS_PASSWORD": "x"})
        assert cfg.redis.url.startswith("redis://redis:6379") and cfg.redis.password_env == "REDIS_PASSWORD"
        assert "REDIS_PASSWORD" in svc["environment"]
        assert int(svc["environment"]["PLANTSIGHT_PORT"]) == cfg.port(args.service)
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert set(seen.values()) == set(RUNNABLE)
    assert set(TASKS) == set(load_config(COMPOSE_CONFIG, environ={"REDIS_PASSWORD": "x"}).tasks())


def test_compose_healthchecks_users_restart_and_mounts():
    for name, svc in compose()["services"].items():
        hc = svc.get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name}: no healthcheck"
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"
        user = str(svc.get("user", ""))
        assert user and user.split(":")[0] not in ("root", "0"), f"{name}: runs as {user or 'the image default'}"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
        for vol in svc.get("volumes", []):
            if vol.startswith("./"):
                assert (ROOT / vol.split(":")[0]).exists(), f"{name}: {vol} mounts a missing path"


def test_compose_redis_preprocess_and_gpu_profile():
    services = compose()["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--requirepass" in redis_cmd
    assert services["redis"]["image"].startswith("redis:7")
    assert re.fullmatch(r"\$\{PREPROCESS_REPLICAS:-2\}|2", str(services["preprocess"]["deploy"]["replicas"]))
    gpu = services["infer-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["PLANTSIGHT_INFERENCE__DEVICE"] == "cuda"
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in services["infer"]  # CPU inference by default
    for name in ("prometheus", "alertmanager", "grafana"):
        assert name in services


def test_compose_viewer_ports_tokens_and_evidence():
    services = compose()["services"]
    cfg = load_config(COMPOSE_CONFIG, environ={"REDIS_PASSWORD": "x"})
    viewer, alert = services["viewer"], services["alert"]
    assert viewer["ports"] == [f"${{VIEWER_PORT:-{cfg.port('viewer')}}}:{cfg.port('viewer')}"]
    # Tokens come from .env only: each variable is passed through, never given a value in the file;
    # the operator token is required (compose refuses to start without it), the read-only one optional.
    assert viewer["environment"]["PLANTSIGHT_VIEWER_TOKEN"] == "${PLANTSIGHT_VIEWER_TOKEN:-}"
    operator = viewer["environment"]["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"]
    assert operator.startswith("${PLANTSIGHT_VIEWER_OPERATOR_TOKEN:?")
    assert alert["environment"]["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"] == operator  # POST /alerts/<id>/ack
    assert alert["environment"]["PLANTSIGHT_ALERTS__PUBLIC_URL"] == "${VIEWER_PUBLIC_URL:-}"
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if "TOKEN" in key or "PASSWORD" in key or "SECRET" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}", str(value)), f"{name}: {key} has a value"
    # Evidence: alert writes it, the viewer (and everyone else) only reads it, at alerts.evidence_dir.
    evidence_dir = str(cfg.alerts.evidence_dir)
    assert evidence_dir == "/evidence"
    writers = set()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, target, *mode = vol.split(":")
            if source == "evidence":
                assert target == evidence_dir, f"{name}: {vol}"
                if mode != ["ro"]:
                    writers.add(name)
    assert writers == {"alert"}
    assert f"evidence:{evidence_dir}:ro" in viewer["volumes"]
    example = env_example()
    assert all(example[v] == "" for v in TOKEN_VARS), ".env.example must not carry a usable token"
    text = (ROOT / ".env.example").read_text()
    assert "openssl rand -hex 24" in text
    with pytest.raises(MissingVariable, match="PLANTSIGHT_VIEWER_OPERATOR_TOKEN"):
        interpolate(operator, example)  # `cp .env.example .env` without a token: compose says what to set


def test_compose_viewer_starts_with_its_compose_environment(tmp_path):
    """The viewer as compose runs it: its environment interpolated from a .env with generated tokens,
    the compose config, a password-protected Redis; then its healthcheck, /readyz, /metrics, and the
    tokens at work on /api/me."""
    import secrets

    password = "compose-viewer-test-pass"
    dot_env = {**env_example(), "REDIS_PASSWORD": password,
               "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": secrets.token_hex(24), "PLANTSIGHT_VIEWER_TOKEN": secrets.token_hex(24)}
    svc = compose()["services"]["viewer"]
    env = {k: interpolate(str(v), dot_env) for k, v in svc["environment"].items()}
    assert env["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"] == dot_env["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"]
    redis_port, port = ports(2)
    server = subprocess.Popen([redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                               "--save", "", "--appendonly", "no", "--requirepass", password],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    env = {**env_without_plantsight(), **env, "PLANTSIGHT_PORT": str(port),  # this host's free ports
           "PLANTSIGHT_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0",
           "PLANTSIGHT_ALERTS__EVIDENCE_DIR": str(tmp_path / "evidence")}
    args = cli_parser().parse_args(svc["command"])
    config = str(COMPOSE_CONFIG) if args.config == "/etc/plantsight/plantsight.yaml" else args.config
    log = open(tmp_path / "viewer.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", args.service, "--config", config,
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        check = healthcheck_code(svc["healthcheck"]["test"])
        deadline = time.monotonic() + 30
        while subprocess.run([sys.executable, "-c", check], env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, (tmp_path / "viewer.log").read_text()
            assert time.monotonic() < deadline, "the compose healthcheck never passed"
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:  # it reaches Redis with the password
            assert time.monotonic() < deadline, (tmp_path / "viewer.log").read_text()
            time.sleep(0.2)
        metrics = httpx.get(f"{base}/metrics", timeout=5)  # Prometheus scrapes it without a token
        assert metrics.status_code == 200 and 'plantsight_redis_up{service="viewer"} 1.0' in metrics.text
        assert httpx.get(f"{base}/api/me", timeout=5).status_code == 401
        for var, role in (("PLANTSIGHT_VIEWER_OPERATOR_TOKEN", "operator"), ("PLANTSIGHT_VIEWER_TOKEN", "read")):
            me = httpx.get(f"{base}/api/me", headers={"Authorization": f"Bearer {dot_env[var]}"}, timeout=5)
            assert me.status_code == 200 and me.json() == {"role": role}
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        server.terminate()
        server.wait(10)
    logged = (tmp_path / "viewer.log").read_text()
    assert dot_env["PLANTSIGHT_VIEWER_OPERATOR_TOKEN"] not in logged and password not in logged


def test_example_secrets_are_refused_by_the_viewer():
    """Placeholders someone forgets to replace (secret.example.yaml) do not open the viewer."""
    import yaml

    (secret,) = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text())
                 if d["metadata"]["name"] == "plantsight-viewer"]
    data = secret["stringData"]
    assert set(data) == {"token", "operator-token"}
    for key, var in (("token", "PLANTSIGHT_VIEWER_TOKEN"), ("operator-token", "PLANTSIGHT_VIEWER_OPERATOR_TOKEN")):
        with pytest.raises(TokenError, match="shorter than 16 characters"):
            Tokens({var: data[key]})
    Tokens({"PLANTSIGHT_VIEWER_TOKEN": "x" * 16})  # the check is the length, not the name


def test_compose_redis_command_and_healthcheck_run(tmp_path):
    """The compose Redis command (AOF, requirepass from the environment) and its healthcheck, run here."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.skip("redis-server and redis-cli are not on PATH (apt-get install redis-server)")
    svc = compose()["services"]["redis"]
    shell, flag, line = [part.replace("$$", "$") for part in svc["command"]]  # compose's $$ escape
    port = ports(1)[0]
    env = {**os.environ, "REDIS_PASSWORD": 'a "quoted" pass word'}
    proc = subprocess.Popen([shell, flag, f"{line} --port {port} --bind 127.0.0.1 --dir {tmp_path}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        check = svc["healthcheck"]["test"][1].replace("$$", "$").replace("redis-cli", f"redis-cli -p {port}")
        deadline = time.monotonic() + 10
        while subprocess.run(["sh", "-c", check], env=env).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "the healthcheck never passed"
            time.sleep(0.1)
        client = redis.Redis(port=port, password=env["REDIS_PASSWORD"])
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert subprocess.run(["sh", "-c", check], env={**env, "REDIS_PASSWORD": "wrong"}).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_compose_file_matches_the_compose_specification():
    """The official Compose schema, as vendored by check-jsonschema (skips when that is not installed)."""
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    if not Path(exe).exists():
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    res = run([exe, "--builtin-schema", "vendor.compose-spec", COMPOSE])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_multistage_nonroot_healthcheck_variant():
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2 and any(" AS builder" in f for f in froms)
    first_from = next(i for i, (w, _) in enumerate(ins) if w == "FROM")
    assert ("ARG", "VARIANT=cpu") in ins[:first_from]
    assert froms[-1].startswith("runtime-${VARIANT}")
    assert any("nvidia/cuda" in rest for word, rest in ins if word == "ARG")
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["plantsight"]') in ins
    volumes = " ".join(rest for word, rest in ins if word == "VOLUME")
    assert "/models" in volumes and "/evidence" in volumes
    labels = " ".join(rest for word, rest in ins if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels
    (hc,) = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert "/healthz" in hc and "PLANTSIGHT_PORT" in hc
    exposed = {int(port) for word, rest in ins if word == "EXPOSE" for port in rest.split()}
    cfg = load_config(COMPOSE_CONFIG, environ={"REDIS_PASSWORD": "x"})
    assert exposed == {cfg.port(service) for service in RUNNABLE}


def test_dockerfile_copies_files_the_dockerignore_keeps():
    ignore = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from" in rest:
            continue
        for src in rest.split()[:-1]:
            assert (ROOT / src).exists(), src
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignore), f"{src} is excluded by .dockerignore"
    assert "pyproject.toml" in " ".join(rest for w, rest in dockerfile_instructions() if w == "COPY")


COMPOSE_SUBCOMMANDS = {"logs", "exec", "restart", "stop", "start", "up", "run", "ps", "cp"}
FLAGS_WITH_VALUES = {"--tail", "--scale", "--profile", "--config", "-c"}


def compose_command_services(text: str) -> set[str]:
    """Service names that the `docker compose …` commands of a document name."""
    names = set()
    for m in re.finditer(r"docker compose((?: [^\s`|#;']+)+)", text):
        words = m.group(1).split()
        while words and words[0] in FLAGS_WITH_VALUES:  # `docker compose --profile gpu up`
            words = words[2:]
        if not words or words[0] not in COMPOSE_SUBCOMMANDS:
            continue
        sub, words, skip = words[0], words[1:], False
        for word in words:
            if skip:
                skip = False
            elif word in FLAGS_WITH_VALUES:
                skip = True
            elif word.startswith("-"):
                continue
            elif sub == "cp":
                names |= {word.split(":")[0]} if ":" in word else set()
            else:
                names.add(word)
                if sub in ("exec", "run"):
                    break  # the rest is the command run in the container
    return names


def test_deploy_docs_cover_the_issue_and_name_real_services():
    """deploy/README.md has the sections an operator needs, its URLs use the compose ports, and every
    `docker compose` command in it and in the runbook names a service that exists."""
    readme = (DEPLOY / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    for needed in ("Quick start (docker compose)", "GPU inference", "Adding a camera", "Scaling out",
                   "Backing up Redis"):
        assert needed in headings
    services = compose()["services"]
    for name, url_port in (("viewer", "8080"), ("grafana", "3000")):
        published = services[name]["ports"][0]
        assert re.match(rf"\$\{{[A-Z_]+:-{url_port}\}}:", published), published
        assert f"http://SERVER:{url_port}" in readme, f"no {name} URL in deploy/README.md"
    quick = readme.split("## Quick start (docker compose)")[1].split("\n## ")[0]
    for needle in ("**Viewer**", "**Grafana**", "PLANTSIGHT_VIEWER_OPERATOR_TOKEN", "PLANTSIGHT_VIEWER_TOKEN",
                   "openssl rand -hex 24", "VIEWER_PUBLIC_URL"):
        assert needle in quick, needle
    assert "--profile gpu" in readme and "infer-gpu" in readme
    named = set()
    for doc in (readme, (DEPLOY / "RUNBOOK.md").read_text()):
        named |= compose_command_services(doc)
    assert {"alert", "viewer", "redis", "ingest", "infer-gpu"} <= named  # the parser finds them
    assert named - set(services) - {"<service>"} == set(), "commands name services compose does not have"
    assert compose_command_services("`docker compose logs --tail 5 viewr`, docker compose cp redis:/a b") == {
        "viewr", "redis"}
