"""Service logic in-process on a real Redis: infer batching and coordinates, alert rule lifecycle."""

from __future__ import annotations

import tempfile
import threading
import time

import numpy as np
import pytest

from services.alerting.service import AlertService
from services.inference.postprocess import boxes_to_original, mask_to_original, segment_out, to_original
from services.inference.service import InferService
from shared.config import load_config
from shared.imaging import letterbox
from shared.keys import Keys
from shared.messages import Alert, Prepared, Result
from tests.support.redis_server import command_calls
from tests.support.waiting import wait_until


def config(redis_server, prefix, **extra):
    data = {"redis": {"url": redis_server.url, "prefix": prefix},
            "cameras": [{"id": "c1", "source": "synthetic://process", "tasks": ["classify"]},
                        {"id": "k1", "source": "synthetic://thermal", "tasks": ["thermal"]}],
            "models": {"classify": {"arch": "simple_cnn"}, "thermal": {"arch": "thermal_cnn"}}}
    data.update(extra)
    if "alerts" in data:  # evidence goes to a temporary folder, never into the checkout
        data["alerts"] = {"evidence_dir": tempfile.mkdtemp(prefix="ps-evidence-"), **data["alerts"]}
    return load_config(data=data, environ={})


def prepared(seq: int, camera="c1") -> bytes:
    img = np.full((224, 224, 3), seq % 255, np.uint8)
    return Prepared(camera=camera, seq=seq, ts=time.time_ns(), task="classify", frame_id=f"1-{seq}",
                    shape=img.shape, dtype="uint8", data=img.tobytes(), orig=[480, 640],
                    letterbox=[1.0, 0, 0]).to_msgpack()


def test_infer_batches_up_to_max_batch_then_waits_at_most_max_wait(redis_server, r, prefix):
    cfg = config(redis_server, prefix, inference={"device": "cpu", "max_batch": 4, "max_wait_ms": 300})
    svc = InferService(cfg, tasks=["classify"], port=0)
    svc.setup()
    run = svc.runners[0]
    stream = svc.keys.prepared("classify")
    for seq in range(6):
        r.xadd(stream, {"m": prepared(seq)})
    assert len(svc.collect(run, 100)) == 4  # full batch at once
    t0 = time.monotonic()
    rest = svc.collect(run, 100)
    waited = time.monotonic() - t0
    assert len(rest) == 2 and waited >= 0.29  # the batch stayed open max_wait_ms for more frames
    svc.process(run, rest)
    results = [Result.from_msgpack(f[b"m"]) for _, f in r.xrange(svc.keys.results)]
    assert [m.seq for m in results] == [4, 5]
    assert results[0].out["classes"] == ["normal", "anomaly"] and len(results[0].out["probs"]) == 2
    assert results[0].model == "simple_cnn@untrained"
    pend = r.xpending(stream, "infer-classify")["pending"]
    assert pend == 4  # the first batch was collected but not processed: still pending, not lost


def test_thermal_results_are_exact_for_radiometric_frames(redis_server, r, prefix):
    cfg = config(redis_server, prefix, inference={"device": "cpu", "max_batch": 4, "max_wait_ms": 0})
    svc = InferService(cfg, tasks=["thermal"], port=0)
    svc.setup()
    kelvin = np.full((120, 160), 300.0)
    kelvin[30, 40], kelvin[90, 120], kelvin[0, 0] = 455.25, 420.5, 290.0
    ck = np.round(kelvin * 100).astype(np.uint16)[:, :, None]
    msg = Prepared(camera="k1", seq=0, ts=time.time_ns(), task="thermal", frame_id="1-0", shape=ck.shape,
                   dtype="uint16", data=ck.tobytes(), orig=[140, 180], letterbox=[1.0, 0, 0], roi=[10, 20, 160, 120])
    r.xadd(svc.keys.prepared("thermal"), {"m": msg.to_msgpack()})
    run = svc.runners[0]
    svc.process(run, svc.collect(run, 100))
    (res,) = [Result.from_msgpack(f[b"m"]) for _, f in r.xrange(svc.keys.results)]
    assert res.out["max_k"] == 455.25 and res.out["min_k"] == 290.0
    assert res.out["avg_k"] == pytest.approx(kelvin.mean(), abs=1e-3)
    # Hot spots above the model's threshold, in original-frame pixels (ROI offset added).
    assert sorted(map(tuple, res.out["hotspots"]), key=lambda s: -s[2]) == [(50, 50, 455.25), (130, 110, 420.5)]


def test_boxes_and_masks_map_back_to_the_original_frame_exactly():
    frame = np.zeros((528, 720, 3), np.uint8)
    roi = (100, 40, 400, 300)
    region = frame[40:340, 100:500]
    _, (scale, px, py) = letterbox(region, (448, 448))
    msg = Prepared(camera="c", seq=0, ts=0, task="detect", frame_id="1-0", shape=[448, 448, 3], dtype="uint8",
                   data=bytes(448 * 448 * 3), orig=[528, 720], letterbox=[scale, px, py], roi=list(roi))
    # A box at ROI pixels (40, 30)-(120, 90) is at these prepared pixels:
    box = [40 * scale + px, 30 * scale + py, 120 * scale + px, 90 * scale + py, 0.9, 2]
    (back,) = boxes_to_original([box], msg)
    assert back == [140.0, 70.0, 220.0, 130.0, 0.9, 2]
    mask = np.zeros((448, 448), np.uint8)
    mask[int(py + 30 * scale):int(py + 90 * scale), int(px + 40 * scale):int(px + 120 * scale)] = 1
    full = mask_to_original(mask, msg)
    assert full.shape == (528, 720) and full[:40].sum() == 0 and full[:, :100].sum() == 0
    ys, xs = np.nonzero(full)
    assert abs(xs.min() - 140) <= 1 and abs(xs.max() - 219) <= 1
    assert abs(ys.min() - 70) <= 1 and abs(ys.max() - 129) <= 1
    out = segment_out(mask, msg)
    assert len(out["regions"]) == 1 and out["regions"][0][4] == int(full.sum())
    assert out["defect_ratio"] == pytest.approx(full.sum() / (400 * 300))
    # the frame's anomaly score travels with the mask: the segmenter's highest defect probability
    assert to_original("segment", {"mask": mask, "prob_max": 0.734567}, msg)["score"] == 0.73457


def thermal_result(seq: int, max_k: float) -> Result:
    return Result(camera="k1", seq=seq, ts=seq, task="thermal", frame_id=f"1-{seq}", model="thermal_cnn@x",
                  out={"max_k": max_k, "avg_k": 300.0, "min_k": 290.0, "hotspots": []})


def test_a_rule_fires_after_for_frames_once_per_episode_then_resolves_and_respects_cooldown(redis_server, r, prefix):
    rules = [{"name": "overheat", "task": "thermal", "when": "max_k >= 450", "for_frames": 3, "cooldown_s": 0.5,
              "severity": "critical"}]
    svc = AlertService(config(redis_server, prefix, alerts={"rules": rules, "camera_offline_s": 0}), port=0)
    temps = [460, 460, 300, 460, 460, 460, 470, 480, 300, 460, 460, 460]
    events = [(i, a.state) for i, k in enumerate(temps) for a in svc.evaluate(thermal_result(i, k))]
    # Hits at 0-1 break before 3 in a row; fires at the 3rd consecutive hit (5), resolves at 8;
    # the next episode's 3rd hit (11) falls inside the 0.5 s cooldown, so it does not fire.
    assert events == [(5, "firing"), (8, "resolved")]
    time.sleep(0.5)
    fired = svc.evaluate(thermal_result(12, 465))
    assert [a.state for a in fired] == ["firing"]
    assert fired[0].value == 465.0 and fired[0].threshold == 450.0 and fired[0].severity == "critical"
    assert fired[0].id == Alert.identity("overheat", "k1", "1-12")


def test_alert_service_writes_alerts_and_acks_results_together(redis_server, r, prefix):
    rules = [{"name": "overheat", "task": "thermal", "when": "max_k >= 450", "for_frames": 2, "cooldown_s": 0}]
    svc = AlertService(config(redis_server, prefix, alerts={"rules": rules, "camera_offline_s": 0}), port=0)
    svc.setup()
    for i, k in enumerate([455, 456, 457, 300]):
        r.xadd(svc.keys.results, {"m": thermal_result(i, k).to_msgpack()})
    r.xadd(svc.keys.results, {"m": b"\x93broken"})
    svc.step()
    alerts = [Alert.from_msgpack(f[b"m"]) for _, f in r.xrange(svc.keys.alerts)]
    assert [(a.state, a.frame_id) for a in alerts] == [("firing", "1-1"), ("resolved", "1-3")]
    assert alerts[1].labels["episode"] == alerts[0].id
    assert r.xpending(svc.keys.results, "alert")["pending"] == 0
    (letter,) = r.xrange(svc.keys.deadletter)
    assert letter[1][b"reason"] == b"decode_error"


def test_ingest_replicas_share_the_cameras_out_and_forward_replayed_jpeg_untouched(redis_server, r, prefix):
    from services.ingest.service import IngestService
    from shared.messages import Frame

    cams = [{"id": f"c{i}", "source": "synthetic://process?w=64&h=48&replay=2", "tasks": ["classify"],
             "fps": 50, "max_frames": 3} for i in range(5)]
    cfg = config(redis_server, prefix, cameras=cams, services={"ingest": {"port": 9101, "replicas": 2}})
    replicas = [IngestService(cfg, replica=k, port=0) for k in range(2)]
    assert [[c.id for c in svc.cameras] for svc in replicas] == [["c0", "c2", "c4"], ["c1", "c3"]]
    for svc in replicas:
        svc.setup()
    for svc in replicas:
        for w in svc.workers:
            w.join(timeout=10)
        svc.stop.set()
    frames = [Frame.from_msgpack(f[b"m"]) for _, f in r.xrange(Keys(prefix).frames)]
    assert sorted((f.camera, f.seq) for f in frames) == [(f"c{i}", s) for i in range(5) for s in range(3)]
    by_seq = {(f.camera, f.seq): f for f in frames}
    assert all(f.enc == "jpeg" and f.shape == (48, 64, 3) for f in frames)
    assert by_seq[("c0", 2)].data == by_seq[("c0", 0)].data != by_seq[("c0", 1)].data  # the 2 frames, looped


def blocked_in_xread(r) -> bool:
    """Some client of this Redis is waiting in a blocking XREAD."""
    return any(c["cmd"] == "xread" and "b" in c["flags"] for c in r.client_list())


def questions(calls: dict[str, int]) -> int:
    """How often a service asked where a consumer group stands: each question is one XINFO GROUPS, run by
    ``streams.groups.ask_position``'s script (Redis counts the commands a script runs)."""
    return calls.get("cmdstat_xinfo", 0)


def test_blocked_cameras_wake_when_preprocess_writes_and_do_not_poll_redis(redis_server, r, prefix, monkeypatch):
    """``on_full: block``: a camera never has more than ``queue`` frames unread and loses none. While all
    cameras wait, one of them waits in Redis for preprocess to write a prepared entry (it writes what it
    has read) and only then asks where preprocess is: an idle second costs one question, not one every
    20 ms (or each camera's every 5 ms). With BLOCKED_WAIT_S at 4 s the 36 frames after the first 12 get
    through within 3 s only because each write wakes the cameras."""
    from services.ingest import service as ingest
    from shared.messages import Frame

    monkeypatch.setattr(ingest, "BLOCKED_WAIT_S", 4.0)  # below the client's 5 s socket timeout
    n, queue = 12, 3
    cams = [{"id": f"c{i}", "source": "synthetic://process?w=64&h=48&replay=2", "tasks": ["classify"],
             "fps": 200, "max_frames": n, "on_full": "block", "queue": queue} for i in range(4)]
    svc = ingest.IngestService(config(redis_server, prefix, cameras=cams), port=0)
    stream, prepared = svc.keys.frames, svc.keys.prepared("classify")
    svc.setup()
    try:
        wait_until(lambda: r.xlen(stream) >= 4 * queue, 10, "the cameras fill their queues")
        time.sleep(0.1)  # every camera is blocked now: nothing has been read
        assert r.xlen(stream) == 4 * queue
        r.config_resetstat()
        idle = 1.0
        time.sleep(idle)
        calls = command_calls(r)
        assert calls.get("cmdstat_xadd", 0) == 0
        assert questions(calls) <= 1, calls  # every 20 ms would be 50; each camera every 5 ms, 800
        assert blocked_in_xread(r)
        seen: list[tuple[str, int]] = []
        t0 = time.monotonic()
        while len(seen) < 4 * n:
            assert time.monotonic() - t0 < 3.0, f"{len(seen)} frames after 3 s: the writes did not wake the cameras"
            reply = r.xreadgroup(Keys.PREPROCESS, "test", {stream: ">"}, count=100, block=50)
            for _, entries in reply or []:
                for _id, f in entries:
                    frame = Frame.from_msgpack(f[b"m"])
                    seen.append((frame.camera, frame.seq))
            unread = r.xinfo_groups(stream)[0]
            per_cam = {}
            for _id, f in r.xrange(stream, min="(" + unread["last-delivered-id"].decode()):
                per_cam[f[b"cam"]] = per_cam.get(f[b"cam"], 0) + 1
            assert max(per_cam.values(), default=0) <= queue
            if reply and r.xlen(stream) < 4 * n:  # as preprocess does after reading, once the poller listens
                wait_until(lambda: blocked_in_xread(r) or r.xlen(stream) == 4 * n, 2, "a camera waits in XREAD")
                r.xadd(prepared, {"m": b"-"})
        for w in svc.workers:
            w.join(timeout=10)
    finally:
        svc.stop.set()
        svc.close()
    assert sorted(seen) == [(f"c{i}", s) for i in range(4) for s in range(n)]


def test_a_blocked_camera_takes_over_the_asking_when_the_poller_hands_over_without_news(redis_server, r, prefix,
                                                                                        monkeypatch):
    """The blocked camera that asks Redis for all of them hands over after its wait; when preprocess has not
    moved (or another camera's question already saw it move) one sleeping camera must take over the asking
    at once: the poller may not ask again (its frames may be through, its camera may have ended), and a
    sleeper left to its own timeout stalled its camera for twice ``BLOCKED_WAIT_S`` with nobody asking (CI
    saw the test above time out so)."""
    from services.ingest import service as ingest
    from shared.streams.connection import ensure_group

    monkeypatch.setattr(ingest, "BLOCKED_WAIT_S", 2.0)  # the poller's wait; a sleeper's own timeout is 4 s
    cams = [{"id": "c0", "source": "synthetic://process?w=64&h=48", "tasks": ["classify"]}]
    svc = ingest.IngestService(config(redis_server, prefix, cameras=cams), port=0)
    ensure_group(r, svc.keys.frames, Keys.PREPROCESS)  # as setup does, without starting the camera
    far = (2**62, 0)  # a frame preprocess never reaches
    poller = threading.Thread(target=svc.wait_delivered, args=(far,), daemon=True)
    poller.start()
    wait_until(lambda: blocked_in_xread(r), 5, "the first camera waits in XREAD")
    sleeper_back = threading.Event()
    sleeper = threading.Thread(target=lambda: (svc.wait_delivered(far), sleeper_back.set()), daemon=True)
    sleeper.start()  # sees a poller, so it sleeps on the condition
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert not blocked_in_xread(r)
    assert sleeper_back.wait(1.0), "the sleeping camera was not woken to take over the asking"
    assert svc.known_delivered() == (0, 0)  # nothing was read: the position did not move
    sleeper.join(timeout=10)
    svc.stop.set()


def test_preprocess_paused_by_infer_waits_for_its_results_instead_of_polling(redis_server, r, prefix, monkeypatch):
    """preprocess pauses while infer lags ``prepared_backlog`` entries; it then waits in Redis for infer's
    next results rather than asking every 20 ms, and resumes as soon as they are written (with
    BACKLOG_WAIT_S at 4 s, resuming within 2 s is the write's doing)."""
    from services.preprocess import service as pre
    from shared.imaging import encode
    from shared.messages import Frame

    monkeypatch.setattr(pre, "BACKLOG_WAIT_S", 4.0)  # below the client's 5 s socket timeout
    cfg = config(redis_server, prefix, cameras=[{"id": "c1", "source": "synthetic://process", "tasks": ["classify"]}],
                 streams={"prepared_backlog": 2})
    svc = pre.PreprocessService(cfg, port=0)
    svc.setup()
    out = svc.keys.prepared("classify")
    for seq in range(2):  # infer lags two entries: preprocess must not add more
        r.xadd(out, {"m": prepared(seq)})
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    enc, data = encode(image)
    r.xadd(svc.keys.frames, {"m": Frame(camera="c1", seq=7, ts=time.time_ns(), enc=enc, shape=image.shape,
                                         dtype="uint8", data=data).to_msgpack(), "cam": "c1"})

    def loop():
        while not svc.stop.is_set():
            svc.step()

    worker = threading.Thread(target=loop, daemon=True)
    try:
        r.config_resetstat()
        worker.start()
        time.sleep(1.0)
        calls = command_calls(r)
        assert calls.get("cmdstat_xreadgroup", 0) == 0 and r.xlen(out) == 2  # paused: the frame waits
        assert 1 <= questions(calls) <= 2, calls  # one question, then a wait (every 20 ms: 50)
        wait_until(lambda: blocked_in_xread(r), 2, "preprocess waits in XREAD")
        r.xreadgroup("infer-classify", "test", {out: ">"}, count=2)  # infer takes its two entries...
        r.xadd(svc.keys.results, {"m": b"-"})  # ...and writes its results
        wait_until(lambda: r.xlen(out) == 3, 2, "preprocess resumes when infer writes results")
        ((_, fields),) = r.xrange(out, count=1, min="(" + r.xrange(out)[1][0].decode())
        assert Prepared.from_msgpack(fields[b"m"]).seq == 7
    finally:
        svc.stop.set()
        worker.join(timeout=10)
        svc.close()


def test_preprocess_learns_infers_backlog_from_its_own_write(redis_server, r, prefix, monkeypatch):
    """The question "is infer behind?" rides in the transaction that writes a batch, so preprocess asks no
    separate one while frames flow, and the batch that fills infer's backlog pauses it at once: with the
    20 ms re-ask stretched to a minute, the third frame still waits (an answer from before the writes
    would have let it through)."""
    from services.preprocess import service as pre
    from shared.imaging import encode
    from shared.messages import Frame

    monkeypatch.setattr(pre, "BACKLOG_CHECK_S", 60.0)
    monkeypatch.setattr(pre, "BACKLOG_WAIT_S", 0.05)
    cfg = config(redis_server, prefix, cameras=[{"id": "c1", "source": "synthetic://process", "tasks": ["classify"]}],
                 streams={"prepared_backlog": 2})
    svc = pre.PreprocessService(cfg, port=0)
    svc.setup()
    out = svc.keys.prepared("classify")
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    enc, data = encode(image)
    r.config_resetstat()
    try:
        for seq in range(3):
            r.xadd(svc.keys.frames, {"m": Frame(camera="c1", seq=seq, ts=time.time_ns(), enc=enc, shape=image.shape,
                                                 dtype="uint8", data=data).to_msgpack(), "cam": "c1"})
            svc.step()
        assert r.xlen(out) == 2 and svc.backlogged()
        calls = command_calls(r)
        # one question before the first batch, one in each batch's transaction, one after the pause's wait
        assert (calls["cmdstat_exec"], questions(calls), calls["cmdstat_xreadgroup"]) == (2, 4, 2), calls
        r.xreadgroup("infer-classify", "test", {out: ">"}, count=2)  # infer catches up...
        r.xadd(svc.keys.results, {"m": b"-"})
        svc.step()  # ...the wait's answer says so...
        svc.step()  # ...and the third frame goes through
        assert [Prepared.from_msgpack(f[b"m"]).seq for _, f in r.xrange(out)] == [0, 1, 2]
    finally:
        svc.close()
