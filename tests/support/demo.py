"""`plantsight up --demo` as a real process on a Redis of its own, with the viewer's tokens and free ports."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.ports import ports
from tests.support.redis_server import RedisServer

READ = "read-" + secrets.token_hex(16)
OPERATOR = "oper-" + secrets.token_hex(16)
SERVICES = ("ingest", "preprocess", "infer", "alert", "viewer")


class Demo:
    """The demo pipeline; ``trained``: with the demo's trained models (else every network untrained)."""

    def __init__(self, tmp, *, trained: bool = False):
        self.redis = RedisServer()
        self.r = self.redis.client()
        self.ports = dict(zip(SERVICES, ports(len(SERVICES))))
        self.evidence = tmp / "evidence"
        env = env_without_plantsight() | {
            "PLANTSIGHT_REDIS__URL": self.redis.url,
            **({} if trained else {"PLANTSIGHT_DEMO_MODELS": str(tmp / "no-models")}),
            "PLANTSIGHT_VIEWER_TOKEN": READ, "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": OPERATOR,
            "PLANTSIGHT_ALERTS__EVIDENCE_DIR": str(self.evidence),
            **{f"PLANTSIGHT_SERVICES__{name.upper()}__PORT": str(port) for name, port in self.ports.items()}}
        self.log_path = tmp / "up.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--demo"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.ports['viewer']}"

    def get(self, path: str, token: str | None = READ, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.base + path, headers=headers, timeout=10, **kw)

    def post(self, path: str, token: str | None = OPERATOR, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.base + path, headers=headers, timeout=10, **kw)

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except httpx.TransportError:
                value = None
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"plantsight up exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.redis.close()
