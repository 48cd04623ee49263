"""Alert rules on a real Redis, through the alert service itself: episodes, zones, hysteresis, for_s,
overrides, rise rate, repeats and acknowledgements (with verdicts and their counter), pipeline-health alerts,
the ack endpoint and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.alerting.service import AlertService
from shared import acks
from shared.config import load_config
from shared.data.scenes import make_scene
from shared.imaging import encode
from shared.keys import Keys
from shared.messages import Alert, Frame, Result
from shared.streams.groups import group_lag
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.redis_server import redis_major

NS = 1_000_000_000
T0 = 1_800_000_000 * NS  # capture times of the synthetic results


def service(redis_server, prefix, tmp_path, rules, cameras=None, port=0, **alerts) -> AlertService:
    data = {"redis": {"url": redis_server.url, "prefix": prefix},
            "cameras": cameras if cameras is not None else [
                {"id": "k1", "source": "synthetic://thermal", "tasks": ["thermal"]},
                {"id": "k2", "source": "synthetic://thermal?seed=2", "tasks": ["thermal"]}],
            "alerts": {"rules": rules, "camera_offline_s": 0, "evidence_dir": str(tmp_path / "evidence"), **alerts}}
    return AlertService(load_config(data=data, environ={}), port=port)


def thermal(seq: int, max_k: float, camera="k1", step_s: float = 0.25, hotspots=(), frame_id=None) -> Result:
    return Result(camera=camera, seq=seq, ts=T0 + int(seq * step_s * NS), task="thermal",
                  frame_id=frame_id or f"{1000 + seq}-0", model="thermal_cnn@untrained",
                  out={"max_k": max_k, "avg_k": 300.0, "min_k": 290.0, "hotspots": [list(h) for h in hotspots],
                       "source": "radiometric"})


def run(svc: AlertService, results, now=None) -> list[tuple[int, Alert]]:
    return [(i, a) for i, res in enumerate(results) for a in svc.evaluate(res, now=None if now is None else now(i))]


def stream_alerts(r, svc) -> list[Alert]:
    return [Alert.from_msgpack(f[b"m"]) for _, f in r.xrange(svc.keys.alerts)]


def test_a_long_synthetic_sequence_gives_exactly_one_alert_per_episode(redis_server, r, prefix, tmp_path):
    scene = make_scene("thermal", seed=3, anomaly_rate=0.1)
    n = 1500
    rules = [{"name": "overheat", "task": "thermal", "when": "max_k >= 450", "for_frames": 3, "clear_frames": 2,
              "cooldown_s": 0, "severity": "critical"}]
    svc = service(redis_server, prefix, tmp_path, rules)
    svc.setup()
    truths = []
    for seq in range(n):  # the scene's own radiometric statistics, as infer reports them
        _, truth = scene.render(seq)
        truths.append(truth)
        res = Result(camera="k1", seq=seq, ts=T0 + seq * NS // 4, task="thermal", frame_id=f"{1000 + seq}-0",
                     model="thermal_cnn@untrained",
                     out={k: truth[k] for k in ("max_k", "avg_k", "min_k", "hotspots")} | {"source": "radiometric"})
        r.xadd(svc.keys.results, {"m": res.to_msgpack()})
    for _ in range(n // 64 + 2):  # the service reads 64 results a step
        svc.step()
    assert group_lag(r, svc.keys.results, "alert") == 0
    episodes = sorted({scene.episode(q)[:2] for q in range(n) if scene.episode(q)})
    assert len(episodes) >= 12
    # Each episode is 10 frames above 460 K: it fires on its 3rd frame and resolves 2 frames after it ends.
    want = []
    for _, first in episodes:
        last = max(q for q in range(first, first + 20) if q < n and scene.anomalous(q) and truths[q]["max_k"] >= 450)
        want += [("firing", f"{1000 + first + 2}-0"), ("resolved", f"{1000 + last + 2}-0")]
    got = stream_alerts(r, svc)
    assert [(a.state, a.frame_id) for a in got] == want
    firing = [a for a in got if a.state == "firing"]
    assert len({a.id for a in got}) == len(got)
    assert [a.labels["episode"] for a in got if a.state == "resolved"] == [a.id for a in firing]
    assert all(a.value >= 450 and a.threshold == 450.0 for a in firing)
    # The evidence of every firing alert was written before the alert (evidence.json names it).
    for a in firing:
        assert a.evidence == a.id
        assert json.loads((tmp_path / "evidence" / a.id / "evidence.json").read_text())["id"] == a.id
    assert r.xpending(svc.keys.results, "alert")["pending"] == 0


@pytest.mark.parametrize("rule, want", [
    # Without hysteresis a value dithering around the threshold makes an alert storm ...
    ({}, 6),
    # ... with resolve_when (a band) or clear_frames it is one episode.
    ({"resolve_when": "max_k < 440"}, 1),
    ({"clear_frames": 3}, 1),
])
def test_hysteresis_keeps_a_dithering_value_to_one_episode(redis_server, r, prefix, tmp_path, rule, want):
    svc = service(redis_server, prefix, tmp_path, [{"name": "hot", "task": "thermal", "when": "max_k >= 450",
                                                    "cooldown_s": 0, **rule}])
    temps = [300, 451, 449, 452, 448, 455, 447, 451, 446, 453, 449, 452, 300, 300, 300]
    alerts = run(svc, [thermal(i, k) for i, k in enumerate(temps)])
    assert sum(a.state == "firing" for _, a in alerts) == want
    assert alerts[-1][1].state == "resolved"
    if want == 1:
        assert [(i, a.state) for i, a in alerts] == [(1, "firing"), (12 if "resolve_when" in rule else 14, "resolved")]


def test_for_s_counts_capture_time_not_frames(redis_server, r, prefix, tmp_path):
    svc = service(redis_server, prefix, tmp_path, [{"name": "hot", "task": "thermal", "when": "max_k >= 450",
                                                    "for_s": 2, "cooldown_s": 0}])
    # 0.5 s apart: the 5th matching frame is the first 2 s after the first one.
    alerts = run(svc, [thermal(i, 460, step_s=0.5) for i in range(6)])
    assert [(i, a.state) for i, a in alerts] == [(4, "firing")]
    # A sparse camera (one frame in 3 s) fires on its second matching frame.
    alerts = run(svc, [thermal(i, 460, camera="k2", step_s=3) for i in range(3)])
    assert [(i, a.state, a.camera) for i, a in alerts] == [(1, "firing", "k2")]


def test_per_camera_overrides_of_a_param(redis_server, r, prefix, tmp_path):
    rules = [{"name": "hot", "task": "thermal", "when": "max_k >= limit", "params": {"limit": 450},
              "overrides": {"k2": {"limit": 480}}, "cooldown_s": 0}]
    svc = service(redis_server, prefix, tmp_path, rules)
    fired = run(svc, [thermal(0, 465, "k1"), thermal(0, 465, "k2"), thermal(1, 485, "k2")])
    assert [(i, a.camera, a.threshold, a.value, json.loads(a.labels["params"])) for i, a in fired] == [
        (0, "k1", 450.0, 465.0, {"limit": 450.0}), (2, "k2", 480.0, 485.0, {"limit": 480.0})]


def test_zones_scope_detections_with_one_episode_per_zone(redis_server, r, prefix, tmp_path):
    cams = [{"id": "p1", "source": "synthetic://equipment", "tasks": ["detect"],
             "zones": {"left": [[0, 0], [200, 0], [200, 448], [0, 448]],
                       "right": [[248, 0], [448, 0], [448, 448], [248, 448]]}},
            {"id": "p2", "source": "synthetic://equipment", "tasks": ["detect"]}]
    rules = [{"name": f"leak-{z}", "task": "detect", "zone": z, "when": "count.leak >= 1", "cooldown_s": 0}
             for z in ("left", "right")] + [{"name": "leak", "task": "detect", "when": "count.leak >= 1",
                                             "cooldown_s": 0}]
    svc = service(redis_server, prefix, tmp_path, rules, cameras=cams)
    classes = ["pump", "valve", "motor", "leak", "hot_spot"]

    def det(seq, camera, *boxes):
        return Result(camera=camera, seq=seq, ts=T0 + seq * NS, task="detect", frame_id=f"{2000 + seq}-0",
                      model="simple_yolo@untrained", out={"boxes": [list(b) for b in boxes], "classes": classes})

    left_leak, right_leak, straddling = [50, 50, 90, 90, 0.8, 3], [300, 40, 340, 80, 0.7, 3], [150, 10, 300, 60, 0.9, 3]
    seq = [det(0, "p1", left_leak), det(1, "p1", left_leak, right_leak), det(2, "p1", right_leak),
           det(3, "p1", straddling),  # centre x 225: in neither zone, but a leak on the camera
           det(4, "p1"), det(0, "p2", left_leak)]
    got = [(i, a.rule, a.camera, a.state, a.labels.get("zone")) for i, a in run(svc, seq)]
    assert got == [(0, "leak-left", "p1", "firing", "left"), (0, "leak", "p1", "firing", None),
                   (1, "leak-right", "p1", "firing", "right"), (2, "leak-left", "p1", "resolved", "left"),
                   (3, "leak-right", "p1", "resolved", "right"), (4, "leak", "p1", "resolved", None),
                   (5, "leak", "p2", "firing", None)]  # p2 has no zones: only the camera-wide rule
    assert set(svc.state.episodes) == {("leak-left", "p1", "left"), ("leak-right", "p1", "right"),
                                       ("leak", "p1", ""), ("leak", "p2", "")}


def test_a_thermal_zone_is_judged_on_its_own_pixels(redis_server, r, prefix, tmp_path):
    cams = [{"id": "k1", "source": "synthetic://thermal", "tasks": ["thermal"],
             "zones": {"burner": [[10, 10], [60, 10], [60, 50], [10, 50]], "door": [[100, 60], [150, 60], [150, 110]]}}]
    rules = [{"name": f"hot-{z}", "task": "thermal", "zone": z, "when": "max_k >= 450", "cooldown_s": 0}
             for z in ("burner", "door")]
    svc = service(redis_server, prefix, tmp_path, rules, cameras=cams)
    kelvin = np.full((120, 160), 300.0)
    kelvin[30, 40] = 470.0  # in the burner
    kelvin[5, 150] = 520.0  # in neither zone: the frame's max, but no zone's business
    enc, data = encode(np.round(kelvin * 100).astype(np.uint16)[:, :, None])
    frame = Frame(camera="k1", seq=0, ts=T0, enc=enc, shape=[120, 160, 1], dtype="uint16", data=data)
    frame_id = r.xadd(svc.keys.frames, {"m": frame.to_msgpack()}).decode()
    res = Result(camera="k1", seq=0, ts=T0, task="thermal", frame_id=frame_id, model="thermal_cnn@untrained",
                 out={"max_k": 520.0, "avg_k": 300.4, "min_k": 300.0, "hotspots": [[40, 30, 470.0], [150, 5, 520.0]],
                      "source": "radiometric"})
    (alert,) = svc.evaluate(res)
    assert (alert.rule, alert.labels["zone"], alert.value, alert.threshold) == ("hot-burner", "burner", 470.0, 450.0)
    assert alert.id == Alert.identity("hot-burner", "k1/burner", frame_id)
    assert "zone burner" in alert.message


def test_rise_k_per_min_over_the_rules_window(redis_server, r, prefix, tmp_path):
    rules = [{"name": "heating", "task": "thermal", "when": "rise_k_per_min > 20", "window_s": 10,
              "resolve_when": "rise_k_per_min < 5", "cooldown_s": 0}]
    svc = service(redis_server, prefix, tmp_path, rules)
    # 4 frames a second: flat (with noise) for 20 s, then +0.5 K per s (30 K/min) for 20 s, then flat.
    temps = [350 + (0.3 if i % 2 else -0.3) for i in range(80)]
    temps += [350 + 0.5 * (i / 4) for i in range(80)]
    temps += [360.0] * 80
    alerts = run(svc, [thermal(i, k) for i, k in enumerate(temps)])
    (fire, resolve) = alerts
    assert fire[1].state == "firing" and 80 < fire[0] < 80 + 40  # within 10 s of the start of the rise
    assert fire[1].value > 20 and fire[1].threshold == 20.0
    assert resolve[1].state == "resolved" and 160 < resolve[0] < 160 + 40


def test_repeats_until_acknowledged_and_the_resolve_still_goes_out(redis_server, r, prefix, tmp_path):
    rules = [{"name": "hot", "task": "thermal", "when": "max_k >= 450", "repeat_s": 60, "cooldown_s": 0}]
    svc = service(redis_server, prefix, tmp_path, rules)
    clock = {"now": 1000.0}

    def feed(seq, k):
        out = svc.evaluate(thermal(seq, k), now=clock["now"])  # step() would pass the wall clock
        for a in out:
            r.xadd(svc.keys.alerts, {"m": a.to_msgpack()})
        return [(a.state, a.labels.get("repeat")) for a in out]

    assert feed(0, 460) == [("firing", None)]
    clock["now"] += 30
    assert feed(1, 460) == []
    clock["now"] += 30
    assert feed(2, 460) == [("firing", "1")]  # 60 s on: re-notified, with a new id and the same episode
    first, repeat = stream_alerts(r, svc)
    assert repeat.id != first.id and repeat.labels["episode"] == first.id
    acks.acknowledge(r, svc.keys.prefix, repeat.id, "ann")  # acknowledging any alert of the episode counts
    clock["now"] += 600
    assert feed(3, 460) == []
    assert feed(4, 300) == [("resolved", None)]  # the resolve is sent anyway
    clock["now"] += 1
    assert feed(5, 460) == [("firing", None)]  # a new episode is notified (and repeats) as usual
    clock["now"] += 60
    assert feed(6, 460) == [("firing", "1")]


def test_pipeline_health_consumer_lag_and_dead_letters(redis_server, r, prefix, tmp_path):
    svc = service(redis_server, prefix, tmp_path, [], consumer_lag_max=5, consumer_lag_for_s=0, deadletter_max=3,
                  deadletter_window_s=1.5)
    svc.setup()
    stream = svc.keys.prepared("thermal")
    r.xgroup_create(stream, "infer-thermal", id="0", mkstream=True)
    for i in range(8):
        r.xadd(stream, {"m": b"x"})
    for i in range(3):
        r.xadd(svc.keys.deadletter, {"stage": "infer", "reason": "decode_error", "detail": f"#{i}"})

    def step():
        svc.health.next_check = svc.health.next_pipeline = 0.0
        svc.step()
        return [(a.rule, a.state, a.camera, a.task, a.value, a.threshold, a.labels.get("group"))
                for a in stream_alerts(r, svc)]

    # Redis 7 says the lag (8); 6.2 does not, and the check counts no further than one past its bound
    said = redis_major(r) >= 7
    lag = 8.0 if said else 6.0
    assert step() == [("consumer-lag", "firing", "pipeline", "pipeline", lag, 5.0, "infer-thermal"),
                      ("deadletter-growing", "firing", "pipeline", "pipeline", 3.0, 3.0, None)]
    assert step()[2:] == []  # still lagging, still growing: no second alert
    entries = r.xreadgroup("infer-thermal", "w", {stream: ">"}, count=100)[0][1]
    r.xack(stream, "infer-thermal", *[e[0] for e in entries])
    time.sleep(1.6)  # the dead letters leave the window
    assert step()[2:] == [("consumer-lag", "resolved", "pipeline", "pipeline", 0.0, 5.0, "infer-thermal"),
                          ("deadletter-growing", "resolved", "pipeline", "pipeline", 0.0, 3.0, None)]
    got = stream_alerts(r, svc)
    assert got[2].labels["episode"] == got[0].id and got[3].labels["episode"] == got[1].id
    assert ("infer-thermal lags 8 entries" if said else "infer-thermal lags at least 6 entries") in got[0].message


def test_ack_endpoint_needs_the_operator_token(redis_server, r, prefix, tmp_path, monkeypatch):
    token = "op-token-7Hq2"
    monkeypatch.setenv("PLANTSIGHT_VIEWER_OPERATOR_TOKEN", token)
    svc = service(redis_server, prefix, tmp_path, [{"name": "hot", "task": "thermal", "when": "max_k >= 450"}],
                  port=free_port())
    svc.setup()
    r.xadd(svc.keys.results, {"m": thermal(0, 460).to_msgpack()})
    svc.step()
    (alert,) = stream_alerts(r, svc)
    svc.start_http()
    base = f"http://127.0.0.1:{svc.port}/alerts"
    try:
        assert httpx.post(f"{base}/{alert.id}/ack", timeout=5).status_code == 401
        bad = httpx.post(f"{base}/{alert.id}/ack", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert bad.status_code == 401 and bad.headers["WWW-Authenticate"].startswith("Bearer")
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.post(f"{base}/not-an-alert/ack", headers=auth, timeout=5).status_code == 404
        assert httpx.get(f"{base}/{alert.id}/ack", headers=auth, timeout=5).status_code == 405
        assert httpx.post(f"{base}/{alert.id}/ack", headers=auth, content=b"[1]", timeout=5).status_code == 400
        assert acks.acknowledgement(r, svc.keys.prefix, alert.id) is None  # nothing was written so far
        ok = httpx.post(f"{base}/{alert.id}/ack", headers=auth, json={"by": "ann", "note": "valve closed"}, timeout=5)
        assert ok.status_code == 200
        doc = ok.json()
        assert (doc["id"], doc["by"], doc["note"]) == (alert.id, "ann", "valve closed")
        assert acks.acknowledgement(r, svc.keys.prefix, alert.id)["by"] == "ann"
        again = httpx.post(f"{base}/{alert.id}/ack", headers=auth, json={"by": "bob"}, timeout=5)
        assert again.json()["by"] == "ann"  # the first acknowledgement stands
        assert again.json()["verdict"] is None

        bad = httpx.post(f"{base}/{alert.id}/ack", headers=auth, json={"verdict": "maybe"}, timeout=5)
        assert bad.status_code == 400
        assert bad.json() == {"error": "verdict 'maybe' is not one of: confirmed, false_alarm"}
        judged = httpx.post(f"{base}/{alert.id}/ack", headers=auth, json={"by": "bob", "verdict": "false_alarm"},
                            timeout=5)
        assert judged.status_code == 200  # a verdict added to the acknowledgement, which is still ann's
        assert {k: judged.json()[k] for k in ("by", "note", "verdict", "rule", "camera")} == {
            "by": "ann", "note": "valve closed", "verdict": "false_alarm", "rule": "hot", "camera": "k1"}
        changed = httpx.post(f"{base}/{alert.id}/ack", headers=auth, json={"verdict": "confirmed"}, timeout=5)
        assert changed.json() == judged.json()  # a verdict stays

        r.xadd(svc.keys.results, {"m": thermal(1, 460, camera="k2").to_msgpack()})
        svc.step()
        other = stream_alerts(r, svc)[-1]
        assert other.camera == "k2"
        acks.acknowledge(r, svc.keys.prefix, other.id, "cli-user", verdict="confirmed")  # another process's write
        text = httpx.get(f"http://127.0.0.1:{svc.port}/metrics", timeout=5).text
        verdicts = {(s.labels["rule"], s.labels["verdict"]): s.value for fam in text_string_to_metric_families(text)
                    for s in fam.samples if s.name == "plantsight_alert_verdicts_total"}
        assert verdicts[("hot", "false_alarm")] == 1 and verdicts[("hot", "confirmed")] == 1
        assert verdicts[("camera-offline", "confirmed")] == 0  # known rules' series exist at zero
    finally:
        svc.http.shutdown()


def test_a_verdict_is_stored_may_be_added_later_and_is_never_changed(redis_server, r, prefix):
    keys = Keys(prefix)
    alerts = [Alert(id=Alert.identity("leak", cam, "1-0"), rule="leak", severity="warning", state="firing",
                    camera=cam, task="detect", ts=T0, value=1.0, threshold=1.0, message="leak", frame_id="1-0")
              for cam in ("p1", "p2", "p3", "p4")]
    for a in alerts:
        r.xadd(keys.alerts, {"m": a.to_msgpack()})
    a1, a2, a3, a4 = (a.id for a in alerts)
    assert acks.find_alert(r, prefix, a2).camera == "p2" and acks.find_alert(r, prefix, "nope") is None

    for bad in ("maybe", "", "Confirmed", 1, ["confirmed"]):
        with pytest.raises(ValueError, match="is not one of: confirmed, false_alarm"):
            acks.acknowledge(r, prefix, a1, "ann", verdict=bad)
    assert acks.acknowledgement(r, prefix, a1) is None  # refused before anything was written
    with pytest.raises(acks.BadVerdict, match="verdict 'maybe'"):
        acks.acknowledge(r, prefix, "no-such-alert", "ann", verdict="maybe")  # the verdict is checked first

    first = acks.acknowledge(r, prefix, a1, "ann", "seen", verdict="confirmed")
    assert {k: v for k, v in first.items() if k != "at"} == {
        "by": "ann", "note": "seen", "verdict": "confirmed", "rule": "leak", "camera": "p1"}
    assert acks.acknowledgement(r, prefix, a1) == first
    assert acks.acknowledge(r, prefix, a1, "bob", "no", verdict="false_alarm") == first  # a verdict stays
    assert acks.acknowledge(r, prefix, a1, "bob") == first

    plain = acks.acknowledge(r, prefix, a2, "ann", "looking")
    assert plain["verdict"] is None and plain["rule"] == "leak"
    later = acks.acknowledge(r, prefix, a2, "bob", "ignored", verdict="false_alarm")
    assert later == {**plain, "verdict": "false_alarm"}  # who acknowledged, when and the note are the first's
    assert acks.acknowledge(r, prefix, a2, "carl", verdict="confirmed") == later

    # an acknowledgement written before verdicts existed gets the verdict with the alert's rule and camera
    r.hset(keys.alert_acks, a3, json.dumps({"by": "old", "at": 1.0, "note": ""}))
    assert acks.acknowledge(r, prefix, a3, "bob", verdict="confirmed") == {
        "by": "old", "at": 1.0, "note": "", "verdict": "confirmed", "rule": "leak", "camera": "p3"}

    # operators judging the same acknowledgement at once: one verdict wins and every caller is told it
    acks.acknowledge(r, prefix, a4, "ann")
    clients = [redis_server.client() for _ in range(8)]
    with ThreadPoolExecutor(len(clients)) as pool:
        got = list(pool.map(lambda i: acks.acknowledge(clients[i], prefix, a4, f"op{i}", verdict=acks.VERDICTS[i % 2]),
                            range(len(clients))))
    assert all(g == acks.acknowledgement(r, prefix, a4) for g in got) and got[0]["verdict"] in acks.VERDICTS

    r.hset(keys.alert_acks, "by-hand", b"not json")  # skipped, not counted, and no failure
    want = Counter({("leak", "confirmed"): 2, ("leak", "false_alarm"): 1})  # a1, a3; a2
    want[("leak", got[0]["verdict"])] += 1  # a4
    assert acks.verdict_counts(r, prefix) == want


def test_ack_token_from_a_file_and_none_configured(redis_server, r, prefix, tmp_path, monkeypatch):
    from services.alerting.service import operator_token

    path = tmp_path / "token"
    path.write_text("from-file-Zx9\n")
    assert operator_token({"PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE": str(path),
                           "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": "env"}) == "from-file-Zx9"
    assert operator_token({"PLANTSIGHT_VIEWER_OPERATOR_TOKEN": "env"}) == "env"
    assert operator_token({}) is None
    monkeypatch.delenv("PLANTSIGHT_VIEWER_OPERATOR_TOKEN", raising=False)
    monkeypatch.delenv("PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE", raising=False)
    svc = service(redis_server, prefix, tmp_path, [], port=free_port())
    svc.start_http()
    try:
        resp = httpx.post(f"http://127.0.0.1:{svc.port}/alerts/x/ack", headers={"Authorization": "Bearer guess"},
                          timeout=5)
        assert resp.status_code == 401 and resp.json() == {"error": "no operator token is configured"}
    finally:
        svc.http.shutdown()


def test_cli_lists_and_acknowledges_alerts(redis_server, r, prefix, tmp_path):
    svc = service(redis_server, prefix, tmp_path, [{"name": "hot", "task": "thermal", "when": "max_k >= 450",
                                                    "cooldown_s": 0}])
    svc.setup()
    for i, k in enumerate([460, 300]):
        r.xadd(svc.keys.results, {"m": thermal(i, k).to_msgpack()})
    svc.step()
    firing, resolved = stream_alerts(r, svc)
    path = tmp_path / "plantsight.yaml"
    path.write_text(yaml.safe_dump({"redis": {"url": redis_server.url, "prefix": prefix}}))

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "services.cli", "alerts", *args], cwd=ROOT, capture_output=True,
                             text=True, env=env_without_plantsight(), timeout=60)
        return res.returncode, res.stdout, res.stderr

    code, out, _ = cli("ack", firing.id, "--by", "ann", "--config", str(path))
    assert code == 0 and json.loads(out)["by"] == "ann" and json.loads(out)["verdict"] is None
    code, _, err = cli("--config", str(path), "ack", "no-such-id")
    assert code == 1 and f"no alert no-such-id on {Keys(prefix).alerts}" in err
    code, out, _ = cli("--config", str(path))
    assert code == 0 and out.splitlines()[1].split()[-3:] == ["-", "by", "ann"]  # acknowledged, not judged
    code, out, err = cli("--config", str(path), "ack", firing.id, "--verdict", "maybe")
    assert (code, out) == (2, "") and "verdict 'maybe' is not one of: confirmed, false_alarm" in err
    code, out, _ = cli("--config", str(path), "ack", firing.id, "--by", "bob", "--verdict", "confirmed")
    assert code == 0 and (json.loads(out)["by"], json.loads(out)["verdict"]) == ("ann", "confirmed")
    code, out, _ = cli("--config", str(path), "--json")
    rows = json.loads(out)["alerts"]
    assert [(a["id"], a["state"], a["rule"], a["camera"], a["value"], (a["acked"] or {}).get("by"),
             (a["acked"] or {}).get("verdict")) for a in rows] == [
        (firing.id, "firing", "hot", "k1", 460.0, "ann", "confirmed"),
        (resolved.id, "resolved", "hot", "k1", 300.0, "ann", "confirmed")]
    code, out, _ = cli("--config", str(path))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["id", "time", "(UTC)", "state"]
    assert lines[0].split()[-2:] == ["verdict", "acked"]
    assert lines[1].split()[0] == firing.id and lines[1].split()[3:8] == ["firing", "warning", "hot", "k1", "460"]
    assert lines[1].split()[-3:] == ["confirmed", "by", "ann"] and lines[2].split()[3] == "resolved"


def test_an_unreadable_token_file_turns_acknowledging_off_but_not_alerting(tmp_path, caplog):
    from services.alerting.service import operator_token

    missing = tmp_path / "no-such-token"
    assert operator_token({"PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE": str(missing)}) is None
    assert f"PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE={missing}: cannot read the file" in caplog.text
    assert "acknowledging over HTTP is off" in caplog.text
