"""Anomaly detection from good pictures only: the segmenter, taught by anomalies pasted into good pictures.

A plant has thousands of pictures of good product and almost no labelled defects. ``train segment
--good-only`` trains the defect segmenter on good pictures alone (DRAEM's idea): each training picture,
with even odds, gets an anomaly pasted into it, a region of irregular shape (thresholded Perlin noise, or
a thin scar) filled with a foreign texture (another good picture turned, inverted or recoloured, or a
noise field), and the network learns to mark that region. What it learns is "not like the good surface",
so a real defect of a kind it never saw lights up the same way. Its output is the segment model's
defect probability map: the anomaly map, whose maximum is the picture's anomaly score.

The decision threshold comes from held-out good pictures, not from defects: the ``THRESHOLD_QUANTILE``
of their scores (the maximum of each one's map), stored as ``thresholds.mask`` in ``model.json``, so a
picture is anomalous when any pixel of its map exceeds what good product reaches.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from shared.data.datasets import IMAGE_EXTS, DataError, TaskDataset

__all__ = ["GOOD_ONLY", "THRESHOLD_QUANTILE", "good_pictures", "perlin", "anomaly_mask", "paste_anomaly",
           "SyntheticAnomalies", "good_threshold"]

GOOD_ONLY = "good-only"  # model.json `metrics.training` of a segmenter trained this way
THRESHOLD_QUANTILE = 0.995  # of held-out good pictures' scores: about one good picture in 200 above it
ANOMALY_SHARE = 0.5  # training pictures that get an anomaly; the rest teach that good stays unmarked


def good_pictures(root: str | Path) -> TaskDataset:
    """The good pictures of ``root``: MVTec AD's ``train/good`` when it has one (``test/`` is never read),
    else every image in ``root`` and its subfolders."""
    root = Path(root)
    folder = root / "train" / "good" if (root / "train" / "good").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"{root}: not a folder of good pictures (nor an MVTec AD folder with train/good)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"{folder}: holds no images ({', '.join(IMAGE_EXTS)}) to learn good product from")
    return TaskDataset("segment", ["defect"], files, [None] * len(files), root=root, split="train",
                       layout="good")


def perlin(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of ``shape`` with ``cells`` lattice cells per axis, about in [-1, 1]."""
    h, w = shape
    ch, cw = cells
    angles = rng.uniform(0, 2 * math.pi, (ch + 1, cw + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = np.linspace(0, ch, h, endpoint=False)[:, None]
    x = np.linspace(0, cw, w, endpoint=False)[None, :]
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0

    def dot(dy, dx):
        return gy[y0 + dy, x0 + dx] * (fy - dy) + gx[y0 + dy, x0 + dx] * (fx - dx)

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return (top * (1 - uy) + bottom * uy) * math.sqrt(2)


def _scar(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A thin, slightly bent stroke: what scratches and cracks look like to a mask."""
    h, w = shape
    m = np.zeros(shape, np.uint8)
    x, y, th = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(0, 2 * math.pi)
    pts = [(x, y)]
    for _ in range(int(rng.integers(4, 12))):
        th += rng.normal(0, 0.3)
        step = rng.uniform(0.03, 0.08) * max(h, w)
        x, y = x + step * math.cos(th), y + step * math.sin(th)
        pts.append((x, y))
    width = max(1, int(round(rng.uniform(0.006, 0.02) * max(h, w))))
    cv2.polylines(m, [np.round(np.array(pts)).astype(np.int32)], False, 1, width)
    return m.astype(bool)


def anomaly_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A boolean anomaly region: thresholded Perlin noise blobs (three times in four) or a scar, covering
    between a few hundredths of a percent and about a sixth of the picture."""
    if rng.random() < 0.25:
        return _scar(shape, rng)
    for _ in range(10):
        k = 2 ** int(rng.integers(1, 5))
        noise = perlin(shape, (k, k), rng)
        m = noise > rng.uniform(0.35, 0.6)
        share = m.mean()
        if 0.0005 < share < 0.17:
            return m
    return _scar(shape, rng)


def _foreign_texture(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture unlike ``img``'s surface, as float32 RGB of its shape: ``donor`` turned and recoloured, or
    a coloured noise field."""
    h, w = img.shape[:2]
    if rng.random() < 0.3:
        cells = int(rng.integers(2, 16))
        field = np.stack([perlin((h, w), (cells, cells), rng) for _ in range(3)], 2)
        return np.clip(127.5 + field * rng.uniform(60, 127), 0, 255).astype(np.float32)
    t = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    t = np.rot90(t, int(rng.integers(4))) if h == w else t[::-1, ::-1]
    if rng.random() < 0.5:
        t = 255.0 - t
    t = t[:, :, rng.permutation(3)] * rng.uniform(0.5, 1.5) + rng.uniform(-60, 60)
    return np.clip(t, 0, 255).astype(np.float32)


def paste_anomaly(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(``img`` with an anomaly pasted in, its uint8 0/1 mask): a region of ``anomaly_mask`` filled with a
    foreign texture at opacity 0.3–1, the mask only where the change is visible."""
    mask = anomaly_mask(img.shape[:2], rng)
    texture = _foreign_texture(img, donor, rng)
    beta = rng.uniform(0.3, 1.0)
    out = img.astype(np.float32)
    out[mask] = (1 - beta) * out[mask] + beta * texture[mask]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    changed = np.abs(out.astype(np.int16) - img).max(2) > 8  # a change of a few grey levels is no anomaly
    return out, (mask & changed).astype(np.uint8)


class SyntheticAnomalies(torch.utils.data.Dataset):
    """Good pictures as segment training items ``(image, mask)``: with odds ``ANOMALY_SHARE`` an anomaly
    pasted in (``paste_anomaly``, a donor drawn from the same pictures), else the picture as it is with an
    empty mask. Draws from (seed, epoch, index): set ``epoch`` before each epoch; a fixed ``epoch`` gives a
    fixed validation set."""

    def __init__(self, good: TaskDataset, seed: int = 0, epoch: int = 0):
        self.good, self.seed, self.epoch = good, seed, epoch
        self.task, self.classes = "segment", ["defect"]

    def __len__(self) -> int:
        return len(self.good)

    def stratum(self, i: int) -> int:
        return 0

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, _ = self.good[i]
        rng = np.random.default_rng([self.seed, self.epoch, i, 104729])
        if rng.random() >= ANOMALY_SHARE:
            return img, np.zeros(img.shape[:2], np.uint8)
        donor, _ = self.good[int(rng.integers(len(self.good)))]
        return paste_anomaly(img, donor, rng)


def good_threshold(scores, quantile: float = THRESHOLD_QUANTILE) -> float:
    """The anomaly threshold from held-out good pictures' scores: their ``quantile``, nudged just above it
    so that a good picture scoring exactly that is not flagged."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise DataError("no held-out good pictures to set the anomaly threshold from")
    return float(min(np.nextafter(np.quantile(s, quantile), 1.0), 1.0))
