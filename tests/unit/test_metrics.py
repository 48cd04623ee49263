"""Evaluation metrics against hand-computed cases (shared/training/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from shared.training import metrics as M


def test_box_iou_agrees_with_torchvision():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (20, 2))
    a = np.concatenate([xy, xy + rng.uniform(1, 50, (20, 2))], 1)
    xy = rng.uniform(0, 100, (15, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 50, (15, 2))], 1)
    want = torchvision.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(M.box_iou(a, b), want, rtol=1e-12)
    assert M.box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)


def test_ap_hand_computed_two_gt_three_detections():
    # Scores 0.9 (TP), 0.8 (FP), 0.7 (TP) against 2 GT: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Envelope 1, 2/3, 2/3; the 51 recall points 0..0.5 read 1, the 50 above read 2/3.
    gt = np.array([[0, 0, 10, 10, 0], [50, 50, 60, 60, 0]], float)
    pred = np.array([[0, 0, 10, 10, 0.9, 0], [100, 100, 110, 110, 0.8, 0], [50, 50, 60, 60, 0.7, 0]], float)
    m = M.detection_map([pred], [gt], num_classes=1)
    assert m["map50"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["map50_95"] == pytest.approx(253 / 303, abs=1e-12)  # exact boxes: same at every threshold
    ap, rec, prec = M.average_precision([True, False, True], [0.9, 0.8, 0.7], 2)
    assert ap == pytest.approx(253 / 303, abs=1e-12)
    np.testing.assert_allclose(rec, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(prec, [1.0, 2 / 3, 2 / 3])


def test_perfect_detections_give_one_and_classes_without_gt_are_left_out():
    gts = [np.array([[0, 0, 10, 10, 0], [20, 20, 40, 40, 1]], float), np.array([[5, 5, 25, 25, 1]], float)]
    preds = [np.array([[0, 0, 10, 10, 0.8, 0], [20, 20, 40, 40, 0.9, 1]], float),
             np.array([[5, 5, 25, 25, 0.7, 1]], float)]
    m = M.detection_map(preds, gts, num_classes=3, class_names=["a", "b", "c"])
    assert m["map50"] == 1.0 and m["map50_95"] == 1.0
    assert set(m["per_class"]) == {"a", "b"}  # class c has no ground truth
    assert m["per_class"]["b"]["n_gt"] == 2


def test_iou_0625_counts_at_050_to_060_only():
    # 10×10 GT, prediction 10×6.25 inside it: IoU 0.625 ≥ 0.50, 0.55, 0.60; < 0.65 … 0.95 → 3 of 10 thresholds.
    gt = np.array([[0, 0, 10, 10, 0]], float)
    pred = np.array([[0, 0, 10, 6.25, 0.9, 0]], float)
    assert M.box_iou(pred[:, :4], gt[:, :4])[0, 0] == pytest.approx(0.625)
    m = M.detection_map([pred], [gt], num_classes=1)
    assert m["map50"] == 1.0
    assert m["map50_95"] == pytest.approx(0.3, abs=1e-12)
    _, tp = M.match_detections(pred[:, :4], pred[:, 4], gt[:, :4], (0.5, 0.75))
    assert tp.tolist() == [[True], [False]]


def test_greedy_matching_one_gt_per_detection_wrong_class_is_false_positive():
    gt = np.array([[0, 0, 10, 10, 0]], float)
    # Two detections on the same GT: the higher score matches, the duplicate is a false positive.
    order, tp = M.match_detections([[0, 0, 10, 10], [0, 0, 10, 10]], [0.6, 0.9], gt[:, :4], (0.5,))
    assert order.tolist() == [1, 0] and tp.tolist() == [[True, False]]
    m = M.detection_map([np.array([[0, 0, 10, 10, 0.9, 1]], float)], [gt], num_classes=2)
    assert m["map50"] == 0.0  # the class-1 box does not match the class-0 truth; class 1 has no GT


def test_classification_metrics_known_case():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = M.classification_metrics(y_true, y_pred, 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: class 0 = 4/5, class 1 = 2/4, class 2 = 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class neither present nor predicted is left out of the macro mean.
    assert M.classification_metrics([0, 1], [0, 1], 3)["macro_f1"] == 1.0


def test_dice_iou_known_cases():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 1  # 4 pixels
    b[:2, :3] = 1  # 6 pixels, 4 shared
    assert M.dice_iou(a, b) == pytest.approx((8 / 10, 4 / 6))
    assert M.dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)
    assert M.dice_iou(a, np.zeros_like(a)) == (0.0, 0.0)
    m = M.segmentation_metrics([a, a], [b, np.zeros_like(a)], scores=[0.9, 0.2])
    # Pooled: intersections 4 + 0, sizes (4 + 6) + (4 + 0), unions 6 + 4.
    assert m["dice"] == pytest.approx(8 / 14) and m["iou"] == pytest.approx(4 / 10)
    assert m["dice_per_image"] == pytest.approx(0.4) and m["iou_per_image"] == pytest.approx(1 / 3)
    assert m["image_auroc"] == 1.0
    # Predicting nothing scores 0 pooled, though every good image alone is a perfect 1.
    empty = M.segmentation_metrics([np.zeros_like(a)] * 3, [b, np.zeros_like(a), np.zeros_like(a)])
    assert empty["dice"] == 0.0 and empty["dice_per_image"] == pytest.approx(2 / 3)


def test_auroc_with_ties_and_single_class():
    # Positives 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5, 0.8>0.2, 0.5=0.5 → ½, 0.5>0.2) = 3.5 / 4.
    assert M.auroc([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert M.auroc([0.1, 0.2, 0.3], [0, 1, 0]) == pytest.approx(0.5)
    assert M.auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert M.auroc([0.1, 0.9], [1, 1]) is None


def test_thermal_mae():
    pred = [[400.0, 310.0, 290.0], [380.0, 300.0, 280.0]]
    target = [[401.0, 309.0, 290.0], [377.0, 300.0, 282.0]]
    assert M.thermal_mae(pred, target) == pytest.approx({"mae_max_k": 2.0, "mae_avg_k": 0.5, "mae_min_k": 1.0,
                                                         "mae_k": 3.5 / 3})


def test_detection_map_gives_the_score_threshold_of_the_best_f1():
    gt = [[0, 0, 10, 10, 0], [20, 20, 30, 30, 0]]
    # hits at 0.9 and 0.6, misses at 0.8 and 0.3: keeping >= 0.6 gives F1 2*2/(3+2) = 0.8, the best
    preds = [[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0], [20, 20, 30, 30, 0.6, 0], [70, 70, 80, 80, 0.3, 0]]
    m = M.detection_map([preds], [gt], 1)
    assert m["best_conf"] == 0.6 and m["best_f1"] == pytest.approx(0.8)
    assert M.detection_map([[]], [gt], 1)["best_conf"] is None


def _two_regions(b_score: float):
    """A 4×4 picture with defect regions A (two pixels, scored 1.0) and B (two pixels, scored ``b_score``);
    its twelve defect-free pixels score from 0.1 to 0.2, each another value."""
    target = np.zeros((4, 4), bool)
    target[0, 0:2] = True  # A
    target[3, 2:4] = True  # B
    prob = np.zeros((4, 4), np.float32)
    prob[~target] = np.linspace(0.1, 0.2, 12)
    prob[0, 0:2] = 1.0
    prob[3, 2:4] = b_score
    return prob, target


def test_pixel_auroc_and_pro_of_hand_made_maps():
    perfect = M.segmentation_metrics([np.zeros((4, 4))], [_two_regions(1.0)[1]], maps=[_two_regions(1.0)])
    assert perfect["pixel_auroc"] == 1.0 and perfect["pro_auc"] == pytest.approx(1.0)
    # B scored below every defect-free pixel: half the defect pixels ranked first (AUROC 24/48), and half the
    # regions found at every false-positive rate up to 0.3 (PRO 0.5), though B is as large as A
    half = M.segmentation_metrics([np.zeros((4, 4))], [_two_regions(0.0)[1]], maps=[_two_regions(0.0)])
    assert half["pixel_auroc"] == pytest.approx(0.5) and half["pro_auc"] == pytest.approx(0.5)


def test_pro_of_a_random_map_is_the_mean_false_positive_rate():
    # Scores unrelated to the defects: each region's overlap equals the FPR, so the normalised area up to
    # FPR 0.3 is 0.15 (and the pixel AUROC 0.5).
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(4):
        target = np.zeros((128, 128), bool)
        for _ in range(5):
            y, x = rng.integers(0, 110, 2)
            target[y:y + 16, x:x + 16] = True
        maps.append((rng.random((128, 128)).astype(np.float32), target))
    m = M.segmentation_metrics([np.zeros((128, 128))] * 4, [t for _, t in maps], maps=maps)
    assert m["pro_auc"] == pytest.approx(0.15, abs=0.02) and m["pixel_auroc"] == pytest.approx(0.5, abs=0.02)


def test_map_for_ranking_shrinks_large_pictures_and_keeps_small_ones():
    prob, target = np.random.default_rng(1).random((600, 900)), np.zeros((600, 900), np.uint8)
    target[:300] = 1
    p, t = M.map_for_ranking(prob, target)
    assert p.shape == t.shape == (171, 256) and p.dtype == np.float32 and t.dtype == bool
    assert t[:80].all() and not t[90:].any()
    p, t = M.map_for_ranking(prob[:100, :200], target[:100, :200])
    assert p.shape == (100, 200) and t.all()
