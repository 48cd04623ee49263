"""Slack and Teams message formats and the rate limit, against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import time

from shared.messages import Alert
from tests.support.sinks import Receiver, acked, run_sink

PUBLIC = {"public_url": "https://viewer.plant.example"}


def firing(n: int = 0, message: str = "kiln too hot") -> Alert:
    return Alert(id=Alert.identity("hot", "kiln-1", f"1-{n}"), rule="hot", severity="critical", state="firing",
                 camera="kiln-1", task="thermal", ts=1_700_000_000_000_000_000 + n, value=455.5, threshold=400.0,
                 message=message, frame_id=f"1-{n}", labels={"episode": Alert.identity("hot", "kiln-1", f"1-{n}"),
                                                             "zone": "door", "seq": "7"})


def resolved(of: Alert) -> Alert:
    return Alert(id=Alert.identity("hot:resolved", of.camera, "2-0"), rule="hot", severity="critical",
                 state="resolved", camera=of.camera, task="thermal", ts=of.ts + 60_000_000_000, value=380.0,
                 threshold=400.0, message="kiln back to normal", frame_id="2-0", labels={"episode": of.id})


def deliver(redis_server, prefix, sink_type, alerts, **opts) -> list[dict]:
    rx = Receiver([])
    try:
        run_sink(redis_server, prefix, rx.url, alerts, lambda r_, n: len(rx.requests) >= len(alerts) and acked(r_, n),
                 sink_type=sink_type, **opts)
    finally:
        rx.close()
    assert len(rx.requests) == len(alerts)
    for _, headers, _ in rx.requests:
        assert headers["Content-Type"] == "application/json"
    return [json.loads(body) for _, _, body in rx.requests]


def test_slack_gets_text_and_blocks_with_the_snapshot_and_alert_links(redis_server, r, prefix):
    a = firing(1, message="kiln <A> & door")
    fire, clear = deliver(redis_server, prefix, "slack", [a, resolved(a)], alerts_cfg=PUBLIC)
    snap, page = (f"https://viewer.plant.example/api/alerts/{a.id}/snapshot.jpg",
                  f"https://viewer.plant.example/alerts/{a.id}")
    assert fire["text"] == ("🔴 CRITICAL hot on kiln-1: kiln <A> & door — camera kiln-1, zone door, value 455.5 "
                            f"(threshold 400) <{snap}|snapshot>")
    assert [b["type"] for b in fire["blocks"]] == ["header", "section", "section", "actions", "context"]
    assert fire["blocks"][0]["text"] == {"type": "plain_text", "text": "🔴 CRITICAL hot on kiln-1", "emoji": True}
    assert fire["blocks"][1]["text"] == {
        "type": "mrkdwn", "text": "kiln &lt;A&gt; &amp; door — camera kiln-1, zone door, value 455.5 (threshold 400)"}
    assert [f["text"] for f in fire["blocks"][2]["fields"]] == [
        "*Camera*\nkiln-1", "*Rule*\nhot", "*Severity*\ncritical", "*State*\nfiring", "*Task*\nthermal",
        "*Value*\n455.5", "*Threshold*\n400", "*Zone*\ndoor", "*Time*\n2023-11-14T22:13:20.000Z"]
    assert [(e["text"]["text"], e["url"]) for e in fire["blocks"][3]["elements"]] == [
        ("Snapshot", snap), ("Alert page", page)]
    assert fire["blocks"][4]["elements"][0]["text"] == f"plantsight alert `{a.id}`"
    # The resolved message links to the episode's evidence (the firing alert's id), not its own id.
    assert clear["blocks"][0]["text"]["text"] == "✅ RESOLVED hot on kiln-1"
    assert [e["url"] for e in clear["blocks"][3]["elements"]] == [snap, page]
    assert clear["text"].startswith("✅ RESOLVED hot on kiln-1: kiln back to normal — camera kiln-1, value 380")


def test_slack_without_a_public_url_has_no_link_buttons(redis_server, r, prefix):
    (doc,) = deliver(redis_server, prefix, "slack", [firing(2)])
    assert [b["type"] for b in doc["blocks"]] == ["header", "section", "section", "context"]
    assert "snapshot" not in doc["text"]


def test_teams_gets_an_adaptive_card_with_facts_and_links(redis_server, r, prefix):
    a = firing(3)
    fire, clear = deliver(redis_server, prefix, "teams", [a, resolved(a)], alerts_cfg=PUBLIC)
    assert fire["type"] == "message" and fire["summary"] == "🔴 CRITICAL hot on kiln-1"
    (att,) = fire["attachments"]
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive" and att["contentUrl"] is None
    card = att["content"]
    assert (card["type"], card["version"], card["$schema"]) == (
        "AdaptiveCard", "1.4", "http://adaptivecards.io/schemas/adaptive-card.json")
    title, text, facts = card["body"]
    assert (title["type"], title["text"], title["color"]) == ("TextBlock", "🔴 CRITICAL hot on kiln-1", "Attention")
    assert text["text"] == "kiln too hot — camera kiln-1, zone door, value 455.5 (threshold 400)"
    assert facts["type"] == "FactSet"
    assert {f["title"]: f["value"] for f in facts["facts"]} == {
        "Camera": "kiln-1", "Rule": "hot", "Severity": "critical", "State": "firing", "Task": "thermal",
        "Value": "455.5", "Threshold": "400", "Zone": "door", "Time": "2023-11-14T22:13:20.000Z"}
    assert card["actions"] == [
        {"type": "Action.OpenUrl", "title": "Snapshot",
         "url": f"https://viewer.plant.example/api/alerts/{a.id}/snapshot.jpg"},
        {"type": "Action.OpenUrl", "title": "Alert page", "url": f"https://viewer.plant.example/alerts/{a.id}"}]
    cleared = clear["attachments"][0]["content"]
    assert (cleared["body"][0]["text"], cleared["body"][0]["color"]) == ("✅ RESOLVED hot on kiln-1", "Good")
    assert cleared["actions"][1]["url"] == f"https://viewer.plant.example/alerts/{a.id}"


def test_the_rate_limit_delays_alerts_but_drops_none(redis_server, r, prefix):
    """rate_per_min=120 with burst 1: a first worker stopped after 1.2 s can have delivered at most
    1 + 2.4 alerts; the rest wait in the stream (one held pending, none dead-lettered) and a second
    worker delivers exactly the remainder (the held one once it has been idle claim_idle_ms, so
    possibly later), which takes it at least 0.5 s per alert after its first.

    Only bounds that a slow machine cannot break: counts after a measured time, and durations
    measured from before a worker starts to after its last delivery."""
    alerts = [firing(10 + i) for i in range(8)]
    rx = Receiver([])
    try:
        began = time.monotonic()
        r2, names = run_sink(redis_server, prefix, rx.url, alerts, lambda r_, n: time.monotonic() - began >= 1.2,
                             timeout=1.2, consumer="first", rate_per_min=120, claim_idle_ms=300)
        first = len(rx.requests)
        assert 1 <= first <= 1 + int((time.monotonic() - began) * 2)
        assert r2.xlen(names.deadletter) == 0
        assert r2.xpending(names.alerts, "sink-cmms")["pending"] <= 1  # the one waiting for a token, if any
        began = time.monotonic()
        run_sink(redis_server, prefix, rx.url, [], lambda r_, n: len(rx.requests) >= 8 and acked(r_, n),
                 consumer="second", rate_per_min=120, claim_idle_ms=300)
        assert time.monotonic() - began >= (8 - first - 1) * 0.5
    finally:
        rx.close()
    keys = [h["Idempotency-Key"] for _, h, _ in rx.requests]
    assert keys[:first] == [a.id for a in alerts[:first]]  # in order within a worker
    assert sorted(keys) == sorted(a.id for a in alerts)  # each exactly once: the one held at the stop included
    assert r2.xlen(names.deadletter) == 0


def test_a_burst_goes_at_once_then_the_rate_applies(redis_server, r, prefix):
    """burst 3 then one every 0.5 s: five alerts take at least (5 - 3) × 0.5 s, and arrive in order."""
    alerts = [firing(30 + i) for i in range(5)]
    rx = Receiver([])
    try:
        began = time.monotonic()
        run_sink(redis_server, prefix, rx.url, alerts, lambda r_, n: len(rx.requests) >= 5 and acked(r_, n),
                 rate_per_min=120, burst=3)
        took = time.monotonic() - began
    finally:
        rx.close()
    assert [h["Idempotency-Key"] for _, h, _ in rx.requests] == [a.id for a in alerts]
    assert took >= 1.0


def test_a_429_is_retried_after_the_receivers_retry_after(redis_server, r, prefix):
    """Slack (and others) answer 429 with Retry-After: the next try waits that long, not backoff_s (0.2 s)."""
    rx = Receiver([429, 200])
    try:
        run_sink(redis_server, prefix, rx.url, [firing(40)], lambda r_, n: len(rx.requests) >= 2 and acked(r_, n),
                 sink_type="slack")
    finally:
        rx.close()
    (t0, _, first), (t1, _, second) = rx.requests
    assert first == second
    assert t1 - t0 >= 1.0
