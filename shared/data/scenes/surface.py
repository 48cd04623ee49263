"""The ``surface`` scene: brushed metal sliding past the camera, with defect masks to segment."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from .base import EPISODE_BLOCK, Scene, register, smooth_noise


@register
class SurfaceScene(Scene):
    """Brushed metal sliding slowly past the camera; anomalies add scratches, stains and cracks.

    The defects move with the metal. ``mask`` is 1 exactly where a defect was painted: every
    masked pixel differs from the defect-free frame, and no other pixel does.
    """

    name = "surface"
    default_size = (256, 256)
    kinds = ("scratch", "stain", "crack")
    SPEED = 1  # pixels per frame

    def _setup(self) -> None:
        w, h = self.width, self.height
        rng = self._rng("setup")
        period = 2 * w
        streak = rng.standard_normal((h, period)).astype(np.float32)
        streak = np.tile(streak, (1, 3))
        klen = max(15, (w // 6) | 1)
        streak = cv2.blur(streak, (klen, 1))[:, period:2 * period]
        streak /= max(1e-6, float(streak.std()))
        low = smooth_noise(rng, h, period, max(8, min(w, h) // 4), wrap_x=True)
        grad = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * rng.uniform(-8, 8)
        base = np.clip(132 + 12 * streak + 14 * low + grad, 70, 195)
        tex = np.repeat(base[:, :, None], 3, axis=2) * np.array([0.97, 1.0, 1.04], np.float32)
        tex = np.clip(tex, 65, 200).astype(np.uint8)
        self.tex = np.ascontiguousarray(np.concatenate([tex, tex[:, :w]], axis=1))
        self.period = period
        self._noise_tables(3.0)

    def base(self, seq: int) -> np.ndarray:
        """The defect-free frame ``seq``."""
        off = (seq * self.SPEED) % self.period
        img = self.tex[:, off:off + self.width]
        return self._add_noise(img, seq)

    def _defects(self, block: int, shift: int) -> list[tuple[str, np.ndarray]]:
        w, h = self.width, self.height
        m = min(w, h)
        rng = self._rng(block, "defects")
        out = []
        n = int(rng.integers(1, 4))
        first = self.episode_kind(block)
        for i in range(n):
            kind = first if i == 0 else self.kinds[int(rng.integers(0, 3))]
            mask = np.zeros((h, w), np.uint8)
            # room for EPISODE_BLOCK frames of sliding to the left
            x0 = rng.uniform(0.15 * w + EPISODE_BLOCK * self.SPEED, 0.85 * w) - shift
            y0 = rng.uniform(0.15 * h, 0.85 * h)
            if kind == "scratch":
                ang = rng.uniform(0, math.pi)
                ln = rng.uniform(0.15, 0.5) * m
                dx, dy = math.cos(ang) * ln / 2, math.sin(ang) * ln / 2
                pts = np.array([[x0 - dx, y0 - dy], [x0 + 0.1 * dy, y0 - 0.1 * dx], [x0 + dx, y0 + dy]])
                curve = np.array([(1 - s) ** 2 * pts[0] + 2 * (1 - s) * s * pts[1] + s * s * pts[2]
                                  for s in np.linspace(0, 1, 12)])
                cv2.polylines(mask, [np.round(curve).astype(np.int32)], False, 1, int(rng.integers(1, 3)))
            elif kind == "stain":
                for _ in range(int(rng.integers(3, 7))):
                    ex, ey = x0 + rng.normal(0, 0.05 * m), y0 + rng.normal(0, 0.05 * m)
                    ax = max(2, int(rng.uniform(0.03, 0.09) * m))
                    ay = max(2, int(ax * rng.uniform(0.5, 1.0)))
                    cv2.ellipse(mask, (int(ex), int(ey)), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
            else:  # crack: a jagged polyline, sometimes with a branch
                ang = rng.uniform(0, 2 * math.pi)
                pts = [(x0, y0)]
                for _ in range(int(rng.integers(6, 14))):
                    ang += rng.normal(0, 0.6)
                    stp = rng.uniform(0.02, 0.05) * m
                    pts.append((pts[-1][0] + stp * math.cos(ang), pts[-1][1] + stp * math.sin(ang)))
                cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 1, int(rng.integers(1, 3)))
                if rng.random() < 0.5:
                    j = int(rng.integers(1, len(pts)))
                    a2 = ang + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
                    br = [pts[j]]
                    for _ in range(int(rng.integers(3, 6))):
                        a2 += rng.normal(0, 0.5)
                        stp = rng.uniform(0.02, 0.04) * m
                        br.append((br[-1][0] + stp * math.cos(a2), br[-1][1] + stp * math.sin(a2)))
                    cv2.polylines(mask, [np.round(np.array(br)).astype(np.int32)], False, 1, 1)
            if mask.any():
                out.append((kind, mask))
        return out

    # Each paint maps a base pixel (65..~215) to a value that differs from it in every channel.
    PAINT = {
        "scratch": lambda b: np.minimum(b.astype(np.int16) + 60, 255).astype(np.uint8),
        "stain": lambda b: (b * np.array([0.55, 0.45, 0.33], np.float32)).astype(np.uint8),
        "crack": lambda b: (b // 4).astype(np.uint8),
    }

    def _render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        img = self.base(seq)
        mask = np.zeros((self.height, self.width), np.uint8)
        ep = self.episode(seq)
        kinds: list[str] = []
        if ep:
            block, first, _ = ep
            base = img.copy()
            for kind, m in self._defects(block, (seq - first) * self.SPEED):
                sel = m.astype(bool)
                img[sel] = self.PAINT[kind](base[sel])
                mask |= m
                kinds.append(kind)
        return img, {"mask": mask, "defects": kinds, "anomaly": ep is not None,
                     "kind": self.episode_kind(ep[0]) if ep else None}
