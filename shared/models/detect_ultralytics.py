"""Decoding the raw output of an Ultralytics YOLO detect export (YOLOv5u, v8, v11 and later with that head).

The graph ends before NMS: ``[B, 4 + classes, N]`` with each column a candidate box as cx, cy, w, h in
input pixels followed by one score per class (already sigmoid; there is no objectness). A box's score is
its best class score; NMS runs per image and class, with the model directory's thresholds.
"""

from __future__ import annotations

import torch
import torchvision

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


def instance_masks(det: torch.Tensor, proto: torch.Tensor, conf_threshold: float, iou_threshold: float,
                   size: tuple[int, int], mask_threshold: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An Ultralytics segment export's output, per image: (detections [K, 6] as ``decode_ultralytics`` gives
    them, mask probabilities [K, H, W] at the input ``size``, zero outside each box).

    ``det``: [B, 4 + classes + 32, N], each box followed by its class scores and 32 mask coefficients;
    ``proto``: [B, 32, h, w] mask prototypes. An instance's mask is the sigmoid of its coefficients
    times the prototypes, resized to the input and cropped to its box, as Ultralytics draws it."""
    det, proto = det.float(), proto.float()
    nm = proto.shape[1]
    nc = det.shape[1] - 4 - nm
    h, w = size
    out = []
    for d, p in zip(det, proto):  # a handful of images a batch: one NMS and one matrix product each
        rows = d.T  # [N, 4 + nc + nm]
        score, cls = rows[:, 4:4 + nc].max(1)
        keep = (score >= conf_threshold).nonzero().flatten()
        cx, cy, bw, bh = rows[keep, :4].unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        kept = torchvision.ops.batched_nms(xyxy, score[keep], cls[keep], iou_threshold)
        boxes, idx = xyxy[kept], keep[kept]
        coef = rows[idx, 4 + nc:]
        masks = (coef @ p.reshape(nm, -1)).sigmoid().reshape(-1, 1, *p.shape[1:])
        masks = torch.nn.functional.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        ys = torch.arange(h, dtype=masks.dtype).view(1, h, 1)
        xs = torch.arange(w, dtype=masks.dtype).view(1, 1, w)
        inside = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
                  & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None]))
        dets = torch.cat([boxes, score[idx, None], cls[idx, None].to(boxes.dtype)], 1)
        out.append((dets, masks * inside))
    return out
