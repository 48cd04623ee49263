"""The alert condition language: what it accepts, what it refuses, and the fields each task offers."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.alerting.state import FIRE, REPEAT, RESOLVE, Episode, Lifecycle, advance, repeated
from shared.rules import RiseWindow, RuleError, Zone, check_names, compile_condition, fields_of, threshold_of, value_of

THERMAL = {"max_k": 455.5, "avg_k": 310.0, "min_k": 280.25, "hotspots": 2}


@pytest.mark.parametrize("expr, want", [
    ("max_k >= 450", True), ("max_k >= 455.5", True), ("max_k > 455.5", False), ("max_k < 456", True),
    ("max_k <= 455", False), ("max_k == 455.5", True), ("max_k != 455.5", False), ("hotspots == 2", True),
    ("450 <= max_k", True), ("min_k > -5", True), ("min_k < -5", False), ("max_k < 1e5", True),
    ("max_k > 4.5e2", True), ("avg_k > .5", True),
])
def test_comparisons(expr, want):
    assert compile_condition(expr)(THERMAL) is want


@pytest.mark.parametrize("expr, want", [
    ("400 <= max_k < 500", True), ("400 <= max_k < 450", False), ("min_k < avg_k < max_k", True),
    ("max_k > 450 and hotspots >= 1", True), ("max_k > 450 and hotspots >= 3", False),
    ("max_k > 500 or hotspots >= 2", True), ("max_k > 500 or hotspots >= 3", False),
    ("not max_k > 500", True), ("not (max_k > 450 and hotspots == 2)", False),
    ("(max_k > 500 or avg_k > 300) and not min_k < 0", True),
    ("max_k > 450 and (hotspots > 5 or min_k < 281)", True),
])
def test_chained_and_boolean(expr, want):
    assert compile_condition(expr)(THERMAL) is want


def test_strings_and_dotted_fields():
    fields = {"label": "anomaly", "prob.anomaly": 0.875, "prob.normal": 0.125, "count.leak": 1, "count.hot-spot": 0}
    assert compile_condition('label == "anomaly"')(fields) is True
    assert compile_condition("label == 'anomaly'")(fields) is True
    assert compile_condition('label != "anomaly"')(fields) is False
    assert compile_condition('label == "max_k >= 1"')(fields) is False  # a string is never read as a condition
    assert compile_condition("prob.anomaly > 0.5")(fields) is True
    assert compile_condition("prob.normal > 0.5")(fields) is False
    assert compile_condition("count.leak >= 1")(fields) is True
    assert compile_condition("count.hot-spot >= 1")(fields) is False
    assert compile_condition('label == "anomaly" and prob.anomaly > 0.8')(fields) is True
    assert compile_condition('label == "anomaly" and prob.anomaly > 0.9')(fields) is False


def test_missing_field_or_mismatched_type_is_false():
    assert compile_condition("max_k >= 450")({}) is False
    assert compile_condition("max_k < 450")({}) is False  # missing is not "small": neither side holds
    assert compile_condition("count.leak >= 1")({"count.smoke": 3}) is False
    assert compile_condition("label > 3")({"label": "anomaly"}) is False
    assert compile_condition("max_k")({}) is False
    assert compile_condition("max_k")({"max_k": 1.0}) is True
    assert compile_condition("max_k > 450 or avg_k > 300")({"avg_k": 301}) is True


@pytest.mark.parametrize("expr, shown", [
    ("__import__('os')", "__import__('os')"),
    ("max_k >= 450 or open('/etc/passwd')", "open('/etc/passwd')"),
    ("len(hotspots) > 1", "len(hotspots)"),
    ("().__class__", "().__class__"),
    ("hotspots[0] > 1", "hotspots[0]"),
    ("max_k + 1 > 2", "max_k + 1"),
    ("max_k * 2 > 900", "max_k * 2"),
    ("-max_k < 0", "-max_k"),
    ("max_k > -'a'", "-'a'"),
    ("max_k > -True", "-True"),
    ("{} == 1", "{}"),
    ("[max_k] == 1", "[max_k]"),
    ("(max_k, 1) == 1", "(max_k, 1)"),
    # read as field names (dict keys, never attributes), which are missing: allowed and always False
    ("max_k == None", None),
    ("max_k.__class__ == 1", None),
])
def test_disallowed_constructs(expr, shown):
    if shown is None:
        assert compile_condition(expr)({"max_k": 1}) is False
        return
    with pytest.raises(RuleError, match="is not allowed in a condition") as info:
        compile_condition(expr)
    assert repr(shown) in str(info.value)  # the message shows the user's words, not the parser's


@pytest.mark.parametrize("expr", ["lambda: 1", "max_k >= 450; rm", "max_k in [1, 2]", "max_k is 1",
                                  "[x for x in hotspots]", "max_k > 1 if max_k else 2", "import os",
                                  "max_k >=", "max_k > 450 max_k", 'f"{max_k}" == "1"',
                                  "max_k >= 450and hotspots > 1"])  # a SyntaxWarning in Python: refused always
def test_unparseable(expr):
    with pytest.raises(RuleError, match="cannot parse"):
        compile_condition(expr)


@pytest.mark.parametrize("expr", ["", "   ", None, 450])
def test_empty_or_not_text(expr):
    with pytest.raises(RuleError, match="empty condition"):
        compile_condition(expr)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="max_k.lbe0123456789 <>=!\"'()-+*[]_andortsi,:;", max_size=30))
def test_fuzz_compile_raises_only_rule_error(expr):
    try:
        cond = compile_condition(expr)
    except RuleError:
        return
    for fields in ({}, THERMAL, {"max_k": "hot", "label": None}):
        assert cond(fields) in (True, False)


def test_fields_of_classify():
    out = {"label": "anomaly", "index": 1, "probs": [0.125, 0.875], "classes": ["normal", "anomaly"]}
    assert fields_of("classify", out) == {"label": "anomaly", "index": 1, "prob.normal": 0.125,
                                          "prob.anomaly": 0.875, "prob": 0.875}


def test_fields_of_detect():
    out = {"boxes": [[10, 20, 30, 40, 0.5, 0], [1, 2, 3, 4, 0.75, 1], [5, 5, 6, 6, 0.625, 1], [0, 0, 1, 1, 0.25, 7]],
           "classes": ["leak", "smoke", "fire"]}
    assert fields_of("detect", out) == {
        "count": 4, "count.leak": 1, "count.smoke": 2, "count.fire": 0, "count.7": 1,
        "max_score.leak": 0.5, "max_score.smoke": 0.75, "max_score.fire": 0.0, "max_score.7": 0.25, "max_score": 0.75}
    assert fields_of("detect", {"boxes": [], "classes": ["leak"]}) == {
        "count": 0, "count.leak": 0, "max_score.leak": 0.0, "max_score": 0.0}
    # a negative class index is unknown, not the last class
    assert fields_of("detect", {"boxes": [[0, 0, 1, 1, 0.5, -1]], "classes": ["leak", "smoke"]}) == {
        "count": 1, "count.leak": 0, "count.smoke": 0, "count.-1": 1,
        "max_score.leak": 0.0, "max_score.smoke": 0.0, "max_score.-1": 0.5, "max_score": 0.5}


def test_fields_of_segment():
    out = {"defect_ratio": 0.03125, "regions": [[1, 2, 3, 4, 12], [5, 6, 7, 8, 40], [0, 0, 2, 2, 4]],
           "mask": b"\x89PNG"}
    assert fields_of("segment", out) == {"defect_ratio": 0.03125, "regions": 3, "max_region_area": 40,
                                         "anomaly_area": 56, "anomaly_score": None}
    assert fields_of("segment", {"defect_ratio": 0.0, "regions": [], "score": 0.012}) == {
        "defect_ratio": 0.0, "regions": 0, "max_region_area": 0, "anomaly_area": 0, "anomaly_score": 0.012}


def test_fields_of_thermal_and_unknown_task():
    out = {"max_k": 455.5, "avg_k": 310.0, "min_k": 280.25, "hotspots": [[10, 12, 455.5], [40, 3, 451.0]]}
    assert fields_of("thermal", out) == THERMAL
    assert fields_of("thermal", {}) == {"max_k": None, "avg_k": None, "min_k": None, "hotspots": 0}
    assert fields_of("ocr", {"text": "x"}) == {}


def test_conditions_over_real_fields():
    detect = fields_of("detect", {"boxes": [[1, 2, 3, 4, 0.9, 0]], "classes": ["leak", "smoke"]})
    assert compile_condition("count.leak >= 1 and max_score.leak > 0.8")(detect) is True
    assert compile_condition("count.smoke >= 1")(detect) is False
    classify = fields_of("classify", {"label": "anomaly", "index": 1, "probs": [0.1, 0.9],
                                      "classes": ["normal", "anomaly"]})
    assert compile_condition('label == "anomaly" and prob.anomaly > 0.8')(classify) is True


@pytest.mark.parametrize("expr, want", [
    ("max_k >= 450", 450.0), ("prob.anomaly > 0.5", 0.5), ("count.leak >= 1", 1.0), ("min_k < -12.5", -12.5),
    ("450 <= max_k", 450.0), ('label == "anomaly"', None), ("max_k", None),
    ("cam12_temp > 5", 5.0), ("count.leak2 >= 3", 3.0), ('label == "class1" and prob.class1 > 0.75', 0.75),
    ("max_k > 1e3", 1000.0), ("avg_k > .5", 0.5),
])
def test_threshold_of(expr, want):
    assert threshold_of(expr) == want


def test_value_of():
    fields = {"label": "anomaly", "prob.anomaly": 0.875, "max_k": 455.5, "avg_k": 310.0, "flag": True}
    assert value_of("max_k >= 450", fields) == 455.5
    assert value_of("prob.anomaly > 0.5", fields) == 0.875
    assert value_of('label == "anomaly" and prob.anomaly > 0.8', fields) == 0.875  # the label is not a number
    assert value_of('label == "max_k" and avg_k > 300', fields) == 310.0  # names inside strings are not read
    assert value_of("flag and avg_k > 1", fields) == 310.0  # booleans are not values
    assert value_of('label == "anomaly"', fields) == 1.0
    assert value_of("missing > 1", fields) == 1.0
    assert isinstance(value_of("hotspots > 0", {"hotspots": 2}), float)


# --- field names per task (checked at config time) -------------------------------------------------

@pytest.mark.parametrize("task, expr", [
    ("classify", 'label == "anomaly" and prob.anomaly > 0.8'), ("classify", "index == 1 or prob < 0.6"),
    ("detect", "count.leak >= 1 and max_score.leak > 0.5"), ("detect", "count == 0 or max_score > 0.9"),
    ("segment", "defect_ratio > 0.02 or regions >= 3 or max_region_area > 400"),
    ("thermal", "max_k >= 450 or avg_k > 320 or min_k < 250 or hotspots >= 2 or rise_k_per_min > 5"),
    ("thermal", "max_k >= limit"),  # a param
])
def test_known_names_pass(task, expr):
    check_names(compile_condition(expr), task, params={"limit": 450})


@pytest.mark.parametrize("task, expr, bad", [
    ("detect", "max_k >= 450", "max_k"), ("thermal", "count.leak >= 1", "count.leak"),
    ("segment", "defect_ration > 0.1", "defect_ration"), ("classify", "probability > 0.5", "probability"),
    ("thermal", "max_k >= limit", "limit"), ("thermal", "max_k == None", "None"),
    ("classify", "rise_k_per_min > 1", "rise_k_per_min"),
])
def test_unknown_names_are_named(task, expr, bad):
    with pytest.raises(RuleError, match=f"unknown field '{re.escape(bad)}' for task {task}") as info:
        check_names(compile_condition(expr), task)
    assert "fields: " in str(info.value)


def test_condition_lists_its_names_in_order():
    assert compile_condition('label == "max_k" and prob.anomaly > 0.8 or prob.anomaly < x').names == (
        "label", "prob.anomaly", "x")


# --- zones -----------------------------------------------------------------------------------------

SQUARE = Zone("valve", [[10, 10], [50, 10], [50, 40], [10, 40]])
TRIANGLE = Zone("tri", [[0, 0], [100, 0], [0, 100]])


@pytest.mark.parametrize("zone, x, y, inside", [
    (SQUARE, 30, 25, True), (SQUARE, 9, 25, False), (SQUARE, 51, 25, False), (SQUARE, 30, 41, False),
    (SQUARE, 10.5, 10.5, True), (TRIANGLE, 10, 10, True), (TRIANGLE, 49, 49, True), (TRIANGLE, 51, 51, False),
    (TRIANGLE, -1, 5, False),
])
def test_zone_contains(zone, x, y, inside):
    assert zone.contains(x, y) is inside


def test_zone_mask_counts_pixel_centres_inside():
    m = SQUARE.mask(60, 80)
    assert m.shape == (60, 80) and m.sum() == 40 * 30
    assert m[10:40, 10:50].all() and not m[:10].any() and not m[:, 50:].any()
    tri = TRIANGLE.mask(100, 100)
    assert tri.sum() == sum(1 for y in range(100) for x in range(100) if x + y + 1 < 100)
    assert SQUARE.mask(60, 80) is m  # cached per size


DETECT = {"boxes": [[12, 12, 20, 20, 0.9, 3], [30, 30, 60, 60, 0.6, 3], [100, 5, 110, 15, 0.95, 0],
                    [40, 5, 48, 13, 0.7, 0]],  # centres (16,16) in; (45,45) out; (105,10) out; (44,9) out
          "classes": ["pump", "valve", "motor", "leak", "hot_spot"]}


def test_detect_fields_in_a_zone_count_box_centres_inside():
    f = fields_of("detect", DETECT, SQUARE)
    assert (f["count"], f["count.leak"], f["count.pump"], f["max_score.leak"], f["max_score"]) == (1, 1, 0, 0.9, 0.9)
    whole = fields_of("detect", DETECT)
    assert (whole["count"], whole["count.leak"], whole["count.pump"], whole["max_score"]) == (4, 2, 2, 0.95)


def test_segment_fields_in_a_zone_measure_the_mask_inside():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:20, 10:30] = 255  # 200 px, all inside the 1200 px zone
    mask[50:60, 60:80] = 255  # 200 px outside
    out = {"defect_ratio": 400 / 4800, "regions": [[10, 10, 20, 10, 200], [60, 50, 20, 10, 200]], "score": 0.9}
    f = fields_of("segment", out, SQUARE, mask=mask)
    assert f == {"defect_ratio": 200 / 1200, "regions": 1, "max_region_area": 200, "anomaly_area": 200,
                 "anomaly_score": 0.9}
    assert fields_of("segment", out, SQUARE)["defect_ratio"] is None  # no mask: not measured, rules do not hold
    assert fields_of("segment", out) == {"defect_ratio": 400 / 4800, "regions": 2, "max_region_area": 200,
                                         "anomaly_area": 400, "anomaly_score": 0.9}


def test_thermal_fields_in_a_zone_over_its_pixels_or_its_hotspots():
    kelvin = np.full((60, 80), 300.0, np.float32)
    kelvin[20, 30] = 480.0  # inside the zone
    kelvin[55, 70] = 520.0  # outside: hotter, but not the zone's business
    kelvin[10, 10] = 290.0  # inside
    out = {"max_k": 520.0, "avg_k": 300.1, "min_k": 290.0, "hotspots": [[30, 20, 480.0], [70, 55, 520.0]]}
    f = fields_of("thermal", out, SQUARE, kelvin=kelvin)
    inside = kelvin[10:40, 10:50]
    assert f == {"max_k": 480.0, "avg_k": round(float(inside.mean()), 3), "min_k": 290.0, "hotspots": 1}
    # Without the frame (trimmed from the stream, or an 8-bit camera): the zone's hot spots only.
    assert fields_of("thermal", out, SQUARE) == {"max_k": 480.0, "avg_k": None, "min_k": None, "hotspots": 1}
    assert fields_of("thermal", {**out, "hotspots": [[70, 55, 520.0]]}, SQUARE)["max_k"] is None


# --- rise over a window ----------------------------------------------------------------------------

def test_rise_is_the_least_squares_slope_per_minute():
    w = RiseWindow(keep_s=60)
    assert w.rate(30) is None
    for i in range(31):  # 2 K/s for 30 s, plus alternating noise that a two-point difference would see
        w.add(float(i), 300.0 + 2.0 * i + (0.5 if i % 2 else -0.5))
    assert w.rate(30) == pytest.approx(120.0, abs=1.0)
    assert w.rate(10) == pytest.approx(120.0, abs=4.0)
    w.add(31.0, None)  # a frame without max_k changes nothing
    assert len(w.samples) == 31


def test_rise_needs_half_its_window_and_forgets_old_samples():
    w = RiseWindow(keep_s=20)
    w.add(0.0, 300.0)
    w.add(4.0, 340.0)
    assert w.rate(10) is None  # 4 s of a 10 s window
    w.add(5.0, 350.0)
    assert w.rate(10) == pytest.approx(600.0)
    w.add(100.0, 350.0)  # everything before 80 s falls out
    assert list(w.samples) == [(100.0, 350.0)] and w.rate(10) is None
    w.add(106.0, 362.0)
    w.add(103.0, 356.0)  # a late result (replicas reorder frames) takes its place
    assert list(w.samples) == [(100.0, 350.0), (103.0, 356.0), (106.0, 362.0)]
    assert w.rate(10) == pytest.approx(120.0)
    w.add(50.0, 300.0)  # from further back than keep_s (a camera restarted its clock): start again
    assert list(w.samples) == [(50.0, 300.0)]


# --- params ----------------------------------------------------------------------------------------

def test_threshold_and_value_with_params():
    assert threshold_of("max_k >= limit", {"limit": 470.0}) == 470.0
    assert threshold_of("limit <= max_k and hotspots >= 2", {"limit": 470}) == 470.0
    assert threshold_of('label == mode and prob > 0.7', {"mode": "anomaly"}) == 0.7  # a text param is no threshold
    assert threshold_of("max_k >= limit", {}) is None
    fields = {"max_k": 455.5, "limit": 470.0}
    assert value_of("limit <= max_k", fields, skip={"limit"}) == 455.5
    assert value_of("limit <= max_k", fields) == 470.0


# --- the episode lifecycle (services/alerting/state.py) ----------------------------------------------

def run_lifecycle(life: Lifecycle, frames: list, step_s: float = 1.0, ep: Episode | None = None) -> list:
    """frames: per observation ``hit`` (bool) or ``(hit, clear)``; returns [(index, change)]."""
    ep = ep or Episode()
    out = []
    for i, f in enumerate(frames):
        hit, clear = (f, not f) if isinstance(f, bool) else f
        change = advance(ep, life, hit, clear, i * step_s, i * step_s)
        if change == REPEAT:
            repeated(ep, i * step_s, f"r{i}")
        if change:
            out.append((i, change))
    return out


T, F = True, False


@pytest.mark.parametrize("life, frames, want", [
    (Lifecycle(), [F, T, T, F, F], [(1, FIRE), (3, RESOLVE)]),
    (Lifecycle(for_frames=3), [T, T, F, T, T, T, T, F], [(5, FIRE), (7, RESOLVE)]),
    # for_s: the condition must have held 3 s of capture time (4 observations 1 s apart)
    (Lifecycle(for_s=3), [T, T, T, F, T, T, T, T, T, F], [(7, FIRE), (9, RESOLVE)]),
    (Lifecycle(for_frames=2, for_s=1.5), [T, T, T, F], [(2, FIRE), (3, RESOLVE)]),
    # clear_frames: three clearing frames in a row before resolving; a hit in between starts again
    (Lifecycle(clear_frames=3), [T, F, F, T, F, F, F, T], [(0, FIRE), (6, RESOLVE), (7, FIRE)]),
    # resolve_when (hysteresis band): neither hit nor clear keeps it firing
    (Lifecycle(), [(T, F), (F, F), (F, F), (F, T), (F, F), (T, F)], [(0, FIRE), (3, RESOLVE), (5, FIRE)]),
    # cooldown: a new episode within 5 s of the last firing waits, and fires once the cooldown is over
    (Lifecycle(cooldown_s=5), [T, F, T, T, T, T, T, F], [(0, FIRE), (1, RESOLVE), (5, FIRE), (7, RESOLVE)]),
    # repeat_s: re-notify every 3 s while firing
    (Lifecycle(repeat_s=3), [T, T, T, T, T, T, T, F], [(0, FIRE), (3, REPEAT), (6, REPEAT), (7, RESOLVE)]),
    (Lifecycle(repeat_s=0), [T] * 10, [(0, FIRE)]),
])
def test_lifecycle_table(life, frames, want):
    assert run_lifecycle(life, frames) == want


def test_skipped_repeat_waits_a_full_period():
    ep, life = Episode(), Lifecycle(repeat_s=2)
    assert advance(ep, life, True, False, 0, 0) == FIRE
    assert advance(ep, life, True, False, 2, 2) == REPEAT
    repeated(ep, 2, None)  # acknowledged: nothing sent, and nothing counted
    assert (ep.repeats, advance(ep, life, True, False, 3, 3)) == (0, None)
    assert advance(ep, life, True, False, 4, 4) == REPEAT
