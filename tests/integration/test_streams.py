"""Stream helpers against a real Redis: trimming, ack with output, claiming, dead letters, lag."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from shared.config import Config
from shared.keys import Keys
from shared.streams.connection import REDIS_DOWN, ensure_group
from shared.streams.groups import (
    Position,
    ask_position,
    group_info,
    group_lag,
    group_position,
    parse_id,
    position_of,
    wait_then_ask,
)
from shared.streams.outbox import Outbox
from shared.streams.producer import Producer
from shared.streams.reader import DeadLetters, GroupReader
from shared.streams.stats import publish_stream_metrics, stream_stats
from tests.support.redis_server import command_calls, redis_major

GROUP = Keys.PREPROCESS
CLAIM_IDLE_MS = 100


@pytest.fixture
def names(prefix) -> Keys:
    return Keys(prefix)


def reader(r, names: Keys, consumer: str, *, max_deliveries: int = 3, max_bytes: int = 1024,
           count: int = 10) -> GroupReader:
    dead = DeadLetters(r, names, max_age_s=3600, stage="preprocess")
    rd = GroupReader(r, names.frames, GROUP, consumer, dead=dead, count=count, block_ms=10,
                     claim_idle_ms=CLAIM_IDLE_MS, max_deliveries=max_deliveries, max_bytes=max_bytes)
    rd.setup()
    return rd


def pending(r, stream: str, group: str = GROUP) -> int:
    return int(r.xpending(stream, group)["pending"])


def deadletters(r, names: Keys) -> list[dict]:
    return [{k.decode(): v.decode() if k != b"m" else v for k, v in fields.items()}
            for _id, fields in r.xrange(names.deadletter)]


def deadletter_count(reason: str) -> float:
    return REGISTRY.get_sample_value("plantsight_deadletter_total", {"stage": "preprocess", "reason": reason}) or 0.0


def test_producer_maxlen_trims_approximately(r, names):
    producer = Producer(r, names.frames, maxlen=100)
    for i in range(1000):
        producer.add(b"frame-%04d" % i, cam="kiln-1")
    length = r.xlen(names.frames)
    assert 100 <= length <= 200  # `MAXLEN ~` trims whole nodes: never below maxlen, at most a node above
    newest = r.xrevrange(names.frames, count=1)[0][1]
    assert newest == {b"m": b"frame-0999", b"cam": b"kiln-1"}
    oldest_kept = int(r.xrange(names.frames, count=1)[0][1][b"m"][6:])
    assert oldest_kept == 1000 - length  # the oldest entries went, in order


def test_producer_fields(r, names):
    producer = Producer(r, names.prepared("detect"))
    entry_id = producer.add(b"payload", cam="line-2", task="detect")
    assert r.xrange(names.prepared("detect")) == [(entry_id.encode(), {b"m": b"payload", b"cam": b"line-2",
                                                                     b"task": b"detect"})]
    plain = producer.add(b"p2")
    assert r.xrange(names.prepared("detect"), min=plain, max=plain)[0][1] == {b"m": b"p2"}


def test_sent_entries_are_answered_in_order_with_the_ids_redis_gave(r, names):
    producer = Producer(r, names.frames, maxlen=1000)
    for i in range(5):
        producer.send(b"frame-%d" % i, cam="kiln-1")
    assert producer.unanswered == 5
    ids = producer.answers()  # waits for all of them
    assert producer.unanswered == 0 and producer.answers() == []
    assert [(i.decode(), f) for i, f in r.xrange(names.frames)] == [
        (ids[i], {b"m": b"frame-%d" % i, b"cam": b"kiln-1"}) for i in range(5)]
    # without waiting: only what Redis has answered, oldest first; the rest stays counted
    producer.send(b"frame-5", cam="kiln-1")
    time.sleep(0.2)  # long enough for a loopback answer
    producer.send(b"frame-6", cam="kiln-1")
    early = producer.answers(wait=False)
    added = [i.decode() for i, _ in r.xrange(names.frames)][5:]
    assert len(early) >= 1 and len(early) + producer.unanswered == 2 and early == added[:len(early)]
    assert early + producer.answers() == added
    producer.close()
    assert producer.unanswered == 0


def test_sending_trims_like_adding(r, names):
    producer = Producer(r, names.frames, maxlen=100)
    for i in range(1000):
        producer.send(b"frame-%04d" % i, cam="kiln-1")
        if producer.unanswered >= 50:
            producer.answers()
    producer.close()
    assert 100 <= r.xlen(names.frames) <= 200
    assert r.xrevrange(names.frames, count=1)[0][1] == {b"m": b"frame-0999", b"cam": b"kiln-1"}


def test_entries_sent_while_redis_is_away_are_written_once_it_is_back_and_not_twice():
    from tests.support.redis_server import RedisServer

    server = RedisServer(appendonly=True)  # what Redis answered survives its restart
    try:
        r = server.client()
        producer = Producer(r, "s", maxlen=100)
        producer.send(b"a")
        producer.send(b"b")
        assert len(producer.answers()) == 2
        producer.send(b"c")  # answered by Redis, its answer not yet read, when Redis stops
        time.sleep(0.2)
        server.stop()
        producer.send(b"d")  # Redis is away: kept, not raised
        producer.send(b"e")
        with pytest.raises(REDIS_DOWN):
            producer.answers()
        assert producer.unanswered == 3  # c's id (read before d was written), d and e
        server.start()
        ids = producer.answers()
        assert producer.unanswered == 0
        assert [f[b"m"] for _, f in r.xrange("s")] == [b"a", b"b", b"c", b"d", b"e"]  # c not written again
        assert ids == [i.decode() for i, _ in r.xrange("s")][2:]
        producer.close()
    finally:
        server.close()


def test_read_batch_then_ack_with_output_in_one_transaction(r, names):
    frames = Producer(r, names.frames)
    ids = [frames.add(b"f%d" % i, cam="kiln-1") for i in range(5)]
    rd = reader(r, names, "worker-1", count=3)
    batch = rd.read()
    assert [e.id for e in batch] == ids[:3]
    assert [e.payload for e in batch] == [b"f0", b"f1", b"f2"]
    assert [e.camera for e in batch] == ["kiln-1"] * 3
    assert [e.deliveries for e in batch] == [1, 1, 1]
    assert pending(r, names.frames) == 3

    results = Producer(r, names.results)
    box = Outbox(r)
    committed = []
    for e in batch:
        assert results.add(b"result-of-" + e.payload, cam=e.camera, task="thermal", box=box) is None
    rd.ack(box, [e.id for e in batch])
    box.on_commit(lambda: committed.append(True))
    assert r.xlen(names.results) == 0 and pending(r, names.frames) == 3  # nothing happens before the commit
    assert committed == []
    box.commit()
    assert committed == [True]
    assert [f[b"m"] for _i, f in r.xrange(names.results)] == [b"result-of-f0", b"result-of-f1", b"result-of-f2"]
    assert pending(r, names.frames) == 0
    assert [e.id for e in rd.read()] == ids[3:]


def test_crashed_consumer_entries_are_claimed(r, names):
    frames = Producer(r, names.frames)
    ids = [frames.add(b"f%d" % i, cam="kiln-1") for i in range(3)]
    a = reader(r, names, "consumer-a")
    assert [e.id for e in a.read()] == ids  # ... and consumer-a dies without acking
    read_at = time.monotonic()
    b = reader(r, names, "consumer-b")
    early = b.read(block_ms=1)
    if time.monotonic() - read_at < CLAIM_IDLE_MS / 1000:  # (a stalled test machine may have waited longer)
        assert early == []  # not idle long enough yet: nothing to claim, nothing new
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)
    claimed = b.read(block_ms=1)
    assert [e.id for e in claimed] == ids
    assert [e.payload for e in claimed] == [b"f0", b"f1", b"f2"]
    assert [e.deliveries for e in claimed] == [2, 2, 2]
    owners = r.xpending_range(names.frames, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"].decode(), p["consumer"].decode(), p["times_delivered"]) for p in owners] == [
        (i, "consumer-b", 2) for i in ids]
    box = Outbox(r)
    b.ack(box, [e.id for e in claimed])
    box.commit()
    assert pending(r, names.frames) == 0
    assert r.xlen(names.deadletter) == 0


def test_entry_delivered_too_often_is_dead_lettered(r, names):
    frames = Producer(r, names.frames)
    entry_id = frames.add(b"poison", cam="kiln-1")
    before = deadletter_count("max_deliveries")
    a = reader(r, names, "consumer-a", max_deliveries=2)
    assert [e.deliveries for e in a.read()] == [1]
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)
    b = reader(r, names, "consumer-b", max_deliveries=2)
    assert [(e.id, e.deliveries) for e in b.read(block_ms=1)] == [(entry_id, 2)]  # still within the limit
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)
    c = reader(r, names, "consumer-c", max_deliveries=2)
    assert c.read(block_ms=1) == []  # third delivery: dead-lettered, not handed out
    assert pending(r, names.frames) == 0
    assert deadletters(r, names) == [{"stage": "preprocess", "reason": "max_deliveries", "detail": "delivered 3 times",
                                      "stream": names.frames, "id": entry_id, "cam": "kiln-1", "m": b"poison",
                                      "truncated": "0"}]
    assert deadletter_count("max_deliveries") == before + 1
    assert r.xlen(names.frames) == 1  # dead-lettering copies; the source entry stays for evidence lookups


def test_entry_without_payload_is_dead_lettered(r, names):
    bad = r.xadd(names.frames, {"cam": "kiln-1"}).decode()
    good = Producer(r, names.frames).add(b"fine", cam="kiln-1")
    before = deadletter_count("no_payload")
    rd = reader(r, names, "worker-1")
    assert [e.id for e in rd.read()] == [good]
    rows = deadletters(r, names)
    assert rows == [{"stage": "preprocess", "reason": "no_payload", "detail": "entry has no 'm' field",
                     "stream": names.frames, "id": bad, "cam": "kiln-1", "m": b"", "truncated": "0"}]
    assert pending(r, names.frames) == 1  # only the good one waits for its ack
    assert deadletter_count("no_payload") == before + 1


def test_oversized_entry_is_dead_lettered(r, names):
    producer = Producer(r, names.frames)
    big = producer.add(b"x" * 65, cam="kiln-1")
    limit = producer.add(b"y" * 64, cam="kiln-1")
    rd = reader(r, names, "worker-1", max_bytes=64)
    assert [e.id for e in rd.read()] == [limit]
    rows = deadletters(r, names)
    assert [(d["reason"], d["id"], d["detail"], d["m"]) for d in rows] == [
        ("oversized", big, "65 bytes > limit 64", b"x" * 65)]
    assert pending(r, names.frames) == 1


def test_reject_dead_letters_and_acks(r, names):
    entry_id = Producer(r, names.frames).add(b"\xc1not msgpack", cam="line-2")
    rd = reader(r, names, "worker-1")
    [entry] = rd.read()
    box = Outbox(r)
    rd.reject(box, entry, "undecodable", "frame: not valid msgpack")
    box.commit()
    assert pending(r, names.frames) == 0
    assert [(d["reason"], d["id"], d["cam"], d["detail"]) for d in deadletters(r, names)] == [
        ("undecodable", entry_id, "line-2", "frame: not valid msgpack")]


def test_drop_if_undelivered(r, names):
    producer = Producer(r, names.frames)
    ensure_group(r, names.frames, GROUP)
    first, second = producer.add(b"a", cam="kiln-1"), producer.add(b"b", cam="kiln-1")
    rd = reader(r, names, "worker-1", count=1)
    assert [e.id for e in rd.read()] == [first]
    assert producer.drop_if_undelivered(second, [GROUP]) == 1
    assert r.xrange(names.frames, min=second, max=second) == []
    assert producer.drop_if_undelivered(first, [GROUP]) == -1  # already delivered: the consumer owns it
    assert [i.decode() for i, _f in r.xrange(names.frames)] == [first]
    assert producer.drop_if_undelivered(second, [GROUP]) == 0  # gone already
    assert rd.read(block_ms=1) == []


def test_drop_if_undelivered_to_any_of_several_groups(r, names):
    """With ``read_from: frames`` each task's infer group reads the frames: an entry may go only while none
    of them has read it."""
    producer = Producer(r, names.frames)
    groups = ["infer-classify", "infer-detect"]
    for g in groups:
        ensure_group(r, names.frames, g)
    first, second, third = (producer.add(b"%d" % i, cam="kiln-1") for i in range(3))
    r.xreadgroup("infer-detect", "w", {names.frames: ">"}, count=1)  # detect has read the first only
    assert producer.drop_if_undelivered(first, groups) == -1
    assert producer.drop_if_undelivered(second, groups) == 1
    r.xreadgroup("infer-classify", "w", {names.frames: ">"}, count=2)  # classify reads the first and the third
    assert producer.drop_if_undelivered(third, groups) == -1
    assert [i.decode() for i, _f in r.xrange(names.frames)] == [first, third]
    assert producer.drop_if_undelivered(third, ["nobody", "infer-classify"]) == -1
    assert producer.drop_if_undelivered(third, ["nobody",
                                                "infer-detect"]) == 1  # a group that does not exist has read nothing


def test_group_lag_counts_undelivered(r, names):
    assert group_lag(r, names.frames, GROUP) == 0  # no stream, no group
    producer = Producer(r, names.frames)
    ids = [producer.add(b"%d" % i, cam="kiln-1") for i in range(5)]
    assert group_lag(r, names.frames, GROUP) == 5  # no group yet: everything is undelivered
    rd = reader(r, names, "worker-1", count=2)
    assert group_lag(r, names.frames, GROUP) == 5
    rd.read()
    assert group_lag(r, names.frames, GROUP) == 3
    # deleting an undelivered entry makes Redis 7 report no lag; the XRANGE count takes over
    assert producer.drop_if_undelivered(ids[3], [GROUP]) == 1
    assert group_lag(r, names.frames, GROUP) == 2
    assert group_lag(r, names.frames, GROUP, limit=1) == 1  # the count is capped
    assert group_position(r, names.frames, GROUP, limit=2).at_least  # a count that reaches its limit is a floor
    assert not group_position(r, names.frames, GROUP, limit=3).at_least
    info = group_info(r, names.frames, GROUP)
    assert (info["name"], info["pending"], info["last-delivered-id"]) == (GROUP, 2, ids[1])
    assert group_position(r, names.frames, GROUP) == Position(parse_id(ids[1]), 2)
    assert group_position(r, names.frames, "nobody") == Position((0, 0), 4)  # no such group: all of it waits


def test_a_position_rides_in_a_transaction_and_after_a_wait(r, names):
    """``ask_position`` is a script that never fails, so it can share a MULTI with writes (a missing stream
    answers 0 rather than failing the transaction); ``wait_then_ask`` answers after the wait's entry."""
    rd = reader(r, names, "worker-1", count=1)
    box = Outbox(r)
    Producer(r, names.frames).add(b"a", cam="kiln-1", box=box)
    ask_position(box.pipe, names.frames, GROUP)
    ask_position(box.pipe, names.prepared("nothing"), GROUP)
    _id, here, missing = box.commit()
    assert (position_of(here), position_of(missing)) == (Position((0, 0), 1), Position((0, 0), 0))
    assert wait_then_ask(r, [names.results], 0.05, [(names.frames, GROUP)]) == (False, [Position((0, 0), 1)])
    (entry,) = rd.read()

    def later():
        time.sleep(0.2)
        r.xadd(names.results, {"m": b"r"})

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    came, (pos,) = wait_then_ask(r, [names.results], 3.0, [(names.frames, GROUP)])
    assert came and time.monotonic() - t0 < 2.0 and pos == Position(parse_id(entry.id), 0)


def test_stream_stats_rows(r, names):
    frames = Producer(r, names.frames)
    for i in range(4):
        frames.add(b"%d" % i, cam="kiln-1")
    reader(r, names, "worker-1", count=1).read()
    ensure_group(r, names.prepared("thermal"), Keys.infer_group("thermal"))
    Producer(r, names.prepared("thermal")).add(b"p", cam="kiln-1", task="thermal")
    Producer(r, names.alerts, max_age_s=3600).add(b"alert")
    assert stream_stats(r, names, ["thermal"]) == [
        {"stream": names.frames, "group": "preprocess", "length": 4, "lag": 3, "pending": 1},
        {"stream": names.prepared("thermal"), "group": "infer-thermal", "length": 1, "lag": 1, "pending": 0},
        {"stream": names.results, "group": "alert", "length": 0, "lag": None, "pending": None},
        {"stream": names.alerts, "group": None, "length": 1, "lag": None, "pending": None},
        {"stream": names.deadletter, "group": None, "length": 0, "lag": None, "pending": None},
    ]


def test_stream_stats_rows_when_infer_reads_the_frames(r, prefix):
    """``read_from: frames``: a row per infer group on ``{P}:frames``, no ``prepared`` streams."""
    names = Keys(prefix, infer_reads_frames=True)
    assert names.frame_groups(["detect", "classify"]) == ["infer-classify", "infer-detect"]
    assert names.frame_readers_write(["detect", "classify"]) == [names.results]
    frames = Producer(r, names.frames)
    for i in range(3):
        frames.add(b"%d" % i, cam="kiln-1")
    for g in names.frame_groups(["classify", "detect"]):
        ensure_group(r, names.frames, g)
    r.xreadgroup("infer-detect", "w", {names.frames: ">"}, count=2)
    assert stream_stats(r, names, ["classify", "detect"])[:3] == [
        {"stream": names.frames, "group": "infer-classify", "length": 3, "lag": 3, "pending": 0},
        {"stream": names.frames, "group": "infer-detect", "length": 3, "lag": 1, "pending": 2},
        {"stream": names.results, "group": "alert", "length": 0, "lag": None, "pending": None},
    ]


def test_stream_metrics_ask_only_about_the_service_streams(r, names):
    """Every service publishes its streams' gauges every two seconds: it asks about its own streams only
    (not all six, filtered afterwards) with one XLEN and one XINFO per stream, in one round trip."""
    frames = Producer(r, names.frames)
    for i in range(3):
        frames.add(b"%d" % i, cam="kiln-1")
    reader(r, names, "worker-1", count=1).read()
    cfg = Config.model_validate({"redis": {"prefix": names.prefix}})
    r.config_resetstat()
    assert publish_stream_metrics(r, names, cfg, set()) == []
    assert command_calls(r).keys() <= {"cmdstat_info", "cmdstat_config"}  # no question (those two are the test's)
    r.config_resetstat()
    rows = publish_stream_metrics(r, names, cfg, {names.frames, names.alerts})
    assert rows == [{"stream": names.frames, "group": "preprocess", "length": 3, "lag": 2, "pending": 1},
                    {"stream": names.alerts, "group": None, "length": 0, "lag": None, "pending": None}]
    calls = command_calls(r)
    if redis_major(r) >= 7:
        assert (calls.get("cmdstat_xlen"), calls.get("cmdstat_xinfo")) == (2, 1), calls
        assert calls.keys() <= {"cmdstat_xlen", "cmdstat_xinfo", "cmdstat_info", "cmdstat_config"}, calls
    else:  # 6.2 reports no lag: one more question (the script) counts it
        assert (calls.get("cmdstat_xlen"), calls.get("cmdstat_xinfo"), calls.get("cmdstat_eval")) == (2, 2, 1), calls
    lag = REGISTRY.get_sample_value("plantsight_consumer_lag", {"stream": names.frames, "group": "preprocess"})
    assert (lag, REGISTRY.get_sample_value("plantsight_stream_length", {"stream": names.frames})) == (2, 3)


def test_pending_entry_trimmed_away_is_accounted(r, names):
    producer = Producer(r, names.frames)
    ids = [producer.add(b"f%d" % i, cam="kiln-1") for i in range(3)]
    a = reader(r, names, "consumer-a")
    assert len(a.read()) == 3  # ... consumer-a dies, and the stream is trimmed under its pending entries
    r.xtrim(names.frames, maxlen=1, approximate=False)
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)
    b = reader(r, names, "consumer-b")
    assert [(e.id, e.payload, e.deliveries) for e in b.read(block_ms=1)] == [(ids[2], b"f2", 2)]
    assert [(d["reason"], d["id"], d["m"]) for d in deadletters(r, names)] == [
        ("trimmed", ids[0], b""), ("trimmed", ids[1], b"")]
    assert [p["message_id"].decode() for p in r.xpending_range(names.frames, GROUP, "-", "+", 10)] == [ids[2]]
