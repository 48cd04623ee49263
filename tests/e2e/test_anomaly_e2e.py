"""Anomaly detection live: a segmenter trained on good frames alone runs in the pipeline, an ``anomaly_area``
rule fires on the scene's defect episodes and never on its good frames, and the viewer shows the regions above
the model's threshold on the alert's snapshot."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import cv2
import httpx
import msgpack
import numpy as np
import pytest

from shared.data.scenes import scene_from_source
from shared.imaging import decode_frame
from shared.messages import Frame
from shared.overlay import decode_mask
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CAMERA = "line-a"
SOURCE = "synthetic://surface?seed=9&anomaly=0.5"  # half its frames in defect episodes
TOKEN = "read-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def good_only_model(tmp_path_factory):
    """`plantsight train segment --good-only` on 48 good frames of another stretch of surface (a few epochs:
    enough to flag the scene's defects, not a quality figure; docs/models.md has those)."""
    tmp = tmp_path_factory.mktemp("anomaly")
    good = tmp / "good"
    good.mkdir()
    scene = scene_from_source("synthetic://surface?seed=5&anomaly=0")
    for i in range(48):
        img, truth = scene.render(7 * i)
        assert not truth["mask"].any()
        cv2.imwrite(str(good / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    model = tmp / "model"
    run = subprocess.run([sys.executable, "-m", "services.cli", "train", "segment", "--good-only", "--data", str(good),
                          "--out", str(model), "--epochs", "6", "--lr", "3e-3", "--json"],
                         cwd=ROOT, env=env_without_plantsight(), capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((model / "model.json").read_text())
    assert meta["metrics"]["training"] == "good-only" and 0 < meta["thresholds"]["mask"] < 1, meta
    return model


def test_an_anomaly_rule_fires_on_defect_episodes_and_the_viewer_shows_the_regions(up_pipeline, r, good_only_model):
    rules = [{"name": "surface-anomaly", "task": "segment", "when": "anomaly_area > 0", "for_frames": 2,
              "clear_frames": 2, "cooldown_s": 0, "severity": "warning"}]
    up = up_pipeline([{"id": CAMERA, "source": SOURCE, "fps": 4, "tasks": ["segment"]}],
                     models={"segment": {"path": str(good_only_model)}}, alerts={"rules": rules},
                     extra_env={"PLANTSIGHT_VIEWER_TOKEN": TOKEN})

    def firing() -> list[dict]:
        alerts = [msgpack.unpackb(f[b"m"], raw=False) for _, f in r.xrange(up.keys.alerts)]
        return [a for a in alerts if a["rule"] == "surface-anomaly" and a["state"] == "firing"]

    try:
        up.wait_for(lambda: len(firing()) >= 2, 240, "two anomaly alerts")
        alert = firing()[0]
        results = {m["frame_id"]: m for m in up.results()}
        base = f"http://127.0.0.1:{up.port('viewer')}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 30
        while (snap := httpx.get(f"{base}/api/alerts/{alert['id']}/snapshot.jpg", headers=auth, timeout=10)
               ).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        (_, fields), = r.xrange(up.keys.frames, alert["frame_id"], alert["frame_id"])
        frame = decode_frame(Frame.from_msgpack(fields[b"m"]))
    finally:
        up.stop()

    # Every result is the good-only model's, with its anomaly score; the alerts fired on defect episodes only.
    assert results and all("score" in m["out"] for m in results.values())
    scene = scene_from_source(SOURCE)
    for a in firing():
        assert scene.render(int(a["labels"]["seq"]))[1]["mask"].any(), f"an anomaly alert on a good frame: {a}"
    # The viewer's snapshot of the alert shows the regions above the threshold, tinted.
    assert snap.status_code == 200, snap.text
    shown = cv2.cvtColor(cv2.imdecode(np.frombuffer(snap.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    region = decode_mask(results[alert["frame_id"]]["out"]["mask"], frame.shape[:2])
    assert region.any()
    # the overlay's tint (MASK_COLOUR, magenta) turns red up against green; JPEG blurs the colour of thin regions
    redness = shown[..., 0].astype(int) - shown[..., 1] - (frame[..., 0].astype(int) - frame[..., 1])
    assert redness[region].mean() > 40 and abs(redness[~region].mean()) < 5, "the regions are not drawn"
