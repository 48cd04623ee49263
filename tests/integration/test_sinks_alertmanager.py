"""The alertmanager sink against a real Alertmanager (Debian's prometheus-alertmanager) on loopback.

Alertmanager's API lists only alerts that are still active, so "resolved" is shown the way a plant
sees it: Alertmanager's own webhook notification with ``status: resolved``, sent to a receiver the
test runs, and the alert gone from ``GET /api/v2/alerts``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest

from shared.messages import Alert
from tests.support.ports import free_port
from tests.support.sinks import Receiver, acked, run_sink
from tests.support.waiting import wait_until

BINARY = "/usr/bin/prometheus-alertmanager"
PUBLIC = {"public_url": "https://viewer.plant.example"}


class Alertmanager:
    def __init__(self, tmp_path, notify_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = tmp_path / "alertmanager.yml"
        conf.write_text(json.dumps({  # YAML is a superset of JSON
            "route": {"receiver": "plant", "group_by": ["..."], "group_wait": "0s", "group_interval": "1s",
                      "repeat_interval": "1h"},
            "receivers": [{"name": "plant", "webhook_configs": [{"url": notify_url, "send_resolved": True}]}]}))
        self.log = open(tmp_path / "alertmanager.log", "wb")
        self.proc = subprocess.Popen([BINARY, f"--config.file={conf}", f"--storage.path={tmp_path / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            time.sleep(0.1)
        raise RuntimeError(f"alertmanager did not become ready on port {self.port}")

    def alerts(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v2/alerts", timeout=5).json()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def notified():
    rx = Receiver([])
    yield rx
    rx.close()


@pytest.fixture
def am(tmp_path, notified):
    if not os.access(BINARY, os.X_OK):
        pytest.skip(f"{BINARY} is not installed (apt-get install prometheus-alertmanager)")
    server = Alertmanager(tmp_path, notified.url)
    yield server
    server.close()


def notifications(rx: Receiver) -> list[dict]:
    return [json.loads(body) for _, _, body in rx.requests]


def statuses(rx: Receiver) -> list[tuple[str, str]]:
    return [(a["status"], a["labels"]["alertname"]) for n in notifications(rx) for a in n["alerts"]]


def firing(n: int, ago_s: float = 5.0) -> Alert:
    ts = time.time_ns() - int(ago_s * 1e9)
    return Alert(id=Alert.identity("hot", "kiln-1", f"1-{n}"), rule="hot", severity="critical", state="firing",
                 camera="kiln-1", task="thermal", ts=ts, value=455.5, threshold=400.0, message="kiln too hot",
                 frame_id=f"1-{n}", labels={"episode": Alert.identity("hot", "kiln-1", f"1-{n}"), "zone": "door",
                                            "seq": "7", "model": "thermal_cnn@3"})


def resolved(of: Alert, after_s: float = 2.0) -> Alert:
    return Alert(id=Alert.identity("hot:resolved", of.camera, of.frame_id), rule="hot", severity="critical",
                 state="resolved", camera=of.camera, task="thermal", ts=of.ts + int(after_s * 1e9), value=380.0,
                 threshold=400.0, message="kiln back to normal", frame_id="2-0",
                 labels={"episode": of.id, "zone": "door", "seq": "9", "model": "thermal_cnn@3"})


def iso(ts_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ns // 1_000_000_000)) + \
        f".{(ts_ns // 1_000_000) % 1000:03d}Z"


def instant(text: str):
    """An RFC 3339 time as a datetime: Alertmanager (Go) drops trailing zeros of the fraction (.43Z for .430Z)."""
    from datetime import datetime

    return datetime.fromisoformat(text)


def test_alertmanager_lists_the_alert_then_shows_it_resolved(redis_server, r, prefix, am, notified):
    a = firing(1)
    r2, names = run_sink(redis_server, prefix, am.url, [a], lambda r_, n: acked(r_, n) and len(am.alerts()) == 1,
                         sink_type="alertmanager", alerts_cfg=PUBLIC)
    (listed,) = am.alerts()
    labels = {"alertname": "hot", "camera": "kiln-1", "severity": "critical", "task": "thermal", "episode": a.id,
              "zone": "door", "source": "plantsight"}
    assert listed["labels"] == labels
    assert listed["annotations"] == {
        "summary": "hot on camera kiln-1", "message": "kiln too hot", "value": "455.5", "threshold": "400",
        "alert_id": a.id, "frame_id": "1-1", "seq": "7", "model": "thermal_cnn@3",
        "snapshot": f"https://viewer.plant.example/api/alerts/{a.id}/snapshot.jpg",
        "evidence": f"https://viewer.plant.example/alerts/{a.id}"}
    assert listed["status"]["state"] == "active" and listed["receivers"] == [{"name": "plant"}]
    assert instant(listed["startsAt"]) == instant(iso(a.ts))
    assert listed["generatorURL"] == f"https://viewer.plant.example/alerts/{a.id}"
    wait_until(lambda: statuses(notified) == [("firing", "hot")], 20,
               "Alertmanager's webhook call for the firing alert",
               poll=0.1)

    clear = resolved(a)
    r2.xadd(names.alerts, {"m": clear.to_msgpack()})
    run_sink(redis_server, prefix, am.url, [], lambda r_, n: acked(r_, n) and ("resolved", "hot") in statuses(notified),
             sink_type="alertmanager", alerts_cfg=PUBLIC)
    assert statuses(notified) == [("firing", "hot"), ("resolved", "hot")]
    (note,) = notifications(notified)[1]["alerts"]
    assert note["labels"] == labels  # the same alert, not a new one
    assert instant(note["startsAt"]) == instant(iso(a.ts)) and instant(note["endsAt"]) == instant(iso(clear.ts))
    assert note["annotations"]["message"] == "kiln back to normal" and note["annotations"]["resolved_by"] == clear.id
    assert am.alerts() == []  # nothing active any more
    assert json.loads(r2.hget(names.sink_state("cmms"), a.id))["state"] == "resolved"
    assert r2.xlen(names.deadletter) == 0


def test_a_firing_alert_is_re_posted_so_alertmanager_keeps_it_active(redis_server, r, prefix, am, notified):
    """Alertmanager ends an alert at its endsAt; the sink re-posts every resend_s with a later one."""
    a = firing(2)
    seen: list[str] = []

    def moved(r_, n) -> bool:
        listed = am.alerts()
        if listed:
            seen.append(listed[0]["endsAt"])
        return acked(r_, n) and len(set(seen)) >= 2

    run_sink(redis_server, prefix, am.url, [a], moved, sink_type="alertmanager", resend_s=0.5)
    assert len(set(seen)) >= 2 and sorted(set(seen)) == list(dict.fromkeys(seen))  # endsAt only moves forward
    assert seen[-1] > iso(time.time_ns())


def test_a_firing_alert_that_arrives_after_its_resolve_is_posted_already_ended(redis_server, r, prefix, am,
                                                                              notified):
    """Across a restart a pending firing alert can be delivered after its resolve: it must not fire again."""
    a = firing(3)
    r2, names = run_sink(redis_server, prefix, am.url, [resolved(a), a], acked, sink_type="alertmanager",
                         resend_s=0.2)
    time.sleep(1.0)  # a few re-post intervals: nothing may bring it back
    assert am.alerts() == []
    assert json.loads(r2.hget(names.sink_state("cmms"), a.id))["state"] == "resolved"
    assert ("firing", "hot") not in statuses(notified)
    assert r2.xlen(names.deadletter) == 0


def test_an_alertmanager_that_refuses_the_alert_dead_letters_it(redis_server, r, prefix, am):
    """Alertmanager answers 400 to an alert that starts after it ends: final, not retried."""
    a = firing(4, ago_s=-3600)  # a camera clock an hour fast: startsAt after now + 4 × resend_s
    r2, names = run_sink(redis_server, prefix, am.url, [a], lambda r_, n: r_.xlen(n.deadletter) >= 1,
                         sink_type="alertmanager", resend_s=1)
    (letter,) = r2.xrange(names.deadletter)
    assert letter[1][b"reason"] == b"delivery_failed"
    assert letter[1][b"detail"] == b'sink cmms: HTTP 400: "start time must be before end time"\n'
    assert am.alerts() == []
