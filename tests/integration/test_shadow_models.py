"""Shadow models in infer, on a real Redis with the command line: a candidate runs on its share of the live
model's frames and writes to {P}:shadow only, its agreement shows on /metrics and in Redis, `models promote`
switches it in without losing a frame, and a shadow that fails to load or raises on frames is dropped
while every frame still gets exactly one live result."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from services.cli import parser
from services.inference.service import InferService
from services.viewer.data import ViewerData
from shared.config import load_config
from shared.messages import Prepared, Result
from shared.models.modeldir import default_meta
from tests.support.small_models import SIZE, model_dir
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


class FailsOnBrightFrames(nn.Module):
    """Loads and warms (on noise), then raises on the bright frames the pipeline sends it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.mean() > 1.0):
            raise RuntimeError("this network fails on bright frames")
        return x.mean((2, 3))[:, :2]


def raising_dir(path):
    path.mkdir()
    meta = default_meta("simple_cnn")
    meta.arch, meta.version, meta.format, meta.layout = "fails", "v9", "torchscript", "logits"
    meta.input_size, meta.options = tuple(SIZE), {}
    torch.jit.save(torch.jit.script(FailsOnBrightFrames()), path / "model.ts")
    (path / "model.json").write_text(meta.to_json())
    return path


def prepared(seq: int, level: int) -> bytes:
    img = np.full((*SIZE, 3), level, np.uint8)
    img[: seq % 8] = level // 2  # frames differ, so the two models need not agree on all
    return Prepared(camera="c1", seq=seq, ts=time.time_ns(), task="classify", frame_id=f"1-{seq}",
                    shape=img.shape, dtype="uint8", data=img.tobytes(), orig=[48, 64],
                    letterbox=[1.0, 0, 0]).to_msgpack()


def cli(cfg_path, *argv) -> int:
    args = parser().parse_args(["models", *argv, "--config", str(cfg_path)])
    return args.fn(args)


def metric(port: int, name: str, **labels) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def infer(redis_server, r, prefix, tmp_path):
    live, shadow = model_dir(tmp_path / "live", "v1", 1), model_dir(tmp_path / "cand", "v2", 2)
    data = {"redis": {"url": redis_server.url, "prefix": prefix},
            "cameras": [{"id": "c1", "source": "synthetic://process", "tasks": ["classify"]}],
            "models": {"classify": {"path": str(live), "shadow": str(shadow), "shadow_share": 0.5}},
            "inference": {"device": "cpu", "max_batch": 4, "max_wait_ms": 0, "threads": 1, "model_poll_s": 0.2},
            "streams": {"read_block_ms": 50, "claim_idle_ms": 60_000}}
    cfg_path = tmp_path / "plantsight.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    svc = InferService(load_config(cfg_path, environ={}), tasks=["classify"], port=0)
    svc.setup()
    svc.start_http()
    errors = []

    def loop():
        try:
            while not svc.stop.is_set():
                svc.step()
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    svc.cfg_path, svc.tmp, svc.port = cfg_path, tmp_path, svc.http.server_address[1]
    yield svc
    svc.stop.set()
    t.join(10)
    svc.close()
    svc.http.shutdown()
    assert not errors, errors


def results(r, key) -> list[Result]:
    return [Result.from_msgpack(f[b"m"]) for _, f in r.xrange(key)]


def feed(r, svc, seqs, level: int = 60):
    for seq in seqs:
        r.xadd(svc.keys.prepared("classify"), {"m": prepared(seq, level), "cam": "c1", "task": "classify"})


def exactly_once(r, svc, n: int):
    wait_until(lambda: r.xlen(svc.keys.results) >= n, 60, f"{n} live results", poll=0.05)
    counts = collections.Counter(m.seq for m in results(r, svc.keys.results))
    assert set(counts) == set(range(n)) and max(counts.values()) == 1


def test_a_shadow_runs_on_its_share_apart_from_alerting_and_is_promoted_without_losing_a_frame(infer, r):
    svc, run = infer, infer.runners[0]
    wait_until(lambda: run.shadow is not None, 30, "the configured shadow to load", poll=0.05)
    feed(r, svc, range(40))
    exactly_once(r, svc, 40)
    wait_until(lambda: r.xlen(svc.keys.shadow) >= 20, 10, "the shadow's results", poll=0.05)
    shadowed = results(r, svc.keys.shadow)
    # Half the frames, evenly spread; on {P}:shadow only, in the same Result message as the live model's.
    assert len(shadowed) == 20 and {m.model for m in shadowed} == {"simple_cnn@v2"}
    assert {m.model for m in results(r, svc.keys.results)} == {"simple_cnn@v1"}
    assert [m.seq for m in shadowed] == list(range(1, 40, 2))
    assert set(shadowed[0].out) == {"label", "index", "probs", "classes"}
    live = {m.seq: m.out["label"] for m in results(r, svc.keys.results)}
    agree = sum(live[m.seq] == m.out["label"] for m in shadowed)
    labels = {"task": "classify", "live": "simple_cnn@v1", "shadow": "simple_cnn@v2"}
    assert metric(svc.port, "plantsight_shadow_agreement_count", **labels) == 20
    assert metric(svc.port, "plantsight_shadow_agreement_sum", **labels) == pytest.approx(agree)
    wait_until(lambda: json.loads(r.hget(svc.keys.models_shadow_state, f"classify|{svc.consumer}") or "{}")
               .get("frames") == 20, 10, "the shadow's totals in Redis", poll=0.05)
    rec = json.loads(r.hget(svc.keys.models_shadow_state, f"classify|{svc.consumer}"))
    assert rec["state"] == "running" and rec["live"] == "simple_cnn@v1" and rec["shadow"] == "simple_cnn@v2"
    assert rec["mean"] == pytest.approx(agree / 20) and rec["share"] == 0.5 and rec["measure"] == "label agreement"
    (row,) = ViewerData(svc.cfg, r).shadows()  # what the viewer's health page shows
    assert (row["task"], row["shadow"], row["frames"], row["state"]) == ("classify", "simple_cnn@v2", 20, "running")

    # Promote while frames flow: the shadow becomes the live model through the hot swap and is cleared.
    feeder = threading.Thread(target=lambda: [feed(r, svc, [s]) or time.sleep(0.02) for s in range(40, 120)])
    feeder.start()
    assert cli(svc.cfg_path, "promote", "classify", "--wait", "30") == 0
    feeder.join()
    exactly_once(r, svc, 120)
    order = [m.model for m in results(r, svc.keys.results)]
    assert [a for a, b in zip(order, [None, *order]) if a != b] == ["simple_cnn@v1", "simple_cnn@v2"]
    wait_until(lambda: run.shadow is None and r.hget(svc.keys.models_shadow_state, f"classify|{svc.consumer}")
               is None, 10, "the shadow cleared", poll=0.05)
    assert json.loads(r.hget(svc.keys.models_shadow, "classify"))["path"] is None


def test_a_shadow_that_fails_to_load_or_raises_is_dropped_and_live_results_flow(infer, r, caplog):
    svc, run = infer, infer.runners[0]
    caplog.set_level(logging.INFO, logger="plantsight")
    wait_until(lambda: run.shadow is not None, 30, "the configured shadow to load", poll=0.05)
    corrupt = model_dir(svc.tmp / "corrupt", "v3", 3)
    (corrupt / "model.pt").write_bytes(b"not a state dict")
    assert cli(svc.cfg_path, "shadow", "classify", str(corrupt), "--wait", "30") == 1  # refused, and says so
    rec = json.loads(r.hget(svc.keys.models_shadow_state, f"classify|{svc.consumer}"))
    assert rec["state"] == "refused" and "not a loadable state dict" in rec["error"]
    wait_until(lambda: run.shadow is None, 10, "the old shadow dropped", poll=0.05)
    feed(r, svc, range(20))
    exactly_once(r, svc, 20)
    assert metric(svc.port, "plantsight_shadow_failures_total", task="classify", reason="load") == 1

    # A shadow that loads but raises on the frames: dropped at its first batch, logged once, the live model on.
    boom = raising_dir(svc.tmp / "boom")
    assert cli(svc.cfg_path, "shadow", "classify", str(boom), "--share", "1", "--wait", "30") == 0
    wait_until(lambda: run.shadow is not None and run.shadow.name == "fails@v9", 10, "the new shadow", poll=0.05)
    shadow_before = r.xlen(svc.keys.shadow)
    feed(r, svc, range(20, 60), level=250)
    exactly_once(r, svc, 60)
    assert run.shadow is None and r.xlen(svc.keys.shadow) == shadow_before
    assert metric(svc.port, "plantsight_shadow_failures_total", task="classify", reason="inference") == 1
    failed = [rec for rec in caplog.records if "failed on frames" in rec.getMessage()]
    assert len(failed) == 1 and "fails on bright frames" in failed[0].getMessage()
    assert {m.model for m in results(r, svc.keys.results)} == {"simple_cnn@v1"}
    wait_until(lambda: json.loads(r.hget(svc.keys.models_shadow_state, f"classify|{svc.consumer}") or "{}")
               .get("state") == "failed", 10, "the failure recorded", poll=0.05)
    # Not loaded again until its directory changes; --off clears the record.
    time.sleep(0.5)
    assert run.shadow is None
    assert cli(svc.cfg_path, "shadow", "classify", "--off") == 0
    wait_until(lambda: r.hget(svc.keys.models_shadow_state, f"classify|{svc.consumer}") is None, 10,
               "the record cleared", poll=0.05)


def test_the_viewer_health_page_shows_each_tasks_shadow_summed_over_workers(redis_server, r, prefix, tmp_path):
    from services.viewer.auth import Tokens
    from services.viewer.service import ViewerService
    from tests.support.ports import free_port

    cfg = load_config(data={"redis": {"url": redis_server.url, "prefix": prefix},
                            "cameras": [{"id": "c1", "source": "synthetic://process", "tasks": ["classify", "detect"]}],
                            "alerts": {"evidence_dir": str(tmp_path / "evidence")}}, environ={})
    token = "read-" + "x" * 32
    viewer = ViewerService(cfg, tokens=Tokens({"PLANTSIGHT_VIEWER_TOKEN": token}), port=free_port())
    viewer._connect()
    viewer.start_http()
    key, now = viewer.keys.models_shadow_state, time.time()
    base = {"task": "detect", "live": "simple_yolo@v1", "shadow": "simple_yolo@v2", "path": "/m/v2", "share": 0.25,
            "measure": "box F1 at IoU 0.5", "state": "running"}
    r.hset(key, mapping={
        "detect|infer-a": json.dumps({**base, "consumer": "infer-a", "frames": 30, "mean": 0.9, "at": now}),
        "detect|infer-b": json.dumps({**base, "consumer": "infer-b", "frames": 10, "mean": 0.5, "at": now}),
        "detect|infer-gone": json.dumps({**base, "consumer": "infer-gone", "frames": 99, "mean": 0.0, "at": now - 600}),
        "classify|infer-a": json.dumps({"task": "classify", "live": "simple_cnn@v1", "path": "/m/bad",
                                        "state": "refused", "error": "ModelError: bad", "at": now})})
    try:
        url = f"http://127.0.0.1:{viewer.port}"
        assert httpx.get(url + "/api/shadow", timeout=5).status_code == 401
        rows = httpx.get(url + "/api/shadow", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert [row["task"] for row in rows] == ["classify", "detect"]
        assert rows[0]["state"] == "refused" and rows[0]["error"] == "ModelError: bad" and rows[0]["mean"] is None
        detect = rows[1]
        assert (detect["live"], detect["shadow"], detect["share"], detect["workers"]) == (
            "simple_yolo@v1", "simple_yolo@v2", 0.25, 2)
        assert detect["frames"] == 40 and detect["mean"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
        page = httpx.get(url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert page.status_code == 200 and '<table id="shadow"' in page.text
    finally:
        viewer.stop.set()
        viewer.http.shutdown()


def test_the_shadow_commands_check_what_they_are_given(redis_server, r, prefix, tmp_path, capsys):
    cfg_path = tmp_path / "plantsight.yaml"
    cfg_path.write_text(yaml.safe_dump({"redis": {"url": redis_server.url, "prefix": prefix}}))
    cand = model_dir(tmp_path / "cand", "v2", 2)
    assert cli(cfg_path, "promote", "classify") == 1
    assert "classify has no shadow model" in capsys.readouterr().err
    assert cli(cfg_path, "shadow", "classify") == 2  # neither a directory nor --off
    assert cli(cfg_path, "shadow", "classify", str(cand), "--off") == 2
    assert cli(cfg_path, "shadow", "classify", str(cand), "--share", "0") == 2
    assert "--share 0: give a fraction above 0, at most 1" in capsys.readouterr().err
    assert cli(cfg_path, "shadow", "detect", str(cand)) == 1  # a classify model is no detect shadow
    assert "holds a classify model, not a detect one" in capsys.readouterr().err
    assert r.hget(f"{prefix}:models:shadow", "classify") is None  # nothing asked of infer by a refused command
    assert cli(cfg_path, "shadow", "classify", str(cand), "--share", "0.5") == 0
    asked = json.loads(r.hget(f"{prefix}:models:shadow", "classify"))
    assert asked["path"] == str(cand.resolve()) and asked["share"] == 0.5
