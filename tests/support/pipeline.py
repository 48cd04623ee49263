"""A running `plantsight up` (config, log, results, metrics) and what tests check of the pipeline's streams."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.keys import Keys
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT


class Up:
    """A running `plantsight up` with its config, log and Redis client."""

    def __init__(self, cfg: dict, tmp: Path, r, extra_env: dict | None = None):
        self.cfg, self.r = cfg, r
        self.prefix = cfg["redis"]["prefix"]
        self.keys = Keys(self.prefix)
        self.path = tmp / "plantsight.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "up.log"
        env = {**env_without_plantsight(), **(extra_env or {})}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(self.path)],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def port(self, service: str) -> int:
        return self.cfg["services"][service]["port"]

    def results(self) -> list[dict]:
        return [msgpack.unpackb(f[b"m"], raw=False) for _, f in self.r.xrange(self.keys.results)]

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"plantsight up exited early with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.25)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}")

    def replica_ports(self, service: str) -> list[int]:
        """The ports of a service's replicas, as `plantsight up` printed them (the first is the config's)."""
        self.log.flush()
        return [int(p) for p in re.findall(rf"plantsight up: {service}(?:#\d+)?\s+pid \d+\s+http://127\.0\.0\.1:(\d+)",
                                           self.log_path.read_text(errors="replace"))]

    def metrics(self, service: str, port: int | None = None) -> dict[tuple, float]:
        """Samples of one service's /metrics (one replica's, at ``port``) as {(name, sorted labels): value}."""
        deadline = time.monotonic() + 60  # the service may still be starting (torch import, model build)
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port or self.port(service)}/metrics", timeout=5).text
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.25)
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def counter(self, service: str, name: str, port: int | None = None, **labels) -> float:
        """Sum of a counter's samples whose labels include ``labels`` (one replica's, at ``port``)."""
        total = 0.0
        for (n, lab), v in self.metrics(service, port).items():
            d = dict(lab)
            if n == name and all(d.get(k) == v2 for k, v2 in labels.items()):
                total += v
        return total

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"plantsight up did not stop within {timeout} s\n{self.tail()}")
        self.log.close()
        return self.proc.returncode


def per_key(results: list[dict]) -> collections.Counter:
    return collections.Counter((m["camera"], m["seq"], m["task"]) for m in results)


def groups_idle(r, prefix: str, tasks, read_from: str = "prepared") -> bool:
    """Nothing undelivered and nothing pending in any consumer group of the pipeline."""
    keys = Keys(prefix)
    pairs = [(keys.results, Keys.ALERT)]
    if read_from == "frames":  # infer's group of each task reads the frames itself
        pairs += [(keys.frames, Keys.infer_group(t)) for t in tasks]
    else:
        pairs += [(keys.frames, Keys.PREPROCESS)] + [(keys.prepared(t), Keys.infer_group(t)) for t in tasks]
    for stream, group in pairs:
        for g in r.xinfo_groups(stream):
            if g["name"].decode() == group:
                undelivered = r.xrange(stream, min="(" + g["last-delivered-id"].decode(), max="+", count=1)
                if g["pending"] or undelivered:
                    return False
    return True
