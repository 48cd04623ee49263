"""The transport alone: plantsight's codec and one Redis hop per frame, beside a bare redis-py loop.

    python -m bench transport [--shape 224 224 3] [--batch 8] [--seconds 10]

Both loops move the same frames through a private redis-server in the same run, one ``XADD`` per
frame and one ``XREADGROUP`` of ``--batch`` entries followed by their acknowledgement:

- plantsight: build a ``Prepared`` message, ``to_msgpack``, ``Producer.add``; ``GroupReader.read``,
  ``Prepared.from_msgpack`` and ``.array()`` (zero-copy), ``XACK`` in an ``Outbox`` (MULTI);
- bare: ``XADD {"m": payload}`` of the same bytes, ``XREADGROUP``, ``XACK``.

Prints one JSON object with frames per second of each and ``overhead`` = bare fps / plantsight fps;
both loops warm up for a second, then run ``--rounds`` times each, interleaved and in alternating
order; each loop's figure is the median of its rounds (a shared machine's speed drifts by tens of
per cent over seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from bench.common import PrivateRedis, machine, say, service_heap, versions


def plantsight_loop(r, frame: np.ndarray, batch: int, seconds: float) -> float:
    from shared.keys import Keys
    from shared.messages import Prepared
    from shared.streams.outbox import Outbox
    from shared.streams.producer import Producer
    from shared.streams.reader import DeadLetters, GroupReader

    keys = Keys("tp")
    stream = keys.prepared("classify")
    prod = Producer(r, stream, maxlen=10_000)
    rd = GroupReader(r, stream, "g", "c", dead=DeadLetters(r, keys, 3600, "bench"), count=batch, block_ms=1000,
                     claim_idle_ms=3_600_000, max_deliveries=3, max_bytes=32 << 20)
    rd.setup()
    rd._next_claim = float("inf")  # no idle claims in a benchmark
    data = frame.tobytes()
    n, seq, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            msg = Prepared(camera="c", seq=seq, ts=time.time_ns(), task="classify", frame_id="1-0", shape=frame.shape,
                           dtype="uint8", data=data, orig=[480, 640], letterbox=[1.0, 0, 0])
            prod.add(msg.to_msgpack(), cam="c", task="classify")
            seq += 1
        entries = rd.read(count=batch)
        for e in entries:
            Prepared.from_msgpack(e.payload).array()
        box = Outbox(r)
        rd.ack(box, [e.id for e in entries])
        box.commit()
        n += len(entries)
    return n / (time.perf_counter() - t0)


def bare_loop(r, frame: np.ndarray, batch: int, seconds: float) -> float:
    from shared.messages import Prepared

    stream = "tp:bare"
    r.xgroup_create(stream, "g", id="0", mkstream=True)
    payload = Prepared(camera="c", seq=0, ts=time.time_ns(), task="classify", frame_id="1-0", shape=frame.shape,
                       dtype="uint8", data=frame.tobytes(), orig=[480, 640], letterbox=[1.0, 0, 0]).to_msgpack()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            r.xadd(stream, {"m": payload}, maxlen=10_000, approximate=True)
        reply = r.xreadgroup("g", "c", {stream: ">"}, count=batch, block=1000)
        ids = [i for _, items in reply for i, _f in items]
        r.xack(stream, "g", *ids)
        n += len(ids)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench transport", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[224, 224, 3], metavar=("H", "W", "C"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="per loop, split over its rounds")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of each loop")
    args = ap.parse_args(argv)

    service_heap()
    frame = np.random.default_rng(0).integers(0, 256, args.shape, dtype=np.uint8)
    server = PrivateRedis()
    try:
        r = server.client()
        out = {"mode": "transport", "shape": args.shape, "frame_bytes": int(frame.nbytes), "batch": args.batch,
               **machine("cpu")}
        ps, bare = [], []
        loops = {"plantsight codec + Redis hop": (plantsight_loop, ps), "bare redis-py loop": (bare_loop, bare)}
        say("warm-up: each loop for 1 s")  # Redis's allocator and the sockets warm on the first frames
        for fn, _ in loops.values():
            fn(r, frame, args.batch, 1.0)
            r.flushall()
        # Interleaved rounds in alternating order, so neither a change in the machine's load nor going
        # first after a FLUSHALL favours one loop.
        for k in range(args.rounds):
            for name in (list(loops) if k % 2 == 0 else list(reversed(loops))):
                fn, figures = loops[name]
                say(f"{name}, {args.seconds / args.rounds:g} s ({k + 1}/{args.rounds})")
                figures.append(fn(r, frame, args.batch, args.seconds / args.rounds))
                r.flushall()
        p_fps, b_fps = statistics.median(ps), statistics.median(bare)
        out.update({"plantsight_fps": round(p_fps, 1), "bare_fps": round(b_fps, 1),
                    "plantsight_us_per_frame": round(1e6 / p_fps, 1), "bare_us_per_frame": round(1e6 / b_fps, 1),
                    "overhead": round(b_fps / p_fps, 3),
                    "rounds": {"plantsight_fps": [round(v) for v in ps], "bare_fps": [round(v) for v in bare]},
                    "load_average_end": machine("cpu")["load_average"], "versions": versions(r)})
    finally:
        server.close()
    print(json.dumps(out))
    return 0
