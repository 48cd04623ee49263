"""``bench ingest``: the CPU one frame costs ingest, away from the networks' noise.

Runs the real ingest service (its own process, cameras replaying JPEG at ``--camera-fps``) against a
private Redis, and in this process a reader that stands in for the stage reading ``{P}:frames``: it
takes up to ``--batch`` frames with its consumer group, holds them as long as a model running at
``--rate`` frames/s would, acknowledges them and writes one entry per frame to the stream ingest's
blocked cameras wait on (results with ``read_from: frames``, the task's prepared stream without).
Cameras faster than the reader (the default, 4 × 240 fps against 67) are blocked most of the time, as
in ``bench pipeline``; ``--camera-fps`` below ``rate / cameras`` paces them like real cameras instead.
Each camera loops ``--replay`` pre-rendered frames; ``--replay 1`` is a still camera (the frozen check's case).

Prints one JSON object: ingest's and the Redis server's CPU ms per frame read, and the Redis commands
per frame (``INFO commandstats``, the reader's included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import PrivateRedis, cpu_seconds, free_port, machine, say, versions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--camera-fps", type=float, default=240.0, help="each camera's fps (default: faster than --rate)")
    ap.add_argument("--rate", type=float, default=67.0, help="frames/s the stand-in reader takes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--queue", type=int, default=8, help="frames per camera that may wait for the reader")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--read-from", choices=["prepared", "frames"], default="frames",
                    help="which layout's group reads the frames (inference.read_from)")
    ap.add_argument("--replay", type=int, default=50,
                    help="pre-rendered frames each camera loops (1: a still camera, the same picture every frame)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    args = ap.parse_args(argv)

    from shared.config import load_config
    from shared.keys import Keys

    server = PrivateRedis()
    r = server.client()
    work = Path(tempfile.mkdtemp(prefix="plantsight-bench-ingest-"))
    cams = [{"id": f"cam{i}", "fps": args.camera_fps, "tasks": ["classify"], "on_full": "block", "queue": args.queue,
             "source": f"synthetic://process?w={args.width}&h={args.height}&seed={i}&replay={args.replay}"}
            for i in range(args.cameras)]
    raw = {"redis": {"url": server.url, "prefix": "bench"}, "cameras": cams,
           "models": {"classify": {"arch": "simple_cnn"}}, "services": {"ingest": {"port": free_port()}},
           "inference": {"read_from": args.read_from}}
    cfg = load_config(data=raw, environ={})
    keys = Keys.for_config(cfg)
    (group,), (progress,) = keys.frame_groups(["classify"]), keys.frame_readers_write(["classify"])
    (work / "bench.yaml").write_text(yaml.safe_dump(raw))
    say(f"ingest: {args.cameras} camera(s) {args.width}x{args.height} JPEG at {args.camera_fps:g} fps, read by "
        f"{group} at {args.rate:g} frames/s in batches of {args.batch}")
    log = open(work / "ingest.log", "wb+")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "ingest", "--config",
                             str(work / "bench.yaml")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not r.exists(keys.frames):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"ingest published nothing:\n{log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.1)

        def read(seconds: float) -> int:
            """Take frames as a model at ``rate`` would for ``seconds``; the number taken."""
            n, due = 0, time.monotonic()
            end = due + seconds
            while time.monotonic() < end:
                got = r.xreadgroup(group, "bench", {keys.frames: ">"}, count=args.batch, block=200)
                ids = [i for i, _ in got[0][1]] if got else []
                if not ids:
                    continue
                due = max(due, time.monotonic() - 1.0) + len(ids) / args.rate
                time.sleep(max(0.0, due - time.monotonic()))
                pipe = r.pipeline(transaction=True)  # as infer writes results and acks in one MULTI
                for _ in ids:
                    pipe.xadd(progress, {"m": b"result"}, maxlen=10_000, approximate=True)
                pipe.xack(keys.frames, group, *ids)
                pipe.execute()
                n += len(ids)
            return n

        say(f"warming up for {args.warmup:g} s")
        read(args.warmup)
        r.config_resetstat()
        t0, cpu0, rcpu0 = time.monotonic(), cpu_seconds(proc.pid), cpu_seconds(server.proc.pid)
        say(f"measuring for {args.seconds:g} s")
        n = read(args.seconds)
        span, cpu, rcpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0, cpu_seconds(server.proc.pid) - rcpu0
        calls = {k.removeprefix("cmdstat_"): round(v["calls"] / max(n, 1), 3)
                 for k, v in r.info("commandstats").items() if k != "cmdstat_config|resetstat"}
        out = {"mode": "ingest", "cameras": args.cameras, "camera_fps": args.camera_fps, "replay": args.replay,
               "rate": args.rate,
               "batch": args.batch, "queue": args.queue, "frame": [args.height, args.width],
               "read_from": args.read_from, "reader": {"group": group, "writes": progress}, "frames_read": n,
               "seconds": round(span, 1), "fps": round(n / span, 1),
               "ingest_cpu_ms_per_frame": round(cpu / max(n, 1) * 1000, 3),
               "redis_cpu_ms_per_frame": round(rcpu / max(n, 1) * 1000, 3),
               "redis_calls_per_frame": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
               **machine("cpu"), "redis_server": r.info("server")["redis_version"], "versions": versions(r)}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.close()
        log.close()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
