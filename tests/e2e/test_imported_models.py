"""Imported models in the real pipeline: an Ultralytics-layout detector, segmenter and classifier, imported
with the command line, run by `plantsight up` on a camera of real photographs; every result is the network's
own output on the frame's prepared pixels, decoded independently and mapped back to the frame's pixels; a
broken imported directory deployed to it is refused and the running model stays."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from services.inference.postprocess import mask_to_original
from shared.config import load_config
from shared.messages import Frame
from shared.prepare import Preparer
from tests.support.environment import env_without_plantsight
from tests.support.foreign_models import (
    Classifier,
    UltralyticsDetect,
    UltralyticsSegment,
    export_onnx,
    reference_instance_mask,
    reference_yolo,
    ultralytics_metadata,
)
from tests.support.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAMES = ["pump", "valve", "motor"]
SIZE = 64


def imported(tmp_path, net, name: str, task: str, metadata: dict, **export) -> str:
    f = export_onnx(net, tmp_path / f"{name}.onnx", SIZE, metadata, **export)
    out = tmp_path / f"model-{task}"
    res = subprocess.run([sys.executable, "-m", "services.cli", "models", "import", str(f), "--task", task,
                          "--out", str(out)], cwd=ROOT, env=env_without_plantsight(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return str(out)


def test_imported_detector_and_classifier_give_the_networks_own_outputs_in_frame_pixels(up_pipeline, r, tmp_path,
                                                                                       shared_data):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("fruits.jpg", "baboon.jpg", "building.jpg"):
        shutil.copy(shared_data / name, photos / name)
    detect = imported(tmp_path, UltralyticsDetect(len(NAMES), SIZE), "yolo-line", "detect",
                      ultralytics_metadata("detect", NAMES, SIZE))
    classify = imported(tmp_path, Classifier(3, probs=True), "state-cls", "classify",
                        ultralytics_metadata("classify", NAMES, SIZE))
    segment = imported(tmp_path, UltralyticsSegment(2, SIZE), "defects-seg", "segment",
                       ultralytics_metadata("segment", ["scratch", "stain"], SIZE), outputs=("output0", "output1"))
    tasks = ("detect", "classify", "segment")
    models = {"detect": {"path": detect}, "classify": {"path": classify}, "segment": {"path": segment}}
    cam = {"id": "line-1", "source": str(photos), "fps": 10, "tasks": list(tasks), "on_full": "block",
           "max_frames": 6, "queue": 2}
    up = up_pipeline([cam], models=models)
    up.wait_for(lambda: len(up.results()) >= 18, 200, "18 results")

    cfg = load_config(data={"cameras": [cam], "models": models}, environ={})
    preparer = Preparer(cfg, "preprocess", route_jpeg=False)
    sessions = {t: ort.InferenceSession(f"{m['path']}/model.onnx", providers=["CPUExecutionProvider"])
                for t, m in models.items()}
    results = up.results()
    assert {(m["seq"], m["task"]) for m in results} == {(s, t) for s in range(6) for t in tasks}
    masks_seen = 0
    boxes_seen = 0
    for m in results:
        (_, fields), = r.xrange(up.keys.frames, m["frame_id"], m["frame_id"])
        frame = Frame.from_msgpack(fields[b"m"])
        msg, = preparer.messages(frame, cfg.cameras[0], [m["task"]], m["frame_id"], time.perf_counter())
        x = msg.array().transpose(2, 0, 1)[None].astype(np.float32) / 255.0  # normalisation "unit"
        outputs = sessions[m["task"]].run(None, {"images": x})
        raw = outputs[0][0]
        assert m["model"].startswith(("yolo-line@", "state-cls@", "defects-seg@"))
        if m["task"] == "segment":
            want = mask_to_original(reference_instance_mask(raw, outputs[1][0], 0.25, 0.45, SIZE).astype(np.uint8),
                                    msg)
            got = cv2.imdecode(np.frombuffer(m["out"]["mask"], np.uint8), cv2.IMREAD_GRAYSCALE) > 0
            assert (got != want.astype(bool)).mean() < 0.002  # bilinear edges may round either way
            masks_seen += int(want.sum())
            continue
        if m["task"] == "classify":
            np.testing.assert_allclose(m["out"]["probs"], raw, atol=1e-5)
            assert m["out"]["label"] == NAMES[int(raw.argmax())]
            continue
        scale, px, py = msg.letterbox
        h, w = frame.shape[:2]
        want = [[min(max((b[0] - px) / scale, 0), w), min(max((b[1] - py) / scale, 0), h),
                 min(max((b[2] - px) / scale, 0), w), min(max((b[3] - py) / scale, 0), h), b[4], b[5]]
                for b in reference_yolo(raw, 0.25, 0.45)]
        got = list(m["out"]["boxes"])
        assert len(got) == len(want)
        for w in want:  # each of the network's boxes is in the result, to the 2 decimals results carry
            match = next((g for g in got if g[5] == w[5] and np.allclose(g[:5], w[:5], atol=0.011)), None)
            assert match is not None, f"frame {m['seq']}: no result box for {w}"
            got.remove(match)
        boxes_seen += len(want)
    assert boxes_seen > 0 and masks_seen > 0

    # A broken imported directory deployed to the running pipeline is refused; the running detector stays.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(f"{detect}/model.json", broken / "model.json")
    (broken / "model.onnx").write_bytes(b"not a network")
    done = subprocess.run([sys.executable, "-m", "services.cli", "models", "deploy", "detect", str(broken), "--config",
                           str(up.path), "--wait", "60"], cwd=ROOT, env=env_without_plantsight(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    rec = json.loads(done.stdout)
    running = next(m["model"] for m in results if m["task"] == "detect")
    assert rec["model"] == running and "not a loadable ONNX model" in rec["refused"]
