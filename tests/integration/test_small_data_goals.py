"""The training goals on a plant's few hundred pictures, measured on photographs the scene code did not draw.

Each test writes 100 good + 100 defective pictures (bench/photo_defects.py, seed 0) for training and 30 + 30
held-out pictures with another seed, trains the task's default network, and checks the held-out figure
against the goal the small-data benchmark states. Each trains for minutes (the segmenter about four on two cores,
at four epochs instead of the default ten; the classifier about seven), so both are marked ``quality`` and run
with ``make test-quality``.
"""

from __future__ import annotations

import pytest

from bench.small_data import GOALS, run_task


def _goal(task: str, tmp_path, epochs: int | None) -> dict:
    r = run_task(task, tmp_path, n_good=100, n_defect=100, n_test=30, epochs=epochs, arch=None, device="cpu",
                 progress=False)
    key, op, goal = GOALS[task]
    assert r["n_test"] == 60 and r["n_train"] == 200
    assert r["met"], f"{task}: held-out {key} {r['metrics'][key]:.3f}, goal {op} {goal}; curve {r['history']}"
    return r


@pytest.mark.slow
@pytest.mark.quality
@pytest.mark.timeout(900)
def test_the_segmenter_reaches_the_dice_goal_on_photographs(tmp_path):
    r = _goal("segment", tmp_path, epochs=4)
    assert r["metrics"]["dice"] >= 0.75
    # the curve goes down: each validation loss below the first epoch's
    losses = [h["val_loss"] for h in r["history"]]
    assert all(v < losses[0] for v in losses[1:]), losses


@pytest.mark.slow
@pytest.mark.quality
@pytest.mark.timeout(1800)
def test_the_classifier_reaches_the_accuracy_goal_on_photographs_with_its_defaults(tmp_path):
    r = _goal("classify", tmp_path, epochs=None)
    assert r["metrics"]["accuracy"] >= 0.95 and r["arch"] == "small_resnet"
    # no swings at the end: over the last ten epochs, validation accuracy moves by at most five points (two of the
    # 40 validation pictures) from one epoch to the next
    tail = [h["accuracy"] for h in r["history"][-10:]]
    assert all(abs(b - a) <= 0.05 + 1e-9 for a, b in zip(tail, tail[1:])), tail
