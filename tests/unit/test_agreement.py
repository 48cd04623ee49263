"""The agreement measures between a live model and its shadow, one frame at a time."""

from __future__ import annotations

import numpy as np
import pytest

from shared.agreement import MEASURES, box_f1, compare, label_agreement, mask_dice, max_k_difference


def test_labels_agree_or_not():
    assert label_agreement("normal", "normal") == 1.0
    assert label_agreement("normal", "anomaly") == 0.0
    assert compare("classify", {"label": "a"}, {"label": "a"}) == 1.0


def test_box_f1_matches_at_iou_half_and_only_within_a_class():
    live = [[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 2]]
    # the first box overlaps its twin at IoU 10/11 (same class); the second is in place but of another class
    shadow = [[0, 0, 10, 11, 0.7, 1], [20, 20, 30, 30, 0.8, 1]]
    assert box_f1(live, shadow) == pytest.approx(2 * 1 / 4)
    assert box_f1(live, live) == 1.0
    # IoU below 0.5 is no match: [0,0,10,10] against [5,0,15,10] is 50/150
    assert box_f1([[0, 0, 10, 10, 0.9, 0]], [[5, 0, 15, 10, 0.9, 0]]) == 0.0
    assert box_f1([[0, 0, 10, 10, 0.9, 0]], [[2, 0, 12, 10, 0.9, 0]]) == 1.0  # IoU 80/120


def test_box_f1_counts_each_live_box_once_and_agrees_on_nothing_found():
    live = [[0, 0, 10, 10, 0.9, 0]]
    twice = [[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0]]
    assert box_f1(live, twice) == pytest.approx(2 / 3)
    assert box_f1([], []) == 1.0
    assert box_f1(live, []) == 0.0 and box_f1([], live) == 0.0


def test_mask_dice():
    a = np.zeros((8, 8), np.uint8)
    b = np.zeros((8, 8), np.uint8)
    assert mask_dice(a, b) == 1.0  # both empty: the same (no defect)
    a[:4, :4] = 1
    assert mask_dice(a, b) == 0.0
    b[:4, :2] = 1
    assert mask_dice(a, b) == pytest.approx(2 * 8 / (16 + 8))
    assert compare("segment", {"mask": a}, {"mask": a}) == 1.0


def test_thermal_is_the_absolute_difference_of_max_k():
    assert max_k_difference(350.0, 352.5) == 2.5
    assert compare("thermal", {"max_k": 352.5}, {"max_k": 350.0}) == 2.5


def test_every_task_has_a_measure():
    from shared.names import TASKS

    assert set(MEASURES) == set(TASKS)
    with pytest.raises(ValueError):
        compare("nope", {}, {})


def test_infer_compares_outputs_as_published_in_original_frame_pixels():
    from services.inference.postprocess import comparable
    from shared.messages import Prepared

    # a 64x48 frame letterboxed into 32x32 at scale 0.5 with 4 rows of padding on top
    msg = Prepared(camera="c", seq=0, ts=0, task="segment", frame_id="1-0", shape=(32, 32, 3), dtype="uint8",
                   data=bytes(32 * 32 * 3), orig=[48, 64], letterbox=[0.5, 0, 4])
    live = np.zeros((32, 32), np.uint8)
    live[4:28, :16] = 1  # the left half of the picture
    shadow = live.copy()
    shadow[:4] = 1  # defects found in the padding are no part of the frame: they change nothing
    a, b = comparable("segment", {"mask": live}, msg), comparable("segment", {"mask": shadow}, msg)
    assert a["mask"].shape == (48, 64) and compare("segment", a, b) == 1.0
    boxes = {"boxes": [[0, 4, 16, 28, 0.9, 1]]}
    assert comparable("detect", boxes, msg) == {"boxes": [[0.0, 0.0, 32.0, 48.0, 0.9, 1]]}
    assert comparable("thermal", {"max_k": 351.25, "avg_k": 300.0}, msg) == {"max_k": 351.25}
    assert comparable("classify", {"label": "normal", "index": 0}, msg) == {"label": "normal"}
