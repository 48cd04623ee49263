"""Sink settings checked at config load, and the token bucket's exact arithmetic on a stepped clock."""

from __future__ import annotations

import pytest

from services.alerting.sinks.base import TokenBucket
from shared.config import ConfigError, load_config
from shared.config_sinks import AlertmanagerSinkConfig, MqttSinkConfig


def sink_config(**sink) -> dict:
    return {"alerts": {"sinks": [{"name": "s", **sink}]}}


@pytest.mark.parametrize("sink, error", [
    ({"type": "mqtt", "url": "mqtt://b:1883", "topic": "plant/{zone}/x"},
     "alerts.sinks[0]: topic has {zone}; it may use {camera}, {rule}, {severity}, {state}, {task}"),
    ({"type": "mqtt", "url": "mqtt://b:1883", "topic": "plant/#"},
     "alerts.sinks[0]: topic: MQTT wildcards + and # cannot be published to"),
    ({"type": "mqtt", "url": "mqtt://b:1883", "state_topic": "plant/{rule}/state"},
     "alerts.sinks[0]: state_topic has {rule}; it may use {camera}"),
    ({"type": "mqtt", "url": "http://b:1883"}, "an mqtt sink needs url: mqtt://host:port or mqtts://host:port"),
    ({"type": "alertmanager", "url": "alertmanager:9093"}, "an alertmanager sink needs url: http(s)://…"),
    ({"type": "slack", "url": "https://hooks.slack.com/x", "template": "t.j2"},
     "alerts.sinks[0].template: unknown key for a slack sink"),
    ({"type": "mqtt", "url": "mqtt://b:1883", "headers": {"X-Token": "t"}},
     "alerts.sinks[0].headers: unknown key for a mqtt sink"),
    ({"type": "webhook"}, "alerts.sinks[0].url: Field required"),
    ({"type": "pager", "url": "https://h/x"}, "alerts.sinks[0]: Input tag 'pager' found using 'type' does not match"),
    ({"type": "webhook", "url": "https://h/x", "rate_per_min": 0}, "rate_per_min: Input should be greater than 0"),
    ({"type": "webhook", "url": "https://h/x", "burst": 0}, "burst: Input should be greater than or equal to 1"),
    ({"type": "mqtt", "url": "mqtt://b:1883", "qos": 3}, "qos: Input should be 0, 1 or 2"),
])
def test_bad_sink_settings_are_named(sink, error):
    with pytest.raises(ConfigError) as e:
        load_config(data=sink_config(**sink), environ={})
    assert error in str(e.value)


def test_good_sink_settings_load():
    cfg = load_config(data=sink_config(type="mqtt", url="mqtts://b:8883", topic="site/{severity}/{camera}/{rule}",
                                       state_topic=None, qos=2), environ={})
    s = cfg.alerts.sinks[0]
    assert type(s) is MqttSinkConfig
    assert (s.topic, s.state_topic, s.qos, s.burst, s.rate_per_min) == ("site/{severity}/{camera}/{rule}", None, 2, 1,
                                                                        None)
    am = load_config(data=sink_config(type="alertmanager", url="http://am:9093"), environ={}).alerts.sinks[0]
    assert type(am) is AlertmanagerSinkConfig and am.resend_s == 60.0


def test_the_mqtt_password_is_masked_in_config_check(monkeypatch):
    cfg = load_config(data=sink_config(type="mqtt", url="mqtt://b:1883", username="u", password="hunter2-mqtt"),
                      environ={})
    assert cfg.alerts.sinks[0].broker_password() == "hunter2-mqtt"
    assert "hunter2-mqtt" not in repr(cfg) and "hunter2-mqtt" not in str(cfg.masked())


class SteppedClock:
    """Time that moves only when the bucket waits: the waits it asks for are exact."""

    def __init__(self):
        self.now, self.waits = 0.0, []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(round(seconds, 9))
        self.now += seconds
        return False


def test_the_bucket_lets_a_burst_through_then_one_per_interval():
    clock = SteppedClock()
    bucket = TokenBucket(rate_per_min=30, burst=3, clock=clock)  # one token every 2 s
    for _ in range(6):
        assert bucket.take(clock.wait)
    assert clock.waits == [2.0, 2.0, 2.0]  # 3 at once, then 3 more two seconds apart
    assert clock.now == 6.0


def test_the_bucket_refills_while_idle_but_never_beyond_the_burst():
    clock = SteppedClock()
    bucket = TokenBucket(rate_per_min=60, burst=2, clock=clock)
    assert bucket.take(clock.wait) and bucket.take(clock.wait)
    clock.now += 100.0  # idle for a long time: two tokens back, not a hundred
    for _ in range(4):
        assert bucket.take(clock.wait)
    assert clock.waits == [1.0, 1.0]


def test_a_wait_cut_short_by_shutdown_takes_no_token():
    clock = SteppedClock()
    bucket = TokenBucket(rate_per_min=60, burst=1, clock=clock)
    assert bucket.take(clock.wait)
    assert not bucket.take(lambda s: True)  # shutdown during the wait
    assert bucket.take(clock.wait) and clock.waits == [1.0]
