"""`make demo` shows trained networks: on frames whose truth the synthetic scenes know, the demo's results
are right from the start (classify accuracy, detect boxes, segment Dice, thermal temperatures), and its
alerts are the plant's, not an untrained network's."""

from __future__ import annotations

import collections
import json

import cv2
import msgpack
import numpy as np
import pytest

from shared.config import demo_config
from shared.data.scenes import scene_from_source
from shared.imaging import decode_frame
from shared.messages import Alert, Frame
from shared.models.registry import DEFAULT_CLASSES
from tests.support.demo import Demo
from tests.support.paths import ARTIFACTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

DEMO = demo_config()
CAMERAS = {c.id: c for c in DEMO.cameras}
DEMO_CLASSES = DEFAULT_CLASSES["detect"]
PER_CAMERA = {"classify": 40, "detect": 8, "segment": 16, "thermal": 40}  # 10 s of each camera's frames


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_demos_trained_networks_read_the_scenes_right(tmp_path):
    assert all(m.path is not None for m in DEMO.models.values()), "the demo's trained models are missing"
    demo = Demo(tmp_path, trained=True)
    try:
        def results():
            return [msgpack.unpackb(f[b"m"], raw=False) for _, f in demo.r.xrange(f"{DEMO.redis.prefix}:results")]

        def enough():
            n = collections.Counter(m["camera"] for m in results())
            return all(n[c.id] >= PER_CAMERA[c.tasks[0]] for c in DEMO.cameras)

        demo.wait_for(enough, 240, "10 s of results from every demo camera")
        alerts = [Alert.from_msgpack(f[b"m"]) for _, f in demo.r.xrange(f"{DEMO.redis.prefix}:alerts")]
        got = results()
        # A result's seq is the scene's frame number: the camera's picture is the frame the scene draws.
        shown = {}
        for m in got:
            if m["camera"] not in shown:
                (_, fields), = demo.r.xrange(f"{DEMO.redis.prefix}:frames", m["frame_id"], m["frame_id"])
                shown[m["camera"]] = (m["seq"], decode_frame(Frame.from_msgpack(fields[b"m"])))
    finally:
        demo.stop()

    scenes = {c.id: scene_from_source(c.source) for c in DEMO.cameras}
    for cam, (seq, picture) in shown.items():
        def off(q: int) -> float:  # JPEG and the scene's sensor noise keep even the right frame a little off
            return float(np.abs(picture.astype(int) - scenes[cam].render(q)[0].astype(int)).mean())
        assert off(seq) < min(off(seq + 1), off(seq + 25)), f"{cam}: frame {seq} is not the scene's frame {seq}"
    right = collections.Counter()
    total = collections.Counter()
    matched, boxes, kept, right_boxes, inter, union_sum = 0, 0, 0, 0, 0, 0
    for m in got:
        cam = CAMERAS[m["camera"]]
        truth = scenes[cam.id].render(m["seq"])[1]
        task = m["task"]
        total[task] += 1
        if task == "classify":
            right[task] += m["out"]["label"] == truth["label"]
        elif task == "detect":
            want = [[t[0], t[1], t[2] + 1, t[3] + 1, t[4]] for t in truth["boxes"]]  # x2/y2 inclusive in truth
            for t in want:
                matched += max((iou(t, b) for b in m["out"]["boxes"] if int(b[5]) == t[4]), default=0.0) >= 0.5
            for b in m["out"]["boxes"]:
                right_boxes += max((iou(t, b) for t in want if t[4] == int(b[5])), default=0.0) >= 0.5
            boxes, kept = boxes + len(want), kept + len(m["out"]["boxes"])
        elif task == "segment":
            mask = cv2.imdecode(np.frombuffer(m["out"]["mask"], np.uint8), cv2.IMREAD_GRAYSCALE) > 0
            want = truth["mask"] > 0
            inter += int((mask & want).sum())
            union_sum += int(mask.sum() + want.sum())
        else:
            right[task] += all(abs(m["out"][k] - truth[k]) <= 0.05 for k in ("max_k", "avg_k", "min_k"))

    accuracy = right["classify"] / total["classify"]
    recall, precision = matched / boxes, right_boxes / kept
    dice = 2 * inter / union_sum
    figures = {"frames": dict(total), "classify_accuracy": accuracy, "detect_recall": recall,
               "detect_precision": precision, "segment_dice": dice,
               "thermal_exact": right["thermal"] / total["thermal"]}
    (ARTIFACTS / "demo").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "demo" / "quality.json").write_text(json.dumps(figures, indent=2) + "\n")  # to look at
    assert accuracy >= 0.95, f"classify accuracy {accuracy:.3f} on {total['classify']} frames"
    assert recall >= 0.8, f"detect: {matched} of {boxes} true boxes found at IoU 0.5"
    assert precision >= 0.8, f"detect: {right_boxes} of {kept} boxes are true ones at IoU 0.5"
    assert dice >= 0.7, f"segment Dice {dice:.3f}"
    assert right["thermal"] == total["thermal"], "thermal statistics differ from the scene's"

    # Alerts are the plant's: nothing a network that cannot tell would raise, and every process-anomaly
    # alert fired on a frame the scene drew as an anomaly.
    rules = collections.Counter(a.rule for a in alerts if a.state == "firing")
    assert not {"process-unsure", "equipment-not-seen"} & set(rules), rules
    leak = DEMO_CLASSES.index("leak")
    for a in alerts:
        if a.state != "firing":
            continue
        truth = scenes[a.camera].render(int(a.labels["seq"]))[1]
        if a.rule == "process-anomaly":
            assert truth["label"] == "anomaly", a
        elif a.rule == "leak":
            assert any(b[4] == leak for b in truth["boxes"]), a
        elif a.rule == "surface-defect":
            assert truth["mask"].any(), a
