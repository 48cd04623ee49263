"""The webhook sink against a real HTTP server: signature, idempotency key, templates, retries, give-up."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time

import pytest

from shared.config import ConfigError, load_config
from shared.messages import Alert
from tests.support.environment import env_without_plantsight
from tests.support.ports import free_port
from tests.support.sinks import Receiver, RunningSink, acked, run_sink

SECRET = "hook-secret-for-tests"


def alert(n: int = 0) -> Alert:
    return Alert(id=Alert.identity("hot", "kiln-1", f"1-{n}"), rule="hot", severity="critical", state="firing",
                 camera="kiln-1", task="thermal", ts=1_700_000_000_000_000_000 + n, value=455.5, threshold=400.0,
                 message="kiln too hot", frame_id=f"1-{n}")


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("PS_HOOK_SECRET", SECRET)


def verify(headers: dict, body: bytes, secret: str, max_age_s: int = 300) -> bool:
    """What a receiver does (docs/alerts.md, Sinks): HMAC-SHA256 over "<timestamp>.<body>", timestamp recent."""
    stamp = headers["X-Plantsight-Timestamp"]
    if abs(time.time() - int(stamp)) > max_age_s:
        return False
    want = "sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, headers["X-Plantsight-Signature"])


def test_delivery_is_signed_and_retried_with_backoff(redis_server, r, prefix):
    rx = Receiver([500, 503, 200])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert()],
                             lambda r_, n: len(rx.requests) >= 3 and acked(r_, n))
    finally:
        rx.close()
    assert len(rx.requests) == 3
    times = [t for t, _, _ in rx.requests]
    # Exponential backoff with jitter in [0.5, 1) of 0.2 s, then 0.4 s.
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2
    for _, headers, body in rx.requests:  # every attempt is signed afresh
        assert verify(headers, body, SECRET)
    _, headers, body = rx.requests[-1]
    assert headers["Idempotency-Key"] == alert().id
    assert {rx.requests[i][1]["Idempotency-Key"] for i in range(3)} == {alert().id}
    doc = json.loads(body)
    assert doc["rule"] == "hot" and doc["camera"] == "kiln-1" and doc["value"] == 455.5 and doc["state"] == "firing"
    assert r2.xlen(names.deadletter) == 0
    assert acked(r2, names)


def test_a_400_is_final_and_dead_lettered(redis_server, r, prefix):
    rx = Receiver([400])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert(1), alert(2)],
                             lambda r_, n: r_.xlen(n.deadletter) >= 1 and len(rx.requests) >= 2 and acked(r_, n))
    finally:
        rx.close()
    assert len(rx.requests) == 2  # no retry of the 400; the second alert went through
    letters = r2.xrange(names.deadletter)
    assert len(letters) == 1
    fields = letters[0][1]
    assert fields[b"reason"] == b"delivery_failed"
    assert fields[b"detail"] == b'sink cmms: HTTP 400: {"error": "unknown asset tag"}'
    assert Alert.from_msgpack(fields[b"m"]).id == alert(1).id


def test_an_unreachable_receiver_is_retried_then_dead_lettered(redis_server, r, prefix):
    url = f"http://127.0.0.1:{free_port()}/nothing-listens-here"
    r2, names = run_sink(redis_server, prefix, url, [alert(3)], lambda r_, n: r_.xlen(n.deadletter) >= 1,
                         retries=2)
    letters = r2.xrange(names.deadletter)
    assert len(letters) == 1 and letters[0][1][b"reason"] == b"delivery_failed"
    assert b"ConnectError" in letters[0][1][b"detail"]


def test_a_slow_receiver_times_out_and_the_alert_is_retried(redis_server, r, prefix):
    rx = Receiver([200, 200], delays=[1.5, 0])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert(4)],
                             lambda r_, n: len(rx.requests) >= 2 and acked(r_, n), timeout_s=0.5)
    finally:
        rx.close()
    assert len(rx.requests) == 2 and r2.xlen(names.deadletter) == 0
    assert rx.requests[0][1]["Idempotency-Key"] == rx.requests[1][1]["Idempotency-Key"] == alert(4).id


def test_an_alert_raised_while_the_receiver_is_down_arrives_after_a_restart(redis_server, r, prefix):
    """The first sink worker stops while retrying; the next one (a new consumer) claims and delivers it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    r2, names = run_sink(redis_server, prefix, url, [alert(5)], lambda r_, n: False, consumer="alert-old",
                         timeout=1.5, retries=100, backoff_s=0.2)
    assert r2.xpending(names.alerts, "sink-cmms")["pending"] == 1  # not given up, not acknowledged
    assert r2.xlen(names.deadletter) == 0
    rx = Receiver([], port=port)
    try:
        run_sink(redis_server, prefix, url, [], lambda r_, n: len(rx.requests) >= 1 and acked(r_, n),
                 consumer="alert-new", claim_idle_ms=200)
    finally:
        rx.close()
    assert len(rx.requests) == 1
    assert json.loads(rx.requests[0][2])["id"] == alert(5).id
    assert r2.xlen(names.deadletter) == 0


def test_the_timestamp_is_signed_so_a_replay_with_a_new_timestamp_fails(redis_server, r, prefix):
    rx = Receiver([])
    try:
        run_sink(redis_server, prefix, rx.url, [alert(6)], lambda r_, n: len(rx.requests) >= 1 and acked(r_, n))
    finally:
        rx.close()
    _, headers, body = rx.requests[0]
    assert verify(headers, body, SECRET)
    assert not verify(headers, body, "another-secret")
    assert not verify(headers, body + b" ", SECRET)
    moved = {**headers, "X-Plantsight-Timestamp": str(int(headers["X-Plantsight-Timestamp"]) + 1)}
    assert not verify(moved, body, SECRET)  # the timestamp is part of the signed material
    body_only = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Plantsight-Signature"] != body_only
    assert abs(int(headers["X-Plantsight-Timestamp"]) - time.time()) < 60


def test_the_same_alert_delivered_twice_carries_the_same_key_and_body(redis_server, r, prefix):
    """At least once: an alert written twice (a replay after a crash) reaches the receiver with one key."""
    rx = Receiver([])
    try:
        run_sink(redis_server, prefix, rx.url, [alert(7), alert(7), alert(8)],
                 lambda r_, n: len(rx.requests) >= 3 and acked(r_, n))
    finally:
        rx.close()
    keys = [h["Idempotency-Key"] for _, h, _ in rx.requests]
    assert keys == [alert(7).id, alert(7).id, alert(8).id]
    assert rx.requests[0][2] == rx.requests[1][2] != rx.requests[2][2]


def test_custom_headers_are_sent_but_cannot_replace_the_idempotency_key(redis_server, r, prefix, monkeypatch):
    monkeypatch.setenv("PS_CMMS_TOKEN", "cmms-token-from-env")
    rx = Receiver([])
    try:
        run_sink(redis_server, prefix, rx.url, [alert(9)], lambda r_, n: len(rx.requests) >= 1 and acked(r_, n),
                 headers={"Authorization": "Bearer ${PS_CMMS_TOKEN}", "X-Site": "line-a", "Idempotency-Key": "mine"})
    finally:
        rx.close()
    _, headers, body = rx.requests[0]
    assert headers["Authorization"] == "Bearer cmms-token-from-env" and headers["X-Site"] == "line-a"
    assert headers["Idempotency-Key"] == alert(9).id
    assert headers["Content-Type"] == "application/json"
    assert verify(headers, body, SECRET)


WORK_ORDER = """{
  "workOrder": {
    "title": {{ ("[" ~ alert.severity|upper ~ "] " ~ alert.message)|tojson }},
    "asset": {{ alert.camera|tojson }},
    "priority": {{ {"critical": 1, "warning": 2}.get(alert.severity, 3) }},
    "reading": {"value": {{ alert.value }}, "limit": {{ alert.threshold|tojson }}},
    "externalId": {{ episode|tojson }},
    "openedAt": {{ time|tojson }},
    "photo": {{ snapshot_url|tojson }},
    "link": {{ alert_url|tojson }},
    "zone": {{ alert.labels.get("zone")|tojson }}
  }
}
"""


def test_a_template_shapes_the_body_for_a_cmms_and_the_signature_covers_it(redis_server, r, prefix, tmp_path):
    tpl = tmp_path / "work-order.json.j2"
    tpl.write_text(WORK_ORDER)
    rx = Receiver([])
    a = alert(10)
    try:
        run_sink(redis_server, prefix, rx.url, [a], lambda r_, n: len(rx.requests) >= 1 and acked(r_, n),
                 template=str(tpl), alerts_cfg={"public_url": "https://viewer.plant.example/"})
    finally:
        rx.close()
    _, headers, body = rx.requests[0]
    assert verify(headers, body, SECRET)
    assert headers["Idempotency-Key"] == a.id
    assert json.loads(body) == {"workOrder": {
        "title": "[CRITICAL] kiln too hot", "asset": "kiln-1", "priority": 1,
        "reading": {"value": 455.5, "limit": 400.0}, "externalId": a.id, "openedAt": "2023-11-14T22:13:20.000Z",
        "photo": f"https://viewer.plant.example/api/alerts/{a.id}/snapshot.jpg",
        "link": f"https://viewer.plant.example/alerts/{a.id}", "zone": None}}


def test_a_template_value_with_quotes_stays_json_when_quoted_with_tojson(redis_server, r, prefix, tmp_path):
    tpl = tmp_path / "t.json.j2"
    tpl.write_text('{"text": {{ alert.message|tojson }}, "sink": {{ sink|tojson }}}')
    rx = Receiver([])
    quoted = Alert(id=Alert.identity("hot", "kiln-1", "q"), rule="hot", severity="warning", state="firing",
                   camera="kiln-1", task="thermal", ts=1_700_000_000_000_000_000, value=1.0,
                   message='door "B" open </script> \\ done', frame_id="q")
    try:
        run_sink(redis_server, prefix, rx.url, [quoted], lambda r_, n: len(rx.requests) >= 1 and acked(r_, n),
                 template=str(tpl))
    finally:
        rx.close()
    assert json.loads(rx.requests[0][2]) == {"text": 'door "B" open </script> \\ done', "sink": "cmms"}


@pytest.mark.parametrize("text, error", [
    ('{"a": {{ alert.rule }', "line 1: unexpected '}'"),
    ('{"a": "{{ alert.message }}"}', "did not render JSON: Expecting ',' delimiter at line 1 column 11"),
    ('{"a": {{ alert.no_such_field|tojson }}}', "UndefinedError: 'dict object' has no attribute 'no_such_field'"),
    ('{"a": {{ alert.__class__.__mro__|tojson }}}',
     "SecurityError: access to attribute '__class__' of 'dict' object is unsafe."),
    ('{"a": 1', "did not render JSON: Expecting ',' delimiter"),
])
def test_a_broken_template_stops_config_check_naming_the_file(tmp_path, text, error):
    tpl = tmp_path / "bad.json.j2"
    tpl.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(data={"alerts": {"sinks": [{"name": "cmms", "type": "webhook", "url": "http://127.0.0.1/h",
                                                "template": str(tpl)}]}}, environ={})
    assert f"alerts.sinks[0]: template {tpl}" in str(e.value)
    assert error in str(e.value)


def test_a_missing_template_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"alerts.sinks\[0\]: template .*nope.j2: cannot read it: No such file"):
        load_config(data={"alerts": {"sinks": [{"name": "cmms", "type": "webhook", "url": "http://127.0.0.1/h",
                                                "template": str(tmp_path / "nope.j2")}]}}, environ={})


def test_plantsight_config_check_reports_the_template(tmp_path):
    tpl = tmp_path / "bad.json.j2"
    tpl.write_text('{"a": {{ alert.rule }}}')  # unquoted: the sample alert's rule is not JSON
    conf = tmp_path / "plant.yaml"
    conf.write_text(f"alerts:\n  sinks:\n    - {{name: cmms, type: webhook, url: 'http://127.0.0.1/h', "
                    f"template: '{tpl}'}}\n")
    out = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(conf)], capture_output=True,
                         text=True, timeout=60, env=env_without_plantsight())
    assert out.returncode == 2
    assert f"template {tpl} did not render JSON" in out.stderr


def test_an_alert_the_template_cannot_render_is_dead_lettered_without_retrying(redis_server, r, prefix, tmp_path):
    """The sample alert has a zone; this one has none, and the template insists on it."""
    tpl = tmp_path / "zoned.json.j2"
    tpl.write_text('{"zone": {{ alert.labels.zone|tojson }}}')
    rx = Receiver([])
    try:
        r2, names = run_sink(redis_server, prefix, rx.url, [alert(11)],
                             lambda r_, n: r_.xlen(n.deadletter) >= 1 and acked(r_, n), template=str(tpl))
    finally:
        rx.close()
    assert rx.requests == []
    letters = r2.xrange(names.deadletter)
    assert len(letters) == 1
    assert letters[0][1][b"detail"].decode() == (
        f"sink cmms: template {tpl}: UndefinedError: 'dict object' has no attribute 'zone'")


def test_an_alert_being_retried_is_not_taken_over_by_another_replica(redis_server, r, prefix):
    """Retrying for longer than claim_idle_ms, the worker keeps re-claiming its entry, so a second
    replica of the sink (another consumer of the group) does not deliver it a second time."""
    rx = Receiver([503, 503, 503, 200])
    one = RunningSink(redis_server, prefix, rx.url, [alert(12)], consumer="replica-1", claim_idle_ms=300,
                      backoff_s=0.4, backoff_max_s=0.8)
    two = None
    try:
        assert one.until(lambda r_, n: len(rx.requests) >= 1, timeout=10)
        two = RunningSink(redis_server, prefix, rx.url, [], consumer="replica-2", claim_idle_ms=300)
        assert one.until(lambda r_, n: len(rx.requests) >= 4 and acked(r_, n), timeout=20)
        time.sleep(0.6)  # two idle claim intervals: a takeover would show as a fifth request
    finally:
        one.stop()
        if two:
            two.stop()
        rx.close()
    assert [h["Idempotency-Key"] for _, h, _ in rx.requests] == [alert(12).id] * 4
    assert r.xlen(one.keys.deadletter) == 0


def test_a_header_naming_an_unset_variable_stops_the_start(redis_server, r, prefix, monkeypatch):
    monkeypatch.delenv("PS_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match=r"^sink cmms: header uses \$\{PS_NOT_SET\}, which is not set$"):
        RunningSink(redis_server, prefix, "http://127.0.0.1:1/h", [], headers={"Authorization": "Bearer ${PS_NOT_SET}"})
