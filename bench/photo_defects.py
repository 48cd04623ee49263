"""Datasets the scenes did not draw: tiles of real photographs with drawn surface defects.

A recipe tuned on the pipeline's own scenes can still fail on a plant's pictures. These datasets
come from elsewhere: tiles cut from the real photographs of surfaces scikit-image ships (a brick wall,
gravel, grass, the moon's surface), some with scratches, cracks, stains, pits or burns drawn on them by the
generator below, written in each task's training layout:

=========  =====================================================================================
task       files
=========  =====================================================================================
classify   ``DIR/<split>/good/*.png``, ``DIR/<split>/defect/*.png`` (ImageFolder)
segment    ``DIR/images/<split>/*.png``, ``DIR/masks/<split>/*.png`` (good pictures: empty masks)
detect     ``DIR/images/<split>/*.png``, ``DIR/labels/<split>/*.txt``, ``DIR/data.yaml``; a class per kind
thermal    ``DIR/<split>/*.npy``: kelvin maps whose surface is the photograph, burns as hot spots
=========  =====================================================================================

``write_photo_dataset(task, DIR, n_good=100, n_defect=100, split="train", seed=0)`` writes one
split; a held-out set is the same call with another split name and seed. Everything drawn is a
function of the seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import yaml

__all__ = ["PHOTOS", "KINDS", "SIZE", "tile", "draw_defect", "picture", "write_photo_dataset"]

# scikit-image's shipped photographs of surfaces (read from its package folder: nothing is downloaded). A plant's
# pictures show one product or one piece of equipment; four unlike surfaces make the task harder than that.
PHOTOS = ("brick.png", "gravel.png", "grass.png", "moon.png")
KINDS = ("scratch", "crack", "stain", "pit", "burn")
SIZE = 256
THERMAL_SHAPE = (240, 320)
_cache: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    """An RGB uint8 photograph from scikit-image's data folder."""
    if name not in _cache:
        import skimage.data  # noqa: PLC0415 - a test and benchmark dependency, not the pipeline's

        path = Path(skimage.data.__file__).parent / name
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"{path}: scikit-image's photograph is missing or unreadable")
        _cache[name] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return _cache[name]


def tile(rng: np.random.Generator, size: int | tuple[int, int] = SIZE, photos: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """A random crop of one of ``photos``, resized to ``size``, flipped/turned, exposure varied."""
    h, w = (size, size) if isinstance(size, int) else size
    img = _photo(photos[rng.integers(len(photos))])
    side = min(img.shape[:2])
    s = int(rng.integers(min(160, side), min(side, 480) + 1))
    sh, sw = (s, s) if h == w else (s, min(img.shape[1], int(s * w / h)))
    y, x = rng.integers(0, img.shape[0] - sh + 1), rng.integers(0, img.shape[1] - sw + 1)
    out = cv2.resize(img[y:y + sh, x:x + sw], (w, h), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if h == w:
        out = np.rot90(out, int(rng.integers(4)))
    gain, gamma = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.25)
    out = 255.0 * (out.astype(np.float32) / 255.0) ** gamma * gain
    return np.clip(out, 0, 255).astype(np.float32)


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    a = alpha[:, :, None]
    img *= 1 - a
    img += a * np.asarray(colour, np.float32)


def _blob(shape, rng: np.random.Generator, centre, radius: float) -> np.ndarray:
    """A soft irregular blob (union of ellipses, blurred): float 0..1."""
    m = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(3, 7))):
        c = (int(centre[0] + rng.normal(0, radius / 3)), int(centre[1] + rng.normal(0, radius / 3)))
        axes = (max(2, int(radius * rng.uniform(0.4, 0.8))), max(2, int(radius * rng.uniform(0.3, 0.7))))
        cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    k = max(3, int(radius / 3) | 1)
    return cv2.GaussianBlur(m, (k, k), 0)


def _contrasting(img: np.ndarray, where: np.ndarray, colours) -> tuple:
    """Of ``colours``, the one farthest from the surface's mean colour under ``where``. A defect an inspector is
    asked to find can be seen: a light scratch on a light surface could not, by a person or a network."""
    under = img[where].mean(0) if where.any() else img.reshape(-1, 3).mean(0)
    return max(colours, key=lambda c: float(np.sum((np.asarray(c, np.float32) - under) ** 2)))


def _scratch(img, rng, mask):
    h, w = mask.shape
    x, y, th = rng.uniform(30, w - 30), rng.uniform(30, h - 30), rng.uniform(0, 2 * math.pi)
    length, pts = rng.uniform(60, 170), []
    for t in np.linspace(-0.5, 0.5, 6):
        along, bend = t * length, rng.normal(0, 4)
        pts.append((x + along * math.cos(th) - bend * math.sin(th), y + along * math.sin(th) + bend * math.cos(th)))
    pts = np.round(np.array(pts)).astype(np.int32)
    line = np.zeros(mask.shape, np.float32)
    cv2.polylines(line, [pts], False, 1.0, int(rng.integers(2, 4)), cv2.LINE_AA)
    colour = _contrasting(img, line > 0.5, [(235, 235, 225), (25, 22, 20)])
    _blend(img, line * rng.uniform(0.65, 0.9), colour)
    mask |= (line > 0.5)


def _crack(img, rng, mask):
    h, w = mask.shape
    line = np.zeros(mask.shape, np.float32)

    def walk(x, y, th, steps, width):
        pts = [(x, y)]
        for _ in range(steps):
            th += rng.normal(0, 0.35)
            x, y = x + 4 * math.cos(th), y + 4 * math.sin(th)
            pts.append((x, y))
        cv2.polylines(line, [np.round(np.array(pts)).astype(np.int32)], False, 1.0, width, cv2.LINE_AA)
        return pts

    pts = walk(rng.uniform(40, w - 40), rng.uniform(40, h - 40), rng.uniform(0, 2 * math.pi),
               int(rng.integers(15, 40)), int(rng.integers(2, 4)))
    for _ in range(int(rng.integers(0, 3))):
        bx, by = pts[int(rng.integers(len(pts)))]
        walk(bx, by, rng.uniform(0, 2 * math.pi), int(rng.integers(4, 12)), 2)
    _blend(img, line * rng.uniform(0.75, 0.95), (18, 15, 12))
    mask |= (line > 0.5)


def _stain(img, rng, mask):
    h, w = mask.shape
    r = rng.uniform(16, 42)
    blob = _blob(mask.shape, rng, (rng.uniform(r, w - r), rng.uniform(r, h - r)), r)
    palette = [(125, 70, 30), (45, 40, 35), (190, 165, 60), (90, 110, 60)]
    colour = _contrasting(img, blob > 0.5, [palette[i] for i in rng.permutation(len(palette))[:2]])
    _blend(img, blob * rng.uniform(0.45, 0.7), colour)
    mask |= (blob > 0.5)


def _pit(img, rng, mask):
    h, w = mask.shape
    cx, cy = rng.uniform(30, w - 30), rng.uniform(30, h - 30)
    dark, rim = np.zeros(mask.shape, np.float32), np.zeros(mask.shape, np.float32)
    for _ in range(int(rng.integers(3, 8))):
        x, y, r = int(cx + rng.normal(0, 10)), int(cy + rng.normal(0, 10)), int(rng.integers(3, 7))
        cv2.circle(rim, (x - 1, y - 1), r + 1, 1.0, -1, cv2.LINE_AA)
        cv2.circle(dark, (x, y), r, 1.0, -1, cv2.LINE_AA)
    _blend(img, np.clip(rim - dark, 0, 1) * 0.7, (240, 240, 235))
    _blend(img, dark * rng.uniform(0.75, 0.9), (15, 12, 10))
    mask |= (dark > 0.5)


def _burn(img, rng, mask):
    h, w = mask.shape
    r = rng.uniform(20, 48)
    blob = _blob(mask.shape, rng, (rng.uniform(r, w - r), rng.uniform(r, h - r)), r)
    core = blob ** 2
    _blend(img, blob * 0.6, (150, 75, 25))
    _blend(img, core * 0.9, (20, 12, 8))
    mask |= (blob > 0.4)


DRAW = {"scratch": _scratch, "crack": _crack, "stain": _stain, "pit": _pit, "burn": _burn}


def draw_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one defect of ``kind`` into the float image in place; its 0/1 mask."""
    mask = np.zeros(img.shape[:2], bool)
    DRAW[kind](img, rng, mask)
    return mask


def picture(rng: np.random.Generator, defective: bool, size=SIZE, photos: tuple[str, ...] = PHOTOS
            ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """(uint8 RGB picture, [(kind, mask)] of its defects): one defect, sometimes two, when defective."""
    img = tile(rng, size, photos)
    defects = []
    if defective:
        for _ in range(1 if rng.random() < 0.75 else 2):
            kind = KINDS[int(rng.integers(len(KINDS)))]
            defects.append((kind, draw_defect(img, kind, rng)))
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # sensor noise over defect and surface alike
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), defects


def _write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    if not cv2.imwrite(str(path), bgr):
        raise OSError(f"{path}: could not write the image")


def _yolo_rows(defects, shape) -> list[str]:
    h, w = shape
    rows = []
    for kind, m in defects:
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        rows.append(f"{KINDS.index(kind)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                    f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    return rows


def _kelvin(rng: np.random.Generator, defective: bool, photos: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """A surface whose temperature follows the photograph's brightness; defective ones carry 1-2 hot spots."""
    gray = cv2.cvtColor(tile(rng, THERMAL_SHAPE, photos).astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float64)
    k = rng.uniform(285, 320) + gray / 255.0 * rng.uniform(4, 25)
    if defective:
        h, w = k.shape
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(1, 3))):
            cx, cy, s = rng.uniform(20, w - 20), rng.uniform(20, h - 20), rng.uniform(3, 14)
            k += rng.uniform(15, 120) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return k + rng.normal(0, 0.05, k.shape)


def write_photo_dataset(task: str, out: str | Path, *, n_good: int = 100, n_defect: int = 100,
                        split: str = "train", seed: int = 0, photos: tuple[str, ...] = PHOTOS) -> dict:
    """Write ``n_good`` + ``n_defect`` pictures of ``task``'s layout into split ``split`` of ``out``, cut from
    ``photos`` (default: all four surfaces)."""
    out = Path(out)
    rng = np.random.default_rng([seed, 7919])
    order = np.array([False] * n_good + [True] * n_defect)
    rng.shuffle(order)
    counts = {"good": 0, "defect": 0}
    for i, defective in enumerate(order):
        name = f"{split}_{seed}_{i:05d}"
        label = "defect" if defective else "good"
        counts[label] += 1
        if task == "thermal":
            path = out / split / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, _kelvin(rng, bool(defective), photos), allow_pickle=False)
            continue
        img, defects = picture(rng, bool(defective), photos=photos)
        if task == "classify":
            _write_png(out / split / label / f"{name}.png", img)
        elif task == "segment":
            mask = np.zeros(img.shape[:2], np.uint8)
            for _, m in defects:
                mask[m] = 255
            _write_png(out / "images" / split / f"{name}.png", img)
            _write_png(out / "masks" / split / f"{name}.png", mask)
        elif task == "detect":
            _write_png(out / "images" / split / f"{name}.png", img)
            labels = out / "labels" / split / f"{name}.txt"
            labels.parent.mkdir(parents=True, exist_ok=True)
            labels.write_text("".join(r + "\n" for r in _yolo_rows(defects, img.shape[:2])), encoding="utf-8")
        else:
            raise ValueError(f"unknown task {task!r}")
    if task == "detect":
        (out / "data.yaml").write_text(yaml.safe_dump({"names": list(KINDS), "nc": len(KINDS)}), encoding="utf-8")
    return {"task": task, "dir": str(out), "split": split, "seed": seed, **counts}
