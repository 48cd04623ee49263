"""The ``equipment`` scene: pumps, valves and motors on a plant floor, with boxes to detect."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from .base import Scene, register, smooth_noise


@register
class EquipmentScene(Scene):
    """A plant floor with 2–5 pumps, valves and motors; anomalies add a ``leak`` or a ``hot_spot``.

    The layout (which items, where) changes every ``LAYOUT_FRAMES`` frames, as if the camera
    were re-aimed; within a layout each item sways a few pixels with ``seq``.
    Boxes are ``[x1, y1, x2, y2, cls]`` with inclusive pixel corners, cls an index into ``classes``.
    """

    name = "equipment"
    default_size = (448, 448)
    classes = ("pump", "valve", "motor", "leak", "hot_spot")
    kinds = ("leak", "hot_spot")
    LAYOUT_FRAMES = 100

    def _setup(self) -> None:
        w, h = self.width, self.height
        rng = self._rng("setup")
        m = min(w, h)
        floor = 112 + 14 * smooth_noise(rng, h, w, max(4, m // 10)) + 6 * smooth_noise(rng, h, w, max(2, m // 60))
        bg = np.repeat(np.clip(floor, 0, 255)[:, :, None], 3, axis=2) * np.array([1.0, 0.99, 0.93], np.float32)
        bg = np.clip(bg, 0, 255).astype(np.uint8)
        step = max(16, m // 6)
        off = int(rng.integers(0, step))
        for x in range(off, w, step):
            cv2.line(bg, (x, 0), (x, h - 1), (92, 92, 88), 1)
        for y in range(off, h, step):
            cv2.line(bg, (0, y), (w - 1, y), (92, 92, 88), 1)
        # a pipe run along the top or the bottom edge
        py = int(h * (0.04 if rng.random() < 0.5 else 0.93))
        th = max(4, m // 40)
        cv2.rectangle(bg, (0, py - th), (w - 1, py + th), (150, 150, 158), -1)
        cv2.line(bg, (0, py - th // 2), (w - 1, py - th // 2), (195, 195, 205), max(1, th // 3))
        self.bg = bg
        self._noise_tables(5.0)

    # --- items: each drawn to touch all four sides of its box -----------------------------
    @staticmethod
    def _pump(img, x1, y1, x2, y2):
        bw, bh = x2 - x1, y2 - y1
        r = int(0.34 * bh)
        ccx, ccy = x1 + int(0.42 * bw), y2 - int(0.16 * bh) - r
        cv2.rectangle(img, (x1, y2 - int(0.14 * bh)), (x2, y2), (60, 62, 68), -1)
        cv2.rectangle(img, (x1 + int(0.70 * bw), ccy - int(0.16 * bh)), (x2, ccy + int(0.16 * bh)), (30, 60, 150), -1)
        cv2.rectangle(img, (ccx - int(0.09 * bw), y1), (ccx + int(0.09 * bw), ccy), (40, 90, 200), -1)
        cv2.rectangle(img, (ccx - int(0.13 * bw), y1), (ccx + int(0.13 * bw), y1 + max(2, int(0.05 * bh))),
                      (35, 70, 170), -1)
        cv2.circle(img, (ccx, ccy), r, (40, 90, 200), -1, cv2.LINE_AA)
        cv2.circle(img, (ccx, ccy), max(2, r // 3), (120, 160, 235), -1, cv2.LINE_AA)

    @staticmethod
    def _valve(img, x1, y1, x2, y2):
        bw, bh = x2 - x1, y2 - y1
        mx, my = (x1 + x2) // 2, y1 + int(0.70 * bh)
        top = y1 + int(0.42 * bh)
        body = np.array([[x1, top], [mx, my], [x1, y2], [x2, top], [mx, my], [x2, y2]], np.int32)
        cv2.fillPoly(img, [body[:3], body[3:]], (190, 40, 40), cv2.LINE_AA)
        cv2.rectangle(img, (x1, top), (x1 + max(2, bw // 12), y2), (120, 30, 30), -1)
        cv2.rectangle(img, (x2 - max(2, bw // 12), top), (x2, y2), (120, 30, 30), -1)
        cv2.rectangle(img, (mx - max(1, bw // 25), y1 + int(0.16 * bh)), (mx + max(1, bw // 25), my),
                      (110, 110, 115), -1)
        th = max(2, bw // 18)
        hr, vr = int(0.36 * bw), int(0.16 * bh)
        hc = (mx, y1 + vr + th // 2 + 1)
        cv2.ellipse(img, hc, (hr, vr), 0, 0, 360, (235, 200, 30), th, cv2.LINE_AA)
        sp = max(1, bw // 60)
        cv2.rectangle(img, (mx - hr, hc[1] - sp), (mx + hr, hc[1] + sp), (235, 200, 30), -1)
        cv2.rectangle(img, (mx - sp, y1), (mx + sp, hc[1] + vr), (235, 200, 30), -1)

    @staticmethod
    def _motor(img, x1, y1, x2, y2):
        bw, bh = x2 - x1, y2 - y1
        bx2 = x1 + int(0.78 * bw)
        cv2.rectangle(img, (x1 + int(0.06 * bw), y2 - int(0.14 * bh)), (bx2 - int(0.04 * bw), y2), (35, 60, 40), -1)
        cv2.rectangle(img, (x1, y1 + int(0.16 * bh)), (bx2, y2 - int(0.12 * bh)), (40, 150, 70), -1)
        n = 5
        for k in range(1, n):
            yy = y1 + int(0.16 * bh) + k * int(0.72 * bh) // n
            cv2.rectangle(img, (x1 + 2, yy), (bx2 - 2, yy + max(1, bh // 40) - 1), (25, 100, 45), -1)
        cv2.rectangle(img, (x1 + int(0.30 * bw), y1), (x1 + int(0.52 * bw), y1 + int(0.18 * bh)), (30, 120, 55), -1)
        my = (y1 + y2) // 2
        cv2.rectangle(img, (bx2, my - max(2, int(0.07 * bh))), (x2, my + max(2, int(0.07 * bh))), (170, 170, 175), -1)

    DRAW = {0: _pump, 1: _valve, 2: _motor}
    ASPECT = {0: (1.0, 0.8), 1: (0.8, 1.0), 2: (1.25, 0.7)}  # (w, h) per unit size

    def _layout(self, seq: int) -> list[tuple]:
        """Items of the layout that ``seq`` falls in: (cls, cx, cy, size, amp_x, amp_y, period, phase)."""
        seg = seq // self.LAYOUT_FRAMES
        rng = self._rng(seg, "layout")
        w, h = self.width, self.height
        cols = 3 if w >= h * 0.8 else 2
        rows = 3 if h >= w * 0.8 else 2
        cw, ch = w / cols, h / rows
        n = int(rng.integers(2, 6))
        cells = rng.permutation(cols * rows)[:n]
        items = []
        for c in cells:
            cls = int(rng.integers(0, 3))
            ax, ay = self.ASPECT[cls]
            size = min(cw / ax, ch / ay) * rng.uniform(0.45, 0.62)
            slack_x, slack_y = (cw - size * ax) / 2, (ch - size * ay) / 2
            cx = (c % cols + 0.5) * cw + rng.uniform(-0.5, 0.5) * slack_x
            cy = (c // cols + 0.5) * ch + rng.uniform(-0.5, 0.5) * slack_y
            items.append((cls, cx, cy, size, 0.25 * slack_x, 0.25 * slack_y,
                          rng.uniform(40, 90), rng.uniform(0, 2 * math.pi)))
        return items

    def _render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        w, h = self.width, self.height
        img = self.bg.copy()
        boxes: list[list[int]] = []
        t = float(seq)
        for cls, cx, cy, size, axm, aym, period, ph in self._layout(seq):
            x = cx + axm * math.sin(2 * math.pi * t / period + ph)
            y = cy + aym * math.cos(2 * math.pi * t / (period * 1.3) + ph)
            aw, ah = self.ASPECT[cls]
            x1, y1 = int(round(x - size * aw / 2)), int(round(y - size * ah / 2))
            x2, y2 = int(round(x + size * aw / 2)), int(round(y + size * ah / 2))
            x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w - 1, x2), min(h - 1, y2)
            # a soft shadow, then the item
            cv2.rectangle(img, (x1 + 3, y1 + 4), (min(w - 1, x2 + 3), min(h - 1, y2 + 4)), (85, 85, 82), -1)
            self.DRAW[cls](img, x1, y1, x2, y2)
            boxes.append([x1, y1, x2, y2, cls])
        ep = self.episode(seq)
        kind = self.episode_kind(ep[0]) if ep else None
        if ep and boxes:
            block, first, length = ep
            k = seq - first
            rng = self._rng(block, "anomaly")
            x1, y1, x2, y2, _ = boxes[int(rng.integers(0, len(boxes)))]
            bw, bh = x2 - x1 + 1, y2 - y1 + 1
            box = self._leak(img, rng, x1, y1, x2, y2, bw, bh, k, length) if kind == "leak" else \
                self._hot_spot(img, rng, x1, y1, x2, y2, bw, bh, k, length)
            if box is not None:
                boxes.append(box)
        img = self._add_noise(img, seq)
        return img, {"boxes": boxes, "anomaly": ep is not None, "kind": kind}

    def _leak(self, img, rng, x1, y1, x2, y2, bw, bh, k, length):
        w, h = self.width, self.height
        grow = 0.6 + 0.4 * (k + 1) / length
        sx = int(x1 + rng.uniform(0.25, 0.75) * bw)
        py = min(h - 1 - int(0.06 * bh), y2 + int(rng.uniform(0.1, 0.25) * bh))
        mask = np.zeros((h, w), np.uint8)
        axes = (max(3, int(0.45 * bw * grow)), max(2, int(0.13 * bh * grow)))
        cv2.ellipse(mask, (sx + int(rng.uniform(-0.1, 0.1) * bw), py), axes, 0, 0, 360, 1, -1)
        cv2.ellipse(mask, (sx + int(0.25 * axes[0]), py + axes[1] // 2), (axes[0] // 2, axes[1]), 15, 0, 360, 1, -1)
        cv2.line(mask, (sx, y1 + int(0.6 * bh)), (sx, py), 1, max(2, bw // 25))
        ys, xs = np.nonzero(mask)
        if xs.size == 0:
            return None
        sel = mask.astype(bool)
        img[sel] = (img[sel] * np.array([0.18, 0.17, 0.16], np.float32) + np.array([18, 15, 12], np.float32)
                    ).astype(np.uint8)
        return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()), 3]

    def _hot_spot(self, img, rng, x1, y1, x2, y2, bw, bh, k, length):
        w, h = self.width, self.height
        gx = x1 + rng.uniform(0.25, 0.75) * bw
        gy = y1 + rng.uniform(0.25, 0.75) * bh
        sigma = max(2.0, min(bw, bh) * rng.uniform(0.12, 0.18) * (0.8 + 0.2 * (k + 1) / length))
        rad = int(math.ceil(2.2 * sigma))
        rx1, ry1 = max(0, int(gx) - rad), max(0, int(gy) - rad)
        rx2, ry2 = min(w, int(gx) + rad + 1), min(h, int(gy) + rad + 1)
        xx = np.arange(rx1, rx2, dtype=np.float32)[None, :] - gx
        yy = np.arange(ry1, ry2, dtype=np.float32)[:, None] - gy
        alpha = np.exp(-(xx * xx + yy * yy) / (2 * sigma * sigma))
        alpha[alpha < 0.1] = 0.0
        ys, xs = np.nonzero(alpha)
        if xs.size == 0:
            return None
        core = np.clip((alpha - 0.6) / 0.4, 0, 1)[:, :, None]
        glow = (1 - core) * np.array([255, 85, 10], np.float32) + core * np.array([255, 235, 150], np.float32)
        a = np.minimum(1.0, alpha * 1.4)[:, :, None]
        roi = img[ry1:ry2, rx1:rx2]
        roi[:] = (roi * (1 - a) + glow * a).astype(np.uint8)
        return [int(rx1 + xs.min()), int(ry1 + ys.min()), int(rx1 + xs.max()), int(ry1 + ys.max()), 4]
