"""Anchor-free multi-scale detector (FCOS-style) for small defects and distant equipment.

`AnchorFreeDet` is a small residual backbone with an FPN neck over strides 8/16/32 (a 448×448
input gives 56×56, 28×28 and 14×14 grids) and a decoupled head per level. Every location of every
level predicts its own box, so two objects whose centres share one 32-pixel cell (a hot spot on a
motor, two valves side by side) are separate predictions: SimpleYOLO's one-object-per-cell limit
is gone.

Raw output: one tensor [N, A, 5 + C], A = Σ (H/s)·(W/s) over the strides, levels in stride order,
locations row-major within a level. Per location: (l, t, r, b) log-distances — the distance in
pixels is exp(v)·stride —, a centre-ness logit, then C class logits (sigmoid, one-vs-all).

`decode_anchor_free` turns it into boxes without Python loops over locations or boxes, then
`torchvision.ops.batched_nms`; `anchor_free_loss` is focal loss (classes) + GIoU (boxes, weighted
by centre-ness) + BCE (centre-ness), with FCOS targets: centre sampling within `radius` strides of
a box's centre, a size range per level, and the smallest box winning a contested location.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .detect import nms_per_image
from .registry import register

__all__ = ["AnchorFreeDet", "ARCH", "PRIOR_LOGIT", "STRIDES", "SIZE_RANGES", "decode_anchor_free", "anchor_free_loss",
           "anchor_free_targets", "level_points"]

ARCH = "anchor_free"
INPUT_SIZE = (448, 448)
STRIDES = (8, 16, 32)
# A location of a level regresses boxes whose largest distance max(l, t, r, b) lies in its range (pixels).
SIZE_RANGES = ((0.0, 32.0), (32.0, 64.0), (64.0, math.inf))
RADIUS = 2.5  # centre sampling radius, in strides of the level
MAX_LOG = 8.0  # exp clamp of the box distances: e^8 strides is far beyond any image
PRIOR = 0.01  # focal-loss prior: every location starts as background at 1 %, so the loss does not start huge
PRIOR_LOGIT = -math.log((1 - PRIOR) / PRIOR)


def _cbr(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(c, c // 2, 1), _cbr(c // 2, c, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(_cbr(cin, cout, 3, 2), *[_Res(cout) for _ in range(blocks)])


class AnchorFreeDet(nn.Module):
    """Backbone (strides 2..32) → FPN (P3, P4, P5) → per-level decoupled head; see the module doc."""

    def __init__(self, num_classes: int, width: int = 16, neck: int = 64, head_convs: int = 1, in_channels: int = 3,
                 strides: tuple[int, ...] = STRIDES):
        super().__init__()
        self.num_classes, self.strides = num_classes, tuple(strides)
        w = width
        self.stem = nn.Sequential(_cbr(in_channels, w, 3, 2), _cbr(w, 2 * w, 3, 2))  # /4
        self.c3 = _stage(2 * w, 3 * w, 1)   # /8
        self.c4 = _stage(3 * w, 6 * w, 2)   # /16
        self.c5 = _stage(6 * w, 12 * w, 2)  # /32
        self.lat = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in (3 * w, 6 * w, 12 * w))
        self.smooth = nn.ModuleList(_cbr(neck, neck) for _ in strides)
        self.cls_tower = nn.ModuleList(nn.Sequential(*[_cbr(neck, neck) for _ in range(head_convs)]) for _ in strides)
        self.reg_tower = nn.ModuleList(nn.Sequential(*[_cbr(neck, neck) for _ in range(head_convs)]) for _ in strides)
        self.cls_out = nn.ModuleList(nn.Conv2d(neck, num_classes, 1) for _ in strides)
        self.reg_out = nn.ModuleList(nn.Conv2d(neck, 5, 1) for _ in strides)  # l, t, r, b, centre-ness
        for conv in self.cls_out:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, PRIOR_LOGIT)
        for conv in self.reg_out:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0.0)  # every distance starts at one stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lat[2](c5)
        p4 = self.lat[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lat[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        outs = []
        for i, p in enumerate((p3, p4, p5)):
            p = self.smooth[i](p)
            o = torch.cat([self.reg_out[i](self.reg_tower[i](p)), self.cls_out[i](self.cls_tower[i](p))], 1)
            outs.append(o.flatten(2))  # [N, 5 + C, h·w]
        return torch.cat(outs, 2).permute(0, 2, 1)  # [N, A, 5 + C]


@register(ARCH, task="detect", input_size=INPUT_SIZE)
def anchor_free(num_classes: int, width: int = 16, neck: int = 64, head_convs: int = 1) -> nn.Module:
    return AnchorFreeDet(num_classes, width=width, neck=neck, head_convs=head_convs)


def level_points(input_size: int | tuple[int, int], device=None, dtype=torch.float32,
                 strides: tuple[int, ...] = STRIDES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(points [A, 2] x, y in pixels, stride [A], level index [A]) in the network's output order.

    A location (i, j) of a level with stride s sits at ((j + 0.5)·s, (i + 0.5)·s); the grid of a level
    is ceil(size / s) like the strided convolutions give.
    """
    ih, iw = (input_size, input_size) if isinstance(input_size, int) else input_size
    pts, st, lv = [], [], []
    for k, s in enumerate(strides):
        gh, gw = -(-ih // s), -(-iw // s)
        ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        st.append(torch.full((gh * gw,), float(s), device=device, dtype=dtype))
        lv.append(torch.full((gh * gw,), k, device=device, dtype=torch.long))
    return torch.cat(pts), torch.cat(st), torch.cat(lv)


def _boxes(raw: torch.Tensor, points: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """Raw [..., A, ≥4] log-distances → [..., A, 4] x1, y1, x2, y2 in pixels."""
    d = raw[..., :4].clamp(max=MAX_LOG).exp() * stride[:, None]
    return torch.cat([points - d[..., :2], points + d[..., 2:4]], -1)


def decode_anchor_free(
    raw: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    input_size: int | tuple[int, int] = INPUT_SIZE,
    *,
    max_det: int = 300,
    pre_nms: int = 1000,
    strides: tuple[int, ...] = STRIDES,
) -> list[torch.Tensor]:
    """Detections per image: Tensor[K, 6] = x1, y1, x2, y2, score, cls in input pixels, best first.

    score = sqrt(sigmoid(class) · sigmoid(centre-ness)) for every (location, class) pair; the best
    `pre_nms` pairs of each image above `conf_threshold` go to one batched NMS (per image and class).
    """
    ih, iw = (input_size, input_size) if isinstance(input_size, int) else input_size
    raw = raw.float()
    n, a, ch = raw.shape
    nc = ch - 5
    points, stride, _ = level_points((ih, iw), raw.device, raw.dtype, strides)
    if len(points) != a:
        raise ValueError(f"anchor-free output has {a} locations; a {ih}×{iw} input with strides {strides} "
                         f"gives {len(points)}")
    xyxy = _boxes(raw, points, stride)
    xyxy = torch.stack([xyxy[..., 0].clamp(0, iw), xyxy[..., 1].clamp(0, ih),
                        xyxy[..., 2].clamp(0, iw), xyxy[..., 3].clamp(0, ih)], -1)  # [N, A, 4]
    score = (raw[..., 5:].sigmoid() * raw[..., 4:5].sigmoid()).sqrt().reshape(n, a * nc)  # [N, A·C]
    k = min(pre_nms, a * nc)
    top, idx = score.topk(k, dim=1)  # [N, k], best first
    img = torch.arange(n, device=raw.device)[:, None].expand(n, k)
    ok = top >= conf_threshold
    img, top, idx = img[ok], top[ok], idx[ok]
    loc, cls = idx // nc, idx % nc
    return nms_per_image(xyxy[img, loc], top, cls, img, n, nc, iou_threshold, max_det)


def anchor_free_targets(
    targets: list[torch.Tensor],
    input_size: tuple[int, int],
    *,
    device=None,
    dtype=torch.float32,
    strides: tuple[int, ...] = STRIDES,
    ranges: tuple[tuple[float, float], ...] = SIZE_RANGES,
    radius: float = RADIUS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS targets: (box index [N, A] into each image's targets, −1 = background; boxes [N, A, 4] xyxy px).

    targets: per image Tensor[K, 5] = (cls, cx, cy, w, h) normalised to 0..1. A location is positive
    for a box when it lies inside the box and within `radius` strides of its centre, and the box's
    largest distance from it fits the level's range; where boxes compete, the smallest area wins.
    A box no location claims (tiny, or at an edge) gets the location nearest its centre on the level
    its size belongs to, so that every object is learnt.
    """
    ih, iw = input_size
    points, stride, level = level_points((ih, iw), device, dtype, strides)
    lo = torch.tensor([r[0] for r in ranges], device=device, dtype=dtype)[level]
    hi = torch.tensor([r[1] for r in ranges], device=device, dtype=dtype)[level]
    a = len(points)
    assign = torch.full((len(targets), a), -1, dtype=torch.long, device=device)
    tboxes = torch.zeros(len(targets), a, 4, dtype=dtype, device=device)
    for i, t in enumerate(targets):  # images; locations and boxes are vectorised
        t = torch.as_tensor(t, dtype=dtype, device=device).reshape(-1, 5)
        if len(t) == 0:
            continue
        cx, cy, bw, bh = t[:, 1] * iw, t[:, 2] * ih, t[:, 3] * iw, t[:, 4] * ih
        box = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)  # [K, 4]
        px, py = points[:, 0:1], points[:, 1:2]  # [A, 1]
        ltrb = torch.stack([px - box[:, 0], py - box[:, 1], box[:, 2] - px, box[:, 3] - py], -1)  # [A, K, 4]
        inside = ltrb.amin(-1) > 0
        rad = radius * stride[:, None]
        near = ((px - cx).abs() < rad) & ((py - cy).abs() < rad)
        m = ltrb.amax(-1)
        fits = (m >= lo[:, None]) & (m <= hi[:, None])
        ok = inside & near & fits  # [A, K]
        # fallback: the location nearest each unclaimed box's centre on its size's level
        half = torch.maximum(bw, bh) / 2
        blevel = ((half[None, :] > torch.tensor([r[0] for r in ranges[1:]], device=device, dtype=dtype)[:, None])
                  .sum(0))  # [K]
        dist = (px - cx) ** 2 + (py - cy) ** 2  # [A, K]
        dist = torch.where(level[:, None] == blevel[None, :], dist, torch.full_like(dist, math.inf))
        nearest = dist.argmin(0)  # [K]
        lonely = ~ok.any(0)
        kk = torch.arange(len(t), device=device)
        ok[nearest[lonely], kk[lonely]] = True
        area = (bw * bh)[None, :].expand(a, -1)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best_area, best = area.min(1)
        pos = torch.isfinite(best_area)
        assign[i] = torch.where(pos, best, torch.full_like(best, -1))
        tboxes[i] = box[best]
    return assign, tboxes


def _focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    w = alpha * target + (1 - alpha) * (1 - target)
    return (w * (1 - pt) ** gamma * ce).sum()


def anchor_free_loss(
    raw: torch.Tensor,
    targets: list[torch.Tensor],
    input_size: tuple[int, int] = INPUT_SIZE,
    *,
    strides: tuple[int, ...] = STRIDES,
    box_weight: float = 2.0,
) -> torch.Tensor:
    """Focal (classes, per positive) + box_weight·GIoU (centre-ness weighted) + BCE (centre-ness).

    raw: the network's [N, A, 5 + C]; targets: per image Tensor[K, 5] = (cls, cx, cy, w, h) normalised.
    """
    raw = raw.float()
    n, a, ch = raw.shape
    nc = ch - 5
    dev, dt = raw.device, raw.dtype
    targets = [torch.as_tensor(t, dtype=dt, device=dev).reshape(-1, 5) for t in targets]
    assign, tboxes = anchor_free_targets(targets, input_size, device=dev, dtype=dt, strides=strides)
    pos = assign >= 0  # [N, A]
    num_pos = max(float(pos.sum()), 1.0)

    cls_t = torch.zeros(n, a, nc, dtype=dt, device=dev)
    if pos.any():
        img, loc = pos.nonzero(as_tuple=True)
        labels = torch.cat([t[:, 0] for t in targets]).long()
        offsets = torch.tensor([0] + [len(t) for t in targets[:-1]], device=dev).cumsum(0)
        cls_t[img, loc, labels[offsets[img] + assign[img, loc]]] = 1.0
    loss_cls = _focal(raw[..., 5:], cls_t) / num_pos
    if not pos.any():
        return loss_cls + 0.0 * raw[..., :5].sum()

    points, stride, _ = level_points(input_size, dev, dt, strides)
    pred = _boxes(raw, points, stride)[pos]  # [P, 4]
    tb = tboxes[pos]
    p = points.expand(n, a, 2)[pos]
    l, t_, r, b = p[:, 0] - tb[:, 0], p[:, 1] - tb[:, 1], tb[:, 2] - p[:, 0], tb[:, 3] - p[:, 1]
    # fallback locations may sit just outside a tiny box: clamp so centre-ness stays defined
    l, t_, r, b = (v.clamp(min=1e-3) for v in (l, t_, r, b))
    ctr_t = ((torch.minimum(l, r) / torch.maximum(l, r)) * (torch.minimum(t_, b) / torch.maximum(t_, b))).sqrt()
    giou = torchvision.ops.generalized_box_iou_loss(pred, tb, reduction="none")
    loss_box = (giou * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(raw[..., 4][pos], ctr_t, reduction="sum") / num_pos
    return loss_cls + box_weight * loss_box + loss_ctr
