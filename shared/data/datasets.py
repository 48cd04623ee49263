"""Loaders for the dataset formats plants already have.

=========  ================  ====================================================================
task       layout            files
=========  ================  ====================================================================
classify   ``imagefolder``   ``DIR/<split>/<class>/*.jpg``
detect     ``yolo``          ``DIR/images/<split>/*.jpg``, ``DIR/labels/<split>/<stem>.txt``, ``data.yaml``
segment    ``images_masks``  ``DIR/images/<split>/*.png``, ``DIR/masks/<split>/<stem>.png``
segment    ``mvtec``         ``DIR/train/good``, ``DIR/test/<defect>``, ``DIR/ground_truth/<defect>/<id>_mask.png``
thermal    ``thermal``       ``DIR/<split>/*.npy`` (kelvin) or ``*.png`` (16-bit centikelvin)
=========  ================  ====================================================================

``load_split(task, root, split)`` checks the cheap things at once (folders, label files, masks
present, thermal file headers) so that a bad dataset fails before training starts; pixels are
read lazily in ``__getitem__``. Every error is a :class:`DataError` naming the file or folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml

from shared.names import TASKS

__all__ = ["DataError", "TaskDataset", "load_split", "has_split", "stratified_holdout", "detect_layout", "read_rgb",
           "read_mask", "read_thermal", "IMAGE_EXTS", "SPLITS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
COORD_TOL = 1e-3
MVTEC_VAL_EVERY = 5  # every 5th defective (and good) image by sorted path goes to val


class DataError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it and what is wrong."""


# --- reading single files -------------------------------------------------------------------
def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(str(path), np.uint8)  # imdecode of the bytes copes with any path encoding
    except OSError as e:
        raise DataError(f"{path}: cannot read it: {e.strerror or e}") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """An RGB ``uint8`` H×W×3 image (grayscale and BGRA files are converted)."""
    img = cv2.imdecode(_read_bytes(Path(path)), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A ``uint8`` H×W mask, 1 where the file is nonzero (in any channel); checked against ``shape``."""
    m = cv2.imdecode(_read_bytes(Path(path)), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise DataError(f"{path}: not a readable mask image")
    if m.ndim == 3:
        m = m.any(axis=2)
    m = (m != 0).astype(np.uint8)
    if shape is not None and m.shape != tuple(shape):
        raise DataError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return m


def _png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR, without decoding the pixels."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as e:
        raise DataError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file")
    return head[24], head[25]


def _check_thermal(path: Path) -> None:
    """Reject a thermal file whose header shows it cannot be a radiometric map."""
    if path.suffix.lower() == ".png":
        depth, colour = _png_header(path)
        if depth != 16 or colour != 0:
            kind = {0: "grayscale", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}.get(colour, f"type {colour}")
            raise DataError(f"{path}: a thermal PNG must be 16-bit single-channel centikelvin; "
                            f"this one is {depth}-bit {kind}")
        return
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy array: {e}") from None
    shape, dtype = arr.shape, arr.dtype
    del arr
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 1)):
        raise DataError(f"{path}: a thermal map must be H×W kelvin, this array has shape {tuple(shape)}")
    if dtype.kind not in "fiu":
        raise DataError(f"{path}: a thermal map must hold numbers (kelvin), not {dtype}")


def read_thermal(path: str | Path) -> np.ndarray:
    """A ``uint16`` H×W×1 centikelvin frame from a kelvin ``.npy`` or a 16-bit centikelvin PNG."""
    path = Path(path)
    _check_thermal(path)
    if path.suffix.lower() == ".png":
        img = cv2.imdecode(_read_bytes(path), cv2.IMREAD_UNCHANGED)
        if img is None or img.dtype != np.uint16 or img.ndim != 2:
            raise DataError(f"{path}: not a readable 16-bit single-channel PNG")
        return img[:, :, None]
    k = np.load(path, allow_pickle=False)
    k = (k[:, :, 0] if k.ndim == 3 else k).astype(np.float64)
    if k.size == 0:
        raise DataError(f"{path}: the thermal map is empty (shape {k.shape})")
    if not np.isfinite(k).all() or k.min() < 0 or k.max() > 655.35:
        raise DataError(f"{path}: kelvin values must be finite and within 0..655.35 to fit centikelvin uint16 "
                        f"(found {np.nanmin(k):g}..{np.nanmax(k):g})")
    return np.rint(k * 100.0).astype(np.uint16)[:, :, None]


def thermal_stats(img: np.ndarray) -> np.ndarray:
    """``float32 [max, mean, min]`` kelvin of a centikelvin frame: exact at the frame's resolution."""
    plane = img[..., 0] if img.ndim == 3 else img
    return np.array([int(plane.max()) / 100.0, float(plane.mean(dtype=np.float64)) / 100.0,
                     int(plane.min()) / 100.0], np.float32)


# --- folders ---------------------------------------------------------------------------------
def _images(folder: Path, exts: tuple[str, ...] = IMAGE_EXTS) -> list[Path]:
    """Files under ``folder`` (recursively) with one of ``exts``, sorted; hidden files skipped."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _split_dir(folder: Path, split: str) -> Path:
    if not folder.is_dir():
        have = [s for s in SPLITS if (folder.parent / s).is_dir()]
        raise DataError(f"{folder}: split {split!r} not found (splits here: {', '.join(have) or 'none'})")
    return folder


def _nonempty(files: list, folder: Path, what: str = "images") -> list:
    if not files:
        raise DataError(f"{folder}: no {what} in this split")
    return files


class TaskDataset(torch.utils.data.Dataset):
    """One split of a dataset: ``(image, target)`` per item, read from disk on access."""

    def __init__(self, task: str, classes: list[str], files: list[Path], targets: list[Any], *,
                 root: Path, split: str, layout: str):
        self.task, self.classes, self.files = task, list(classes), list(files)
        # per item: classify int, detect float32 [K,5], segment mask Path or None (= no defect), thermal None
        self._targets = list(targets)
        self.root, self.split, self.layout = Path(root), split, layout

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"TaskDataset(task={self.task!r}, layout={self.layout!r}, split={self.split!r}, "
                f"n={len(self)}, root='{self.root}')")

    def subset(self, indices, split: str) -> "TaskDataset":
        """The items at ``indices`` as a dataset of its own, named ``split``."""
        return TaskDataset(self.task, self.classes, [self.files[i] for i in indices],
                           [self._targets[i] for i in indices], root=self.root, split=split, layout=self.layout)

    def box_classes(self, i: int) -> list[int]:
        """detect: the class index of every box of item ``i`` (read from its label file when loaded)."""
        return [int(c) for c in self._targets[i][:, 0]]

    def stratum(self, i: int) -> int:
        """What a stratified split keeps in proportion: the class of a picture; for detect and segment
        whether it shows anything (1) or not (0); 0 for thermal maps."""
        spec = self._targets[i]
        if self.task == "classify":
            return int(spec)
        if self.task == "detect":
            return int(len(spec) > 0)
        if self.task == "segment":
            return int(spec is not None and bool(read_mask(spec).any()))
        return 0

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any]:
        path, spec = self.files[i], self._targets[i]
        if self.task == "thermal":
            img = read_thermal(path)
            return img, thermal_stats(img)
        img = read_rgb(path)
        if self.task == "classify":
            return img, int(spec)
        if self.task == "detect":
            return img, spec.copy()
        if spec is None:
            return img, np.zeros(img.shape[:2], np.uint8)
        return img, read_mask(spec, img.shape[:2])


# --- layouts ---------------------------------------------------------------------------------
def detect_layout(task: str, root: str | Path) -> str:
    """Which layout ``root`` holds for ``task``; DataError saying what was expected if none fits."""
    root = Path(root)
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known: classify, detect, segment, thermal")
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    has_split = any((root / s).is_dir() for s in SPLITS)
    if task == "classify" and has_split:
        return "imagefolder"
    if task == "detect" and (root / "images").is_dir():
        return "yolo"
    if task == "segment":
        if (root / "images").is_dir():
            return "images_masks"
        if (root / "train" / "good").is_dir() or ((root / "test").is_dir() and (root / "ground_truth").is_dir()):
            return "mvtec"
    if task == "thermal" and has_split:
        return "thermal"
    expected = {
        "classify": "an ImageFolder: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg",
        "detect": "a YOLO dataset: DIR/images/{train,val}/*.jpg, DIR/labels/{train,val}/*.txt, DIR/data.yaml",
        "segment": "DIR/images/<split>/ with DIR/masks/<split>/, or MVTec AD: DIR/train/good, DIR/test/<defect>, "
                   "DIR/ground_truth/<defect>/<id>_mask.png",
        "thermal": "DIR/<split>/*.npy (kelvin) or DIR/<split>/*.png (16-bit centikelvin)",
    }[task]
    raise DataError(f"{root}: not a {task} dataset; expected {expected}")


def _classify(root: Path, split: str) -> TaskDataset:
    folder = _split_dir(root / split, split)
    train = root / "train"
    # Indices must mean the same classes in every split, so the train split names them.
    classes = [d.name for d in _subdirs(train if train.is_dir() else folder)]
    if not classes:
        raise DataError(f"{train if train.is_dir() else folder}: no class folders (expected <split>/<class>/*.jpg)")
    files, targets = [], []
    for d in _subdirs(folder):
        if d.name not in classes:
            raise DataError(f"{d}: class {d.name!r} is not one of the train split's classes {classes}")
        imgs = _images(d)
        if not imgs:
            raise DataError(f"{d}: empty class folder (no {'/'.join(e[1:] for e in IMAGE_EXTS)} images)")
        files += imgs
        targets += [classes.index(d.name)] * len(imgs)
    _nonempty(files, folder)
    return TaskDataset("classify", classes, files, targets, root=root, split=split, layout="imagefolder")


def _yolo_names(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: missing; a YOLO dataset needs data.yaml with the class names (names: [...])")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: not readable YAML: {e}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DataError(f"{path}: names keys must be the class indices 0..{len(keys) - 1}, not {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: 'names' must be a non-empty list (or a dict index -> name)")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DataError(f"{path}: nc is {nc} but names lists {len(names)} classes")
    return [str(n) for n in names]


def read_yolo_labels(path: Path, nc: int) -> np.ndarray:
    """``float32 [K,5]`` (cls, cx, cy, w, h) from a YOLO label file; a missing file holds no objects."""
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the label file: {e}") from None
    rows = []
    for ln, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}, line {ln}"
        if len(parts) != 5:
            raise DataError(f"{where}: expected 5 fields 'class cx cy w h', found {len(parts)}: {line.strip()!r}")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise DataError(f"{where}: not numbers: {line.strip()!r}") from None
        c, cx, cy, w, h = vals
        if not all(map(math.isfinite, vals)):
            raise DataError(f"{where}: not finite numbers: {line.strip()!r}")
        if c != int(c) or not 0 <= c < nc:
            raise DataError(f"{where}: class {parts[0]} is not an index 0..{nc - 1} of data.yaml's names")
        if not (-COORD_TOL <= cx <= 1 + COORD_TOL and -COORD_TOL <= cy <= 1 + COORD_TOL):
            raise DataError(f"{where}: centre ({cx:g}, {cy:g}) is outside 0..1 (coordinates must be normalised)")
        if not (0 < w <= 1 + COORD_TOL and 0 < h <= 1 + COORD_TOL):
            raise DataError(f"{where}: size {w:g}x{h:g} must be within (0, 1] (normalised, positive)")
        rows.append([c, *np.clip([cx, cy, w, h], 0.0, 1.0)])
    return np.asarray(rows, np.float32).reshape(-1, 5)


def _yolo(root: Path, split: str) -> TaskDataset:
    names = _yolo_names(root / "data.yaml")
    folder = _split_dir(root / "images" / split, split)
    files = _nonempty(_images(folder), folder)
    labels = root / "labels" / split
    # YOLO's convention: images/<split>/a/b.jpg is labelled by labels/<split>/a/b.txt
    targets = [read_yolo_labels(labels / f.relative_to(folder).with_suffix(".txt"), len(names)) for f in files]
    return TaskDataset("detect", names, files, targets, root=root, split=split, layout="yolo")


def _images_masks(root: Path, split: str) -> TaskDataset:
    folder = _split_dir(root / "images" / split, split)
    files = _nonempty(_images(folder), folder)
    masks = []
    for f in files:
        m = root / "masks" / split / f.relative_to(folder).with_suffix(".png")
        if not m.is_file():
            raise DataError(f"{f}: no mask for this image (expected {m})")
        masks.append(m)
    return TaskDataset("segment", ["defect"], files, masks, root=root, split=split, layout="images_masks")


def mvtec_items(root: Path, split: str, all_test: bool = False) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) of an MVTec AD folder's ``train``/``val``/``test`` split.

    Trained with labels, a segmenter learns from 4/5 of the defective images of ``test/`` (MVTec has no
    defective training images) and 4/5 of ``train/good``; validation is the other 1/5 of each; the test
    split is ``test/good`` and the defective images training never saw. ``all_test``: the whole of
    ``test/``, for a model trained on good pictures only (``train --good-only`` reads only ``train/good``).
    """
    test = _split_dir(root / "test", "test")
    items: list[tuple[Path, Path | None]] = []
    for d in _subdirs(test):
        for img in _images(d):
            if d.name == "good":
                items.append((img, None))
                continue
            mask = root / "ground_truth" / d.name / f"{img.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"{img}: defective test image has no mask (expected {mask})")
            items.append((img, mask))
    defective = sorted((it for it in items if it[1] is not None), key=lambda it: it[0])
    if split == "test":
        if all_test:
            return _nonempty(items, test)
        unseen = {p for i, (p, _) in enumerate(defective) if i % MVTEC_VAL_EVERY == 0}
        return _nonempty([it for it in items if it[1] is None or it[0] in unseen], test)
    # Sorted paths keep the split repeatable.
    good_dir = root / "train" / "good"
    good = [(p, None) for p in _images(good_dir)] if good_dir.is_dir() else []
    want_val = split == "val"
    picked = [it for part in (defective, good) for i, it in enumerate(part)
              if (i % MVTEC_VAL_EVERY == 0) == want_val]
    return _nonempty(picked, root, f"{split} images (defective test/ images or train/good)")


def _mvtec(root: Path, split: str, all_test: bool = False) -> TaskDataset:
    items = mvtec_items(root, split, all_test)
    return TaskDataset("segment", ["defect"], [p for p, _ in items], [m for _, m in items],
                       root=root, split=split, layout="mvtec")


def _thermal(root: Path, split: str) -> TaskDataset:
    folder = _split_dir(root / split, split)
    files = _nonempty(_images(folder, (".npy", ".png")), folder, "thermal maps (.npy or 16-bit .png)")
    for f in files:
        _check_thermal(f)
    return TaskDataset("thermal", [], files, [None] * len(files), root=root, split=split, layout="thermal")


LOADERS = {"imagefolder": _classify, "yolo": _yolo, "images_masks": _images_masks, "mvtec": _mvtec,
           "thermal": _thermal}


def has_split(task: str, root: str | Path, split: str) -> bool:
    """Whether the dataset in ``root`` holds ``split`` (an MVTec AD folder makes every split from its own)."""
    root = Path(root)
    layout = detect_layout(task, root)
    if layout == "mvtec":
        return True
    return (root / "images" / split if layout in ("yolo", "images_masks") else root / split).is_dir()


def stratified_holdout(ds: TaskDataset, fraction: float, seed: int = 0) -> tuple[TaskDataset, TaskDataset]:
    """(train, val): ``fraction`` of each stratum of ``ds`` (at least one picture of each stratum with two
    or more) held out for validation, drawn with ``seed``."""
    rng = np.random.default_rng([seed, 104729])
    strata: dict[int, list[int]] = {}
    for i in range(len(ds)):
        strata.setdefault(ds.stratum(i), []).append(i)
    val: list[int] = []
    for _, idx in sorted(strata.items()):
        k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val += rng.permutation(idx)[:max(k, 1 if len(idx) > 1 else 0)].tolist()
    held = set(val)
    return (ds.subset([i for i in range(len(ds)) if i not in held], ds.split),
            ds.subset(sorted(val), "val"))


def load_split(task: str, root: str | Path, split: str, *, good_only_model: bool = False) -> TaskDataset:
    """The ``split`` ("train", "val" or "test") of the ``task`` dataset in ``root``; DataError if unusable.
    ``good_only_model``: the split evaluates a model that saw good pictures only (an MVTec AD folder's test
    split is then the whole of ``test/``)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = Path(root)
    layout = detect_layout(task, root)
    if layout == "mvtec":
        return _mvtec(root, split, all_test=good_only_model)
    return LOADERS[layout](root, split)
