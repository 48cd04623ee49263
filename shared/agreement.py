"""How far a shadow model agrees with the live model on one frame: pure functions, one per task.

The live model's output stands in for the truth, so a measure is symmetric where it can be and 1.0 means
the shadow would have published the same facts:

- classify: 1.0 when both name the same label, else 0.0;
- detect: F1 of the shadow's boxes against the live model's at IoU ≥ 0.5, a box matching only a box of
  its own class (greedy by score, as COCO evaluation matches: ``shared.training.metrics``); no boxes
  from either is full agreement;
- segment: Dice of the two defect masks (both empty: 1.0);
- thermal: the absolute difference of the frame's maximum temperature, in kelvin (0 is agreement).
"""

from __future__ import annotations

import numpy as np

from shared.training.metrics import dice_iou, match_detections

DETECT_IOU = 0.5
# What each task's measure is, as the metrics and the viewer name it.
MEASURES = {"classify": "label agreement", "detect": "box F1 at IoU 0.5", "segment": "mask Dice",
            "thermal": "|max_k difference| (K)"}


def label_agreement(live: str, shadow: str) -> float:
    return 1.0 if live == shadow else 0.0


def box_f1(live, shadow, iou: float = DETECT_IOU) -> float:
    """F1 of ``shadow`` boxes against ``live`` ones, each ``[x1, y1, x2, y2, score, cls]``, matched per class."""
    a = np.asarray(live, dtype=np.float64).reshape(-1, 6)
    b = np.asarray(shadow, dtype=np.float64).reshape(-1, 6)
    if len(a) + len(b) == 0:
        return 1.0
    tp = 0
    for cls in np.intersect1d(a[:, 5], b[:, 5]):
        mine, theirs = b[b[:, 5] == cls], a[a[:, 5] == cls]
        _, hit = match_detections(mine[:, :4], mine[:, 4], theirs[:, :4], thresholds=(iou,))
        tp += int(hit.sum())
    return 2.0 * tp / (len(a) + len(b))


def mask_dice(live, shadow) -> float:
    """Dice of two 0/1 masks of the same shape."""
    return dice_iou(shadow, live)[0]


def max_k_difference(live: float, shadow: float) -> float:
    return abs(float(live) - float(shadow))


def compare(task: str, live: dict, shadow: dict) -> float:
    """The task's measure for one frame; ``live`` and ``shadow`` hold ``label`` (classify), ``boxes``
    (detect), ``mask`` (segment, 0/1 arrays) or ``max_k`` (thermal)."""
    if task == "classify":
        return label_agreement(live["label"], shadow["label"])
    if task == "detect":
        return box_f1(live["boxes"], shadow["boxes"])
    if task == "segment":
        return mask_dice(live["mask"], shadow["mask"])
    if task == "thermal":
        return max_k_difference(live["max_k"], shadow["max_k"])
    raise ValueError(f"no agreement measure for task {task!r}")
