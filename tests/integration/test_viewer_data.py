"""`ViewerData` against a real Redis: what the viewer reads from the streams, written the way the services write.

Frames, results and alerts go through `Producer` with the ``cam``/``task`` side fields, as ingest, infer and
alert write them; acknowledgements through `acknowledge`; heartbeats as `Service.heartbeat` writes them.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
import pytest

from services.viewer.data import ViewerData, valid_alert_id
from shared.acks import acknowledge
from shared.config import load_config
from shared.imaging import encode
from shared.keys import Keys
from shared.messages import Alert, Frame, Result
from shared.service import Service
from shared.streams.connection import ensure_group
from shared.streams.outbox import Outbox
from shared.streams.producer import Producer
from shared.streams.reader import DeadLetters, Entry

BELT = [[10, 10], [60, 10], [60, 40], [10, 40]]
CLASSES = ["normal", "anomaly"]


def make_cfg(redis_server, prefix, tmp_path):
    return load_config(data={
        "redis": {"url": redis_server.url, "prefix": prefix},
        "cameras": [
            {"id": "press-1", "source": "synthetic://process", "fps": 4, "tasks": ["classify", "detect"],
             "zones": {"belt": BELT}},
            {"id": "kiln-1", "source": "synthetic://thermal", "fps": 10, "tasks": ["thermal"]},
            {"id": "line-1", "source": "synthetic://surface", "fps": 2, "tasks": ["segment"]},
        ],
        "models": {"classify": {"arch": "simple_cnn"}},
        "alerts": {"evidence_dir": str(tmp_path / "evidence")}},
        environ={})


class Writer:
    """Writes the three streams as ingest (frames), infer (results) and alert (alerts) do."""

    def __init__(self, r, prefix: str):
        self.r, self.keys = r, Keys(prefix)
        self.frames = Producer(r, self.keys.frames, maxlen=2000)
        self.results = Producer(r, self.keys.results, maxlen=10000)
        self.alerts = Producer(r, self.keys.alerts, max_age_s=30 * 86400)
        self.seq: dict[str, int] = {}

    def frame(self, camera: str, image: np.ndarray) -> tuple[str, Frame]:
        seq = self.seq[camera] = self.seq.get(camera, -1) + 1
        enc, data = encode(image, 95)
        frame = Frame(camera=camera, seq=seq, ts=time.time_ns(), enc=enc, shape=image.shape,
                      dtype=str(image.dtype), data=data)
        return self.frames.add(frame.to_msgpack(), cam=camera), frame

    def result(self, camera: str, task: str, frame_id: str, seq: int, out: dict, *, entry_id: str | None = None,
               ts: int | None = None, model: str = "net@1") -> Result:
        res = Result(camera=camera, seq=seq, ts=time.time_ns() if ts is None else ts, task=task,
                     frame_id=frame_id, model=model, out=out)
        if entry_id is None:
            self.results.add(res.to_msgpack(), cam=camera, task=task)
        else:  # an entry written in the past: the same fields, an explicit id
            self.r.xadd(self.keys.results, self.results.fields(res.to_msgpack(), camera, task), id=entry_id)
        return res

    def alert(self, alert: Alert) -> Alert:
        self.alerts.add(alert.to_msgpack(), cam=alert.camera, task=alert.task)
        return alert


def classify_out(p_anomaly: float) -> dict:
    probs = [round(1.0 - p_anomaly, 3), p_anomaly]
    index = int(np.argmax(probs))
    return {"label": CLASSES[index], "index": index, "probs": probs, "classes": CLASSES}


def detect_out(*boxes) -> dict:
    return {"boxes": [list(b) for b in boxes], "classes": ["person", "leak"]}


def thermal_out(max_k: float) -> dict:
    return {"max_k": max_k, "avg_k": max_k - 50.0, "min_k": max_k - 80.0, "hotspots": [[5, 5, max_k]]}


def solid(value: int, shape=(48, 64, 3)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def as_row(res: Result) -> dict:
    return {"frame_id": res.frame_id, "seq": res.seq, "ts": res.ts, "model": res.model, "out": res.out}


@pytest.fixture
def env(redis_server, r, prefix, tmp_path):
    cfg = make_cfg(redis_server, prefix, tmp_path)
    return cfg, ViewerData(cfg, r), Writer(r, prefix)


# --- latest results and pictures --------------------------------------------------------------------------
def test_latest_results_are_the_newest_per_camera_and_task_past_other_cameras(env, r):
    cfg, data, w = env
    f0, _ = w.frame("press-1", solid(10))
    f1, _ = w.frame("press-1", solid(20))
    w.result("press-1", "classify", f0, 0, classify_out(0.1))  # older than the next one: passed over
    detect = w.result("press-1", "detect", f0, 0, detect_out([1, 2, 30, 40, 0.9, 1]))
    classify = w.result("press-1", "classify", f1, 1, classify_out(0.8))
    r.xadd(w.keys.results, {"m": b"\xc1 not msgpack", "cam": "press-1", "task": "classify"})  # skipped
    line = w.result("line-1", "segment", "1-0", 0, {"defect_ratio": 0.25, "regions": []})
    kiln = [w.result("kiln-1", "thermal", f"{2 + i}-0", i, thermal_out(300.0 + i)) for i in range(200)]
    w.result("ghost-1", "thermal", "9-0", 0, thermal_out(999.0))  # not a configured camera
    w.result("kiln-1", "classify", "9-1", 0, classify_out(0.9))  # not one of kiln-1's tasks

    # press-1's newest results lie behind 200+ entries of other cameras (several pages of the scan)
    assert data.latest_results() == {
        "press-1": {"classify": as_row(classify), "detect": as_row(detect)},
        "kiln-1": {"thermal": as_row(kiln[-1])},
        "line-1": {"segment": as_row(line)},
    }
    assert data.latest_results("press-1") == {"press-1": {"classify": as_row(classify), "detect": as_row(detect)}}
    assert data.latest_results("line-1") == {"line-1": {"segment": as_row(line)}}
    assert data.latest_results("ghost-1") == {}


def test_picture_is_the_frame_of_the_newest_result_with_every_tasks_result(env, r):
    cfg, data, w = env
    f0, _ = w.frame("press-1", solid(40))
    f1, _ = w.frame("press-1", solid(120))
    f2, _ = w.frame("press-1", solid(200))  # no result yet: results lag the frames
    w.frame("kiln-1", solid(90))
    classify = w.result("press-1", "classify", f1, 1, classify_out(0.7))
    detect = w.result("press-1", "detect", f0, 0, detect_out([1, 2, 30, 40, 0.9, 1]))  # slower task, older frame
    w.frame("kiln-1", solid(91))  # newer frames of another camera

    image, results, frame_id = data.picture("press-1")
    assert frame_id == f1  # the newest result's frame, though the newest result entry is of f0
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert abs(int(np.median(image)) - 120) <= 2
    assert results == {"classify": classify.out, "detect": detect.out}

    # a camera with frames but no results yet: its newest frame, bare
    image, results, frame_id = data.picture("kiln-1")
    assert results == {} and abs(int(np.median(image)) - 91) <= 2
    assert Frame.from_msgpack(r.xrange(w.keys.frames, frame_id, frame_id)[0][1][b"m"]).camera == "kiln-1"
    assert data.picture("line-1") is None  # nothing at all

    # the newest result's frame trimmed away: the camera's newest frame, without results of other frames
    r.xdel(w.keys.frames, f1)
    image, results, frame_id = data.picture("press-1")
    assert (frame_id, results) == (f2, {}) and abs(int(np.median(image)) - 200) <= 2


def test_history_is_the_key_value_per_task_oldest_first_over_five_minutes(env, r):
    cfg, data, w = env
    now_ms = int(time.time() * 1000)
    writes = [  # (seconds ago, camera, task, out)
        (400, "press-1", "classify", classify_out(0.99)),  # before the window
        (200, "press-1", "classify", classify_out(0.2)),
        (150, "kiln-1", "thermal", thermal_out(410.0)),
        (120, "press-1", "detect", detect_out([1, 1, 5, 5, 0.9, 0], [8, 8, 20, 20, 0.7, 1])),
        (100, "press-1", "classify", classify_out(0.6)),
        (50, "line-1", "segment", {"defect_ratio": 0.125, "regions": []}),
        (10, "press-1", "classify", classify_out(0.3)),
        (5, "press-1", "detect", detect_out()),
    ]
    for i, (ago, cam, task, out) in enumerate(writes):
        ms = now_ms - ago * 1000
        w.result(cam, task, f"{ms}-0", i, out, entry_id=f"{ms}-0", ts=ms * 1_000_000)

    def t(ago):
        return round((now_ms - ago * 1000) / 1000, 3)

    assert data.history("press-1") == {
        "classify": [[t(200), 0.8], [t(100), 0.6], [t(10), 0.7]],  # the top class probability
        "detect": [[t(120), 2.0], [t(5), 0.0]],  # the box count
    }
    assert data.history("kiln-1") == {"thermal": [[t(150), 410.0]]}
    assert data.history("line-1") == {"segment": [[t(50), 0.125]]}
    assert data.history("press-1", seconds=60) == {"classify": [[t(10), 0.7]], "detect": [[t(5), 0.0]]}


# --- alerts -------------------------------------------------------------------------------------------------
def firing(rule: str, camera: str, task: str, severity: str, ts: int, frame_id: str) -> Alert:
    alert_id = Alert.identity(rule, camera, frame_id)
    return Alert(id=alert_id, rule=rule, severity=severity, state="firing", camera=camera, task=task, ts=ts,
                 value=1.0, threshold=0.5, message=f"{rule} on {camera}", frame_id=frame_id,
                 labels={"episode": alert_id, "model": "net@1"})


def resolve(of: Alert, ts: int, frame_id: str) -> Alert:
    return Alert(id=Alert.identity(of.rule + ":resolved", f"camera {of.camera}", frame_id), rule=of.rule,
                 severity=of.severity, state="resolved", camera=of.camera, task=of.task, ts=ts, value=0.1,
                 threshold=0.5, message=of.message, frame_id=frame_id, labels={"episode": of.id, "model": "net@1"})


@pytest.fixture
def alert_log(env):
    """kiln-hot fired and resolved, leak fired, kiln-hot fired again, camera-offline fired (newest last)."""
    cfg, data, w = env
    t0 = time.time_ns() - 60 * 10**9
    a1 = w.alert(firing("kiln-hot", "kiln-1", "thermal", "critical", t0, "1-0"))
    r1 = w.alert(resolve(a1, t0 + 10**9, "2-0"))
    a2 = w.alert(firing("leak", "press-1", "detect", "warning", t0 + 2 * 10**9, "3-0"))
    a3 = w.alert(firing("kiln-hot", "kiln-1", "thermal", "critical", t0 + 3 * 10**9, "4-0"))
    a4 = w.alert(firing("camera-offline", "press-1", "", "warning", t0 + 4 * 10**9, "5-0"))
    return a1, r1, a2, a3, a4


def ids(rows) -> list[str]:
    return [row["id"] for row in rows]


def test_alerts_pair_firing_with_resolve_and_filter_exactly(env, alert_log):
    cfg, data, w = env
    a1, r1, a2, a3, a4 = alert_log
    rows = data.alerts()
    assert ids(rows) == [a4.id, a3.id, a2.id, a1.id]  # episodes newest first; the resolve is not a row
    by_id = {row["id"]: row for row in rows}
    assert (by_id[a1.id]["state"], by_id[a1.id]["resolved_ts"]) == ("resolved", r1.ts)
    for a in (a2, a3, a4):
        assert (by_id[a.id]["state"], by_id[a.id]["resolved_ts"]) == ("firing", None)
    row = by_id[a2.id]
    assert {k: row[k] for k in ("rule", "severity", "camera", "task", "ts", "value", "threshold", "message",
                                "frame_id", "labels", "ack", "evidence")} == {
        "rule": "leak", "severity": "warning", "camera": "press-1", "task": "detect", "ts": a2.ts, "value": 1.0,
        "threshold": 0.5, "message": "leak on press-1", "frame_id": "3-0", "labels": a2.labels, "ack": None,
        "evidence": []}

    assert ids(data.alerts(camera="kiln-1")) == [a3.id, a1.id]
    assert ids(data.alerts(camera="kiln")) == []  # exact, not a prefix
    assert ids(data.alerts(rule="kiln-hot")) == [a3.id, a1.id]
    assert ids(data.alerts(rule="kiln")) == []
    assert ids(data.alerts(severity="critical")) == [a3.id, a1.id]
    assert ids(data.alerts(severity="warning")) == [a4.id, a2.id]
    assert ids(data.alerts(state="resolved")) == [a1.id]
    assert ids(data.alerts(state="firing")) == [a4.id, a3.id, a2.id]
    assert ids(data.alerts(camera="kiln-1", state="firing")) == [a3.id]
    assert ids(data.alerts(camera="press-1", rule="leak", severity="warning", state="firing")) == [a2.id]
    assert ids(data.alerts(camera="press-1", severity="critical")) == []
    assert ids(data.alerts(limit=2)) == [a4.id, a3.id]


def test_alerts_show_acknowledgements_and_the_evidence_files_present(env, r, prefix, alert_log):
    cfg, data, w = env
    a1, r1, a2, a3, a4 = alert_log
    record = acknowledge(r, prefix, a2.id, by="alice", note="maintenance informed")
    ev = cfg.alerts.evidence_dir
    (ev / a1.id).mkdir(parents=True)
    (ev / a1.id / "snapshot.jpg").write_bytes(b"\xff\xd8 not checked")
    (ev / a1.id / "evidence.json").write_text(json.dumps({"id": a1.id, "value": 1.0}))
    (ev / a1.id / "notes.txt").write_text("not an evidence file")
    (ev / a3.id / "clip.mp4").mkdir(parents=True)  # a directory of that name is not the clip
    (ev / a3.id / "evidence.json").write_text("{ truncated")

    by_id = {row["id"]: row for row in data.alerts()}
    assert by_id[a2.id]["ack"] == record and record["by"] == "alice" and record["note"] == "maintenance informed"
    assert [by_id[a.id]["ack"] for a in (a1, a3, a4)] == [None, None, None]
    assert by_id[a1.id]["evidence"] == ["snapshot.jpg", "evidence.json"]
    assert by_id[a3.id]["evidence"] == ["evidence.json"]
    assert by_id[a2.id]["evidence"] == []

    one = data.alert(a1.id)
    assert one["id"] == a1.id and one["state"] == "resolved" and one["evidence_json"] == {"id": a1.id, "value": 1.0}
    assert data.alert(a3.id)["evidence_json"] is None  # unreadable JSON is reported as missing, not a crash
    assert "evidence_json" not in data.alert(a2.id)
    assert data.alert(a2.id)["ack"] == record
    assert data.alert(str(uuid.uuid4())) is None
    assert data.alert("not-a-uuid") is None
    assert data.alert(r1.id) is None  # a resolve is part of its episode, not an alert page of its own


def test_a_repeat_notification_is_part_of_its_episode(env):
    """A rule's ``repeat_s`` re-notification is a new firing alert (its own id) carrying ``labels.episode``;
    the log shows the episode once, resolved when its resolve comes, not a second alert firing forever."""
    cfg, data, w = env
    t0 = time.time_ns() - 60 * 10**9
    a1 = w.alert(firing("kiln-hot", "kiln-1", "thermal", "critical", t0, "1-0"))
    repeat_id = Alert.identity("kiln-hot:repeat1", "camera kiln-1", "2-0")
    w.alert(Alert(id=repeat_id, rule="kiln-hot", severity="critical", state="firing", camera="kiln-1",
                  task="thermal", ts=t0 + 10**9, value=2.0, threshold=0.5, message=a1.message, frame_id="2-0",
                  labels={"episode": a1.id, "model": "net@1", "repeat": "1"}))
    r1 = w.alert(resolve(a1, t0 + 2 * 10**9, "3-0"))
    rows = data.alerts()
    assert [(row["id"], row["state"], row["resolved_ts"]) for row in rows] == [(a1.id, "resolved", r1.ts)]
    assert data.alerts(state="firing") == []


def test_evidence_path_takes_only_uuid_ids_and_known_names(env):
    cfg, data, w = env
    alert_id = str(uuid.uuid4())
    d = cfg.alerts.evidence_dir / alert_id
    d.mkdir(parents=True)
    for name in ("snapshot.jpg", "evidence.json", "notes.txt"):
        (d / name).write_text(name)
    (cfg.alerts.evidence_dir / "secret.txt").write_text("not evidence")

    assert data.evidence_path(alert_id, "snapshot.jpg") == d / "snapshot.jpg"
    assert data.evidence_path(alert_id, "evidence.json") == d / "evidence.json"
    assert data.evidence_path(alert_id, "clip.mp4") is None  # not written (yet)
    assert data.evidence_files(alert_id) == ["snapshot.jpg", "evidence.json"]
    for name in ("notes.txt", "../secret.txt", "", ".", "snapshot.jpg/", "SNAPSHOT.JPG"):
        assert data.evidence_path(alert_id, name) is None, name
    for bad in (alert_id.upper(), "{" + alert_id + "}", alert_id.replace("-", ""), "..", "../" + alert_id,
                alert_id + "/..", "", "not-a-uuid"):
        assert not valid_alert_id(bad), bad
        assert data.evidence_path(bad, "snapshot.jpg") is None, bad
    assert valid_alert_id(alert_id)


# --- pipeline health ----------------------------------------------------------------------------------------
def test_streams_show_length_lag_pending_and_dead_letter_reasons(env, r, prefix):
    cfg, data, w = env
    names = Keys(prefix)
    ensure_group(r, names.frames, Keys.PREPROCESS)
    for i in range(3):
        w.frame("press-1", solid(10 * i))
    r.xreadgroup(Keys.PREPROCESS, "pre-1", {names.frames: ">"}, count=1)  # one delivered, not acknowledged
    dead = DeadLetters(r, names, max_age_s=7 * 86400, stage="preprocess")
    box = Outbox(r)
    for reason, n in (("decode_error", 2), ("oversized", 1), ("max_deliveries", 3)):
        for i in range(n):
            dead.add(box, names.frames, Entry(f"{i + 1}-{n}", {b"m": b"x", b"cam": b"press-1"}), reason, "test")
    box.commit()

    rows = {row["stream"]: row for row in data.streams()}
    assert list(rows) == [s for s, _ in names.all(["classify", "detect", "segment", "thermal"])]
    assert rows[names.frames] == {"stream": names.frames, "group": "preprocess", "length": 3, "lag": 2, "pending": 1}
    assert rows[names.deadletter] == {"stream": names.deadletter, "group": None, "length": 6, "lag": None,
                                      "pending": None, "reasons": {"decode_error": 2, "oversized": 1,
                                                                   "max_deliveries": 3}}
    assert rows[names.prepared("thermal")] == {"stream": names.prepared("thermal"), "group": "infer-thermal",
                                               "length": 0, "lag": None, "pending": None}
    assert all("reasons" not in row for s, row in rows.items() if s != names.deadletter)


class _Beating(Service):
    name = "preprocess"


def test_services_show_heartbeats_and_mark_silent_ones_down(env, r, prefix):
    cfg, data, w = env
    svc = _Beating(cfg, replica=1, port=0)
    svc._connect()
    svc.heartbeat()  # a live process, as the service loop writes it every stats_every_s
    key = Keys(prefix).services
    now = time.time()

    def beat(field: str, service: str, age: float, ready: bool = True):
        r.hset(key, field, json.dumps({"service": service, "replica": 0, "host": "h2", "pid": 7, "port": 9102,
                                       "ready": ready, "healthy": True, "ts": now - age}))
    beat("infer-h2-7", "infer", 60.0)  # stopped beating a minute ago (killed): down
    beat("alert-h2-8", "alert", 2.0, ready=False)  # beating, Redis not reachable: up, not ready
    beat("ingest-h2-9", "ingest", 7200.0)  # silent for two hours: forgotten
    r.hset(key, "garbage", b"\xff not json")

    rows = data.services()
    assert [(s["id"], s["service"], s["up"], s["ready"]) for s in rows] == [
        ("alert-h2-8", "alert", True, False),
        ("infer-h2-7", "infer", False, True),
        (svc.consumer, "preprocess", True, True),
    ]
    mine = rows[2]
    assert (mine["replica"], mine["port"], mine["host"]) == (1, 0, os.uname().nodename) and mine["age_s"] < 2.0
    assert 59.0 <= rows[1]["age_s"] <= 62.0
    assert sorted(k.decode() for k in r.hkeys(key)) == sorted(["infer-h2-7", "alert-h2-8", svc.consumer])
