"""The mqtt sink against a real Mosquitto broker that each test starts on a free port.

Messages are read back with a paho subscriber: QoS 1 end to end, the per-camera retained state
topic seen by a subscriber that connects after the fact, username/password, TLS with the plant's
CA, and a broker that is down when the alert is raised and up later.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from shared.config import ConfigError
from shared.messages import Alert
from tests.support.ports import free_port
from tests.support.sinks import RunningSink, acked, run_sink

MOSQUITTO = "/usr/sbin/mosquitto"
PUBLIC = {"public_url": "https://viewer.plant.example"}


class Broker:
    """A mosquitto on 127.0.0.1:``port``, anonymous, with a password file, or with TLS."""

    def __init__(self, tmp: Path, port: int | None = None, users: dict[str, str] | None = None,
                 tls: dict | None = None):
        self.port, self.tmp = port or free_port(), tmp
        lines = [f"listener {self.port} 127.0.0.1", "user root" if os.geteuid() == 0 else "",
                 "persistence false", "log_dest stderr"]
        if users:
            pw = tmp / "passwords"
            pw.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if tls:
            lines += [f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
        self.conf = tmp / f"mosquitto-{self.port}.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = open(tmp / f"mosquitto-{self.port}.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (tmp / f"mosquitto-{self.port}.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def broker(tmp_path):
    if not shutil.which(MOSQUITTO):
        pytest.skip(f"{MOSQUITTO} is not installed")
    b = Broker(tmp_path)
    yield b
    b.close()


class Subscriber:
    """A paho client that records (topic, payload, qos, retain) of what it receives."""

    def __init__(self, port: int, topic: str, *, tls_ca: Path | None = None, auth: tuple[str, str] | None = None):
        self.got: list[tuple[str, dict, int, bool]] = []
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}")
        if tls_ca:
            self.c.tls_set_context(ssl.create_default_context(cafile=str(tls_ca)))
        if auth:
            self.c.username_pw_set(*auth)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.ready.set()
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, json.loads(m.payload), m.qos, bool(m.retain)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(10), "subscriber did not subscribe"

    def wait(self, n: int, timeout: float = 10) -> list:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def alert(camera: str, n: int, state: str = "firing", episode: str | None = None) -> Alert:
    aid = Alert.identity("hot" if state == "firing" else "hot:resolved", camera, f"1-{n}")
    return Alert(id=aid, rule="hot", severity="critical", state=state, camera=camera, task="thermal",
                 ts=1_700_000_000_000_000_000 + n * 1_000_000_000, value=455.5 if state == "firing" else 380.0,
                 threshold=400.0, message=f"{camera} {state}", frame_id=f"1-{n}", labels={"episode": episode or aid})


def test_alerts_are_published_with_qos1_and_a_retained_state_per_camera(redis_server, r, prefix, broker):
    a, b = alert("kiln-1", 1), alert("kiln-2", 2)
    c = alert("kiln-1", 3)
    end_a = alert("kiln-1", 4, "resolved", episode=a.id)
    sub = Subscriber(broker.port, "plantsight/+/hot")
    try:
        run_sink(redis_server, prefix, f"mqtt://127.0.0.1:{broker.port}", [a, b, c, end_a],
                 lambda r_, n: acked(r_, n) and len(sub.got) >= 4, sink_type="mqtt", alerts_cfg=PUBLIC)
        got = sub.wait(4)
    finally:
        sub.close()
    assert [(t, m["id"], m["state"], qos, retain) for t, m, qos, retain in got] == [
        ("plantsight/kiln-1/hot", a.id, "firing", 1, False), ("plantsight/kiln-2/hot", b.id, "firing", 1, False),
        ("plantsight/kiln-1/hot", c.id, "firing", 1, False), ("plantsight/kiln-1/hot", end_a.id, "resolved", 1, False)]
    first = got[0][1]
    assert first["camera"] == "kiln-1" and first["value"] == 455.5 and first["episode"] == a.id
    assert first["snapshot_url"] == f"https://viewer.plant.example/api/alerts/{a.id}/snapshot.jpg"
    assert first["time"] == "2023-11-14T22:13:21.000Z"
    assert got[3][1]["episode"] == a.id and got[3][1]["alert_url"] == f"https://viewer.plant.example/alerts/{a.id}"

    late = Subscriber(broker.port, "plantsight/+/state")  # connects after everything was published
    try:
        states = {t: (m, qos, retain) for t, m, qos, retain in late.wait(2)}
    finally:
        late.close()
    assert sorted(states) == ["plantsight/kiln-1/state", "plantsight/kiln-2/state"]
    k1, qos, retain = states["plantsight/kiln-1/state"]
    assert retain and qos == 1
    assert k1["count"] == 1 and [e["id"] for e in k1["firing"]] == [c.id]  # a resolved, c still firing
    assert k1["last"] == {"id": end_a.id, "episode": a.id, "rule": "hot", "state": "resolved",
                          "time": "2023-11-14T22:13:24.000Z"}
    k2 = states["plantsight/kiln-2/state"][0]
    assert k2["count"] == 1 and k2["firing"][0] == {
        "id": b.id, "rule": "hot", "severity": "critical", "task": "thermal", "since": "2023-11-14T22:13:22.000Z",
        "value": 455.5, "threshold": 400.0, "message": "kiln-2 firing",
        "snapshot_url": f"https://viewer.plant.example/api/alerts/{b.id}/snapshot.jpg",
        "alert_url": f"https://viewer.plant.example/alerts/{b.id}"}


def test_the_topic_template_and_no_state_topic(redis_server, r, prefix, broker):
    a = alert("kiln-1", 5)
    sub = Subscriber(broker.port, "#")
    try:
        run_sink(redis_server, prefix, f"mqtt://127.0.0.1:{broker.port}", [a],
                 lambda r_, n: acked(r_, n) and len(sub.got) >= 1, sink_type="mqtt",
                 topic="site/line-a/{severity}/{camera}/{rule}/{state}", state_topic=None)
        time.sleep(0.3)  # a state message would have arrived by now
    finally:
        sub.close()
    assert [(t, m["id"]) for t, m, _, _ in sub.got] == [("site/line-a/critical/kiln-1/hot/firing", a.id)]


def test_an_alert_raised_while_the_broker_is_down_is_delivered_when_it_comes_back(redis_server, r, prefix,
                                                                                  tmp_path):
    """No PUBACK, no ack: the entry stays pending through the outage; the broker restarting mid-way
    (a dropped connection) is reconnected to."""
    port = free_port()
    a, b = alert("kiln-1", 6), alert("kiln-1", 7)
    sink = RunningSink(redis_server, prefix, f"mqtt://127.0.0.1:{port}", [a], sink_type="mqtt", retries=100,
                       backoff_s=0.1, backoff_max_s=0.3)
    broker = None

    def alerts_seen(sub) -> list[str]:
        return [m["id"] for t, m, _, _ in sub.got if not t.endswith("/state")]

    try:
        time.sleep(1.0)
        assert sink.r.xpending(sink.keys.alerts, "sink-cmms")["pending"] == 1  # tried, not acked
        assert sink.r.xlen(sink.keys.deadletter) == 0
        broker = Broker(tmp_path, port)
        # The sink may publish `a` before this subscriber has subscribed (it retries every 0.1-0.3 s);
        # the retained state topic then still shows `a` to the late subscriber, so either proves delivery.
        sub = Subscriber(port, "plantsight/#")
        assert sink.until(lambda r_, n: acked(r_, n) and (a.id in alerts_seen(sub) or any(
            m.get("last", {}).get("id") == a.id for t, m, _, retained in sub.got if t.endswith("/state") and retained)),
            timeout=10)
        broker.close()  # the connection drops under the sink
        broker = Broker(tmp_path, port)
        sub.close()
        sub = Subscriber(port, "plantsight/#")
        sink.add(b)
        assert sink.until(lambda r_, n: acked(r_, n) and alerts_seen(sub), timeout=10)
        sub.close()
    finally:
        sink.stop()
        if broker:
            broker.close()
    assert alerts_seen(sub) == [b.id]
    assert sink.r.xlen(sink.keys.deadletter) == 0


def test_username_and_password(redis_server, r, prefix, tmp_path, monkeypatch):
    broker = Broker(tmp_path, users={"plant": "s3cret-pw", "reader": "read-pw"})
    monkeypatch.setenv("PS_MQTT_PASSWORD", "s3cret-pw")
    a, b = alert("kiln-1", 8), alert("kiln-1", 9)
    sub = Subscriber(broker.port, "plantsight/+/hot", auth=("reader", "read-pw"))
    try:
        r2, names = run_sink(redis_server, prefix, f"mqtt://127.0.0.1:{broker.port}", [a],
                             lambda r_, n: acked(r_, n) and len(sub.got) >= 1, sink_type="mqtt", username="plant",
                             password_env="PS_MQTT_PASSWORD")
        assert [m["id"] for _, m, _, _ in sub.got] == [a.id]
        pw = tmp_path / "wrong"
        pw.write_text("not-the-password\n")
        r2, names = run_sink(redis_server, prefix, f"mqtt://127.0.0.1:{broker.port}", [b],
                             lambda r_, n: r_.xlen(n.deadletter) >= 1, sink_type="mqtt", username="plant",
                             password_file=str(pw), retries=1)
    finally:
        sub.close()
        broker.close()
    (letter,) = r2.xrange(names.deadletter)
    assert letter[1][b"detail"] == (f"sink cmms: mqtt broker mqtt://127.0.0.1:{broker.port} refused the "
                                    f"connection: Not authorized").encode()
    assert [m["id"] for _, m, _, _ in sub.got] == [a.id]


@pytest.fixture
def certs(tmp_path) -> dict:
    """A plant CA and a broker certificate for 127.0.0.1 signed by it."""
    def ssl_(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    ssl_("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
         "-out", "ca.pem", "-days", "2", "-subj", "/CN=plant test CA")
    ssl_("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "broker.key",
         "-out", "broker.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl_("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "broker.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": tmp_path / "ca.pem", "cert": tmp_path / "broker.pem", "key": tmp_path / "broker.key"}


def test_tls_with_the_plants_ca(redis_server, r, prefix, tmp_path, certs):
    broker = Broker(tmp_path, tls=certs)
    a, b = alert("kiln-1", 10), alert("kiln-1", 11)
    sub = Subscriber(broker.port, "plantsight/+/hot", tls_ca=certs["ca"])
    try:
        run_sink(redis_server, prefix, f"mqtts://127.0.0.1:{broker.port}", [a],
                 lambda r_, n: acked(r_, n) and len(sub.got) >= 1, sink_type="mqtt", tls_ca_file=str(certs["ca"]))
        # Without the plant's CA the broker's certificate is not trusted: nothing is sent.
        r2, names = run_sink(redis_server, prefix, f"mqtts://127.0.0.1:{broker.port}", [b],
                             lambda r_, n: r_.xlen(n.deadletter) >= 1, sink_type="mqtt", retries=0)
    finally:
        sub.close()
        broker.close()
    assert [m["id"] for _, m, _, _ in sub.got] == [a.id]
    (letter,) = r2.xrange(names.deadletter)
    assert b"certificate verify failed" in letter[1][b"detail"]


def test_a_missing_ca_file_is_named_at_start(redis_server, r, prefix, tmp_path):
    with pytest.raises(ConfigError, match=r"^sink cmms: tls_ca_file .*/no-ca.pem: No such file or directory$"):
        RunningSink(redis_server, prefix, "mqtts://127.0.0.1:8883", [], sink_type="mqtt",
                    tls_ca_file=str(tmp_path / "no-ca.pem"))
