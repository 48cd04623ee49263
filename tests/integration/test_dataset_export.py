"""``plantsight dataset export`` against a real Redis: alerts raised by the alert service from frames and results
on the streams, judged through `shared.acks.acknowledge`, exported in the layout ``plantsight train`` reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import yaml

from services.alerting.service import AlertService
from shared import acks
from shared.config import load_config
from shared.data.datasets import load_split
from shared.dataset_export import ExportError, export, parse_since
from shared.imaging import encode
from shared.messages import Alert, Frame, Result
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT

H, W = 64, 64
RULES = {"classify": {"name": "foam", "task": "classify", "when": 'label == "anomaly"', "cooldown_s": 0},
         "detect": {"name": "leak", "task": "detect", "when": "count.leak >= 1", "cooldown_s": 0},
         "segment": {"name": "crack", "task": "segment", "when": "defect_ratio >= 0.01", "cooldown_s": 0}}
CLASSES = {"classify": ["normal", "anomaly"], "detect": ["person", "leak"]}


def alert_service(redis_server, prefix, tmp_path, task) -> AlertService:
    cfg = load_config(data={
        "redis": {"url": redis_server.url, "prefix": prefix},
        "cameras": [{"id": "cam-1", "source": "synthetic://process", "tasks": [task]}],
        "alerts": {"rules": [RULES[task]], "camera_offline_s": 0, "evidence_dir": str(tmp_path / "evidence")}},
        environ={})
    return AlertService(cfg, port=0)


def picture(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 255, (H, W, 3), dtype=np.uint8)


def out_for(task: str, hit: bool) -> dict:
    if task == "classify":
        probs = [0.1, 0.9] if hit else [0.9, 0.1]
        return {"label": CLASSES[task][int(hit)], "index": int(hit), "probs": probs, "classes": CLASSES[task]}
    if task == "detect":
        boxes = [[8.0, 16.0, 40.0, 48.0, 0.9, 1], [0.0, 0.0, 16.0, 8.0, 0.8, 0]] if hit else []
        return {"boxes": boxes, "classes": CLASSES[task]}
    mask = np.zeros((H, W), np.uint8)
    if hit:
        mask[10:30, 20:40] = 255
    return {"defect_ratio": float((mask > 0).mean()), "regions": [[20, 10, 20, 20, 400]] if hit else [],
            "mask": cv2.imencode(".png", mask)[1].tobytes(), "score": 0.9 if hit else 0.1}


def raise_alerts(svc: AlertService, r, task: str, n: int, ts_ns: int | None = None) -> list[Alert]:
    """`n` firing alerts: frames on ``{P}:frames`` as ingest writes them, each with an alarming result followed by a
    quiet one on ``{P}:results`` (so every episode resolves and the next frame fires again), run through the service."""
    keys, seq = svc.keys, 0
    for i in range(n):
        for hit in (True, False):
            enc, data = encode(picture(seq), 90)
            frame = Frame(camera="cam-1", seq=seq, ts=time.time_ns(), enc=enc, shape=(H, W, 3), dtype="uint8",
                          data=data)
            frame_id = r.xadd(keys.frames, {"m": frame.to_msgpack(), "cam": "cam-1"}).decode()
            ts = (ts_ns if ts_ns is not None else time.time_ns()) + seq
            result = Result(camera="cam-1", seq=seq, ts=ts, task=task, frame_id=frame_id,
                            model=f"{task}_net@2026.12.1", out=out_for(task, hit))
            r.xadd(keys.results, {"m": result.to_msgpack(), "cam": "cam-1", "task": task})
            seq += 1
    before = r.xlen(keys.alerts)
    while r.xlen(keys.alerts) - before < 2 * n:
        svc.step()
    found = [Alert.from_msgpack(f[b"m"]) for _, f in r.xrange(keys.alerts)][before:]
    return [a for a in found if a.state == "firing"]


def manifest_of(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_classify_export_by_cli_rerun_and_train(redis_server, r, prefix, tmp_path):
    from shared.training.train import train

    svc = alert_service(redis_server, prefix, tmp_path, "classify")
    svc.setup()
    fired = raise_alerts(svc, r, "classify", 12)
    assert len(fired) == 12
    confirmed, false_alarms, unjudged, gone = fired[:5], fired[5:10], fired[10], fired[11]
    for a in confirmed:
        acks.acknowledge(r, prefix, a.id, "ann", verdict="confirmed")
    for a in false_alarms:
        acks.acknowledge(r, prefix, a.id, "bob", verdict="false_alarm")
    acks.acknowledge(r, prefix, unjudged.id, "ann")  # acknowledged, no verdict: not training data
    acks.acknowledge(r, prefix, gone.id, "ann", verdict="confirmed")
    r.xdel(svc.keys.frames, gone.frame_id)  # trimmed from the stream: its evidence is gone
    config = tmp_path / "plantsight.yaml"
    config.write_text(yaml.safe_dump({"redis": {"url": redis_server.url, "prefix": prefix}}))
    out = tmp_path / "data"

    def cli(*args):
        res = subprocess.run([sys.executable, "-m", "services.cli", "dataset", "export", "--config", str(config),
                              *args], cwd=ROOT, capture_output=True, text=True, env=env_without_plantsight(),
                             timeout=120)
        return res.returncode, res.stdout, res.stderr

    code, stdout, err = cli("--task", "classify", "--since", "1h", "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["added"], summary["already"], summary["without_evidence"]) == (10, 0, 1)
    assert summary["missing"][0]["id"] == gone.id and gone.frame_id in summary["missing"][0]["reason"]
    assert files_under(out) == sorted(["manifest.json"] + [f"train/anomaly/{a.id}.jpg" for a in confirmed]
                                      + [f"train/normal/{a.id}.jpg" for a in false_alarms])
    frame = Frame.from_msgpack(r.xrange(svc.keys.frames, confirmed[0].frame_id, confirmed[0].frame_id)[0][1][b"m"])
    assert (out / f"train/anomaly/{confirmed[0].id}.jpg").read_bytes() == frame.data  # the camera's own JPEG
    manifest = manifest_of(out)
    assert manifest["task"] == "classify"
    items = {item["alert_id"]: item for item in manifest["items"]}
    assert set(items) == {a.id for a in confirmed + false_alarms}
    first = items[confirmed[0].id]
    assert first["camera"] == "cam-1" and first["rule"] == "foam" and first["model"] == "classify_net@2026.12.1"
    assert first["verdict"] == "confirmed" and first["by"] == "ann" and isinstance(first["at"], float)
    assert first["files"] == [f"train/anomaly/{confirmed[0].id}.jpg"]
    assert items[false_alarms[0].id]["verdict"] == "false_alarm" and items[false_alarms[0].id]["by"] == "bob"
    assert items[false_alarms[0].id]["files"] == [f"train/normal/{false_alarms[0].id}.jpg"]

    code, stdout, err = cli("--task", "classify", "--since", "1h", "--out", str(out))  # nothing new
    assert code == 0, err
    assert stdout.splitlines()[-1].endswith("added 0, already there 10, without evidence 1")
    assert f"without evidence: {gone.id}" in stdout
    assert len(manifest_of(out)["items"]) == 10 and len(files_under(out)) == 11

    more = raise_alerts(svc, r, "classify", 1)[0]  # a later judgement is added to the same folder
    acks.acknowledge(r, prefix, more.id, "ann", verdict="false_alarm")
    code, stdout, err = cli("--task", "classify", "--since", "1h", "--out", str(out), "--json")
    assert code == 0, err
    assert {k: json.loads(stdout)[k] for k in ("added", "already", "without_evidence", "added_ids")} == \
        {"added": 1, "already": 10, "without_evidence": 1, "added_ids": [more.id]}
    assert len(manifest_of(out)["items"]) == 11 and (out / f"train/normal/{more.id}.jpg").is_file()

    code, stdout, err = cli("--task", "thermal", "--since", "1h", "--out", str(tmp_path / "t"))
    assert code == 2 and stdout == "" and "task 'thermal' has no export layout" in err
    code, _, err = cli("--task", "classify", "--since", "yesterday", "--out", str(out))
    assert code == 2 and "--since 'yesterday' is neither a duration" in err

    model_dir = tmp_path / "model"
    train("classify", out, model_dir, epochs=1, device="cpu", progress=False)
    assert (model_dir / "model.json").is_file()
    assert json.loads((model_dir / "model.json").read_text())["classes"] == ["anomaly", "normal"]


def test_detect_export_boxes_empty_labels_and_names(redis_server, r, prefix, tmp_path):
    svc = alert_service(redis_server, prefix, tmp_path, "detect")
    svc.setup()
    yes, no = raise_alerts(svc, r, "detect", 2)
    acks.acknowledge(r, prefix, yes.id, "ann", verdict="confirmed")
    acks.acknowledge(r, prefix, no.id, "ann", verdict="false_alarm")
    out = tmp_path / "data"
    summary = export(r, prefix, "detect", parse_since("1h"), out)
    assert (summary["added"], summary["already"], summary["without_evidence"]) == (2, 0, 0)
    assert files_under(out) == sorted(["data.yaml", "manifest.json", f"images/train/{yes.id}.jpg",
                                       f"images/train/{no.id}.jpg", f"labels/train/{yes.id}.txt",
                                       f"labels/train/{no.id}.txt"])
    # names in the model's order; cx cy w h normalised by the 64x64 frame
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == ["person", "leak"]
    assert (out / f"labels/train/{yes.id}.txt").read_text().splitlines() == [
        "1 0.375000 0.500000 0.500000 0.500000", "0 0.125000 0.062500 0.250000 0.125000"]
    assert (out / f"labels/train/{no.id}.txt").read_text() == ""
    ds = load_split("detect", out, "train")
    assert len(ds) == 2
    assert export(r, prefix, "detect", parse_since("1h"), out)["already"] == 2
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == ["person", "leak"]


def test_segment_export_masks(redis_server, r, prefix, tmp_path):
    svc = alert_service(redis_server, prefix, tmp_path, "segment")
    svc.setup()
    yes, no = raise_alerts(svc, r, "segment", 2)
    acks.acknowledge(r, prefix, yes.id, "ann", verdict="confirmed")
    acks.acknowledge(r, prefix, no.id, "bob", verdict="false_alarm")
    out = tmp_path / "data"
    summary = export(r, prefix, "segment", parse_since("1h"), out)
    assert (summary["added"], summary["without_evidence"]) == (2, 0)
    assert files_under(out) == sorted(["manifest.json", f"images/train/{yes.id}.png", f"images/train/{no.id}.png",
                                       f"masks/train/{yes.id}.png", f"masks/train/{no.id}.png"])
    frame = Frame.from_msgpack(r.xrange(svc.keys.frames, yes.frame_id, yes.frame_id)[0][1][b"m"])
    image = cv2.cvtColor(cv2.imread(str(out / f"images/train/{yes.id}.png")), cv2.COLOR_BGR2RGB)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(frame.data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(image, decoded)  # lossless: the frame's pixels as decoded
    mask = cv2.imread(str(out / f"masks/train/{yes.id}.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (H, W) and int((mask > 0).sum()) == 400 and mask[10:30, 20:40].all()
    assert not cv2.imread(str(out / f"masks/train/{no.id}.png"), cv2.IMREAD_UNCHANGED).any()
    assert len(load_split("segment", out, "train")) == 2
    assert [i["model"] for i in manifest_of(out)["items"]] == ["segment_net@2026.12.1"] * 2


def test_since_and_bad_input(redis_server, r, prefix, tmp_path):
    assert parse_since("24h", now=100_000.0) == 100_000.0 - 86400
    assert parse_since("7d", now=1e6) == 1e6 - 7 * 86400
    assert parse_since("2026-12-01") == parse_since("2026-12-01T00:00:00+00:00")
    svc = alert_service(redis_server, prefix, tmp_path, "classify")
    svc.setup()
    old = raise_alerts(svc, r, "classify", 1, ts_ns=(int(time.time()) - 3 * 86400) * 1_000_000_000)[0]
    acks.acknowledge(r, prefix, old.id, "ann", verdict="confirmed")
    assert export(r, prefix, "classify", parse_since("2d"), tmp_path / "a")["added"] == 0
    assert export(r, prefix, "classify", parse_since("4d"), tmp_path / "b")["added"] == 1
    with pytest.raises(ExportError, match="holds a 'classify' export, not 'detect'"):
        export(r, prefix, "detect", 0, tmp_path / "b")
    with pytest.raises(ExportError, match="--negative-class '../x' cannot name a class folder"):
        export(r, prefix, "classify", 0, tmp_path / "c", negative_class="../x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is not a folder"):
        export(r, prefix, "classify", 0, tmp_path / "file")
