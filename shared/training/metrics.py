"""Evaluation metrics as pure functions (numpy in, Python numbers out), tested directly.

Detection follows COCO: per class, detections sorted by score are matched greedily (each to the
unmatched ground truth of its class with the highest IoU ≥ t), precision is made monotone (the
envelope) and sampled at 101 recall points; classes without ground truth are left out of the mean.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torchvision

# 0.50:0.05:0.95, rounded so that 0.6 is 0.6 and not 0.6000000000000001.
COCO_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def box_iou(a, b) -> np.ndarray:
    """[N, 4] × [M, 4] xyxy boxes → [N, M] IoU (torchvision.ops.box_iou, in float64)."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1, 4))
    return torchvision.ops.box_iou(a, b).numpy()


def match_detections(boxes, scores, gt_boxes, thresholds=COCO_IOUS) -> tuple[np.ndarray, np.ndarray]:
    """Greedy COCO matching in one image and one class.

    Returns (order, tp): `order` sorts the detections by descending score (stable), `tp[t, k]` is
    True when the k-th detection in that order matched a ground truth at IoU ≥ thresholds[t].
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    thr = np.asarray(thresholds, dtype=np.float64)
    tp = np.zeros((len(thr), len(order)), dtype=bool)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(order) == 0 or len(gt_boxes) == 0:
        return order, tp
    iou = box_iou(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order], gt_boxes)  # [N, M]
    taken = np.zeros((len(thr), len(gt_boxes)), dtype=bool)
    rows = np.arange(len(thr))
    for k in range(len(order)):
        cand = np.where(taken, -1.0, iou[k][None, :])  # [T, M]: unmatched GT only
        best = cand.argmax(1)
        ok = cand[rows, best] >= thr
        tp[ok, k] = True
        taken[rows[ok], best[ok]] = True
    return order, tp


def average_precision(tp, scores, n_gt: int) -> tuple[float, np.ndarray, np.ndarray]:
    """101-point interpolated AP of detections (tp flags, scores) against `n_gt` ground truths.

    Returns (ap, recall, precision) with precision already the monotone envelope; ap is NaN when n_gt == 0.
    """
    tp = np.asarray(tp, dtype=bool).reshape(-1)
    order = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")
    tp = tp[order]
    if n_gt == 0:
        return float("nan"), np.zeros(0), np.zeros(0)
    tpc, fpc = np.cumsum(tp), np.cumsum(~tp)
    recall = tpc / n_gt
    precision = tpc / np.maximum(tpc + fpc, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(len(RECALL_POINTS))
    valid = idx < len(precision)
    q[valid] = precision[idx[valid]]
    return float(q.mean()), recall, precision


def detection_map(preds: list, gts: list, num_classes: int, thresholds=COCO_IOUS, class_names=None) -> dict:
    """mAP over a set of images.

    preds: per image an array [N, 6] = x1, y1, x2, y2, score, cls; gts: per image [M, 5] = x1, y1, x2, y2, cls
    (any units, the same for both). Returns map50, map50_95 (NaN-free: 0.0 when no class has ground truth),
    per_class {name: {ap50, ap50_95, n_gt}}, pr {name: {recall, precision}} at IoU 0.5, and best_conf with
    best_f1: the score threshold at which all classes together reach their best F1 at IoU 0.5 (what a
    deployed detector should keep; mAP itself is independent of any threshold).
    """
    thr = np.asarray(thresholds, dtype=np.float64)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    tps = [[[] for _ in range(len(thr))] for _ in range(num_classes)]
    scs = [[] for _ in range(num_classes)]
    n_gt = np.zeros(num_classes, dtype=int)
    for p, g in zip(preds, gts):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 6)
        g = np.asarray(g, dtype=np.float64).reshape(-1, 5)
        for c in range(num_classes):
            gc = g[g[:, 4] == c, :4]
            pc = p[p[:, 5] == c]
            n_gt[c] += len(gc)
            if len(pc) == 0:
                continue
            order, tp = match_detections(pc[:, :4], pc[:, 4], gc, thr)
            scs[c].append(pc[order, 4])
            for t in range(len(thr)):
                tps[c][t].append(tp[t])
    ap = np.full((num_classes, len(thr)), np.nan)
    per_class, pr = {}, {}
    for c in range(num_classes):
        if n_gt[c] == 0:
            continue
        s = np.concatenate(scs[c]) if scs[c] else np.zeros(0)
        for t in range(len(thr)):
            flags = np.concatenate(tps[c][t]) if tps[c][t] else np.zeros(0, dtype=bool)
            ap[c, t], rec, prec = average_precision(flags, s, int(n_gt[c]))
            if t == 0:
                pr[names[c]] = {"recall": rec.tolist(), "precision": prec.tolist()}
        per_class[names[c]] = {"ap50": float(ap[c, 0]), "ap50_95": float(ap[c].mean()), "n_gt": int(n_gt[c])}
    have = n_gt > 0
    if not have.any():
        return {"map50": 0.0, "map50_95": 0.0, "per_class": {}, "pr": {}, "best_conf": None, "best_f1": 0.0}
    i50 = int(np.argmin(np.abs(thr - 0.5)))
    best_conf, best_f1 = _best_threshold(
        np.concatenate([np.concatenate(s) for s in scs if s] or [np.zeros(0)]),
        np.concatenate([np.concatenate(t[i50]) for t in tps if t[i50]] or [np.zeros(0, dtype=bool)]),
        int(n_gt.sum()))
    return {
        "map50": float(ap[have, i50].mean()),
        "map50_95": float(ap[have].mean(1).mean()),
        "per_class": per_class,
        "pr": pr,
        "best_conf": best_conf,
        "best_f1": best_f1,
    }


def _best_threshold(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> tuple[float | None, float]:
    """(score threshold, F1) where keeping detections at or above the threshold gives the highest F1."""
    if len(scores) == 0 or n_gt == 0:
        return None, 0.0
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(tp[order])
    f1 = 2 * hits / (np.arange(1, len(s) + 1) + n_gt)
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every detection of equal score
    i = int(np.argmax(np.where(last, f1, -1)))
    return float(s[i]), float(f1[i])


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=int).reshape(-1), np.asarray(y_pred, dtype=int).reshape(-1)
    cm = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """accuracy, macro_f1, per-class f1 and the confusion matrix.

    Per-class F1 = 2TP / (2TP + FP + FN); a class neither present nor predicted is left out of the macro mean.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    total = cm.sum()
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else 0.0,
        "f1": [None if math.isnan(v) else float(v) for v in f1],
        "confusion_matrix": cm.tolist(),
    }


def dice_iou(pred, target) -> tuple[float, float]:
    """Dice and IoU of two 0/1 masks; both empty counts as a perfect 1.0."""
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    inter, ps, ts = np.logical_and(p, t).sum(), p.sum(), t.sum()
    union = ps + ts - inter
    if union == 0:
        return 1.0, 1.0
    return float(2 * inter / (ps + ts)), float(inter / union)


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve by the rank statistic (Mann–Whitney U), ties as average ranks.

    None when the labels hold only one class.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).astype(bool).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s))
    # Average rank (1-based) over each run of equal scores.
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    for st, n in zip(start, counts):
        ranks[order[st:st + n]] = st + (n + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def thermal_mae(pred, target) -> dict:
    """Mean absolute error in kelvin of [N, 3] (max, avg, min) estimates."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 3)
    t = np.asarray(target, dtype=np.float64).reshape(-1, 3)
    if len(p) == 0:
        return {"mae_max_k": float("nan"), "mae_avg_k": float("nan"), "mae_min_k": float("nan"),
                "mae_k": float("nan")}
    err = np.abs(p - t).mean(0)
    return {"mae_max_k": float(err[0]), "mae_avg_k": float(err[1]), "mae_min_k": float(err[2]),
            "mae_k": float(err.mean())}  # the three together: what a checkpoint is chosen on


RANK_SIDE = 256  # pixel AUROC ranks maps of at most this side: every picture weighs alike, and memory stays small


def map_for_ranking(prob: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 probability map, bool target) of one picture, shrunk to at most ``RANK_SIDE`` a side (area
    average for the map, nearest for the mask), for ``pixel_auroc``."""
    h, w = target.shape[:2]
    f = min(1.0, RANK_SIDE / max(h, w))
    if f < 1.0:
        size = (max(1, round(w * f)), max(1, round(h * f)))
        prob = cv2.resize(prob.astype(np.float32), size, interpolation=cv2.INTER_AREA)
        target = cv2.resize(target.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return prob.astype(np.float32), target.astype(bool)


def segmentation_metrics(preds: list, targets: list, scores=None, maps: list | None = None) -> dict:
    """dice, iou pooled over the split (Σ intersections over Σ sizes, so an empty prediction everywhere
    scores 0, not the share of good images); dice_per_image, iou_per_image: per image (both empty = 1.0),
    then the mean; image_auroc of `scores` vs "has defect pixels"; with `maps` ((probability, target) per
    picture, from ``map_for_ranking``), pixel_auroc over every pixel of every picture and pro_auc (MVTec AD's
    per-region overlap, integrated up to a false-positive rate of 0.3)."""
    inter = total = union = 0
    pairs = []
    for p, t in zip(preds, targets):
        p, t = np.asarray(p).astype(bool), np.asarray(t).astype(bool)
        i, s = int(np.logical_and(p, t).sum()), int(p.sum() + t.sum())
        inter, total, union = inter + i, total + s, union + s - i
        pairs.append(dice_iou(p, t))
    out = {
        "dice": float(2 * inter / total) if total else 1.0,
        "iou": float(inter / union) if union else 1.0,
        "dice_per_image": float(np.mean([d for d, _ in pairs])) if pairs else float("nan"),
        "iou_per_image": float(np.mean([i for _, i in pairs])) if pairs else float("nan"),
    }
    if scores is not None:
        out["image_auroc"] = auroc(scores, [np.asarray(t).any() for t in targets])
    if maps:
        out["pixel_auroc"] = auroc(np.concatenate([p.reshape(-1) for p, _ in maps]),
                                   np.concatenate([t.reshape(-1) for _, t in maps]))
        out["pro_auc"] = pro_auc(maps)
    return out


def pro_auc(maps: list, max_fpr: float = 0.3, steps: int = 200) -> float | None:
    """MVTec AD's PRO score: for thresholds from high to low, the mean overlap of each connected defect
    region with the pixels above the threshold, against the false-positive rate on defect-free pixels;
    the area under that curve up to ``max_fpr``, divided by ``max_fpr`` (1.0 is perfect). None without
    defect regions or defect-free pixels."""
    regions, negatives = [], []
    for prob, target in maps:
        n, labels = cv2.connectedComponents(target.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            regions.append(prob[labels == k])
        negatives.append(prob[~target])
    neg = np.concatenate(negatives) if negatives else np.empty(0)
    if not regions or neg.size == 0:
        return None
    # Thresholds at quantiles of the defect-free pixels sample the FPR axis evenly; ±inf close the curve at
    # (0, 0) and (1, 1), and between two thresholds it is a straight line (ties, as in a ROC curve).
    thresholds = np.unique(np.concatenate([np.quantile(neg, np.linspace(0.0, 1.0, steps + 1)), [-np.inf, np.inf]]))
    fpr = np.array([(neg > t).mean() for t in thresholds])
    pro = np.array([np.mean([(r > t).mean() for r in regions]) for t in thresholds])
    order = np.lexsort((pro, fpr))
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= max_fpr
    fpr, pro = np.append(fpr[keep], max_fpr), np.append(pro[keep], np.interp(max_fpr, fpr, pro))
    return float(np.trapezoid(pro, fpr) / max_fpr)
