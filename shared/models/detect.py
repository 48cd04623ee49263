"""Equipment detector: SimpleYOLO, a YOLOv1-style grid detector, with its decoder and loss."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from .registry import register

INPUT_SIZE = (448, 448)
BOXES = 2  # boxes per grid cell (YOLOv1's B)

# (out_channels, kernel, stride) or "M" for a 2×2 max pool; total stride 32, darknet-like.
_BACKBONE = [
    (64, 7, 2), "M",
    (192, 3, 1), "M",
    (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M",
    (256, 1, 1), (512, 3, 1), (512, 1, 1), (1024, 3, 1), "M",
    (512, 1, 1), (1024, 3, 1), (1024, 3, 1),
]


def _conv(cin: int, cout: int, k: int, s: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)
    )


class SimpleYOLO(nn.Module):
    """Grid detector; returns raw [N, S, S, B*5 + C] with S = input / 32 (14 at 448×448).

    Per cell: B × (x, y, w, h, conf) then C class logits. `width` scales every layer (tests, CPU).
    """

    def __init__(self, num_classes: int, boxes: int = BOXES, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.num_classes, self.boxes = num_classes, boxes
        layers, cin = [], in_channels
        for spec in _BACKBONE:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout, k, s = spec
            cout = max(8, int(cout * width))
            layers.append(_conv(cin, cout, k, s))
            cin = cout
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, boxes * 5 + num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).permute(0, 2, 3, 1)


@register("simple_yolo", task="detect", input_size=INPUT_SIZE)
def simple_yolo(num_classes: int, boxes: int = BOXES, width: float = 1.0) -> nn.Module:
    return SimpleYOLO(num_classes, boxes=boxes, width=width)


def _split(raw: torch.Tensor, boxes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(box terms [N,S,S,B,5] after sigmoid, class probabilities [N,S,S,C])."""
    n, sh, sw, _ = raw.shape
    return raw[..., : 5 * boxes].reshape(n, sh, sw, boxes, 5).sigmoid(), raw[..., 5 * boxes :].softmax(-1)


def decode_yolo(
    raw: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    input_size: int | tuple[int, int] = INPUT_SIZE,
    *,
    boxes: int = BOXES,
    max_det: int = 300,
) -> list[torch.Tensor]:
    """Detections per image: Tensor[K, 6] = x1, y1, x2, y2, score, cls in input pixels, best first.

    score = box confidence × best class probability; NMS runs per image and class.
    """
    ih, iw = (input_size, input_size) if isinstance(input_size, int) else input_size
    n, sh, sw, _ = raw.shape
    box, cls_prob = _split(raw.float(), boxes)
    cls_score, cls_idx = cls_prob.max(-1)  # [N,S,S]
    gy = torch.arange(sh, device=raw.device, dtype=box.dtype).view(1, sh, 1, 1)
    gx = torch.arange(sw, device=raw.device, dtype=box.dtype).view(1, 1, sw, 1)
    cx = (gx + box[..., 0]) / sw * iw
    cy = (gy + box[..., 1]) / sh * ih
    half_w, half_h = box[..., 2] * iw / 2, box[..., 3] * ih / 2
    xyxy = torch.stack(
        [(cx - half_w).clamp(0, iw), (cy - half_h).clamp(0, ih), (cx + half_w).clamp(0, iw),
         (cy + half_h).clamp(0, ih)], -1).reshape(n, -1, 4)
    score = (box[..., 4] * cls_score.unsqueeze(-1)).reshape(n, -1)
    cls = cls_idx.unsqueeze(-1).expand(n, sh, sw, boxes).reshape(n, -1)

    img, j = (score >= conf_threshold).nonzero(as_tuple=True)
    xyxy, score, cls = xyxy[img, j], score[img, j], cls[img, j]
    return nms_per_image(xyxy, score, cls, img, n, cls_prob.shape[-1], iou_threshold, max_det)


def nms_per_image(boxes: torch.Tensor, score: torch.Tensor, cls: torch.Tensor, img: torch.Tensor, n: int,
                  num_classes: int, iou_threshold: float, max_det: int) -> list[torch.Tensor]:
    """Candidates of a whole batch -> per image Tensor[K,6] (x1,y1,x2,y2,score,cls), best first, at most max_det."""
    # One NMS call for the whole batch: the group id keeps images and classes apart.
    keep = torchvision.ops.batched_nms(boxes, score, img * max(num_classes, 1) + cls, iou_threshold)
    keep = keep[torch.argsort(img[keep], stable=True)]  # group by image, still best first within each
    img_k = img[keep]
    counts = torch.bincount(img_k, minlength=n)
    rank = torch.arange(len(keep), device=boxes.device) - (torch.cumsum(counts, 0) - counts)[img_k]
    keep, img_k = keep[rank < max_det], img_k[rank < max_det]
    dets = torch.cat([boxes[keep], score[keep, None], cls[keep, None].to(boxes.dtype)], 1)
    return list(torch.split(dets, torch.bincount(img_k, minlength=n).tolist()))


def _iou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes given as (cx, cy, w, h) in the same units; broadcasts."""
    ax1, ay1 = a[..., 0] - a[..., 2] / 2, a[..., 1] - a[..., 3] / 2
    ax2, ay2 = a[..., 0] + a[..., 2] / 2, a[..., 1] + a[..., 3] / 2
    bx1, by1 = b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2
    bx2, by2 = b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2
    inter_w = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(min=0)
    inter = inter_w * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(min=0)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return inter / union.clamp(min=1e-9)


def yolo_loss(
    raw: torch.Tensor,
    targets: list[torch.Tensor],
    *,
    boxes: int = BOXES,
    l_coord: float = 5.0,
    l_noobj: float = 0.5,
) -> torch.Tensor:
    """YOLOv1 sum-squared loss, averaged over the batch.

    targets: per image a Tensor[K, 5] = (cls, cx, cy, w, h), normalised to 0..1. The cell holding
    a box centre is responsible for it, through whichever of its B boxes has the highest IoU;
    when two boxes share a cell, one of them wins (YOLOv1 sees one object per cell).
    """
    n, sh, sw, _ = raw.shape
    box, cls_prob = _split(raw, boxes)
    dev, dt = raw.device, box.dtype
    t = [torch.as_tensor(tg, dtype=dt, device=dev).reshape(-1, 5) for tg in targets]
    img = torch.cat([torch.full((len(tg),), i, device=dev, dtype=torch.long) for i, tg in enumerate(t)])
    t = torch.cat(t) if t else torch.zeros(0, 5, device=dev, dtype=dt)
    col = (t[:, 1] * sw).long().clamp(0, sw - 1)
    row = (t[:, 2] * sh).long().clamp(0, sh - 1)

    obj = torch.zeros(n, sh, sw, dtype=torch.bool, device=dev)
    obj[img, row, col] = True
    # Target box in cell units: centre offset within the cell, size in cells (IoU needs one unit).
    tbox = torch.zeros(n, sh, sw, 4, dtype=dt, device=dev)
    tbox[img, row, col] = torch.stack([t[:, 1] * sw - col, t[:, 2] * sh - row, t[:, 3], t[:, 4]], 1)
    tcls = torch.zeros_like(cls_prob)
    tcls[img, row, col] = nn.functional.one_hot(t[:, 0].long(), cls_prob.shape[-1]).to(dt)

    pb, tb = box[obj], tbox[obj]  # [M, B, 5], [M, 4]
    scale = torch.tensor([1.0, 1.0, sw, sh], dtype=dt, device=dev)
    iou = _iou_cxcywh(pb[..., :4] * scale, (tb * scale).unsqueeze(1))  # [M, B]
    resp = nn.functional.one_hot(iou.argmax(-1), boxes).to(dt) if len(pb) else iou

    coord = ((pb[..., :2] - tb[:, None, :2]) ** 2).sum(-1) + (
        (pb[..., 2:4].sqrt() - tb[:, None, 2:4].sqrt()) ** 2
    ).sum(-1)
    conf_obj = (pb[..., 4] - iou.detach()) ** 2
    resp_all = torch.zeros(n, sh, sw, boxes, dtype=dt, device=dev)
    resp_all[obj] = resp
    noobj = (1 - resp_all) * box[..., 4] ** 2
    cls_err = ((cls_prob - tcls) ** 2).sum(-1) * obj

    total = l_coord * (resp * coord).sum() + (resp * conf_obj).sum() + l_noobj * noobj.sum() + cls_err.sum()
    return total / n
