"""Synthetic plant scenes: deterministic renderers for ``synthetic://<scene>`` cameras and datasets.

Every scene is a pure function of ``(seed, seq)``: ``Scene(seed=s).render(q)`` gives the same
bytes on every call, in every process. Seed-only work (textures, sensor-noise tables) is done once
in ``__init__``; ``render`` only moves, draws and blends, so a frame costs a few milliseconds.

Images are RGB ``uint8`` H×W×3, except ``thermal``: radiometric ``uint16`` H×W×1 in centikelvin.

Anomalies come in episodes. Frames are grouped in blocks of ``EPISODE_BLOCK`` (20); a fraction of
the blocks, evenly spread with a seed-dependent phase, holds one episode of consecutive anomalous
frames (10 frames at rates up to 0.5, longer above) at a seed-dependent offset, so that on average
a fraction ``anomaly_rate`` of all frames is anomalous and a rule with ``for_frames: 3`` can fire.
At the default rate 0.1 every 100 frames hold exactly one 10-frame episode.

=============  ===========  ==============================================================
scene          default W×H  truth
=============  ===========  ==============================================================
``process``    320×240      ``{"label": "normal"|"anomaly", "index": 0|1}``
``equipment``  448×448      ``{"boxes": [[x1, y1, x2, y2, cls], ...]}`` (ints, pixels, x2/y2 inclusive)
``surface``    256×256      ``{"mask": uint8 H×W 0/1, "defects": ["scratch"|"stain"|"crack", ...]}``
``thermal``    160×120      ``{"max_k", "avg_k", "min_k", "hotspots": [[x, y, peak_k], ...]}``
=============  ===========  ==============================================================

Every truth also holds ``"anomaly": bool`` and ``"kind"`` (the episode's anomaly kind, or None).
"""

from __future__ import annotations

import math
import zlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np

SCENES = ("process", "equipment", "surface", "thermal")
EPISODE_BLOCK = 20
MIN_SIZE = 32

_M64 = (1 << 64) - 1


def _mix(*vals: int | str) -> int:
    """A 64-bit hash of ints/strings, stable across runs and platforms (splitmix64 chain)."""
    h = 0x9E3779B97F4A7C15
    for v in vals:
        if isinstance(v, str):
            v = zlib.crc32(v.encode())
        h = (h ^ (int(v) & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


def _unit(*vals: int | str) -> float:
    """A float in [0, 1) hashed from ``vals``."""
    return (_mix(*vals) >> 11) / float(1 << 53)


class Scene:
    """Base of the scenes; subclasses set ``name``, ``default_size`` and implement ``_render``."""

    name: str = ""
    default_size: tuple[int, int] = (320, 240)  # (width, height)
    classes: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()  # anomaly kinds an episode can show

    def __init__(self, width: int | None = None, height: int | None = None, seed: int = 0,
                 anomaly_rate: float = 0.1):
        dw, dh = self.default_size
        if width is None and height is None:
            width, height = dw, dh
        elif height is None:
            height = round(int(width) * dh / dw)
        elif width is None:
            width = round(int(height) * dw / dh)
        width, height = int(width), int(height)
        if width < MIN_SIZE or height < MIN_SIZE or width > 8192 or height > 8192:
            raise ValueError(f"synthetic scene {self.name!r}: size {width}x{height} is outside "
                             f"{MIN_SIZE}..8192 pixels per side")
        rate = float(anomaly_rate)
        if not 0.0 <= rate <= 1.0 or math.isnan(rate):
            raise ValueError(f"synthetic scene {self.name!r}: anomaly_rate {anomaly_rate!r} is not within 0..1")
        self.width, self.height = width, height
        self.seed = int(seed)
        self.anomaly_rate = rate
        self._setup()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(width={self.width}, height={self.height}, seed={self.seed}, "
                f"anomaly_rate={self.anomaly_rate:g})")

    # --- episodes ----------------------------------------------------------------------
    def _episode_shape(self) -> tuple[float, int]:
        """(fraction of blocks holding an episode, episode length in frames)."""
        r = self.anomaly_rate
        if r <= 0.5:
            return 2.0 * r, EPISODE_BLOCK // 2
        return 1.0, max(EPISODE_BLOCK // 2, min(EPISODE_BLOCK, round(EPISODE_BLOCK * r)))

    def episode(self, seq: int) -> tuple[int, int, int] | None:
        """``(block, first_seq, length)`` of the anomaly episode that ``seq`` belongs to, else None."""
        if self.anomaly_rate <= 0.0:
            return None
        q, length = self._episode_shape()
        block, pos = divmod(seq, EPISODE_BLOCK)
        phase = _unit(self.seed, self.name, "phase")
        if math.floor((block + 1) * q + phase) <= math.floor(block * q + phase):
            return None
        start = int(_unit(self.seed, self.name, block, "start") * (EPISODE_BLOCK - length + 1))
        if start <= pos < start + length:
            return block, block * EPISODE_BLOCK + start, length
        return None

    def anomalous(self, seq: int) -> bool:
        return self.episode(seq) is not None

    def episode_kind(self, block: int) -> str:
        return self.kinds[_mix(self.seed, self.name, block, "kind") % len(self.kinds)]

    # --- helpers -----------------------------------------------------------------------
    def _rng(self, *vals: int | str) -> np.random.Generator:
        return np.random.default_rng(_mix(self.seed, self.name, *vals))

    def _noise_tables(self, sigma: float, channels: int = 3, pad: int = 64) -> None:
        """Seed-only sensor noise as saturating add/subtract tables; a frame takes a hashed window."""
        rng = self._rng("noise")
        shape = (self.height + pad, self.width + pad) + ((channels,) if channels > 1 else ())
        n = rng.normal(0.0, sigma, shape).astype(np.float32)
        self._npos = np.clip(n, 0, 255).astype(np.uint8)
        self._nneg = np.clip(-n, 0, 255).astype(np.uint8)
        self._npad = pad

    def _add_noise(self, img: np.ndarray, seq: int) -> np.ndarray:
        h = _mix(self.seed, self.name, seq, "noise-window")
        ox, oy = h % self._npad, (h >> 20) % self._npad
        win = (slice(oy, oy + self.height), slice(ox, ox + self.width))
        img = cv2.add(img, self._npos[win])
        return cv2.subtract(img, self._nneg[win])

    def _setup(self) -> None:  # seed-only precomputation
        pass

    def _render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        """``(image, truth)`` of frame ``seq`` (an int >= 0); the same inputs give identical output."""
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
            raise ValueError(f"synthetic scene {self.name!r}: seq must be an int >= 0, not {seq!r}")
        return self._render(int(seq))


SCENE_TYPES: dict[str, type[Scene]] = {}


def register(cls: type[Scene]) -> type[Scene]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no scene name")
    SCENE_TYPES[cls.name] = cls
    return cls


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, wrap_x: bool = False) -> np.ndarray:
    """Float32 noise in about -1..1 with features of ``cell`` pixels; periodic in x when ``wrap_x``."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    if wrap_x:
        gw = max(2, round(w / cell))
        g = rng.standard_normal((gh, gw)).astype(np.float32)
        big = cv2.resize(np.tile(g, (1, 3)), (3 * w, h), interpolation=cv2.INTER_CUBIC)
        out = big[:, w:2 * w]
    else:
        out = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(out)


# ======================================================================================
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
        wall = 95 + 30 * ys + 10 * _smooth_noise(rng, h, w, max(4, m // 12))
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


# ======================================================================================
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
        floor = 112 + 14 * _smooth_noise(rng, h, w, max(4, m // 10)) + 6 * _smooth_noise(rng, h, w, max(2, m // 60))
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


# ======================================================================================
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
        low = _smooth_noise(rng, h, period, max(8, min(w, h) // 4), wrap_x=True)
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


# ======================================================================================
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
                    + 0.8 * _smooth_noise(rng, h, w, max(4, m // 6))).astype(np.float32)
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
        hsh = _mix(self.seed, self.name, seq, "noise-window")
        ox, oy = hsh % 32, (hsh >> 20) % 32
        field = self.amb + 0.3 * math.sin(t / 50) + self.noise[oy:oy + h, ox:ox + w]
        ep = self.episode(seq)
        hot = -1
        if ep:
            hot = _mix(self.seed, self.name, ep[0], "hot") % len(self.blobs)
        excess = np.zeros((h, w), np.float32)
        centres = []
        for i, b in enumerate(self.blobs):
            cx = w * (0.5 + 0.36 * math.sin(2 * math.pi * t / b["px"] + b["phx"]))
            cy = h * (0.5 + 0.34 * math.sin(2 * math.pi * t / b["py"] + b["phy"]))
            peak = b["peak"] + 5 * math.sin(2 * math.pi * t / b["pp"] + b["php"])
            if i == hot:
                block, first, length = ep
                peak = 470.0 + 40.0 * _unit(self.seed, self.name, block, "peak") + 15.0 * (seq - first) / length
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


# ======================================================================================
def make_scene(name: str, **kw: Any) -> Scene:
    """The scene called ``name`` (one of ``SCENES``) built with ``width``/``height``/``seed``/``anomaly_rate``."""
    cls = SCENE_TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown synthetic scene {name!r}; known scenes: {', '.join(SCENE_TYPES)}")
    return cls(**kw)


_QUERY_KEYS = {"w": "width", "width": "width", "h": "height", "height": "height", "seed": "seed",
               "anomaly": "anomaly_rate", "anomaly_rate": "anomaly_rate"}


def scene_from_source(source: str, **kw: Any) -> Scene:
    """The scene of ``synthetic://<scene>[?w=320&h=240&seed=3&anomaly=0.2]``.

    ``kw`` gives defaults (``width``, ``height``, ``seed``, ``anomaly_rate``); the query overrides them.
    Raises ValueError naming the source and what is wrong with it.
    """
    parts = urlsplit(source.strip())
    if parts.scheme.lower() != "synthetic":
        raise ValueError(f"{source!r} is not a synthetic source (synthetic://<scene>)")
    name = (parts.netloc or parts.path.lstrip("/")).strip().lower()
    args = dict(kw)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        field = _QUERY_KEYS.get(key.lower())
        if field is None:
            raise ValueError(f"{source!r}: unknown query parameter {key!r} (known: w, h, seed, anomaly)")
        try:
            args[field] = float(value) if field == "anomaly_rate" else int(value)
        except ValueError:
            raise ValueError(f"{source!r}: {key}={value!r} is not a number") from None
    try:
        return make_scene(name, **args)
    except ValueError as e:
        raise ValueError(f"{source!r}: {e}") from None
