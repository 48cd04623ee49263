"""`plantsight train`: Adam + StepLR/cosine, validation each epoch through the Predictor, best checkpoint kept."""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from shared.data.datasets import DataError
from shared.models import ModelError, Predictor, build, default_meta, dice_bce_loss, save_model_dir, yolo_loss
from shared.models.detect_af import ARCH as ANCHOR_FREE
from shared.models.detect_af import anchor_free_loss
from shared.models.registry import get
from shared.names import TASKS

from . import plots
from .augment import PreparedDataset, collate, network_input
from .evaluate import MAIN_METRIC, _load_split, evaluate_dataset, jsonable, resolve_device

__all__ = ["train", "DEFAULTS", "TRANSFER_ARCHS", "compute_loss", "train_step", "seed_everything"]

# Sized for a few hundred synthetic images on two CPU cores; a GPU run may raise epochs/batch.
# `n`: the synthetic images bench/quality.py writes for training (split 80/20 into train/val).
# detect: the anchor-free multi-scale detector (shared/models/detect_af.py) — SimpleYOLO sees one
# object per 32-px cell and misses hot spots on equipment; `--arch simple_yolo` still trains it.
DEFAULTS = {
    "classify": {"arch": "simple_cnn", "epochs": 15, "batch_size": 16, "lr": 5e-4, "n": 500},
    "detect": {"arch": "anchor_free", "epochs": 10, "batch_size": 8, "lr": 2e-3, "n": 400},
    "segment": {"arch": "unet_small", "epochs": 5, "batch_size": 8, "lr": 1e-3, "n": 400},
    "thermal": {"arch": "thermal_cnn", "epochs": 10, "batch_size": 16, "lr": 1e-3, "n": 500},
}
# Builder options used on CPU unless given: the chapter's SimpleYOLO at half width trains in a CPU's time.
CPU_OPTIONS = {"simple_yolo": {"width": 0.5}}
TRANSFER_ARCHS = ("resnet18", "resnet50", "efficientnet_b0")
CURVES = "training_curves.png"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_loss(task: str, out: torch.Tensor, target, *, boxes: int = 2, arch: str | None = None,
                 input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The task's training loss, in float32 whatever autocast produced.

    detect: `arch` picks the loss — the anchor-free detector's FCOS loss (which needs the network's
    `input_size`, default 448×448) or else SimpleYOLO's YOLO loss.
    """
    out = out.float()
    if task == "classify":
        return F.cross_entropy(out, target)
    if task == "detect":
        if arch == ANCHOR_FREE:
            return anchor_free_loss(out, target, tuple(input_size) if input_size else (448, 448))
        return yolo_loss(out, target, boxes=boxes)
    if task == "segment":
        return dice_bce_loss(out, target)
    return F.mse_loss(out, target)  # thermal, in the network's normalised kelvin units


def _to(target, device):
    return [t.to(device) for t in target] if isinstance(target, list) else target.to(device)


def train_step(model: nn.Module, predictor: Predictor, opt, x, target, *, scaler=None, amp: bool = False) -> float:
    """One optimisation step on a prepared batch; returns the loss before the step."""
    task, dev = predictor.task, predictor.device
    inp, tgt = network_input(predictor, x), _to(target, dev)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
        out = model(inp)
    loss = compute_loss(task, out, tgt, boxes=int(predictor.meta.options.get("boxes", 2)), arch=predictor.arch,
                        input_size=tuple(inp.shape[-2:]))
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{task} loss became {loss.item()}: lower --lr")
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return float(loss.detach())


# Ties on the main metric (a small validation set plateaus) are broken by a finer one.
TIEBREAK = {"classify": "macro_f1", "detect": "map50_95", "segment": "iou", "thermal": "mae_max_k"}


def _score(metrics: dict, task: str) -> tuple | None:
    """The run's ranking key, larger = better; None when the main metric is missing or NaN."""
    key, higher = MAIN_METRIC[task]
    vals = []
    for k in (key, TIEBREAK[task]):
        v = metrics.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            if k == key:
                return None
            v = float("-inf") if higher else float("inf")
        vals.append(v if higher else -v)
    return tuple(vals)


def _better(score, best) -> bool:
    if score is None:
        return best is None
    return best is None or score > best


def _build(task: str, arch: str, classes: list[str], dev: torch.device, freeze, pretrained, options):
    info = get(arch)
    if info.task != task:
        raise ModelError(f"architecture {arch!r} is a {info.task} network, not a {task} one")
    opts = dict(CPU_OPTIONS.get(arch, {}) if dev.type == "cpu" else {})
    opts.update(options or {})
    extra = {}
    if freeze is not None or pretrained is not None:
        if arch not in TRANSFER_ARCHS:
            if freeze or pretrained is not None:
                raise ModelError(f"--freeze/--pretrained apply to {', '.join(TRANSFER_ARCHS)}, not {arch!r}")
        else:
            if freeze is not None:
                opts["freeze"] = bool(freeze)
            if pretrained is not None:
                extra["pretrained"] = str(pretrained)  # not stored: model.pt holds the trained weights
    model = build(arch, num_classes=len(classes), **opts, **extra)
    meta = dataclasses.replace(default_meta(arch, classes), options=opts,
                               version=time.strftime("%Y%m%d-%H%M%S"))
    return model.to(dev), meta


def train(task: str, data_dir, out_dir, *, arch: str | None = None, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, device: str = "auto", seed: int = 0,
          freeze: bool | None = None, pretrained=None, patience: int | None = 5, scheduler: str = "cosine",
          progress: bool = True, options: dict | None = None) -> dict:
    """Train `task` on DATA_DIR's train split, validate on its val split, keep the best model in OUT_DIR.

    Returns the best validation metrics with model_dir, version, best_epoch, epochs_run, history and curves.
    """
    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if scheduler not in ("cosine", "step"):
        raise ValueError(f"scheduler must be 'cosine' or 'step', not {scheduler!r}")
    d = DEFAULTS[task]
    arch, epochs = arch or d["arch"], int(epochs or d["epochs"])
    batch_size, lr = int(batch_size or d["batch_size"]), float(lr or d["lr"])
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch size must be ≥ 1 and lr > 0")
    dev = resolve_device(device)
    seed_everything(seed)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False

    train_ds, val_ds = _load_split(task, data_dir, "train"), _load_split(task, data_dir, "val")
    if list(train_ds.classes) != list(val_ds.classes):
        raise DataError(f"{data_dir}: train classes {list(train_ds.classes)} differ from val classes "
                        f"{list(val_ds.classes)}")
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DataError(f"{data_dir}: the train and val splits both need images "
                        f"(found {len(train_ds)} and {len(val_ds)})")
    model, meta = _build(task, arch, list(train_ds.classes), dev, freeze, pretrained, options)
    predictor = Predictor(model, meta, dev)  # its normalisation, and the validation path
    size = tuple(meta.input_size)

    tr = PreparedDataset(train_ds, task, size, meta.normalisation, train=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    workers = min(4, torch.get_num_threads()) if dev.type == "cuda" else 0
    loader = DataLoader(tr, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate,
                        num_workers=workers, pin_memory=dev.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    if scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.1)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    key = MAIN_METRIC[task][0]
    out = Path(out_dir)
    history, best, best_metrics, best_epoch, stale = [], None, {}, 0, 0
    for epoch in range(1, epochs + 1):
        t0 = time.monotonic()
        tr.epoch = epoch
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"{task} epoch {epoch}/{epochs}", unit="batch", file=sys.stderr,
                   disable=not progress, leave=True)
        for x, target in bar:
            loss = train_step(model, predictor, opt, x, target, scaler=scaler, amp=amp)
            total, seen = total + loss * len(x), seen + len(x)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        cur_lr = opt.param_groups[0]["lr"]
        sched.step()
        model.eval()
        metrics, _ = evaluate_dataset(predictor, val_ds, batch_size=batch_size, progress=progress,
                                      desc=f"{task} val {epoch}")
        metrics.pop("pr", None)
        value = metrics.get(key)
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "lr": cur_lr, key: value,
                        "seconds": round(time.monotonic() - t0, 2)})
        if progress:
            print(f"epoch {epoch}: loss {total / max(seen, 1):.4f}, val {key} {value}", file=sys.stderr)
        score = _score(metrics, task)
        if _better(score, best) and (score is not None or not best_metrics):
            best, best_metrics, best_epoch, stale = score, metrics, epoch, 0
            meta.metrics = jsonable({**metrics, "epoch": epoch, "split": "val"})
            if task == "detect" and metrics.get("best_conf") is not None:
                # keep what the validation split says a deployed detector should keep (F1 at IoU 0.5)
                meta.thresholds = {**meta.thresholds, "conf": round(min(max(metrics["best_conf"], 0.05), 0.95), 3)}
            save_model_dir(out, model, meta)
        else:
            stale += 1
            # Not in the first third: a segmenter's Dice sits at 0 for a while before masks appear.
            if patience and stale >= patience and epoch >= epochs // 3:
                if progress:
                    print(f"early stop: no better val {key} for {patience} epochs", file=sys.stderr)
                break
    curves = plots.training_curves(history, key, out / CURVES)
    return jsonable({"task": task, "arch": arch, "model_dir": str(out), "version": meta.version,
                     "best_epoch": best_epoch, "epochs_run": len(history), **best_metrics,
                     "history": history, "curves": str(curves)})
