"""The whole pipeline against the bare model, in one run.

    python -m bench pipeline [--task classify] [--arch simple_cnn] [--batch 8] [--seconds 60] [--cameras 4]

Starts a private redis-server and ``plantsight up`` (every service its own process) with synthetic
640×480 cameras in ``block`` mode sending as fast as they are allowed, waits for results and a
warm-up, then measures for ``--seconds``: frames through infer per second, capture → result latency
(the result entry's Redis id time minus the frame's ``ts``), per-stage throughput, time and CPU per
frame, drops, and the CPU per frame outside the networks (every service's and Redis's, less what infer
counts for its networks in ``plantsight_model_cpu_seconds_total``) against the floor of a plain JPEG
decode + resize. The same process runs the bare model the way infer loads it (same device, batch size,
input size and engine; on the CPU as many predictors at once as infer runs replicas, each with a
replica's torch threads) for ``--model-seconds``, half just before the pipeline starts and half just
after it stops; the ratio is against the mean of the two. When that is not the plain arrangement (one
predictor on torch's default threads), the plain one is measured too (``plain_bare_model``). Prints one
JSON object; progress goes to stderr. ``--rate`` caps the cameras' total frames per second (half the
saturating rate gives the latency target's load).

The cameras replay ``--replay`` pre-rendered JPEG frames (``synthetic://…&replay=N``): a real camera
hands ingest encoded bytes, so the scene renderer's CPU (about 20 ms a frame) is not the pipeline's
and is left out of the measurement; ``--render`` puts it back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.common import PrivateRedis, cpu_seconds, free_port, machine, percentile, rank, say, versions
from shared.keys import Keys
from shared.names import PIPELINE

SCENES = {"classify": "process", "detect": "equipment", "segment": "surface"}


def config(args, redis_url: str, ports: dict[str, int]) -> dict:
    fps = min(240.0, args.rate / args.cameras) if args.rate else 240.0
    replay = "" if args.render else f"&replay={args.replay}"
    cams = [{"id": f"cam{i}",
             "source": f"synthetic://{SCENES[args.task]}?w={args.width}&h={args.height}&seed={i}{replay}",
             "fps": fps, "tasks": [args.task], "on_full": "block", "queue": args.queue} for i in range(args.cameras)]
    model = {"path": args.model} if args.model else {"arch": args.arch}
    replicas = {"ingest": args.ingest, "preprocess": args.preprocess, "infer": args.infer}
    return {"redis": {"url": redis_url, "prefix": "bench"}, "cameras": cams, "models": {args.task: model},
            "services": {s: {"port": p, "replicas": replicas.get(s, 1)} for s, p in ports.items()},
            "inference": inference_options(args),
            # preprocess must not pause before infer has a full batch waiting
            "streams": {"results_maxlen": 200_000, "prepared_backlog": max(32, 4 * args.batch)}}


def inference_options(args) -> dict:
    """``inference:`` for the pipeline and the bare model alike."""
    out = {"device": args.device, "max_batch": args.batch, "max_wait_ms": args.max_wait_ms, "engine": args.engine,
           "amp": args.amp, "cuda_graphs": args.cuda_graphs, "decode": args.decode, "model_poll_s": 0,
           "read_from": args.read_from}
    if args.threads:
        out["threads"] = args.threads
    if args.channels_last is not None:
        out["channels_last"] = args.channels_last == "on"
    if args.batch_buckets is not None:
        out["batch_buckets"] = args.batch_buckets == "on"
    return out


def scrape(port: int) -> dict[tuple, float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **want) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == w for k, w in want.items()))


class Snapshot:
    """Counters of every service and the CPU time of every process at one moment."""

    def __init__(self, ports: dict[str, list[int]], pids: dict[str, list[int]], r, results: str):
        self.t = time.monotonic()
        self.metrics = {s: [scrape(p) for p in ps] for s, ps in ports.items()}
        self.cpu = {s: sum(cpu_seconds(p) for p in ps) for s, ps in pids.items()}
        last = r.xrevrange(results, count=1)
        self.last_result = last[0][0].decode() if last else "0-0"

    def count(self, service: str, name: str, **want) -> float:
        return sum(total(m, name, **want) for m in self.metrics.get(service, []))


def read_results(r, stream: str, after: str, until: str) -> list[tuple[str, dict]]:
    out, start = [], "(" + after
    while True:
        chunk = r.xrange(stream, min=start, max=until, count=2000)
        if not chunk:
            return out
        out += [(i.decode(), msgpack.unpackb(f[b"m"], raw=False)) for i, f in chunk]
        start = "(" + chunk[-1][0].decode()


def run_pipeline(args) -> dict:
    server = PrivateRedis()
    r = server.client()
    work = Path(tempfile.mkdtemp(prefix="plantsight-bench-"))
    ports = {s: free_port() for s in PIPELINE}
    cfg = config(args, server.url, ports)
    (work / "bench.yaml").write_text(yaml.safe_dump(cfg))
    log = open(work / "up.log", "wb+")
    say(f"pipeline: {args.cameras} camera(s) {args.width}x{args.height} JPEG → {args.task} {args.model or args.arch}, "
        f"batch {args.batch}, device {args.device}; log {work / 'up.log'}")
    # the viewer runs as in a plant, with a token of this run's own (else `up` would write one into ~/.config)
    env = {**os.environ, "PLANTSIGHT_VIEWER_TOKEN": secrets.token_urlsafe(24)}
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(work / "bench.yaml")],
                          stdout=log, stderr=subprocess.STDOUT, env=env)
    results = Keys(cfg["redis"]["prefix"]).results
    try:
        deadline = time.monotonic() + 300
        while r.xlen(results) == 0:
            if up.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the pipeline produced no result:\n{log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.5)
        say(f"first results; warming up for {args.warmup:g} s")
        time.sleep(args.warmup)
        log.seek(0)
        found: dict[str, list[int]] = {}
        for m in re.finditer(rb"plantsight up: (\w+)(?:#\d+)?\s+pid (\d+)\s+http://127.0.0.1:(\d+)", log.read()):
            found.setdefault(m.group(1).decode(), []).append((int(m.group(2)), int(m.group(3))))
        pids = {s: [p for p, _ in v] for s, v in found.items()}
        pids["redis"] = [server.proc.pid]  # the server's CPU is the pipeline's too
        sports = {s: [port for _, port in v] for s, v in found.items()}
        a = Snapshot(sports, pids, r, results)
        t_end = time.monotonic() + args.seconds
        while (left := t_end - time.monotonic()) > 0:
            time.sleep(min(5.0, left))
            say(f"measuring: {max(0.0, t_end - time.monotonic()):.0f} s left, {r.xlen(results)} results so far")
        b = Snapshot(sports, pids, r, results)
        window = read_results(r, results, a.last_result, b.last_result)
        redis_version = r.info("server")["redis_version"]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        server.close()
    log.close()
    shutil.rmtree(work, ignore_errors=True)  # kept (and named on stderr) only when the run failed
    return {**summarise(args, a, b, window, server), "redis_server": redis_version,
            "processes": {s: len(p) for s, p in pids.items()}}


def summarise(args, a: Snapshot, b: Snapshot, window: list, server) -> dict:
    span = b.t - a.t
    infer_n = (b.count("infer", "plantsight_frames_total", stage="infer")
               - a.count("infer", "plantsight_frames_total", stage="infer"))
    lat = [int(i.split("-")[0]) - m["ts"] / 1e6 for i, m in window]
    stages = {}
    for s, stage in (("ingest", "ingest"), ("preprocess", "preprocess"), ("infer", "infer")):
        if s not in b.cpu:  # read_from: frames runs no preprocess
            continue
        n = b.count(s, "plantsight_frames_total", stage=stage) - a.count(s, "plantsight_frames_total", stage=stage)
        stages[s] = {"fps": round(n / span, 1), "cpu_ms_per_frame": round((b.cpu[s] - a.cpu[s]) / max(n, 1) * 1000, 2)}
    for s in [s for s in ("preprocess", "infer") if s in stages]:
        t = [m["t"].get(s, 0.0) for _, m in window]
        stages[s]["ms_per_frame"] = round(sum(t) / max(len(t), 1) * 1000, 3)
    bs = (b.count("infer", "plantsight_batch_size_sum") - a.count("infer", "plantsight_batch_size_sum"),
          b.count("infer", "plantsight_batch_size_count") - a.count("infer", "plantsight_batch_size_count"))
    inf_s = b.count("infer", "plantsight_inference_seconds_sum") - a.count("infer", "plantsight_inference_seconds_sum")
    stages["infer"]["batch_mean"] = round(bs[0] / bs[1], 2) if bs[1] else None
    stages["infer"]["model_ms_per_batch"] = round(inf_s / bs[1] * 1000, 2) if bs[1] else None
    for s in ("alert", "redis"):
        stages[s] = {"cpu_ms_per_frame": round((b.cpu[s] - a.cpu[s]) / max(infer_n, 1) * 1000, 2)}
    dropped: dict[str, float] = {}
    for s in PIPELINE:
        for snap, sign in ((b, 1), (a, -1)):
            for m in snap.metrics.get(s, []):
                for (n, lab), v in m.items():
                    if n == "plantsight_frames_dropped_total" and v:
                        key = f"{dict(lab)['stage']}:{dict(lab)['reason']}"
                        dropped[key] = dropped.get(key, 0) + sign * v
    cpu_all = sum(b.cpu[s] - a.cpu[s] for s in b.cpu)
    model_cpu = (b.count("infer", "plantsight_model_cpu_seconds_total")
                 - a.count("infer", "plantsight_model_cpu_seconds_total"))
    stages["infer"]["model_cpu_ms_per_frame"] = round(model_cpu / max(infer_n, 1) * 1000, 2)
    return {
        "pipeline_fps": round(infer_n / span, 1),
        "p50_ms": _r(percentile(lat, 50)), "p95_ms": _r(percentile(lat, 95)), "p99_ms": _r(percentile(lat, 99)),
        "stages": stages,
        "cpu_ms_per_frame_all_services": round(cpu_all / max(infer_n, 1) * 1000, 2),  # Redis included
        # what the same processes spent outside the networks (infer's metrics.ModelCpu), Redis included
        "cpu_outside_model_ms_per_frame": round((cpu_all - model_cpu) / max(infer_n, 1) * 1000, 2),
        # the same less the alert service: what it costs to feed the model (ingest, codec,
        # Redis, decode, resize, batching), the alert rules on the results being work of their own
        "cpu_feeding_model_ms_per_frame": round((cpu_all - model_cpu - (b.cpu["alert"] - a.cpu["alert"]))
                                                / max(infer_n, 1) * 1000, 2),
        "dropped": {k: v for k, v in dropped.items() if v},
        "latency_parts": latency_parts(window),
        "results_in_window": len(window), "seconds": round(span, 1),
    }


def latency_parts(window: list) -> dict:
    """Where each frame's capture → result went, split at its entry in ``{P}:frames`` (``frame_id``):
    ``to_frames_ms`` is ingest's part (capture, the camera's queue, back-pressure, the ``XADD``) and
    ``after_frames_ms`` the rest (waiting in the stream, the batch filling, the model, writing the result).
    Both ends are Redis ids' milliseconds or the capture clock of the same machine, so a part can read up
    to 1 ms under the truth. Given at the median and the 99th percentile of each part, and as the mean of
    each over the slowest 1 % of frames (``slowest_1pct``): which side a long tail comes from."""
    rows = []
    for i, m in window:
        done, written = int(i.split("-")[0]), int(m["frame_id"].split("-")[0])
        rows.append((done - m["ts"] / 1e6, written - m["ts"] / 1e6, done - written, m["t"].get("infer", 0.0) * 1000))
    if not rows:
        return {}
    rows.sort(key=lambda r: r[0])
    tail = rows[rank(len(rows), 99):]  # from the p99 frame up

    def mean(k: int) -> float:
        return _r(sum(r[k] for r in tail) / len(tail))

    def spread(k: int) -> dict:
        return {"p50": _r(percentile([r[k] for r in rows], 50)), "p99": _r(percentile([r[k] for r in rows], 99))}

    return {"to_frames_ms": spread(1), "after_frames_ms": spread(2),
            "slowest_1pct": {"frames": len(tail), "total_ms": mean(0), "to_frames_ms": mean(1),
                             "after_frames_ms": mean(2), "model_ms_per_frame": mean(3)}}


def _r(v):
    return None if v is None else round(v, 1)


def decode_floor_ms(width: int, height: int, size: tuple[int, int], n: int = 100) -> float:
    """The floor: CPU ms to decode one of the synthetic cameras' JPEGs at full size and resize it to the
    network input, the plain way (``cv2.imdecode``, then ``cv2.resize`` bilinear, one thread), best of 3."""
    import cv2
    import numpy as np

    from shared.data.scenes import scene_from_source
    from shared.imaging import encode

    img, _ = scene_from_source(f"synthetic://process?w={width}&h={height}&seed=0").render(0)
    _, data = encode(img, 90)
    buf = np.frombuffer(data, np.uint8)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            cv2.resize(cv2.imdecode(buf, cv2.IMREAD_COLOR), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        best = min(best, (time.process_time() - t0) / n * 1000)
    cv2.setNumThreads(threads)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="classify", choices=sorted(SCENES))
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--model", help="a model directory instead of an untrained --arch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--model-seconds", type=float, default=20.0)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--rate", type=float, help="total frames per second of all cameras (default: as fast as allowed)")
    ap.add_argument("--half-load", action="store_true",
                    help="then run again with the cameras at half the measured pipeline_fps and report the latency "
                         "there against max_wait_ms + 2 × the model's batch time")
    ap.add_argument("--queue", type=int, default=8, help="frames per camera that may wait for preprocess")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--preprocess", type=int, default=1, help="preprocess replicas")
    ap.add_argument("--ingest", type=int, default=1, help="ingest replicas (they share the cameras out)")
    ap.add_argument("--infer", type=int, default=1, help="infer replicas (on one GPU: decode and Python in parallel)")
    ap.add_argument("--replay", type=int, default=50, help="pre-rendered frames each camera sends in a loop")
    ap.add_argument("--render", action="store_true", help="render and encode every frame in ingest instead")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int,
                    help="infer's torch threads (default: torch's, or the cores shared out among "
                                                  "--infer replicas on the CPU); the bare model gets the same")
    ap.add_argument("--bare-workers", type=int, help="predictors the bare model runs at once (default: --infer on "
                                                       "the CPU, 1 on CUDA)")
    ap.add_argument("--engine", default="auto", choices=["auto", "eager", "torchscript", "onnx", "int8"])
    ap.add_argument("--decode", default="preprocess", choices=["preprocess", "infer"])
    ap.add_argument("--read-from", default="prepared", choices=["prepared", "frames"],
                    help="frames: infer reads the cameras' stream itself (no preprocess process)")
    ap.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "off"])
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--channels-last", choices=["on", "off"])
    ap.add_argument("--batch-buckets", choices=["on", "off"])
    args = ap.parse_args(argv)

    import torch

    from services.inference.loading import pick_device
    from shared.config import InferenceConfig

    device = pick_device(args.device)
    start = machine(device)
    out = {"mode": "pipeline", "task": args.task, "arch": args.arch, "model": args.model, "batch": args.batch,
           "max_wait_ms": args.max_wait_ms, "cameras": args.cameras, "frame": [args.height, args.width],
           "rate": args.rate, "decode": args.decode, "read_from": args.read_from, "infer_threads": args.threads,
           "source": "render" if args.render else f"replay {args.replay}",
           "ingest_replicas": args.ingest, "infer_replicas": args.infer,
           "preprocess_replicas": 0 if args.read_from == "frames" else args.preprocess, **start}
    from bench.engines import bare_model, measure
    from services.inference.loading import torch_threads

    inf = InferenceConfig(**{**inference_options(args), "device": device})
    # The bare model runs as infer does: as many predictors at once as infer runs replicas on the CPU (on
    # CUDA one: the GPU figures have always been against one), with the threads each replica gets.
    workers = args.bare_workers or (1 if device.startswith("cuda") else args.infer)
    default_threads = torch.get_num_threads()
    threads = torch_threads(inf, workers, device) or default_threads
    plain = (workers, threads) != (1, default_threads)
    out.update(bare_workers=workers, bare_torch_threads=threads)
    arch = None if args.model else args.arch
    if plain:  # and, for comparison, the plain arrangement: one predictor on torch's default threads
        say(f"plain bare model (1 × {default_threads} threads) for {args.model_seconds / 2:g} s (and again after)")
        plain_before, plain_predictors = bare_model(args.task, arch, args.model, device, inf, args.model_seconds / 2)
    torch.set_num_threads(threads)
    say(f"bare model ({workers} × {threads} threads) for {args.model_seconds / 2:g} s (and again after the pipeline)")
    before, predictors = bare_model(args.task, arch, args.model, device, inf, args.model_seconds / 2, workers)
    predictor = predictors[0]
    floor = decode_floor_ms(args.width, args.height, predictor.input_size())  # while the machine is quiet (and after)
    out.update(run_pipeline(args))
    say(f"bare model again for {args.model_seconds / 2:g} s")
    after = measure(predictors, inf.max_batch, args.model_seconds / 2, predictor.input_size(), predictor.meta.channels)
    if plain:
        torch.set_num_threads(default_threads)
        plain_after = measure(plain_predictors, inf.max_batch, args.model_seconds / 2, predictor.input_size(),
                              predictor.meta.channels)
    # a floor: noise only adds to it, so the lower of the two quiet measurements
    floor = min(floor, decode_floor_ms(args.width, args.height, predictor.input_size()))
    # A shared machine drifts by several per cent over minutes: the pipeline is compared with the mean of the
    # model measured just before and just after it.
    bare = {k: round((before[k] + after[k]) / 2, 2) for k in ("img_per_s", "ms_per_batch", "cpu_ms_per_img")}
    out["model_fps"] = bare["img_per_s"]
    out["bare_model"] = {**bare, "before": before, "after": after, "engine": before["engine"],
                         "input": list(predictor.input_size())}
    out["engine"] = before["engine"]
    if plain:
        fps = round((plain_before["img_per_s"] + plain_after["img_per_s"]) / 2, 2)
        out["plain_bare_model"] = {"img_per_s": fps, "workers": 1, "torch_threads": default_threads,
                                   "before": plain_before, "after": plain_after,
                                   "pipeline_vs_plain": round(out["pipeline_fps"] / fps, 3) if fps else None}
    out["ratio"] = round(out["pipeline_fps"] / bare["img_per_s"], 3) if bare["img_per_s"] else None
    # Outside the model: all the pipeline's CPU less what its networks used, counted in infer itself. The
    # older estimate, less the bare model's CPU measured in another process before and after, is kept beside
    # it: it also charges the pipeline for the model running slower when it shares the cores (and carries
    # that process's drift, ±2 ms a frame on a busy VM).
    outside = out["cpu_outside_model_ms_per_frame"]
    out["cpu_outside_bare_model_ms_per_frame"] = round(out["cpu_ms_per_frame_all_services"] - bare["cpu_ms_per_img"], 2)
    out["decode_resize_floor_ms"] = round(floor, 2)
    out["outside_vs_floor"] = round(outside / floor, 2) if floor else None
    out["feeding_vs_floor"] = round(out["cpu_feeding_model_ms_per_frame"] / floor, 2) if floor else None
    if args.half_load and out["pipeline_fps"]:
        import copy

        half = copy.copy(args)
        half.rate = out["pipeline_fps"] / 2
        say(f"half load: cameras at {half.rate:.1f} frames/s in all")
        h = run_pipeline(half)
        batch_ms = bare["ms_per_batch"]
        target = args.max_wait_ms + 2 * batch_ms
        out["half_load"] = {"rate": round(half.rate, 2), "pipeline_fps": h["pipeline_fps"], "p50_ms": h["p50_ms"],
                            "p95_ms": h["p95_ms"], "p99_ms": h["p99_ms"], "target_p99_ms": round(target, 1),
                            "within_target": h["p99_ms"] is not None and h["p99_ms"] <= target,
                            "batch_mean": h["stages"]["infer"]["batch_mean"], "dropped": h["dropped"],
                            "latency_parts": h["latency_parts"]}
    out["load_average_end"] = machine(device)["load_average"]
    out["versions"] = versions()
    keys = ["pipeline_fps", "model_fps", "ratio", "p50_ms", "p95_ms", "p99_ms"]
    print(json.dumps({**{k: out.pop(k) for k in keys}, **out}))
    return 0
