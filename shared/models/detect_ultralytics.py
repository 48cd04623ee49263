"""Decoding the raw output of an Ultralytics YOLO detect export (YOLOv5u, v8, v11 and later with that head).

The graph ends before NMS: ``[B, 4 + classes, N]`` with each column a candidate box as cx, cy, w, h in
input pixels followed by one score per class (already sigmoid; there is no objectness). A box's score is
its best class score; NMS runs per image and class, with the model directory's thresholds.
"""

from __future__ import annotations

import torch

from .detect import nms_per_image


def decode_ultralytics(raw: torch.Tensor, conf_threshold: float = 0.25, iou_threshold: float = 0.45, *,
                       max_det: int = 300) -> list[torch.Tensor]:
    """Detections per image: Tensor[K, 6] = x1, y1, x2, y2, score, cls in input pixels, best first."""
    raw = raw.float()
    n, rows, _ = raw.shape
    box, scores = raw[:, :4].transpose(1, 2), raw[:, 4:].transpose(1, 2)  # [B, N, 4], [B, N, classes]
    score, cls = scores.max(-1)
    img, j = (score >= conf_threshold).nonzero(as_tuple=True)
    cx, cy, w, h = box[img, j].unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return nms_per_image(xyxy, score[img, j], cls[img, j], img, n, rows - 4, iou_threshold, max_det)
