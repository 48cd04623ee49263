"""The ``process`` scene: a sight glass on a reactor, classified normal or anomalous."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from .base import Scene, register, smooth_noise


@register
class ProcessScene(Scene):
    """A round sight glass on a reactor; the liquid's level, colour and ripples drift slowly.

    Anomalies: ``foaming`` (white foam heads and bubbles, turbulent surface) or ``discolouration``
    (the liquid turns crimson-purple). Normal liquid stays in the amber..olive range.
    """

    name = "process"
    default_size = (320, 240)
    classes = ("normal", "anomaly")
    kinds = ("foaming", "discolouration")

    def _setup(self) -> None:
        w, h = self.width, self.height
        rng = self._rng("setup")
        m = min(w, h)
        self.cx, self.cy = w / 2 + rng.uniform(-0.04, 0.04) * w, h / 2 + rng.uniform(-0.03, 0.03) * h
        self.radius = int(0.40 * m)
        cx, cy, r = int(round(self.cx)), int(round(self.cy)), self.radius
        # steel wall: vertical gradient + brushed texture
        ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
        wall = 95 + 30 * ys + 10 * smooth_noise(rng, h, w, max(4, m // 12))
        wall = np.clip(wall, 0, 255)
        bg = np.repeat(wall[:, :, None], 3, axis=2) * np.array([0.95, 1.0, 1.05], np.float32)
        bg = np.clip(bg, 0, 255).astype(np.uint8)
        flange = int(r * 1.22)
        cv2.circle(bg, (cx, cy), flange, (70, 72, 78), -1, cv2.LINE_AA)
        cv2.circle(bg, (cx, cy), flange, (150, 150, 155), max(1, m // 120), cv2.LINE_AA)
        for k in range(8):
            a = 2 * math.pi * k / 8 + math.pi / 8
            bx, by = cx + int(r * 1.11 * math.cos(a)), cy + int(r * 1.11 * math.sin(a))
            cv2.circle(bg, (bx, by), max(2, m // 45), (175, 175, 180), -1, cv2.LINE_AA)
            cv2.circle(bg, (bx, by), max(1, m // 90), (60, 60, 64), -1, cv2.LINE_AA)
        self.bg = bg
        glass = np.zeros((h, w), np.uint8)
        cv2.circle(glass, (cx, cy), r, 1, -1)
        self.glass = glass.astype(bool)
        # vapour space: dark, slightly lit from the top-left
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        light = np.clip(1.0 - ((xx - cx + r * 0.4) ** 2 + (yy - cy + r * 0.4) ** 2) / (2.2 * r * r), 0.3, 1.0)
        vapour = np.clip(light[:, :, None] * np.array([55, 62, 72], np.float32), 0, 255).astype(np.uint8)
        np.copyto(bg, vapour, where=self.glass[:, :, None])
        self.bg = bg
        self.light = light
        self.light85 = np.ascontiguousarray(light * 0.85, dtype=np.float32)
        self.shade = (200 + 50 * light).astype(np.uint8)
        self.rim = (cx, cy, r)
        self.ph = rng.uniform(0, 2 * math.pi, 8)
        self.xs = np.arange(w, dtype=np.float32)
        self.ys = np.arange(h, dtype=np.float32)
        self._noise_tables(4.0)

    def _render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        w, h, ph = self.width, self.height, self.ph
        cx, cy, r = self.rim
        ep = self.episode(seq)
        kind = self.episode_kind(ep[0]) if ep else None
        t = float(seq)
        img = self.bg.copy()
        # liquid level (fraction of the glass height filled) and surface waves
        level = 0.52 + 0.14 * math.sin(2 * math.pi * t / 420 + ph[0]) + 0.04 * math.sin(2 * math.pi * t / 97 + ph[1])
        amp = r * (0.025 + 0.01 * math.sin(t / 23 + ph[2]))
        if kind == "foaming":
            amp *= 3.0
        y0 = cy + r - 2 * r * level
        surf = (y0 + amp * np.sin(self.xs * (6.0 / r) + t * 0.35 + ph[3])
                + 0.5 * amp * np.sin(self.xs * (15.0 / r) - t * 0.6 + ph[4])).astype(np.float32)
        liquid = np.greater_equal(self.ys[:, None], surf[None, :])
        liquid &= self.glass
        # colour: amber <-> olive, brightness ripples and the lamp's fall-off
        mixc = 0.5 + 0.5 * math.sin(2 * math.pi * t / 600 + ph[5])
        colour = (1 - mixc) * np.array([205, 140, 40]) + mixc * np.array([130, 165, 55])
        if kind == "discolouration":
            colour = np.array([150, 25, 95])
        ripple = np.outer(np.sin(self.ys * (9.0 / r) - t * 0.2 + ph[6]),
                          np.sin(self.xs * (7.0 / r) + t * 0.15 + ph[7])).astype(np.float32)
        bright = cv2.scaleAdd(cv2.multiply(self.light85, ripple), 0.10, self.light85)
        b8 = cv2.convertScaleAbs(bright, alpha=200.0, beta=0.2 * 200.0)
        lit = cv2.multiply(cv2.cvtColor(b8, cv2.COLOR_GRAY2RGB), (*map(float, colour), 0.0), scale=1 / 200.0)
        cv2.copyTo(lit, liquid.view(np.uint8), img)
        rng = self._rng(seq, "bubbles")
        if kind == "foaming":
            foam = np.zeros((h, w), np.uint8)
            n = int(40 + 30 * rng.random())
            for _ in range(n):  # a foam head along the surface and bubbles below it
                fx = rng.uniform(cx - r, cx + r)
                fy = float(np.interp(fx, self.xs, surf)) + abs(rng.normal(0, r * 0.25))
                cv2.circle(foam, (int(fx), int(fy)), int(rng.uniform(0.04, 0.11) * r), 1, -1)
            for _ in range(n // 2):
                fx = rng.uniform(cx - r, cx + r)
                fy = float(np.interp(fx, self.xs, surf)) + rng.uniform(-0.05, 0.15) * r
                cv2.circle(foam, (int(fx), int(fy)), int(rng.uniform(0.06, 0.14) * r), 1, -1)
            foam = foam.astype(bool) & self.glass
            img[foam] = self.shade[foam][:, None]
        else:  # a few small rising bubbles
            for _ in range(int(rng.integers(0, 5))):
                bx = int(rng.uniform(cx - 0.7 * r, cx + 0.7 * r))
                by = int(rng.uniform(cy, cy + 0.9 * r))
                if by > float(np.interp(bx, self.xs, surf)) + 3:
                    cv2.circle(img, (bx, by), max(1, r // 40), (225, 215, 170), 1, cv2.LINE_AA)
        cv2.circle(img, (cx, cy), r, (185, 190, 198), max(2, r // 28), cv2.LINE_AA)
        # a highlight on the glass
        cv2.ellipse(img, (int(cx - 0.45 * r), int(cy - 0.5 * r)), (max(2, r // 6), max(1, r // 18)), -40, 0, 360,
                    (210, 215, 222), -1, cv2.LINE_AA)
        img = self._add_noise(img, seq)
        anomaly = ep is not None
        return img, {"label": self.classes[int(anomaly)], "index": int(anomaly), "anomaly": anomaly, "kind": kind}
