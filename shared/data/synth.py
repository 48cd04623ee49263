"""``plantsight synth TASK --out DIR``: a dataset of the task's synthetic scene in its training layout.

The frames come from the ``synthetic://`` cameras' scenes (classify→process, detect→equipment,
segment→surface, thermal→thermal) and are written in the layouts ``datasets.load_split`` reads:
ImageFolder, YOLO, ``images/``+``masks/`` and ``.npy`` kelvin maps, split into ``train``/``val``.
A ``synth.json`` manifest records the seed and, per file, the scene seed and frame number.

Everything is a function of ``seed``: the same seed writes identical bytes; another seed gives other
scenes (textures, layouts, hot spots) and other frames, so it makes a held-out set.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from shared.models.registry import DEFAULT_CLASSES
from shared.names import TASKS

from .datasets import DataError
from .scenes import make_scene

__all__ = ["write_dataset", "SCENE", "ANOMALY_RATE", "main"]

SCENE = {"classify": "process", "detect": "equipment", "segment": "surface", "thermal": "thermal"}
# Fraction of anomalous frames: balanced classes, plenty of defects, some hot spots, some leaks.
ANOMALY_RATE = {"classify": 0.5, "detect": 0.3, "segment": 0.6, "thermal": 0.4}
SEQ_RANGE = 1_000_000  # frames are drawn from a wide range so layouts, levels and drift all vary
IMAGES_PER_SCENE = 25  # a fresh scene seed (texture, ambient, spots) every 25 images adds variety
JPEG_QUALITY = 95
MANIFEST = "synth.json"
LAYOUT_ENTRIES = ("train", "val", "images", "labels", "masks", "data.yaml", MANIFEST)


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(seed)), int(seed < 0), *words])


def _plan(task: str, n: int, seed: int, val_fraction: float) -> tuple[list[int], list[dict], list]:
    """Scene seeds and, per image, its scene, frame number, anomaly flag and split."""
    rng = _rng(seed, TASKS.index(task))
    n_scenes = max(1, math.ceil(n / IMAGES_PER_SCENE))
    scene_seeds = [int(s) for s in rng.integers(0, 2**31, n_scenes)]
    rate = ANOMALY_RATE[task]
    scenes = [make_scene(SCENE[task], seed=s, anomaly_rate=rate) for s in scene_seeds]
    # an exact anomalous count, shuffled, so that small sets are balanced too
    flags = np.zeros(n, bool)
    flags[:round(n * rate)] = True
    rng.shuffle(flags)
    items, used = [], set()
    for i in range(n):
        k = i % n_scenes
        for _ in range(10_000):  # an episode covers ≥30% of frames: a match comes within a few draws
            seq = int(rng.integers(0, SEQ_RANGE))
            if (k, seq) not in used and scenes[k].anomalous(seq) == bool(flags[i]):
                break
        used.add((k, seq))
        items.append({"index": i, "scene": k, "seq": seq, "anomaly": bool(flags[i]), "split": "train"})
    # stratified split: both splits get normal and anomalous frames in the dataset's proportion
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    anom = [i for i in range(n) if flags[i]]
    norm = [i for i in range(n) if not flags[i]]
    va = min(len(anom), round(n_val * len(anom) / n) if n else 0)
    if n_val >= 2 and len(anom) >= 2 and len(norm) >= 2:
        va = min(max(va, 1), n_val - 1)
    vn = min(len(norm), n_val - va)
    va = min(len(anom), n_val - vn)
    for group, count in ((anom, va), (norm, vn)):
        for i in rng.permutation(group)[:count] if count else []:
            items[int(i)]["split"] = "val"
    return scene_seeds, items, scenes


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes()


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _write_classify(out: Path, name: str, split: str, img: np.ndarray, truth: dict) -> list[Path]:
    path = out / split / truth["label"] / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg(img))
    return [path]


def _write_detect(out: Path, name: str, split: str, img: np.ndarray, truth: dict) -> list[Path]:
    h, w = img.shape[:2]
    # x2/y2 are inclusive pixel corners: a box spans x1..x2+1
    rows = [f"{c} {(x1 + x2 + 1) / 2 / w:.6f} {(y1 + y2 + 1) / 2 / h:.6f} {(x2 - x1 + 1) / w:.6f} "
            f"{(y2 - y1 + 1) / h:.6f}" for x1, y1, x2, y2, c in truth["boxes"]]
    ipath, lpath = out / "images" / split / f"{name}.jpg", out / "labels" / split / f"{name}.txt"
    ipath.write_bytes(_jpeg(img))
    lpath.write_text("".join(r + "\n" for r in rows), encoding="utf-8")  # empty file: no objects
    return [ipath, lpath]


def _write_segment(out: Path, name: str, split: str, img: np.ndarray, truth: dict) -> list[Path]:
    ipath, mpath = out / "images" / split / f"{name}.jpg", out / "masks" / split / f"{name}.png"
    ipath.write_bytes(_jpeg(img))
    mpath.write_bytes(_png(truth["mask"].astype(np.uint8) * 255))
    return [ipath, mpath]


def _write_thermal(out: Path, name: str, split: str, img: np.ndarray, truth: dict) -> list[Path]:
    path = out / split / f"{name}.npy"
    with open(path, "wb") as f:
        np.save(f, (img[:, :, 0] / 100.0).astype(np.float32), allow_pickle=False)
    return [path]


WRITERS = {"classify": _write_classify, "detect": _write_detect, "segment": _write_segment,
           "thermal": _write_thermal}
SPLIT_DIRS = {"classify": (), "detect": ("images/{}", "labels/{}"), "segment": ("images/{}", "masks/{}"),
              "thermal": ("{}",)}


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready; a previous synth dataset there is replaced, anything else is left alone."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise DataError(f"{out}: folder is not empty and holds no {MANIFEST}; "
                            f"write a synthetic dataset to an empty or new folder")
        # Stale files of a bigger earlier dataset would otherwise join this one.
        for name in LAYOUT_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_dataset(task: str, out: str | Path, n: int = 500, seed: int = 0, val_fraction: float = 0.2,
                  progress: bool = True) -> dict:
    """Write ``n`` synthetic images of ``task`` to ``out``; returns ``{task, out, train, val, classes}``."""
    if task not in SCENE:
        raise DataError(f"unknown task {task!r}; known: {', '.join(SCENE)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"synth {task}: n must be a whole number >= 1, not {n!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"synth {task}: val_fraction must be within [0, 1), not {val_fraction!r}")
    out = Path(out)
    scene_seeds, items, scenes = _plan(task, n, seed, val_fraction)
    if task == "detect" and list(scenes[0].classes) != DEFAULT_CLASSES["detect"]:
        raise RuntimeError(f"equipment scene classes {scenes[0].classes} differ from {DEFAULT_CLASSES['detect']}")
    classes = sorted(scenes[0].classes) if task == "classify" else list(DEFAULT_CLASSES[task])
    _prepare_out(out)
    manifest = {"task": task, "scene": SCENE[task], "seed": seed, "n": n, "val_fraction": val_fraction,
                "anomaly_rate": ANOMALY_RATE[task], "scene_seeds": scene_seeds, "classes": classes,
                "complete": False, "items": items}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if task == "detect":
        names = "\n".join(f"  - {c}" for c in classes)
        (out / "data.yaml").write_text(f"train: images/train\nval: images/val\nnc: {len(classes)}\nnames:\n{names}\n",
                                       encoding="utf-8")
    for split in ("train", "val"):
        for pattern in SPLIT_DIRS[task]:
            (out / pattern.format(split)).mkdir(parents=True, exist_ok=True)
    write = WRITERS[task]
    for it in tqdm(items, desc=f"synth {task}", unit="img", disable=not progress, file=sys.stderr):
        img, truth = scenes[it["scene"]].render(it["seq"])
        files = write(out, f"{it['index']:05d}", it["split"], img, truth)
        it["file"] = files[0].relative_to(out).as_posix()
    manifest["complete"] = True
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    n_val = sum(it["split"] == "val" for it in items)
    return {"task": task, "out": str(out), "train": n - n_val, "val": n_val, "classes": classes}


def main(argv: list[str] | None = None) -> int:
    """``python -m shared.data.synth TASK --out DIR [--n N] [--seed S]`` (same as ``plantsight synth``)."""
    p = argparse.ArgumentParser(prog="python -m shared.data.synth", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=list(SCENE))
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    a = p.parse_args(argv)
    try:
        info = write_dataset(a.task, a.out, n=a.n, seed=a.seed, val_fraction=a.val_fraction)
    except DataError as e:
        print(f"synth: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
