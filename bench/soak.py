"""Soak: 8 synthetic cameras through every service for a while; memory, stream bounds and drops.

    python -m bench.soak [--seconds 600] [--warmup 60] [--redis-url URL]

Runs `plantsight up` on a private redis-server, samples each service's RSS every 10 s after the
warm-up, and prints one JSON object: RSS per process (start, end, min, max, and the growth from the
median of the first third of the samples to the median of the last third), stream lengths, frames
published/processed and dropped by reason, and whether RSS growth stayed within 5 %.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.common import PrivateRedis, free_port
from shared.names import PIPELINE

SAMPLE_S = 10.0
SCENES = {"classify": "process", "detect": "equipment", "segment": "surface", "thermal": "thermal"}


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
    server = PrivateRedis()
    rport = server.port
    ports = {s: free_port() for s in PIPELINE}
    (work / "soak.yaml").write_text(yaml.safe_dump(config(f"redis://127.0.0.1:{rport}/0", ports)))
    log = open(work / "up.log", "wb+")
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(work / "soak.yaml")],
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(args.warmup)
        log.seek(0)
        pids = {m.group(1): int(m.group(2)) for m in re.finditer(rb"plantsight up: (\w+)\s+pid (\d+)", log.read())}
        pids = {k.decode(): v for k, v in pids.items()}
        samples: dict[str, list[int]] = {s: [] for s in pids}
        t0, last_print = time.monotonic(), 0.0
        while (left := args.seconds - (time.monotonic() - t0)) > 0:
            for s, p in pids.items():
                samples[s].append(rss_bytes(p))
            if time.monotonic() - last_print >= 30:
                last_print = time.monotonic()
                print(f"soak: {left:5.0f} s left; RSS MiB " +
                      " ".join(f"{s} {v[-1] / 2**20:.0f}" for s, v in samples.items()), file=sys.stderr, flush=True)
            time.sleep(min(SAMPLE_S, left))
        for s, p in pids.items():
            samples[s].append(rss_bytes(p))
        r = redis.Redis(port=rport)
        lengths = {k.decode(): r.xlen(k) for k in r.scan_iter("soak:*") if r.type(k) == b"stream"}
        metrics = {s: counters(p) for s, p in ports.items()}
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
        server.close()

    def total(service, name, **want):
        return sum(v for (n, lab), v in metrics[service].items()
                   if n == name and all(dict(lab).get(k) == w for k, w in want.items()))

    dropped: dict[str, float] = {}
    for s in PIPELINE:
        for (n, lab), v in metrics[s].items():
            if n == "plantsight_frames_dropped_total" and v:
                key = f"{dict(lab)['stage']}:{dict(lab)['reason']}"
                dropped[key] = dropped.get(key, 0) + v
    # RSS of a PyTorch process breathes with batch sizes; growth is judged on the trend: the median of
    # the last third of the samples against the median of the first third.
    def third(v, which):
        k = max(1, len(v) // 3)
        return statistics.median(v[:k] if which == "first" else v[-k:])

    growth = {s: third(v, "last") / third(v, "first") - 1 for s, v in samples.items() if v and v[0]}
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    out = {
        "seconds": args.seconds, "warmup_s": args.warmup, "cameras": 8,
        "rss_mib": {s: {"start": mib(v[0]), "end": mib(v[-1]), "min": mib(min(v)), "max": mib(max(v)),
                        "median_first_third": mib(third(v, "first")), "median_last_third": mib(third(v, "last")),
                        "growth": round(growth.get(s, 0.0), 4)} for s, v in samples.items()},
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
