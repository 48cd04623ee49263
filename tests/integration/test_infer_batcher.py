"""infer's batcher on a real Redis: fills to max_batch, closes max_wait_ms after the first frame, keeps each
camera's order, reads the next batch while one is out, and never acknowledges before the results are written."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.inference.batcher import PREFETCH, Batcher, collect
from services.inference.service import InferService
from shared.config import load_config
from shared.keys import Keys
from shared.messages import Prepared, Result
from shared.streams.connection import ensure_group
from shared.streams.reader import DeadLetters, GroupReader


def prepared(seq: int, camera: str = "c1") -> bytes:
    img = np.full((32, 32, 3), seq % 255, np.uint8)
    return Prepared(camera=camera, seq=seq, ts=time.time_ns(), task="classify", frame_id=f"1-{seq}",
                    shape=img.shape, dtype="uint8", data=img.tobytes(), orig=[48, 64],
                    letterbox=[1.0, 0, 0]).to_msgpack()


def reader(r, prefix: str, consumer: str = "w1", claim_idle_ms: int = 60_000) -> GroupReader:
    names = Keys(prefix)
    rd = GroupReader(r, names.prepared("classify"), Keys.infer_group("classify"), consumer,
                     dead=DeadLetters(r, names, 3600, "infer"), count=8, block_ms=100, claim_idle_ms=claim_idle_ms,
                     max_deliveries=5, max_bytes=1 << 20)
    rd.setup()
    return rd


def seqs(entries) -> list[tuple[str, int]]:
    import msgpack

    return [(m["camera"], m["seq"]) for m in (msgpack.unpackb(e.payload, raw=False) for e in entries)]


def test_a_batch_closes_at_max_batch_without_waiting_for_max_wait(r, prefix):
    rd = reader(r, prefix)
    for seq in range(10):
        r.xadd(rd.stream, {"m": prepared(seq)})
    # max_wait_ms is a minute: had the batch not closed at max_batch, this would hang for it.
    entries, _ = collect(rd, 4, 60_000, 100, threading.Event())
    assert [s for _, s in seqs(entries)] == [0, 1, 2, 3]
    entries, _ = collect(rd, 4, 60_000, 100, threading.Event())
    assert [s for _, s in seqs(entries)] == [4, 5, 6, 7]


def test_a_batch_closes_max_wait_ms_after_its_first_frame_while_frames_keep_coming(r, prefix):
    rd = reader(r, prefix)
    stop = threading.Event()

    def trickle():  # one frame every 20 ms, for longer than the batch may stay open
        seq = 0
        while not stop.is_set() and seq < 500:
            r.xadd(rd.stream, {"m": prepared(seq)})
            seq += 1
            time.sleep(0.02)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        entries, first = collect(rd, 1000, 300, 5000, threading.Event())
        closed = time.monotonic()
    finally:
        stop.set()
        t.join()
    # It waited for more frames after the first, but not for max_batch: it closed at the deadline.
    assert 1 < len(entries) < 1000
    assert [s for _, s in seqs(entries)] == list(range(len(entries)))
    assert closed - first < 0.3 + 0.5  # the deadline counts from the first frame (slack for a loaded machine)


def test_each_camera_keeps_its_order_inside_a_batch_even_with_claimed_entries(r, prefix):
    rd = reader(r, prefix, "w2", claim_idle_ms=100)
    ensure_group(r, rd.stream, rd.group)
    # A dead worker left the first two frames pending; four newer ones wait undelivered.
    for seq, cam in [(0, "a"), (0, "b")]:
        r.xadd(rd.stream, {"m": prepared(seq, cam), "cam": cam})
    r.xreadgroup(rd.group, "dead-worker", {rd.stream: ">"}, count=2)
    for seq, cam in [(1, "a"), (1, "b"), (2, "a"), (2, "b")]:
        r.xadd(rd.stream, {"m": prepared(seq, cam), "cam": cam})
    time.sleep(0.15)  # the dead worker's entries are idle now
    rd._next_claim = time.monotonic() + 0.3  # the first reads find new entries, a later one claims the old

    def late():
        time.sleep(0.5)
        r.xadd(rd.stream, {"m": prepared(3, "a"), "cam": "a"})

    t = threading.Thread(target=late)
    t.start()
    entries, _ = collect(rd, 8, 1500, 100, threading.Event())
    t.join()
    got = seqs(entries)
    assert sorted(got) == sorted([("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)])
    for cam in ("a", "b"):
        mine = [s for c, s in got if c == cam]
        assert mine == sorted(mine), f"camera {cam} out of order in {got}"


def _service(redis_server, prefix, **inference):
    cfg = load_config(data={
        "redis": {"url": redis_server.url, "prefix": prefix},
        "cameras": [{"id": "c1", "source": "synthetic://process", "tasks": ["classify"]}],
        "models": {"classify": {"arch": "simple_cnn"}},
        "inference": {"device": "cpu", "max_batch": 4, "max_wait_ms": 0, "threads": 1, "model_poll_s": 0,
                      **inference},
        "streams": {"read_block_ms": 50, "claim_idle_ms": 200}}, environ={})
    return InferService(cfg, tasks=["classify"], port=0)


@pytest.fixture
def svc(redis_server, r, prefix):
    s = _service(redis_server, prefix)
    s.setup()
    yield s
    s.stop.set()


def test_the_next_batch_is_read_and_decoded_while_one_is_out_and_acks_wait_for_results(svc, r):
    stream = svc.keys.prepared("classify")
    for seq in range(16):
        r.xadd(stream, {"m": prepared_224(seq), "cam": "c1"})
    svc.batcher.start()
    first = svc.batcher.next(timeout=10)
    assert [m.seq for _, m in first.items] == [0, 1, 2, 3]
    second = svc.batcher.next(timeout=10)  # read and decoded while the first is still out
    assert [m.seq for _, m in second.items] == [4, 5, 6, 7]
    assert second.groups[0][1].shape == (4, 224, 224, 3)
    # With PREFETCH batches out, the reader takes no more: the rest stays undelivered.
    assert svc.batcher.next(timeout=0.5) is None
    assert PREFETCH == 2 and r.xpending(stream, "infer-classify")["pending"] == 8
    assert r.xlen(svc.keys.results) == 0  # nothing written, nothing acknowledged yet
    svc.process_batch(first)
    assert [Result.from_msgpack(f[b"m"]).seq for _, f in r.xrange(svc.keys.results)] == [0, 1, 2, 3]
    third = svc.batcher.next(timeout=10)  # the finished batch freed a slot
    assert [m.seq for _, m in third.items] == [8, 9, 10, 11]
    svc.process_batch(second)
    svc.process_batch(third)
    assert r.xpending(stream, "infer-classify")["pending"] == 4  # the fourth batch: read, not yet written
    svc.stop.set()
    svc.close()  # drains what the reader already holds
    assert r.xpending(stream, "infer-classify")["pending"] == 0
    assert [Result.from_msgpack(f[b"m"]).seq for _, f in r.xrange(svc.keys.results)] == list(range(16))


def test_entries_in_flight_are_not_claimed_back_by_their_own_worker(svc, r):
    stream = svc.keys.prepared("classify")
    for seq in range(3):
        r.xadd(stream, {"m": prepared_224(seq), "cam": "c1"})
    run = svc.runners[0]
    b = Batcher(svc.runners, svc.decode_batch, max_batch=4, max_wait_ms=0, block_ms=50, stop=svc.stop)
    batch = b.read(run)
    assert [m.seq for _, m in batch.items] == [0, 1, 2]
    time.sleep(0.3)  # longer than claim_idle_ms: XAUTOCLAIM hands the same entries back
    run.reader._next_claim = 0
    assert b.read(run) is None  # ... and the batcher drops them: they are this worker's batch in hand
    b.done(batch)  # (not written: a failed batch) now they may be claimed again, to be processed once
    time.sleep(0.3)
    run.reader._next_claim = 0
    again = b.read(run)
    assert [m.seq for _, m in again.items] == [0, 1, 2]


def prepared_224(seq: int, camera: str = "c1") -> bytes:
    img = np.full((224, 224, 3), seq % 255, np.uint8)
    return Prepared(camera=camera, seq=seq, ts=time.time_ns(), task="classify", frame_id=f"1-{seq}",
                    shape=img.shape, dtype="uint8", data=img.tobytes(), orig=[480, 640],
                    letterbox=[1.0, 0, 0]).to_msgpack()
