"""Operating the pipeline: worker crashes, config errors, secrets, the streams command, embedded Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import redis
import yaml

from shared.keys import Keys
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.pipeline import groups_idle, per_key
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def child_pid(up, service: str) -> int:
    m = re.search(rf"plantsight up: {service}\s+pid (\d+)", up.tail(400))
    assert m, f"no pid for {service} in the log"
    return int(m.group(1))


@pytest.mark.parametrize("victim,read_from", [("preprocess", "prepared"), ("infer", "prepared"), ("infer", "frames")])
def test_a_killed_worker_loses_nothing_and_duplicates_nothing(up_pipeline, r, victim, read_from):
    """kill -9 mid-stream: the restarted worker (a new consumer) claims the dead one's pending entries (with
    ``read_from: frames``, infer's entries of ``{P}:frames``)."""
    n = 48
    # Large frames keep preprocess busy long enough to be caught holding unacknowledged entries.
    cams = [{"id": f"cam-{i}", "source": f"synthetic://process?seed={i}&w=1280&h=960", "fps": 12,
             "tasks": ["classify"], "on_full": "block", "max_frames": n, "queue": 4} for i in (1, 2)]
    up = up_pipeline(cams, inference={"device": "cpu", "max_batch": 4, "max_wait_ms": 50, "threads": 1,
                                      "read_from": read_from},
                     streams={"claim_idle_ms": 1500})
    up.wait_for(lambda: len(up.results()) >= 6, 120, "first results")
    if victim == "preprocess":
        stream, group = up.keys.frames, Keys.PREPROCESS
    elif read_from == "frames":
        stream, group = up.keys.frames, Keys.infer_group("classify")
    else:
        stream, group = up.keys.prepared("classify"), Keys.infer_group("classify")
    # Freeze the victim at a moment it holds unacknowledged entries, then kill it: there is work to take over.
    pid = child_pid(up, victim)

    def frozen_with_work() -> bool:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        if r.xpending(stream, group)["pending"] > 0:
            return True
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
        return False

    up.wait_for(frozen_with_work, 60, "the victim holding work")
    assert len(up.results()) < 2 * n
    os.kill(pid, signal.SIGKILL)
    up.wait_for(lambda: len(up.results()) >= 2 * n, 180, "all results after the crash")
    up.wait_for(lambda: groups_idle(r, up.prefix, ["classify"], read_from), 60, "nothing pending")
    counts = per_key(up.results())
    assert set(counts) == {(f"cam-{i}", s, "classify") for i in (1, 2) for s in range(n)}
    assert max(counts.values()) == 1
    assert f"{victim} exited with -9" in up.tail(400)
    assert up.stop() == 0


def test_a_wrong_key_or_type_stops_the_start_with_its_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"cameras": [{"id": "c1", "source": "synthetic://process", "fps": "fast",
                                                "tasks": ["classify"]}], "inference": {"max_bach": 4}}))
    for args in (["up", "--config", str(bad)], ["run", "infer", "--config", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True,
                             text=True, env=env_without_plantsight(), timeout=60)
        assert out.returncode == 2, out.stderr
        assert "cameras[0].fps" in out.stderr and "inference.max_bach: unknown key" in out.stderr
    env = {**env_without_plantsight(), "PLANTSIGHT_INFERENCE__MAX_BATCH": "many"}
    good = tmp_path / "good.yaml"
    good.write_text("cameras: []\n")
    out = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(good)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "inference.max_batch" in out.stderr


def test_secrets_never_reach_logs_or_config_check(tmp_path, up_pipeline, service_ports, request):
    """Redis with AUTH (password from the environment) and a signed webhook; neither secret is printed."""
    redis_pw, hook_secret = "s3cret-redis-Pw-81723", "s3cret-hook-KEY-55190"
    server = RedisServer()
    try:
        server.client().config_set("requirepass", redis_pw)
        cfg = {"redis": {"url": server.url, "prefix": "sec", "password_env": "PS_TEST_REDIS_PW"},
               "services": service_ports,
               "cameras": [{"id": "k1", "source": "synthetic://thermal?anomaly=1", "fps": 10, "tasks": ["thermal"],
                            "max_frames": 6, "on_full": "block"}],
               "models": {"thermal": {"arch": "thermal_cnn"}},
               "alerts": {"rules": [{"name": "hot", "task": "thermal", "when": "max_k > 0", "for_frames": 1,
                                     "sinks": ["hook"]}],
                          "sinks": [{"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{free_port()}/h",
                                     "secret_env": "PS_TEST_HOOK_SECRET", "retries": 1, "backoff_s": 0.1}]}}
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**env_without_plantsight(), "PS_TEST_REDIS_PW": redis_pw, "PS_TEST_HOOK_SECRET": hook_secret,
               "PLANTSIGHT_REDIS__PASSWORD": redis_pw}
        check = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(path)], cwd=ROOT,
                               capture_output=True, text=True, env=env, timeout=60)
        assert check.returncode == 0, check.stderr
        log = tmp_path / "up.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--config", str(path)], cwd=ROOT,
                                    env=env, stdout=fh, stderr=subprocess.STDOUT)
            request.addfinalizer(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
            client = redis.Redis(port=server.port, password=redis_pw)
            deadline = time.monotonic() + 120
            # The webhook target is down: the delivery is retried, then dead-lettered (its error is logged).
            while time.monotonic() < deadline and not client.xlen(Keys("sec").deadletter):
                time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        text = log.read_text() + check.stdout + check.stderr
        assert client.xlen(Keys("sec").results) == 6
        assert "giving up on alert" in text  # the log did cover the sink
        assert redis_pw not in text and hook_secret not in text
        assert "**********" in check.stdout
    finally:
        server.close()


def test_streams_command_reports_every_stream(tmp_path, up_pipeline, r):
    cams = [{"id": "p1", "source": "synthetic://process", "fps": 20, "tasks": ["classify"], "max_frames": 5,
             "on_full": "block"}]
    up = up_pipeline(cams)
    up.wait_for(lambda: len(up.results()) == 5, 120, "5 results")
    up.wait_for(lambda: groups_idle(r, up.prefix, ["classify"]), 30, "drained")
    out = subprocess.run([sys.executable, "-m", "services.cli", "streams", "--config", str(up.path), "--json"],
                         cwd=ROOT, capture_output=True, text=True, env=env_without_plantsight(), timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {row["stream"]: row for row in json.loads(out.stdout)["streams"]}
    p = up.prefix
    assert set(rows) == {f"{p}:frames", f"{p}:prepared:classify", f"{p}:results", f"{p}:alerts", f"{p}:deadletter"}
    assert rows[f"{p}:frames"]["length"] == 5 and rows[f"{p}:frames"]["lag"] == 0
    assert rows[f"{p}:results"]["length"] == 5 and rows[f"{p}:results"]["pending"] == 0
    assert rows[f"{p}:deadletter"]["length"] == 0
    table = subprocess.run([sys.executable, "-m", "services.cli", "streams", "--config", str(up.path)], cwd=ROOT,
                           capture_output=True, text=True, env=env_without_plantsight(), timeout=60).stdout
    assert f"{p}:prepared:classify" in table and "infer-classify" in table
    assert up.stop() == 0


def test_up_starts_an_embedded_redis_when_none_answers(tmp_path, service_ports):
    port = free_port()
    cfg = {"redis": {"url": f"redis://127.0.0.1:{port}/0", "prefix": "emb"}, "services": service_ports,
           "cameras": [{"id": "t1", "source": "synthetic://thermal", "fps": 10, "tasks": ["thermal"],
                        "max_frames": 3}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "services.cli", "up", "--config", str(path), "--for", "12"],
                         cwd=ROOT, capture_output=True, text=True, env=env_without_plantsight(), timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"started an embedded redis-server on port {port}" in out.stdout
    assert "embedded redis-server stopped" in out.stdout


def _start_alert_service(tmp_path, redis_server, service_ports):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"redis": {"url": redis_server.url, "prefix": "sig"}, "services": service_ports}))
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "alert", "--config", str(path)], cwd=ROOT,
                            env=env_without_plantsight(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{service_ports['alert']['port']}/readyz"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail("alert service never became ready")


@pytest.mark.timeout(60)
def test_sigterm_stops_a_service_cleanly_and_a_second_signal_at_once(tmp_path, redis_server, service_ports):
    proc = _start_alert_service(tmp_path, redis_server, service_ports)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0 and time.monotonic() - t0 < 10
    assert b"finishing the work in hand" in proc.stdout.read()

    proc = _start_alert_service(tmp_path, redis_server, service_ports)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) in (0, 128 + signal.SIGTERM)


@pytest.mark.timeout(120)
def test_a_wrong_redis_password_fails_at_start_without_printing_it(tmp_path, service_ports):
    server = RedisServer()
    try:
        server.client().config_set("requirepass", "the-right-one")
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump({"redis": {"url": server.url, "prefix": "pw", "password_env": "PS_PW"},
                                        "services": service_ports}))
        env = {**env_without_plantsight(), "PS_PW": "wrong-pass-6631"}
        for args in (["run", "alert"], ["up"]):
            out = subprocess.run([sys.executable, "-m", "services.cli", *args, "--config", str(path)], cwd=ROOT,
                                 capture_output=True, text=True, env=env, timeout=60)
            text = out.stdout + out.stderr
            assert out.returncode != 0, text
            assert "refused the credentials" in text and "password_env" in text
            assert "wrong-pass-6631" not in text and "the-right-one" not in text
            assert "embedded" not in text
        # The right password from the environment works.
        env["PS_PW"] = "the-right-one"
        out = subprocess.run([sys.executable, "-m", "services.cli", "streams", "--config", str(path), "--json"],
                             cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0 and json.loads(out.stdout)["streams"][0]["stream"] == Keys("pw").frames
    finally:
        server.close()


@pytest.mark.timeout(120)
def test_sigterm_lets_infer_finish_and_acknowledge_the_batch_in_hand(tmp_path, redis_server, r, service_ports):
    import numpy as np

    from shared.messages import Prepared

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_server.url, "prefix": "drain"}, "services": service_ports,
        "cameras": [{"id": "e1", "source": "synthetic://equipment", "tasks": ["detect"]}],
        "models": {"detect": {"arch": "simple_yolo"}},
        "inference": {"device": "cpu", "max_batch": 4, "max_wait_ms": 0, "threads": 1}}))
    keys = Keys("drain")
    img = np.zeros((448, 448, 3), np.uint8)
    for seq in range(24):
        msg = Prepared(camera="e1", seq=seq, ts=time.time_ns(), task="detect", frame_id=f"1-{seq}", shape=img.shape,
                       dtype="uint8", data=img.tobytes(), orig=[448, 448], letterbox=[1.0, 0, 0])
        r.xadd(keys.prepared("detect"), {"m": msg.to_msgpack(), "cam": "e1"})
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "infer", "--config", str(path)], cwd=ROOT,
                            env=env_without_plantsight(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a batch in hand: delivered, not yet acknowledged
        groups = {g["name"]: g for g in r.xinfo_groups(keys.prepared("detect"))}
        if groups.get(b"infer-detect", {}).get("pending", 0) > 0:
            break
        time.sleep(0.02)
    in_hand = r.xinfo_groups(keys.prepared("detect"))[0]["pending"]
    assert in_hand > 0
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0 and time.monotonic() - t0 < 10
    g = r.xinfo_groups(keys.prepared("detect"))[0]
    assert g["pending"] == 0  # the batch in hand was finished and acknowledged
    done = r.xlen(keys.results)
    assert done >= in_hand and done < 24  # it stopped taking new work
    assert sorted(msgpack_seq(f) for _, f in r.xrange(keys.results)) == list(range(done))


def msgpack_seq(fields) -> int:
    import msgpack

    return msgpack.unpackb(fields[b"m"], raw=False)["seq"]


def test_services_do_not_outlive_a_killed_supervisor(up_pipeline):
    cams = [{"id": "t1", "source": "synthetic://thermal", "fps": 5, "tasks": ["thermal"]}]
    up = up_pipeline(cams)
    up.wait_for(lambda: len(up.results()) >= 1, 120, "a result")
    pids = [child_pid(up, s) for s in ("ingest", "preprocess", "infer", "alert")]
    up.proc.kill()
    up.proc.wait()
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        time.sleep(0.2)
    assert alive == []
