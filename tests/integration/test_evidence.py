"""Alert evidence against a real Redis: snapshot, clip and evidence.json from frames in ``{P}:frames``.

Frames are the ingest's synthetic scenes, encoded as ingest encodes them (JPEG, 16-bit PNG, raw).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import cv2
import numpy as np
import pytest

from services.alerting.evidence import EvidenceError, EvidenceStore, check_id
from shared.config import load_config
from shared.data.scenes import make_scene
from shared.imaging import encode
from shared.keys import Keys
from shared.messages import Alert, Frame, Result
from shared.overlay import ZONE_HIGHLIGHT, render_base

KILN_ZONE = [[20, 10], [150, 10], [150, 110], [20, 110]]


def make_cfg(redis_server, prefix, tmp_path, **alerts):
    return load_config(data={
        "redis": {"url": redis_server.url, "prefix": prefix},
        "cameras": [
            {"id": "kiln-1", "source": "synthetic://thermal", "fps": 10, "tasks": ["thermal"],
             "zones": {"door": KILN_ZONE, "roof": [[0, 0], [10, 0], [10, 10]]}},
            {"id": "pumps-1", "source": "synthetic://equipment", "fps": 20, "tasks": ["detect"]},
            {"id": "reactor-1", "source": "synthetic://process", "fps": 4, "tasks": ["classify"]},
        ],
        "models": {"classify": {"arch": "simple_cnn"}},
        "alerts": {"evidence_dir": str(tmp_path / "evidence"), "clip_before_s": 1.0, "clip_after_s": 0.5,
                   "rules": [{"name": "kiln-hot", "task": "thermal", "when": "max_k >= 450", "zone": "door",
                              "severity": "critical", "sinks": ["cmms"]},
                             {"name": "leak", "task": "detect", "when": "count.leak >= 1", "sinks": ["cmms"]},
                             {"name": "foam", "task": "classify", "when": 'label == "anomaly"', "sinks": ["cmms"]}],
                   "sinks": [{"name": "cmms", "type": "webhook", "url": "http://127.0.0.1:9/hook",
                              "secret": "s3cret-do-not-show"}],
                   **alerts}},
        environ={})


def put_frame(r, names: Keys, camera: str, seq: int, image: np.ndarray, entry_id: str = "*", raw: bool = False) -> str:
    enc, data = ("raw", image.tobytes()) if raw else encode(image, 90)
    frame = Frame(camera=camera, seq=seq, ts=time.time_ns(), enc=enc, shape=image.shape, dtype=str(image.dtype),
                  data=data)
    return r.xadd(names.frames, {"m": frame.to_msgpack(), "cam": camera}, id=entry_id).decode()


def firing(rule: str, camera: str, task: str, frame_id: str, value: float, threshold: float | None, **labels) -> Alert:
    return Alert(id=Alert.identity(rule, camera, frame_id), rule=rule, severity="warning", state="firing",
                 camera=camera, task=task, ts=time.time_ns(), value=value, threshold=threshold,
                 message=f"{rule} on {camera}", frame_id=frame_id, labels=labels)


def facts_of(store: EvidenceStore, alert_id: str) -> dict:
    return json.loads((store.path(alert_id) / "evidence.json").read_text())


def clip_info(path) -> tuple[int, int, int]:
    """(frames decoded, width, height) of a video file, counting the frames one by one."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n, w, h


def near(pixel: np.ndarray, colour, tol: int = 90) -> bool:
    return int(np.abs(pixel.astype(int) - np.array(colour)).sum()) <= tol


def test_thermal_alert_snapshot_clip_and_facts(redis_server, r, prefix, tmp_path):
    cfg = make_cfg(redis_server, prefix, tmp_path)
    names = Keys(prefix)
    scene = make_scene("thermal", seed=1, anomaly_rate=1.0)
    first = next(s for s in range(400) if scene.render(s + 15)[1]["hotspots"])
    pumps = make_scene("equipment", seed=0, anomaly_rate=0.0)
    base = int(time.time() * 1000) - 60_000  # a minute ago: the whole clip window is in the past
    kiln_ids = []
    for i in range(30):  # kiln-1 every 100 ms, pumps-1 in between (another camera, left out of the clip)
        kiln_ids.append(put_frame(r, names, "kiln-1", first + i, scene.render(first + i)[0], f"{base + 100 * i}-0"))
        put_frame(r, names, "pumps-1", i, pumps.render(i)[0], f"{base + 100 * i + 50}-0")
    frame_id = kiln_ids[15]
    image, truth = scene.render(first + 15)
    out = {"max_k": truth["max_k"], "avg_k": truth["avg_k"], "min_k": truth["min_k"],
           "hotspots": truth["hotspots"], "source": "radiometric"}
    result = Result(camera="kiln-1", seq=first + 15, ts=1, task="thermal", frame_id=frame_id,
                    model="thermal_cnn@2026.11.1", out=out)
    alert = firing("kiln-hot", "kiln-1", "thermal", frame_id, truth["max_k"], 450.0, zone="door", episode="e1")

    store = EvidenceStore(cfg, r)
    assert store.capture(alert, result) == alert.id
    d = store.path(alert.id)
    assert d == tmp_path / "evidence" / alert.id
    assert store.recording() == []  # the window had passed: the clip is complete at once

    snap = cv2.cvtColor(cv2.imread(str(d / "snapshot.jpg")), cv2.COLOR_BGR2RGB)
    assert snap.shape == (120, 160, 3)
    bare = render_base(image)
    for x, y, _ in truth["hotspots"]:
        # the spot is the frame's hottest pixel, near-white in INFERNO; the 1-px cyan cross over it has no red
        assert bare[y, x, 0] > 240 and snap[y, x, 0] < 100 and snap[y, x, 1] > 150, (x, y, snap[y, x])
    assert near(snap[60, 150], ZONE_HIGHLIGHT) and near(snap[60, 20], ZONE_HIGHLIGHT)  # the zone's sides
    assert not near(snap[5, 5], ZONE_HIGHLIGHT)  # the other zone ("roof") is not drawn

    window = kiln_ids[5:21]  # 1.0 s before to 0.5 s after the frame, kiln-1 only
    assert clip_info(d / "clip.mp4") == (16, 160, 120)

    facts = facts_of(store, alert.id)
    assert facts["id"] == alert.id
    assert facts["alert"] == {k: v for k, v in alert.to_dict().items() if k != "v"}
    assert facts["rule"] == cfg.alerts.rules[0].model_dump(mode="json")
    assert (facts["value"], facts["threshold"]) == (truth["max_k"], 450.0)
    assert facts["model"] == {"id": "thermal_cnn@2026.11.1", "name": "thermal_cnn", "version": "2026.11.1"}
    assert facts["frame_ids"] == {"alert": frame_id, "result": frame_id, "snapshot": frame_id, "clip": window}
    assert facts["clip"]["state"] == "done" and facts["clip"]["frames"] == 16 and facts["clip"]["size"] == [160, 120]
    assert facts["files"] == ["clip.mp4", "snapshot.jpg", "evidence.json"]
    assert facts["missing"] == [] and facts["zone"] == "door"
    masked = json.dumps(cfg.masked(), sort_keys=True, separators=(",", ":"))
    assert facts["config_sha256"] == hashlib.sha256(masked.encode()).hexdigest()
    assert "s3cret-do-not-show" not in (d / "evidence.json").read_text()
    assert sorted(os.listdir(d)) == ["clip.mp4", "evidence.json", "snapshot.jpg"]  # no temporary file left


def test_clip_finishes_after_the_alert_and_survives_a_restart(redis_server, r, prefix, tmp_path):
    cfg = make_cfg(redis_server, prefix, tmp_path)
    names = Keys(prefix)
    scene = make_scene("equipment", seed=2, anomaly_rate=1.0)
    ids = []

    def frame(i: int) -> str:
        ids.append(put_frame(r, names, "pumps-1", i, scene.render(i)[0]))
        put_frame(r, names, "kiln-1", i, np.full((120, 160, 1), 30000, np.uint16))  # another camera between
        time.sleep(0.05)
        return ids[-1]

    for i in range(8):
        frame(i)
    image, truth = scene.render(7)
    boxes = [[*b[:4], 0.9, b[4]] for b in truth["boxes"]]
    result = Result(camera="pumps-1", seq=7, ts=1, task="detect", frame_id=ids[-1], model="simple_yolo@0",
                    out={"boxes": boxes, "classes": ["pump", "valve", "motor", "leak", "hot_spot"]})
    alert = firing("leak", "pumps-1", "detect", ids[-1], 1, 1.0)
    old = uuid.uuid4()
    (tmp_path / "evidence" / str(old)).mkdir(parents=True)
    os.utime(tmp_path / "evidence" / str(old), (1, 1))

    store = EvidenceStore(cfg, r)
    store.capture(alert, result)
    d = store.path(alert.id)
    assert store.recording() == [alert.id]
    facts = facts_of(store, alert.id)
    assert facts["clip"]["state"] == "recording" and facts["files"] == ["snapshot.jpg", "evidence.json"]
    assert not (d / "clip.mp4").exists()
    # retention never deletes a clip that is still recording, even when everything is too old
    assert store.prune(now=time.time() + 400 * 86400) == [str(old)]
    assert d.is_dir()

    frame(8)
    assert store.finish() == []
    store.close()  # the alert service stops in the middle of the clip …
    store = EvidenceStore(cfg, r)  # … and a new one records it again from the window's start
    assert store.recording() == [alert.id]
    deadline = time.monotonic() + 10
    done, i = [], 9
    while not done and time.monotonic() < deadline:
        frame(i)
        i += 1
        done = store.finish()
    assert done == [alert.id] and store.recording() == []
    frame(i)  # frames after the window are left out
    assert store.finish() == []

    centre = int(ids[7].split("-")[0])
    window = [e for e in ids if centre - 1000 <= int(e.split("-")[0]) <= centre + 500]
    assert window[0] == ids[0] and window[-1] != ids[-1] and len(window) >= 10
    facts = facts_of(store, alert.id)
    assert facts["frame_ids"]["clip"] == window
    assert facts["clip"]["state"] == "done" and facts["clip"]["frames"] == len(window)
    assert facts["files"] == ["clip.mp4", "snapshot.jpg", "evidence.json"]
    assert "clip recorded again after a restart of the alert service" in facts["notes"]
    assert clip_info(d / "clip.mp4") == (len(window), 448, 448)
    snap = cv2.imread(str(d / "snapshot.jpg"))
    assert snap.shape == (448, 448, 3)


def test_missing_frames_and_health_alerts_never_raise(redis_server, r, prefix, tmp_path):
    cfg = make_cfg(redis_server, prefix, tmp_path)
    names = Keys(prefix)
    store = EvidenceStore(cfg, r)
    process = make_scene("process", seed=0)
    last = [put_frame(r, names, "reactor-1", i, process.render(i)[0], raw=True) for i in range(3)][-1]
    put_frame(r, names, "kiln-1", 0, np.full((120, 160, 1), 30000, np.uint16))  # newer, another camera

    # a rule alert whose frame the stream has trimmed
    result = Result(camera="kiln-1", seq=1, ts=1, task="thermal", frame_id="1-0", model="thermal_cnn@1",
                    out={"max_k": 470.0, "avg_k": 300.0, "min_k": 290.0, "hotspots": []})
    gone = firing("kiln-hot", "kiln-1", "thermal", "1-0", 470.0, 450.0)
    store.capture(gone, result)
    facts = facts_of(store, gone.id)
    assert facts["files"] == ["evidence.json"]
    assert f"frame 1-0 is no longer in {Keys(prefix).frames}" in facts["missing"]
    assert facts["clip"]["state"] == "none" and facts["clip"]["frames"] == 0
    assert sorted(os.listdir(store.path(gone.id))) == ["evidence.json"]

    # a health alert: no result, no frame id; the snapshot is the camera's latest frame
    frozen = Alert(id=Alert.identity("camera-frozen", "reactor-1", ""), rule="camera-frozen", severity="warning",
                   state="firing", camera="reactor-1", task="pipeline", ts=1, value=31.0, threshold=30.0)
    store.capture(frozen, None)
    facts = facts_of(store, frozen.id)
    assert facts["files"] == ["snapshot.jpg", "evidence.json"]
    assert facts["frame_ids"]["snapshot"] == last
    assert facts["rule"] == {"name": "camera-frozen", "builtin": True} and facts["model"] is None
    assert facts["clip"]["state"] == "none"
    snap = cv2.imread(str(store.path(frozen.id) / "snapshot.jpg"))
    assert snap.shape == (240, 320, 3)

    # a health alert for a camera that never sent a frame
    offline = Alert(id=Alert.identity("camera-offline", "ghost", ""), rule="camera-offline", severity="critical",
                    state="firing", camera="ghost", task="pipeline", ts=1, value=61.0, threshold=60.0)
    store.capture(offline, None)
    facts = facts_of(store, offline.id)
    assert facts["files"] == ["evidence.json"]
    assert facts["missing"] == [f"no frame of camera ghost in {Keys(prefix).frames}"]


def test_classifier_alert_gets_a_gradcam_or_says_why_not(redis_server, r, prefix, tmp_path):
    names = Keys(prefix)
    image, _ = make_scene("process", seed=0, anomaly_rate=1.0).render(5)
    frame_id = put_frame(r, names, "reactor-1", 5, image, f"{int(time.time() * 1000) - 30_000}-0")
    out = {"label": "anomaly", "index": 1, "probs": [0.1, 0.9], "classes": ["normal", "anomaly"]}
    result = Result(camera="reactor-1", seq=5, ts=1, task="classify", frame_id=frame_id, model="simple_cnn@0", out=out)
    alert = firing("foam", "reactor-1", "classify", frame_id, 1, None)

    store = EvidenceStore(make_cfg(redis_server, prefix, tmp_path), r)
    store.capture(alert, result)
    facts = facts_of(store, alert.id)
    assert facts["gradcam"]["class_index"] == 1 and facts["gradcam"]["model"].startswith("simple_cnn@")
    with_cam = cv2.imread(str(store.path(alert.id) / "snapshot.jpg")).astype(int)

    cfg = make_cfg(redis_server, prefix, tmp_path / "other")
    cfg = cfg.model_copy(update={"models": {"classify": cfg.models["classify"].model_copy(
        update={"path": tmp_path / "no-such-model", "arch": None})}})
    store = EvidenceStore(cfg, r)
    store.capture(alert, result)
    facts = facts_of(store, alert.id)
    assert "gradcam" not in facts
    assert any(n.startswith("no Grad-CAM: the classify model cannot be loaded") and "no-such-model" in n
               for n in facts["notes"])
    plain = cv2.imread(str(store.path(alert.id) / "snapshot.jpg")).astype(int)
    assert plain.shape == with_cam.shape == (240, 320, 3)
    assert np.abs(plain - with_cam).mean() > 10  # the heat map is blended over the whole frame


@pytest.mark.parametrize("bad", ["../../etc", "not-a-uuid", "", "{12345678-1234-5678-1234-567812345678}",
                                 "12345678-1234-5678-1234-567812345678/..", "12345678-1234-5678-1234-56781234567A"])
def test_bad_alert_ids_are_refused(redis_server, r, prefix, tmp_path, bad):
    store = EvidenceStore(make_cfg(redis_server, prefix, tmp_path), r)
    with pytest.raises(EvidenceError, match="not a canonical uuid"):
        store.path(bad)
    alert = Alert(id=bad, rule="x", severity="info", state="firing", camera="kiln-1", task="thermal", ts=1, value=1)
    with pytest.raises(EvidenceError):
        store.capture(alert, None)
    assert not (tmp_path / "evidence").exists()
    good = str(uuid.uuid4())
    assert check_id(good) == good


def test_prune_by_age_then_by_size_oldest_first(redis_server, r, prefix, tmp_path):
    cfg = make_cfg(redis_server, prefix, tmp_path, evidence_max_age_days=1, evidence_max_mb=0.05)  # 52428 bytes
    store = EvidenceStore(cfg, r)
    root = tmp_path / "evidence"
    now = time.time()
    made = {}
    for name, age_h, size in [("old1", 50, 1000), ("old2", 30, 1000), ("y1", 20, 20000), ("y2", 10, 20000),
                              ("y3", 5, 20000), ("y4", 1, 20000)]:
        d = root / str(uuid.uuid4())
        d.mkdir(parents=True)
        (d / "snapshot.jpg").write_bytes(b"x" * (size - 100))
        (d / "evidence.json").write_bytes(b"{" + b" " * 98 + b"}")
        os.utime(d, (now - age_h * 3600, now - age_h * 3600))
        made[name] = d.name
    (root / "README").write_text("not evidence")
    (root / "scratch").mkdir()
    os.utime(root / "scratch", (1, 1))

    removed = store.prune(now=now)
    # age: old1 and old2; size: 80000 bytes left > 52428, so y1 then y2 go (40000 left)
    assert removed == [made["old1"], made["old2"], made["y1"], made["y2"]]
    assert sorted(os.listdir(root)) == sorted(["README", "scratch", made["y3"], made["y4"]])
    assert store.prune(now=now) == []
