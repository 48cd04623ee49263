"""Faults: Redis going away and coming back, a frame that crashes the model."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from shared.keys import Keys
from shared.messages import Prepared
from tests.support.pipeline import Up, groups_idle, per_key
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SERVICES = ("ingest", "preprocess", "infer", "alert")


def ready(up: Up, service: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{up.port(service)}/readyz", timeout=2).status_code
    except httpx.TransportError:
        return None


def test_services_ride_out_a_redis_restart_without_losing_or_repeating_frames(tmp_path, service_ports, request):
    server = RedisServer(appendonly=True)
    try:
        n = 40
        cfg = {"redis": {"url": server.url, "prefix": "rr", "socket_timeout_s": 1}, "services": service_ports,
               "cameras": [{"id": "t1", "source": "synthetic://thermal", "fps": 8, "tasks": ["thermal"],
                            "on_full": "block", "max_frames": n}],
               "models": {"thermal": {"arch": "thermal_cnn"}},
               "inference": {"device": "cpu", "max_batch": 4, "max_wait_ms": 20, "threads": 1},
               "streams": {"claim_idle_ms": 1500}}
        up = Up(cfg, tmp_path, server.client())
        request.addfinalizer(lambda: up.proc.poll() is None and up.stop())
        up.wait_for(lambda: all(ready(up, s) == 200 for s in SERVICES), 60, "all services ready")
        up.wait_for(lambda: len(up.results()) >= 5, 60, "first results")
        server.stop()
        up.wait_for(lambda: all(ready(up, s) == 503 for s in SERVICES), 30, "every service not ready")
        time.sleep(2)  # a while without Redis: every loop retries with backoff, none exits
        pids = [p.pid for p in [up.proc]]
        server.start()
        up.r = server.client()
        up.wait_for(lambda: all(ready(up, s) == 200 for s in SERVICES), 60, "all services ready again")
        up.wait_for(lambda: len(up.results()) >= n, 120, f"{n} results")
        up.wait_for(lambda: groups_idle(up.r, "rr", ["thermal"]), 30, "drained")
        counts = per_key(up.results())
        assert set(counts) == {("t1", s, "thermal") for s in range(n)}
        assert max(counts.values()) == 1
        assert "exited with" not in up.tail(2000), "a service exited while Redis was away"
        assert pids == [up.proc.pid] and up.stop() == 0
    finally:
        server.close()


def test_a_frame_that_crashes_the_model_is_dead_lettered_after_max_deliveries(up_pipeline, r):
    """A uint16 frame on the classify stream makes the network raise; the stream keeps flowing around it."""
    cams = [{"id": "p1", "source": "synthetic://process", "fps": 10, "tasks": ["classify"], "on_full": "block",
             "max_frames": 20}]
    up = up_pipeline(cams, streams={"claim_idle_ms": 300, "max_deliveries": 2})
    up.wait_for(lambda: len(up.results()) >= 2, 120, "first results")
    img = np.zeros((224, 224, 3), np.uint16)
    poison = Prepared(camera="p1", seq=99_999, ts=time.time_ns(), task="classify", frame_id="0-1",
                      shape=img.shape, dtype="uint16", data=img.tobytes(), orig=[224, 224], letterbox=[1.0, 0, 0])
    stream = up.keys.prepared("classify")
    pid = r.xadd(stream, {"m": poison.to_msgpack(), "cam": "p1"}).decode()
    up.wait_for(lambda: any(f[b"id"].decode() == pid for _, f in r.xrange(up.keys.deadletter)), 60,
                "the poison frame dead-lettered")
    (letter,) = [f for _, f in r.xrange(up.keys.deadletter) if f[b"id"].decode() == pid]
    assert letter[b"reason"] == b"max_deliveries" and letter[b"stage"] == b"infer"
    up.wait_for(lambda: len({m["seq"] for m in up.results()}) == 20, 120, "every good frame")
    assert all(m["seq"] != 99_999 for m in up.results())
    up.wait_for(lambda: groups_idle(r, up.prefix, ["classify"]), 30, "nothing pending")
    assert up.stop() == 0


def _alerts(r, prefix):
    import msgpack

    return [msgpack.unpackb(f[b"m"], raw=False) for _, f in r.xrange(Keys(prefix).alerts)]


def test_camera_offline_frozen_and_black_alerts_fire_and_resolve(up_pipeline, r, tmp_path, shared_data):
    import shutil

    import cv2

    still, dark, late = tmp_path / "still", tmp_path / "dark", tmp_path / "late"
    still.mkdir()
    dark.mkdir()
    shutil.copy(shared_data / "fruits.jpg", still / "a.jpg")
    cv2.imwrite(str(dark / "a.png"), np.zeros((120, 160, 3), np.uint8))
    cam = {"fps": 5, "tasks": ["classify"], "frozen_s": 1.5, "black_s": 1.5}
    cams = [{"id": "still", "source": str(still), **cam}, {"id": "dark", "source": str(dark), **cam},
            {"id": "late", "source": str(late), **cam}]
    up = up_pipeline(cams, alerts={"camera_offline_s": 5})

    def fired():
        return {(a["rule"], a["camera"], a["state"]) for a in _alerts(r, up.prefix)}

    want = {("camera-frozen", "still", "firing"), ("camera-frozen", "dark", "firing"),
            ("camera-black", "dark", "firing"), ("camera-offline", "late", "firing")}
    up.wait_for(lambda: want <= fired(), 90, "frozen, black and offline alerts")
    assert ("camera-black", "still", "firing") not in fired()
    assert not any(cam in ("still", "dark") for rule, cam, _ in fired() if rule == "camera-offline")
    # Recovery: new pictures in the still camera's folder, the late camera's folder appears.
    shutil.copy(shared_data / "baboon.jpg", still / "b.jpg")
    shutil.copy(shared_data / "building.jpg", still / "c.jpg")
    shutil.copytree(still, late)
    up.wait_for(lambda: {("camera-frozen", "still", "resolved"), ("camera-offline", "late", "resolved")} <= fired(),
                90, "frozen and offline alerts resolved")
    ups = up.counter("alert", "plantsight_alerts_total", rule="camera-frozen")
    assert ups == 2  # one episode per camera: still and dark
    episodes = [a for a in _alerts(r, up.prefix) if a["rule"] == "camera-frozen" and a["camera"] == "still"]
    assert [a["state"] for a in episodes] == ["firing", "resolved"]
    assert episodes[1]["labels"]["episode"] == episodes[0]["id"]
    assert up.stop() == 0


def test_a_crashed_alert_service_does_not_repeat_an_alert(up_pipeline, r):
    import os
    import re
    import signal

    cams = [{"id": "k1", "source": "synthetic://thermal", "fps": 10, "tasks": ["thermal"], "max_frames": 60,
             "on_full": "block"}]
    rules = [{"name": "warm", "task": "thermal", "when": "max_k > 0", "for_frames": 3, "cooldown_s": 0}]
    up = up_pipeline(cams, alerts={"rules": rules, "camera_offline_s": 0}, streams={"claim_idle_ms": 1000})
    up.wait_for(lambda: any(a["rule"] == "warm" for a in _alerts(r, up.prefix)), 90, "the alert")
    pid = int(re.search(r"plantsight up: alert\s+pid (\d+)", up.tail(400)).group(1))
    os.kill(pid, signal.SIGKILL)
    up.wait_for(lambda: "alert restarted" in up.tail(400), 60, "the alert service restarted")
    up.wait_for(lambda: len(up.results()) == 60, 120, "all results")
    up.wait_for(lambda: groups_idle(r, up.prefix, ["thermal"]), 60, "results all read by the new alert service")
    warm = [a for a in _alerts(r, up.prefix) if a["rule"] == "warm"]
    assert [a["state"] for a in warm] == ["firing"]  # the episode goes on: no second firing after the restart
    assert up.stop() == 0
