"""The ``thermal`` scene: a radiometric ``uint16`` view with warm spots and overheat episodes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import Scene, mix, register, smooth_noise, unit


@register
class ThermalScene(Scene):
    """A radiometric view: ambient near 300 K, 1–3 warm spots (330–380 K) drifting smoothly.

    In an anomaly episode one spot runs away above 460 K. The image is ``uint16`` centikelvin;
    ``max_k``/``avg_k``/``min_k`` are the image's own statistics divided by 100, and
    ``hotspots`` lists ``[x, y, peak_k]`` at the hottest pixel of each spot above 400 K.
    """

    name = "thermal"
    default_size = (160, 120)
    kinds = ("overheat",)
    HOT_K = 400.0

    def _setup(self) -> None:
        w, h = self.width, self.height
        rng = self._rng("setup")
        m = min(w, h)
        self.amb = (300.0 + rng.uniform(-2, 2)
                    + 1.5 * np.linspace(-1, 1, h, dtype=np.float32)[:, None] * rng.uniform(-1, 1)
                    + 0.8 * smooth_noise(rng, h, w, max(4, m // 6))).astype(np.float32)
        self.noise = rng.normal(0.0, 0.25, (h + 32, w + 32)).astype(np.float32)
        n = int(rng.integers(1, 4))
        self.blobs = [dict(px=rng.uniform(150, 400), py=rng.uniform(150, 400), phx=rng.uniform(0, 2 * math.pi),
                           phy=rng.uniform(0, 2 * math.pi), sigma=rng.uniform(0.05, 0.10) * m,
                           peak=rng.uniform(335, 375), pp=rng.uniform(100, 300), php=rng.uniform(0, 2 * math.pi))
                      for _ in range(n)]
        self.xs = np.arange(w, dtype=np.float32)
        self.ys = np.arange(h, dtype=np.float32)

    def _render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        w, h, t = self.width, self.height, float(seq)
        hsh = mix(self.seed, self.name, seq, "noise-window")
        ox, oy = hsh % 32, (hsh >> 20) % 32
        field = self.amb + 0.3 * math.sin(t / 50) + self.noise[oy:oy + h, ox:ox + w]
        ep = self.episode(seq)
        hot = -1
        if ep:
            hot = mix(self.seed, self.name, ep[0], "hot") % len(self.blobs)
        excess = np.zeros((h, w), np.float32)
        centres = []
        for i, b in enumerate(self.blobs):
            cx = w * (0.5 + 0.36 * math.sin(2 * math.pi * t / b["px"] + b["phx"]))
            cy = h * (0.5 + 0.34 * math.sin(2 * math.pi * t / b["py"] + b["phy"]))
            peak = b["peak"] + 5 * math.sin(2 * math.pi * t / b["pp"] + b["php"])
            if i == hot:
                block, first, length = ep
                peak = 470.0 + 40.0 * unit(self.seed, self.name, block, "peak") + 15.0 * (seq - first) / length
            gx = np.exp(-((self.xs - cx) ** 2) / (2 * b["sigma"] ** 2))
            gy = np.exp(-((self.ys - cy) ** 2) / (2 * b["sigma"] ** 2))
            np.maximum(excess, (peak - 300.0) * np.outer(gy, gx), out=excess)  # spots never add up
            centres.append((cx, cy, b["sigma"]))
        field += excess
        img = np.clip(np.rint(field * 100.0), 0, 65535).astype(np.uint16)[:, :, None]
        plane = img[:, :, 0]
        hotspots = []
        for cx, cy, s in centres:
            r = int(math.ceil(2 * s))
            x1, y1 = max(0, int(cx) - r), max(0, int(cy) - r)
            x2, y2 = min(w, int(cx) + r + 1), min(h, int(cy) + r + 1)
            if x2 <= x1 or y2 <= y1:
                continue
            win = plane[y1:y2, x1:x2]
            iy, ix = np.unravel_index(int(np.argmax(win)), win.shape)
            peak_k = int(win[iy, ix]) / 100.0
            if peak_k > self.HOT_K:
                hotspots.append([int(x1 + ix), int(y1 + iy), peak_k])
        truth = {"max_k": int(plane.max()) / 100.0, "avg_k": float(plane.mean(dtype=np.float64)) / 100.0,
                 "min_k": int(plane.min()) / 100.0, "hotspots": hotspots, "anomaly": ep is not None,
                 "kind": "overheat" if ep else None}
        return img, truth
