"""Small networks with the output layouts of models plants bring, exported as those tools export them.

``UltralyticsDetect`` ends as an Ultralytics YOLO detect head does before NMS: ``[B, 4 + classes, N]``
with cx, cy, w, h in input pixels and sigmoid class scores, no objectness. ``with_nms`` turns it into the
end-to-end layout ``[B, K, 6]`` (x1, y1, x2, y2, score, class). ``export_onnx`` writes the file with a
fixed batch of 1 and Ultralytics' metadata keys (each value as ``str()`` of the Python value), as
``yolo export format=onnx`` does. Weights are seeded: the same network in every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torchvision
from torch import nn


def _seeded(seed: int):
    torch.manual_seed(seed)


class UltralyticsDetect(nn.Module):
    def __init__(self, classes: int = 3, size: int = 64, stride: int = 8, seed: int = 0):
        super().__init__()
        _seeded(seed)
        self.size, self.stride = size, stride
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 4 + classes, 1),
        )
        g = size // stride
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys]).float().reshape(1, 2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x).flatten(2)  # [B, 4 + classes, g*g]
        xy = (self.grid + y[:, :2].sigmoid()) * self.stride
        wh = y[:, 2:4].sigmoid() * self.size / 2
        return torch.cat([xy, wh, (y[:, 4:] * 4).sigmoid()], 1)


class WithNms(nn.Module):
    """The end-to-end layout: the best ``k`` boxes as x1, y1, x2, y2, score, class."""

    def __init__(self, head: UltralyticsDetect, k: int = 20):
        super().__init__()
        self.head, self.k = head, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x).transpose(1, 2)  # [B, N, 4 + classes]
        score, cls = y[..., 4:].max(-1)
        top = score.topk(self.k, dim=1).indices
        b = torch.gather(y[..., :4], 1, top.unsqueeze(-1).expand(-1, -1, 4))
        xyxy = torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
        return torch.cat([xyxy, torch.gather(score, 1, top).unsqueeze(-1),
                          torch.gather(cls, 1, top).unsqueeze(-1).float()], -1)


class Classifier(nn.Module):
    """[B, classes] probabilities (``probs=True``, as Ultralytics classify exports) or logits."""

    def __init__(self, classes: int = 3, probs: bool = True, seed: int = 1):
        super().__init__()
        _seeded(seed)
        self.probs = probs
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) * 8
        return y.softmax(1) if self.probs else y


class Segmenter(nn.Module):
    """[B, 1, H, W] defect logits at the input's size."""

    def __init__(self, seed: int = 2):
        super().__init__()
        _seeded(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 4


def ultralytics_metadata(task: str, names: list[str], size: int, **extra) -> dict:
    return {"description": f"Ultralytics test {task} model", "author": "Ultralytics", "version": "8.3.0",
            "stride": 8, "task": task, "batch": 1, "imgsz": [size, size],
            "names": dict(enumerate(names)), "args": {"batch": 1, "half": False, **extra}}


def export_onnx(net: nn.Module, path: Path, size: int | tuple[int, int], metadata: dict | None = None,
                channels: int = 3, outputs: tuple[str, ...] = ("output0",)) -> Path:
    """``net`` as an ONNX file with batch fixed at 1 and ``metadata`` in its metadata_props."""
    h, w = (size, size) if isinstance(size, int) else size
    net.eval()
    torch.onnx.export(net, (torch.zeros(1, channels, h, w),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=list(outputs))
    if metadata:
        proto = onnx.load(str(path))
        for k, v in metadata.items():
            p = proto.metadata_props.add()
            p.key, p.value = k, str(v)
        onnx.save(proto, str(path))
    return path


def reference_kept(raw: np.ndarray, conf: float, iou: float) -> list[int]:
    """Ultralytics' raw detect output [4 + classes, N] decoded independently: the columns kept by best class,
    threshold and NMS class by class, best first."""
    rows = raw.T  # [N, 4 + classes]
    score, cls = rows[:, 4:].max(1), rows[:, 4:].argmax(1)
    cx, cy, w, h = rows[:, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    kept = []
    for c in np.unique(cls[score >= conf]):
        idx = np.flatnonzero((cls == c) & (score >= conf))
        keep = torchvision.ops.nms(torch.from_numpy(boxes[idx]), torch.from_numpy(score[idx]), iou)
        kept += idx[keep.numpy()].tolist()
    return sorted(kept, key=lambda i: -score[i])


def reference_yolo(raw: np.ndarray, conf: float, iou: float) -> list[list[float]]:
    """The boxes ``reference_kept`` keeps, as [x1, y1, x2, y2, score, class] in input pixels."""
    rows = raw.T
    out = []
    for i in reference_kept(raw, conf, iou):
        cx, cy, w, h = rows[i, :4]
        score, cls = float(rows[i, 4:].max()), int(rows[i, 4:].argmax())
        out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score, cls])
    return out


class UltralyticsSegment(nn.Module):
    """Ultralytics' segment outputs: [B, 4 + classes + 32, N] (a detect head's rows, then 32 mask
    coefficients per box) and [B, 32, H/4, W/4] mask prototypes."""

    def __init__(self, classes: int = 2, size: int = 64, seed: int = 3):
        super().__init__()
        self.det = UltralyticsDetect(classes, size, seed=seed)
        self.coef = nn.Conv2d(3, 32, 8, stride=8)  # one coefficient vector per 8-px cell, as the boxes
        self.proto = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.Tanh())

    def forward(self, x: torch.Tensor):
        det = self.det(x)
        return torch.cat([det, self.coef(x).flatten(2) * 3], 1), self.proto(x) * 3


def reference_instance_mask(det: np.ndarray, proto: np.ndarray, conf: float, iou: float, size: int) -> np.ndarray:
    """The defect mask of one image from Ultralytics segment outputs, decoded independently: boxes as
    ``reference_yolo`` keeps them, each box's mask the sigmoid of coefficients × prototypes, resized to the
    input, cropped to the box; the union over boxes at 0.5."""
    nc = det.shape[0] - 4 - 32
    rows = det.T
    out = np.zeros((size, size), bool)
    for i in reference_kept(det[:4 + nc], conf, iou):
        cx, cy, w, h = rows[i, :4]
        b = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        m = torch.from_numpy(rows[i, 4 + nc:] @ proto.reshape(32, -1)).sigmoid().reshape(1, 1, *proto.shape[1:])
        m = torch.nn.functional.interpolate(m.float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        ys, xs = np.mgrid[:size, :size]
        inside = (xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
        out |= (m.numpy() > 0.5) & inside
    return out
