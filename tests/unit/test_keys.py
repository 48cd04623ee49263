"""The Redis key names are a deployed interface (dashboards, operators, data already in Redis): pin them."""

from __future__ import annotations

from shared.config import Config
from shared.keys import Keys


def test_every_key_keeps_its_name():
    k = Keys("p")
    assert (k.frames, k.results, k.alerts, k.deadletter) == ("p:frames", "p:results", "p:alerts", "p:deadletter")
    assert k.prepared("thermal") == "p:prepared:thermal"
    assert (k.cameras, k.seq, k.services) == ("p:cameras", "p:seq", "p:services")
    assert (k.alert_state, k.alert_acks, k.sink_state("cmms")) == ("p:alert-state", "p:alert-acks", "p:sink-state:cmms")
    assert (k.models_deploy, k.models_active) == ("p:models:deploy", "p:models:active")
    assert (Keys.PREPROCESS, Keys.ALERT, Keys.infer_group("detect")) == ("preprocess", "alert", "infer-detect")


def test_the_streams_and_groups_follow_where_infer_reads_from():
    prepared = Keys.for_config(Config.model_validate({"redis": {"prefix": "p"}}))
    assert prepared.frame_groups(["detect", "classify"]) == ["preprocess"]
    assert prepared.frame_readers_write(["detect", "classify"]) == ["p:prepared:classify", "p:prepared:detect"]
    assert prepared.all(["classify"]) == [("p:frames", "preprocess"), ("p:prepared:classify", "infer-classify"),
                                         ("p:results", "alert"), ("p:alerts", None), ("p:deadletter", None)]
    frames = Keys.for_config(Config.model_validate({"redis": {"prefix": "p"}, "inference": {"read_from": "frames"}}))
    assert frames.frame_groups(["detect", "classify"]) == ["infer-classify", "infer-detect"]
    assert frames.frame_readers_write(["detect"]) == ["p:results"]
    assert frames.all(["classify"]) == [("p:frames", "infer-classify"), ("p:results", "alert"), ("p:alerts", None),
                                       ("p:deadletter", None)]
