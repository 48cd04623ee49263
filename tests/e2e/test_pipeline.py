"""The whole pipeline as real processes (`plantsight up`) on a real Redis."""

from __future__ import annotations

import os
import time

import httpx
import msgpack
import numpy as np
import pytest

from shared.imaging import encode
from shared.messages import Frame, Prepared
from tests.support.pipeline import groups_idle, per_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

DOCUMENTED_METRICS = ("frames_total", "frames_dropped_total", "stream_length", "consumer_lag", "consumer_pending",
                      "stage_seconds", "end_to_end_seconds", "batch_size", "inference_seconds", "camera_up",
                      "camera_reconnects_total", "camera_fps", "alerts_total", "sink_deliveries_total",
                      "deadletter_total", "model_info", "alert_verdicts_total", "shadow_agreement",
                      "shadow_max_k_difference_kelvin", "shadow_failures_total")

FRAMES = {"classify": 6, "detect": 3, "segment": 3, "thermal": 6}
SCENE = {"classify": "process", "detect": "equipment", "segment": "surface", "thermal": "thermal"}


def test_every_frame_gets_exactly_one_result_per_task(up_pipeline, r):
    cams = [{"id": f"{task}-{i}", "source": f"synthetic://{SCENE[task]}?seed={i}", "fps": 20, "tasks": [task],
             "on_full": "block", "max_frames": n, "queue": 2}
            for task, n in FRAMES.items() for i in (1, 2)]
    up = up_pipeline(cams, alerts={"rules": [{"name": "warm", "task": "thermal", "when": "max_k > 0",
                                              "for_frames": 2, "cooldown_s": 0, "severity": "info",
                                              "sinks": ["console"]}],
                                   "sinks": [{"name": "console", "type": "log"}]})
    expected = {(c["id"], seq, c["tasks"][0]) for c in cams for seq in range(c["max_frames"])}
    up.wait_for(lambda: len(up.results()) >= len(expected), 300, f"{len(expected)} results")
    up.wait_for(lambda: groups_idle(r, up.prefix, FRAMES), 30, "all groups drained")

    # Every service answers on its port with the documented metrics (docs/metrics.md), /healthz and /readyz.
    text = ""
    for service in ("ingest", "preprocess", "infer", "alert"):
        base = f"http://127.0.0.1:{up.port(service)}"
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200, service
        assert httpx.get(base + "/readyz", timeout=5).status_code == 200, service
        text += httpx.get(base + "/metrics", timeout=5).text
    missing = [m for m in DOCUMENTED_METRICS if f"plantsight_{m}" not in text]
    assert not missing, f"metrics not exported: {missing}"

    counts = per_key(up.results())
    assert set(counts) == expected
    assert max(counts.values()) == 1
    # Results are in original-image coordinates and carry the model name@version.
    for m in up.results():
        assert m["model"].endswith("@untrained")
        if m["task"] == "detect":
            assert all(0 <= b[0] <= b[2] and 0 <= b[1] <= b[3] for b in m["out"]["boxes"])
        if m["task"] == "thermal":
            assert m["out"]["source"] == "radiometric" and m["out"]["min_k"] <= m["out"]["avg_k"] <= m["out"]["max_k"]
    # The always-true rule fired once per thermal camera (one episode, not one alert per frame).
    alerts = [msgpack.unpackb(f[b"m"], raw=False) for _, f in r.xrange(up.keys.alerts)]
    assert sorted(a["camera"] for a in alerts if a["state"] == "firing") == ["thermal-1", "thermal-2"]
    assert up.counter("alert", "plantsight_alerts_total", rule="warm") == 2
    assert up.stop() == 0


def test_with_infer_reading_the_frames_no_preprocess_runs_and_every_frame_gets_one_result_per_task(up_pipeline, r):
    """``inference.read_from: frames``: `plantsight up` starts no preprocess, infer's groups read
    ``{P}:frames`` (blocked cameras wait for all of them), nothing goes through a ``prepared`` stream, and
    every frame of every camera gets exactly one result per task, JPEG and radiometric alike."""
    frames = {"classify": 6, "detect": 3, "thermal": 4}
    cams = [{"id": f"{task}-{i}", "source": f"synthetic://{SCENE[task]}?seed={i}", "fps": 20, "tasks": [task],
             "on_full": "block", "max_frames": n, "queue": 2}
            for task, n in frames.items() for i in (1, 2)]
    cams[0]["tasks"] = ["classify", "detect"]  # one camera feeding two tasks: both groups must read its frames
    up = up_pipeline(cams, inference={"device": "cpu", "max_batch": 8, "max_wait_ms": 30, "threads": 1,
                                      "read_from": "frames"})
    expected = {(c["id"], seq, t) for c in cams for seq in range(c["max_frames"]) for t in c["tasks"]}
    up.wait_for(lambda: len(up.results()) >= len(expected), 300, f"{len(expected)} results")
    up.wait_for(lambda: groups_idle(r, up.prefix, frames, "frames"), 30, "all groups drained")
    counts = per_key(up.results())
    assert set(counts) == expected and max(counts.values()) == 1
    assert {g["name"].decode() for g in r.xinfo_groups(up.keys.frames)} == {f"infer-{t}" for t in frames}
    assert not r.keys(up.keys.prepared("*"))
    with pytest.raises(httpx.TransportError):  # no preprocess process
        httpx.get(f"http://127.0.0.1:{up.port('preprocess')}/healthz", timeout=2)
    for c in cams:  # every frame published was processed once per task, none dropped
        published = up.counter("ingest", "plantsight_frames_total", camera=c["id"], stage="ingest")
        assert published == c["max_frames"], c["id"]
        assert up.counter("infer", "plantsight_frames_total", camera=c["id"],
                          stage="infer") == published * len(c["tasks"])
    assert up.counter("ingest", "plantsight_frames_dropped_total") == 0
    assert all(m["out"]["source"] == "radiometric" for m in up.results() if m["task"] == "thermal")
    assert up.stop() == 0


@pytest.mark.parametrize("policy,read_from", [("drop_oldest", "prepared"), ("drop_newest", "prepared"),
                                              ("drop_oldest", "frames")])
def test_published_equals_processed_plus_dropped_with_a_slow_consumer(up_pipeline, r, policy, read_from):
    """A camera far faster than the detector: every frame is processed or counted as dropped (with
    ``read_from: frames`` the oldest frame infer has not read is the one dropped)."""
    n = 30
    cams = [{"id": "fast", "source": "synthetic://equipment", "fps": 30, "tasks": ["detect"],
             "on_full": policy, "max_frames": n, "queue": 2}]
    up = up_pipeline(cams, inference={"device": "cpu", "max_batch": 1, "max_wait_ms": 0, "threads": 1,
                                      "read_from": read_from},
                     streams={"prepared_backlog": 1})
    up.wait_for(lambda: up.counter("ingest", "plantsight_frames_total", camera="fast", stage="ingest") == n,
                120, "all frames captured")
    up.wait_for(lambda: groups_idle(r, up.prefix, ["detect"], read_from), 120, "pipeline drained")
    published = up.counter("ingest", "plantsight_frames_total", camera="fast", stage="ingest")
    processed = up.counter("infer", "plantsight_frames_total", camera="fast", stage="infer")
    stages = ("ingest", "infer") if read_from == "frames" else ("ingest", "preprocess", "infer")
    dropped = {service: up.counter(service, "plantsight_frames_dropped_total", camera="fast") for service in stages}
    assert published == n
    assert dropped["ingest"] > 0, "the slow detector should have forced drops"
    assert processed + sum(dropped.values()) == published, (processed, dropped)
    assert up.counter("ingest", "plantsight_frames_dropped_total", camera="fast",
                      reason="queue_full") == dropped["ingest"]
    seqs = sorted(m["seq"] for m in up.results())
    assert len(seqs) == processed and len(set(seqs)) == len(seqs)
    if policy == "drop_newest":  # the first frames are kept, later ones refused
        assert seqs[:2] == [0, 1]
    else:  # the freshest frame is kept
        assert seqs[-1] == n - 1
    assert up.stop() == 0


def _frame(camera: str, seq: int, image: np.ndarray, **over) -> bytes:
    enc, data = encode(image)
    fields = dict(camera=camera, seq=seq, ts=time.time_ns(), enc=enc, shape=image.shape, dtype="uint8", data=data)
    fields.update(over)
    return Frame(**fields).to_msgpack()


def test_bad_input_goes_to_the_dead_letter_stream_and_processing_goes_on(up_pipeline, r):
    cams = [{"id": "good", "source": "synthetic://process", "fps": 10, "tasks": ["classify"], "on_full": "block",
             "max_frames": 12}]
    up = up_pipeline(cams, streams={"max_message_bytes": 400_000})
    frames = up.keys.frames
    up.wait_for(lambda: len(up.results()) >= 2, 120, "first results")
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    good = _frame("good", 10_000, image)
    enc, jpeg = encode(image)
    bad = {
        "garbage": b"\x00\xffnot msgpack at all",
        "truncated": _frame("good", 10_001, image, data=jpeg[: len(jpeg) // 2]),
        "wrong_shape": _frame("good", 10_002, image, shape=[100, 100, 3]),
        "oversized": Frame(camera="good", seq=10_003, ts=time.time_ns(), enc="raw", shape=[480, 640, 3],
                           dtype="uint8", data=bytes(480 * 640 * 3)).to_msgpack(),
    }
    ids = {name: (frames, r.xadd(frames, {"m": payload, "cam": "good"}).decode()) for name, payload in bad.items()}
    # A prepared message of the wrong size for the network, straight onto the infer stream.
    wrong = Prepared(camera="good", seq=10_004, ts=time.time_ns(), task="classify", frame_id="0-1",
                     shape=[10, 10, 3], dtype="uint8", data=bytes(300), orig=[10, 10], letterbox=[1.0, 0, 0])
    prepared = up.keys.prepared("classify")
    ids["prepared"] = (prepared, r.xadd(prepared, {"m": wrong.to_msgpack(), "cam": "good"}).decode())
    r.xadd(frames, {"m": good, "cam": "good"})

    def dead():
        return {(f[b"stream"].decode(), f[b"id"].decode()): f for _, f in r.xrange(up.keys.deadletter)}

    up.wait_for(lambda: set(ids.values()) <= set(dead()), 60, "all bad entries dead-lettered")
    letters = dead()
    reasons = {name: letters[i][b"reason"].decode() for name, i in ids.items()}
    assert reasons == {"garbage": "decode_error", "truncated": "decode_error", "wrong_shape": "decode_error",
                       "oversized": "oversized", "prepared": "wrong_shape"}
    assert b"but the message says uint8 [100, 100, 3]" in letters[ids["wrong_shape"]][b"detail"]
    # The good frame injected after the bad ones and the camera's own frames are still processed.
    up.wait_for(lambda: any(m["seq"] == 10_000 for m in up.results()), 60, "the good frame after the bad ones")
    up.wait_for(lambda: len({m["seq"] for m in up.results() if m["seq"] < 12}) == 12, 120, "the camera's frames")
    assert up.counter("preprocess", "plantsight_deadletter_total", reason="decode_error") == 3
    assert up.counter("preprocess", "plantsight_deadletter_total", reason="oversized") == 1
    assert up.counter("infer", "plantsight_deadletter_total", reason="wrong_shape") == 1
    assert up.stop() == 0


def test_infer_loads_a_model_directory_and_ingest_reconnects_to_a_camera(up_pipeline, r, tmp_path, shared_data):
    """A model directory's version shows in every result; a folder camera that appears late is reconnected."""
    import shutil

    from shared.models import build, default_meta, save_model_dir

    meta = default_meta("simple_cnn", classes=["ok", "foam", "boil"])
    meta.version = "v7"
    save_model_dir(tmp_path / "model", build("simple_cnn", num_classes=3), meta)
    folder = tmp_path / "camera-folder"  # does not exist yet: the camera is down
    cams = [{"id": "late", "source": str(folder), "fps": 10, "tasks": ["classify"], "on_full": "block",
             "max_frames": 3, "loop": False}]
    up = up_pipeline(cams, models={"classify": {"path": str(tmp_path / "model")}})
    up.wait_for(lambda: up.counter("ingest", "plantsight_camera_reconnects_total", camera="late") >= 2, 60,
                "reconnect attempts")
    assert up.counter("ingest", "plantsight_camera_up", camera="late") == 0
    folder.mkdir()
    for name in ("baboon.jpg", "building.jpg", "fruits.jpg"):
        shutil.copy(shared_data / name, folder / name)
    up.wait_for(lambda: len(up.results()) == 3, 120, "3 results")
    results = up.results()
    assert {m["model"] for m in results} == {"simple_cnn@v7"}
    assert all(m["out"]["classes"] == ["ok", "foam", "boil"] for m in results)
    assert sorted(m["seq"] for m in results) == [0, 1, 2]
    assert "reconnecting in" in up.tail(400)
    assert up.stop() == 0


def test_two_infer_replicas_share_the_frames_and_the_cores_and_every_frame_gets_one_result(up_pipeline, r):
    """Two infer replicas in one consumer group (`read_from: frames`, the small CPU box's arrangement): both
    take batches, no frame is processed twice or lost, and with ``inference.threads`` unset each replica
    takes its share of the cores for torch."""
    cams = [{"id": f"line-{i}", "source": f"synthetic://process?seed={i}&w=160&h=120&replay=5", "fps": 40,
             "tasks": ["classify"], "on_full": "block", "max_frames": 60, "queue": 4} for i in (1, 2)]
    up = up_pipeline(cams, models={"classify": {"arch": "simple_cnn"}},
                     inference={"device": "cpu", "max_batch": 4, "max_wait_ms": 30, "read_from": "frames"},
                     replicas={"infer": 2})
    expected = {(c["id"], seq, "classify") for c in cams for seq in range(c["max_frames"])}
    up.wait_for(lambda: len(up.results()) >= len(expected), 300, f"{len(expected)} results")
    up.wait_for(lambda: groups_idle(r, up.prefix, ["classify"], "frames"), 30, "all groups drained")
    counts = per_key(up.results())
    assert set(counts) == expected and max(counts.values()) == 1
    ports = up.replica_ports("infer")
    assert len(ports) == 2
    per_replica = [up.counter("infer", "plantsight_frames_total", port=port, stage="infer") for port in ports]
    assert sum(per_replica) == len(expected) and min(per_replica) > 0, per_replica
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert up.tail(400).count(f"torch threads: {threads} (2 infer replica(s)") == 2
    assert up.stop() == 0
