"""The benchmarks run and print their documented JSON (figures are not judged here: tests time nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.keys import Keys
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT


def bench(*args: str, timeout: float = 240, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-m", "services.cli", "bench", *args], cwd=ROOT,
                          env=env or env_without_plantsight(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bench:" in done.stderr  # progress goes to stderr, stdout is only the JSON
    return json.loads(done.stdout)


def test_transport_compares_the_codec_hop_with_a_bare_redis_py_loop_in_one_run():
    out = bench("transport", "--shape", "32", "32", "3", "--seconds", "0.4")
    assert out["mode"] == "transport" and out["frame_bytes"] == 32 * 32 * 3
    assert out["plantsight_fps"] > 0 and out["bare_fps"] > 0
    # overhead is worked out from the unrounded medians: the printed fps (to 0.1) give it to within 0.001
    assert out["overhead"] == pytest.approx(out["bare_fps"] / out["plantsight_fps"], abs=1e-3)
    assert {"redis_server", "torch", "python"} <= set(out["versions"])


@pytest.mark.parametrize("read_from, group, writes", [("frames", "infer-classify", Keys("bench").results),
                                                      ("prepared", "preprocess", Keys("bench").prepared("classify"))])
def test_ingest_mode_measures_the_real_ingest_against_a_paced_reader(read_from, group, writes):
    out = bench("ingest", "--cameras", "2", "--width", "64", "--height", "48", "--rate", "100", "--seconds", "1",
                "--warmup", "0.5", "--read-from", read_from)
    assert out["mode"] == "ingest" and out["reader"] == {"group": group, "writes": writes}
    assert out["frames_read"] > 0 and out["ingest_cpu_ms_per_frame"] > 0
    calls = out["redis_calls_per_frame"]
    assert calls["xadd"] >= 1 and calls["xreadgroup"] > 0  # the frames and the reader's writes; its reads
    assert {"redis_server", "torch", "python"} <= set(out["versions"])


def test_engines_measures_every_engine_beside_eager():
    out = bench("engines", "--arch", "simple_cnn", "--batch", "2", "--seconds", "0.2")
    rows = out["archs"]["simple_cnn"]["engines"]
    assert set(rows) == {"eager", "torchscript", "onnx", "int8"}
    assert all(row["engine"] == name for name, row in rows.items())  # none fell back to eager
    assert out["auto"] == "torchscript" and out["archs"]["simple_cnn"]["auto_vs_eager"] > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("read_from, infer", [("prepared", 1), ("frames", 1), ("frames", 2)])
def test_pipeline_mode_runs_the_real_pipeline_and_the_bare_model(tmp_path, read_from, infer):
    home = tmp_path / "config"  # where `plantsight up` would keep a viewer token it made
    out = bench("pipeline", "--arch", "simple_cnn", "--cameras", "2", "--seconds", "3", "--warmup", "1",
                "--model-seconds", "0.5", "--width", "320", "--height", "240", "--decode", "infer",
                "--read-from", read_from, "--infer", str(infer), timeout=380,
                env={**env_without_plantsight(), "XDG_CONFIG_HOME": str(home)})
    assert not home.exists()  # the benchmark's viewer gets a token of the run's own; nothing lands in ~/.config
    keys = ["pipeline_fps", "model_fps", "ratio", "p50_ms", "p95_ms", "p99_ms"]
    assert list(out)[:6] == keys and all(out[k] is not None for k in keys)
    assert out["results_in_window"] > 0 and out["dropped"] == {}
    # capture → result split at the frame's entry in {P}:frames; the slowest 1 % is the same frames as p99 up
    parts = out["latency_parts"]
    tail = parts["slowest_1pct"]
    assert tail["frames"] == out["results_in_window"] - round(0.99 * (out["results_in_window"] - 1))
    assert tail["total_ms"] >= out["p99_ms"]
    assert tail["to_frames_ms"] + tail["after_frames_ms"] == pytest.approx(tail["total_ms"], abs=0.15)
    assert parts["to_frames_ms"]["p50"] >= -1 and parts["after_frames_ms"]["p50"] > 0  # Redis ids are whole ms
    assert 0 < tail["model_ms_per_frame"] < tail["after_frames_ms"]
    services = {"ingest", "infer", "alert", "redis"} | ({"preprocess"} if read_from == "prepared" else set())
    assert set(out["stages"]) == services and out["read_from"] == read_from
    assert out["preprocess_replicas"] == (1 if read_from == "prepared" else 0)
    assert out["stages"]["redis"]["cpu_ms_per_frame"] > 0  # the server's CPU is counted
    stage = out["stages"]["infer"]  # the networks' CPU, counted in infer, is most of infer's and not all
    assert 0 < stage["model_cpu_ms_per_frame"] < stage["cpu_ms_per_frame"]
    assert out["cpu_outside_model_ms_per_frame"] == pytest.approx(
        out["cpu_ms_per_frame_all_services"] - stage["model_cpu_ms_per_frame"], abs=0.02)
    assert out["cpu_feeding_model_ms_per_frame"] == pytest.approx(  # the same without the alert service
        out["cpu_outside_model_ms_per_frame"] - out["stages"]["alert"]["cpu_ms_per_frame"], abs=0.02)
    feeding = out["cpu_feeding_model_ms_per_frame"] / out["decode_resize_floor_ms"]
    assert out["feeding_vs_floor"] == pytest.approx(feeding, rel=0.08)
    assert out["batch"] == 8 and out["device"] == "cpu" and out["engine"] == "torchscript"
    assert out["decode"] == "infer" and out["frame"] == [240, 320]
    assert {"torch", "torchvision", "redis_py"} <= set(out["versions"]) and out["redis_server"]
    # the bare model runs as infer does: one predictor per infer replica, each with a replica's torch threads
    threads = max(1, len(os.sched_getaffinity(0)) // infer) if infer > 1 else out["torch_threads"]
    assert out["infer_replicas"] == out["bare_workers"] == out["processes"]["infer"] == infer
    assert out["bare_torch_threads"] == threads
    assert out["bare_model"]["before"]["workers"] == infer and out["bare_model"]["before"]["torch_threads"] == threads
    if infer == 1:  # the plain arrangement: nothing else to compare it with
        assert "plain_bare_model" not in out
    else:  # and the plain one (one predictor on torch's default threads) beside it, for comparison
        plain = out["plain_bare_model"]
        assert plain["workers"] == 1 and plain["torch_threads"] == out["torch_threads"] and plain["img_per_s"] > 0
        assert plain["pipeline_vs_plain"] == pytest.approx(out["pipeline_fps"] / plain["img_per_s"], abs=1e-3)


def test_small_data_trains_on_photographs_and_plots_the_learning_curves(tmp_path):
    plot = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-m", "services.cli", "bench", "small-data", "--task", "thermal",
                           "--n-good", "6", "--n-defect", "6", "--n-test", "3", "--epochs", "2", "--plot", str(plot),
                           "--json", "--quiet"], cwd=ROOT, env=env_without_plantsight(), capture_output=True, text=True,
                          timeout=240)
    out = json.loads(done.stdout)
    assert done.returncode == (0 if out["all_met"] else 1), done.stderr[-3000:]
    r = out["tasks"]["thermal"]
    assert (r["n_train"], r["n_test"], r["epochs_run"]) == (12, 6, 2)
    assert r["validation"] == "20% of train held out, stratified"
    assert [h["epoch"] for h in r["history"]] == [1, 2] and all(h["val_loss"] > 0 for h in r["history"])
    assert r["met"] == (r["metrics"]["mae_k"] <= r["goal"]["value"]) and out["all_met"] == r["met"]
    assert out["plot"] == str(plot) and plot.stat().st_size > 10_000
