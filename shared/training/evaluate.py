"""Evaluation through the pipeline's own Predictor: `evaluate` (a model directory) and `evaluate_predictions`."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.data.datasets import DataError, load_split
from shared.models import ModelError, Predictor
from shared.names import TASKS

from . import anomaly, plots
from . import metrics as M
from .augment import prepare, unletterbox_boxes, unletterbox_mask

__all__ = ["evaluate", "evaluate_predictions", "evaluate_dataset", "resolve_device", "MAIN_METRIC", "jsonable"]

# The figure a run is judged by (and the best checkpoint chosen on); True = higher is better.
MAIN_METRIC = {"classify": ("accuracy", True), "detect": ("map50", True), "segment": ("dice", True),
               "thermal": ("mae_k", False)}  # mean of the max/avg/min MAEs: avg alone is the easy one
MAP_CONF = 0.001  # detections kept for mAP: the whole precision/recall curve, not the alerting threshold
PLOT_IMAGES = 16


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    return torch.device(device)


def _load_split(task: str, data_dir, split: str):
    return load_split(task, Path(data_dir), split)


def _xyxy(target: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Normalised [K, 5] (cls, cx, cy, w, h) → [K, 5] (x1, y1, x2, y2, cls) in pixels of an h×w image."""
    t = np.asarray(target, dtype=np.float64).reshape(-1, 5)
    h, w = shape
    cx, cy, bw, bh = t[:, 1] * w, t[:, 2] * h, t[:, 3] * w, t[:, 4] * h
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, t[:, 0]], 1)


def _batches(predictor: Predictor, ds, task: str, batch_size: int, progress: bool, desc: str):
    """(indices, images, targets, letterboxes, prepared batch) groups of same-shape prepared images."""
    size = predictor.input_size()
    group: list = []
    bar = tqdm(range(len(ds)), desc=desc, unit="img", file=sys.stderr, disable=not progress, leave=False)
    for i in bar:
        image, target = ds[i]
        prepared, box = prepare(task, image, size)
        if group and (len(group) >= batch_size or group[0][3].shape != prepared.shape
                      or group[0][3].dtype != prepared.dtype):
            yield group
            group = []
        group.append((i, image, target, prepared, box))
    if group:
        yield group


def evaluate_dataset(predictor: Predictor, ds, *, batch_size: int = 16, keep: int = 0, progress: bool = False,
                     desc: str = "eval") -> tuple[dict, list[dict]]:
    """(metrics, samples): every image of `ds` through `predictor`; the first `keep` samples kept for plotting."""
    task = predictor.task
    if task == "detect":  # the whole PR curve needs low-confidence detections too
        meta = dataclasses.replace(predictor.meta, thresholds={**predictor.meta.thresholds, "conf": MAP_CONF})
        predictor = Predictor(predictor.model, meta, predictor.device)
    y_true, y_pred, preds, gts, scores, samples, pixel_maps = [], [], [], [], [], [], []
    for group in _batches(predictor, ds, task, batch_size, progress, desc):
        batch = torch.from_numpy(np.stack([g[3] for g in group]))
        outs = predictor.predict(batch, maps=task == "segment")
        for (i, image, target, _, box), out in zip(group, outs):
            shape = image.shape[:2]
            if task == "classify":
                y_true.append(int(target))
                y_pred.append(int(out["index"]))
                pred = out
            elif task == "detect":
                dets = unletterbox_boxes(np.asarray(out["boxes"], dtype=np.float64).reshape(-1, 6), shape, box)
                preds.append(dets)
                gts.append(_xyxy(target, shape))
                pred = dets
            elif task == "segment":
                pred = unletterbox_mask(np.asarray(out["mask"], np.uint8), shape, box)
                preds.append(pred)
                gts.append(np.asarray(target))
                scores.append(float(out["prob_max"]))
                if "prob" in out:
                    pixel_maps.append(M.map_for_ranking(unletterbox_mask(out["prob"], shape, box), np.asarray(target)))
            else:
                pred = np.asarray(out["cnn"], dtype=np.float64)
                preds.append(pred)
                gts.append(np.asarray(target, dtype=np.float64))
            if len(samples) < keep:
                samples.append({"image": image, "target": target, "pred": pred, "file": str(ds.files[i]),
                                **({"score": float(out["prob_max"])} if task == "segment" else {})})
    classes = list(predictor.meta.classes)
    if task == "classify":
        m = M.classification_metrics(y_true, y_pred, len(classes))
        m["classes"] = classes
    elif task == "detect":
        m = M.detection_map(preds, gts, len(classes), class_names=classes)
    elif task == "segment":
        m = M.segmentation_metrics(preds, gts, scores, pixel_maps or None)
        # for the score plot; evaluate() takes it out of what it returns, as it does detect's PR curves
        m["scores"] = {"good": [s for s, t in zip(scores, gts) if not np.asarray(t).any()],
                       "defective": [s for s, t in zip(scores, gts) if np.asarray(t).any()]}
    else:
        m = M.thermal_mae(np.array(preds).reshape(-1, 3), np.array(gts).reshape(-1, 3))
    m["images"] = len(ds)
    return m, samples


def _check_classes(task: str, model_classes: list[str], ds, model_dir, data_dir) -> None:
    if task in ("classify", "detect") and list(ds.classes) != list(model_classes):
        raise ModelError(f"{Path(model_dir) / 'model.json'}: classes {list(model_classes)} differ from "
                         f"{list(ds.classes)} of the dataset {data_dir}")


def evaluate(task: str, model_dir, data_dir, split: str = "val", out_dir=None, device: str = "auto",
             progress: bool = True) -> dict:
    """Metrics of a model directory on a dataset split, plus plots in `out_dir` (default MODEL_DIR/eval-SPLIT)."""
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    dev = resolve_device(device)
    predictor = Predictor.from_spec(task, path=str(model_dir), device=dev)
    ds = load_split(task, Path(data_dir), split,
                    good_only_model=predictor.meta.metrics.get("training") == anomaly.GOOD_ONLY)
    _check_classes(task, predictor.meta.classes, ds, model_dir, data_dir)
    m, samples = evaluate_dataset(predictor, ds, keep=PLOT_IMAGES, progress=progress, desc=f"eval {task}")
    out = Path(out_dir) if out_dir is not None else Path(model_dir) / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    written = {"predictions": str(plots.prediction_grid(task, samples, predictor.meta, out / "predictions.png"))}
    if task == "classify":
        written["confusion_matrix"] = str(plots.confusion_matrix(m["confusion_matrix"], m["classes"],
                                                                 out / "confusion_matrix.png"))
    elif task == "detect":
        written["pr_curves"] = str(plots.pr_curves(m["pr"], out / "pr_curves.png"))
    elif task == "segment" and m["scores"]["good"] and m["scores"]["defective"]:
        written["scores"] = str(plots.image_scores(m["scores"], predictor.meta.thresholds.get("mask"),
                                                   out / "scores.png"))
    m.pop("pr", None)
    m.pop("scores", None)
    return {"task": task, "model": str(model_dir), "version": predictor.version, "data": str(data_dir),
            "split": split, **m, "plots": written}


def _read_predictions(path: Path, num_classes: int) -> np.ndarray:
    """A YOLO txt with confidence (`cls cx cy w h conf` per line, normalised) → [N, 6] rows of those numbers."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            vals = []
        if len(vals) != 6 or not all(math.isfinite(v) for v in vals):
            raise DataError(f"{path}:{n}: expected 'cls cx cy w h conf' (six numbers), got {line.strip()!r}")
        if vals[0] != int(vals[0]) or not 0 <= vals[0] < num_classes:
            raise DataError(f"{path}:{n}: class {parts[0]} is not one of 0..{num_classes - 1}")
        rows.append(vals)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


def evaluate_predictions(data_dir, predictions_dir, split: str = "val") -> dict:
    """mAP of saved detections: one `<stem>.txt` per image of the split (a missing file = no detections).

    IoU is unchanged by scaling each axis, so boxes are compared in normalised coordinates.
    """
    pdir = Path(predictions_dir)
    if not pdir.is_dir():
        raise DataError(f"{pdir}: no such directory of predictions")
    ds = _load_split("detect", data_dir, split)
    nc = len(ds.classes)
    preds, gts, found = [], [], 0
    for i, f in enumerate(ds.files):
        _, target = ds[i]
        gts.append(_xyxy(target, (1, 1)))
        p = pdir / (Path(f).stem + ".txt")
        rows = _read_predictions(p, nc) if p.is_file() else np.zeros((0, 6))
        found += p.is_file()
        d = _xyxy(rows[:, :5], (1, 1))  # x1 y1 x2 y2 cls
        preds.append(np.concatenate([d[:, :4], rows[:, 5:6], d[:, 4:5]], 1))
    m = M.detection_map(preds, gts, nc, class_names=list(ds.classes))
    m.pop("pr", None)
    return {"task": "detect", "data": str(data_dir), "predictions": os.fspath(pdir), "split": split,
            "images": len(ds), "prediction_files": found, **m}


def jsonable(obj):
    """Metrics ready for json.dumps: NaN/inf → None, numpy scalars/arrays → Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
