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

import pytest
import redis

from services.cli import parser as cli_parser
from shared.config import TASKS, load_config
from tests.conftest import ports
from tests.deploy.helpers import (COMPOSE, COMPOSE_CONFIG, DOCKERFILE, ROOT, RUNNABLE, compose, compose_variables,
                                  dockerfile_instructions, env_example, run)


def test_compose_variables_are_all_in_env_example():
    used = compose_variables(COMPOSE.read_text())
    listed = env_example()
    assert {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= used
    assert used - set(listed) == set(), "variables missing from .env.example"
    assert set(listed) - used == set(), ".env.example lists variables docker-compose.yml does not use"
    assert compose_variables("a ${X:-1} ${Y:?no} ${Z} $W $$NOT") == {"X", "Y", "Z", "W"}


def test_compose_services_run_real_plantsight_services():
    services = compose()["services"]
    assert "viewer" not in services  # not runnable yet; see the comment in docker-compose.yml
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
