"""`plantsight train`: AdamW with warm-up and cosine decay, validation each epoch, the best checkpoint kept.

The recipe, the same for every task, is made for a plant's few hundred pictures on a CPU:

- AdamW (weight decay 0.05, none on BatchNorm and biases), a linear warm-up over the first epoch, then
  cosine decay to zero by the last step;
- classify: label smoothing 0.1 and class weights (inverse frequency), so that a rare class counts;
- augmentation that suits plant pictures (`augment.py`);
- an average of the weights over the last two epochs' steps (`WeightAverage`) is what is validated and kept;
- validation loss every epoch: the checkpoint with the lowest one is kept, and training stops after
  `patience` epochs without a lower one. A dataset without a ``val`` split has a stratified 20 % of its
  ``train`` split held out, and says so;
- a check of the first batch's loss against the loss of an uninformed network (`expected_initial_loss`),
  and warnings when the data is too small or too unbalanced for the network.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from shared.data.datasets import DataError, has_split, stratified_holdout
from shared.models import ModelError, Predictor, build, default_meta, dice_bce_loss, save_model_dir, yolo_loss
from shared.models.detect_af import ARCH as ANCHOR_FREE
from shared.models.detect_af import PRIOR_LOGIT, anchor_free_loss
from shared.models.modeldir import load_model_dir
from shared.models.registry import get
from shared.models.segment import PRIOR_LOGIT as SEGMENT_PRIOR_LOGIT
from shared.names import TASKS

from . import anomaly, plots
from .augment import PreparedDataset, collate, network_input
from .evaluate import MAIN_METRIC, _load_split, evaluate_dataset, jsonable, resolve_device

__all__ = ["train", "DEFAULTS", "TRANSFER_ARCHS", "compute_loss", "train_step", "seed_everything",
           "uninformed_output", "first_batch_loss", "data_warnings"]

# Sized for a few hundred pictures on two CPU cores; a GPU run may raise epochs/batch.
# `n`: the synthetic images bench/quality.py writes for training (split 80/20 into train/val).
# classify: small_resnet learns a plant's few hundred pictures where simple_cnn (51 M weights, nearly all
# in one dense layer) memorises them; docs/models.md has the measurements behind the choice.
# detect: the anchor-free multi-scale detector (shared/models/detect_af.py) — SimpleYOLO sees one
# object per 32-px cell and misses hot spots on equipment; `--arch simple_yolo` still trains it.
DEFAULTS = {
    "classify": {"arch": "small_resnet", "epochs": 100, "batch_size": 8, "lr": 3e-3, "n": 500},
    "detect": {"arch": "anchor_free", "epochs": 10, "batch_size": 8, "lr": 2e-3, "n": 400},
    "segment": {"arch": "unet_small", "epochs": 10, "batch_size": 8, "lr": 1e-3, "n": 400},
    "thermal": {"arch": "thermal_cnn", "epochs": 10, "batch_size": 16, "lr": 1e-3, "n": 500},
}
# Builder options used on CPU unless given: the chapter's SimpleYOLO at half width trains in a CPU's time.
CPU_OPTIONS = {"simple_yolo": {"width": 0.5}}
TRANSFER_ARCHS = ("resnet18", "resnet50", "efficientnet_b0")
CURVES = "training_curves.png"
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
VAL_FRACTION = 0.2  # held out of train when a dataset has no val split
# Epochs without a lower validation loss before training stops. Ten, not fewer: on a few hundred pictures a
# classifier's validation loss wanders for a while and drops late, as the learning rate decays.
PATIENCE = 10
EMA_EPOCHS = 2  # the weight average's horizon (WeightAverage)
# A first loss further than this from an uninformed network's is a warning: inputs not normalised as the
# network expects, or an initialisation that starts with confident wrong answers.
INITIAL_LOSS_TOLERANCE = 0.25
# Data checks: fewer pictures than this per class (or with and without defects), a largest-to-smallest
# class ratio above MAX_IMBALANCE, or more weights per training picture than MAX_WEIGHTS_PER_PICTURE
# (training from scratch) is a warning.
MIN_PER_CLASS = 20
MAX_IMBALANCE = 4.0
MAX_WEIGHTS_PER_PICTURE = 50_000


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_loss(task: str, out: torch.Tensor, target, *, boxes: int = 2, arch: str | None = None,
                 input_size: tuple[int, int] | None = None, class_weight: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """The task's training loss, in float32 whatever autocast produced.

    classify: cross-entropy, optionally with per-class weights and label smoothing.
    detect: `arch` picks the loss — the anchor-free detector's FCOS loss (which needs the network's
    `input_size`, default 448×448) or else SimpleYOLO's YOLO loss.
    """
    out = out.float()
    if task == "classify":
        return F.cross_entropy(out, target, weight=class_weight, label_smoothing=label_smoothing)
    if task == "detect":
        if arch == ANCHOR_FREE:
            return anchor_free_loss(out, target, tuple(input_size) if input_size else (448, 448))
        return yolo_loss(out, target, boxes=boxes)
    if task == "segment":
        return dice_bce_loss(out, target)
    return F.mse_loss(out, target)  # thermal, in the network's normalised kelvin units


def _to(target, device):
    return [t.to(device) for t in target] if isinstance(target, list) else target.to(device)


def _loss_options(predictor: Predictor, inp: torch.Tensor, loss_kw: dict | None) -> dict:
    return {"boxes": int(predictor.meta.options.get("boxes", 2)), "arch": predictor.arch,
            "input_size": tuple(inp.shape[-2:]), **(loss_kw or {})}


def train_step(model: nn.Module, predictor: Predictor, opt, x, target, *, scaler=None, amp: bool = False,
               loss_kw: dict | None = None) -> float:
    """One optimisation step on a prepared batch; returns the loss before the step."""
    task, dev = predictor.task, predictor.device
    inp, tgt = network_input(predictor, x), _to(target, dev)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
        out = model(inp)
    loss = compute_loss(task, out, tgt, **_loss_options(predictor, inp, loss_kw))
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


def uninformed_output(task: str, out: torch.Tensor, inp: torch.Tensor, arch: str | None) -> torch.Tensor:
    """What a network that has learnt nothing yet should answer, shaped like ``out``.

    classify: equal odds for every class (its loss is ln(classes)); segment: the defect prior everywhere; detect: the
    anchor-free head's prior (background at 1 %, every box one stride); thermal: ThermalCNN's designed
    start, the input's own max/avg/min.
    """
    if task == "thermal":
        return torch.stack([inp.amax((1, 2, 3)), inp.mean((1, 2, 3)), inp.amin((1, 2, 3))], 1)
    base = torch.zeros_like(out, dtype=torch.float32)
    if task == "detect" and arch == ANCHOR_FREE:
        base[..., 5:] = PRIOR_LOGIT
    elif task == "segment":
        base.fill_(SEGMENT_PRIOR_LOGIT)
    return base


@torch.no_grad()
def first_batch_loss(model: nn.Module, predictor: Predictor, x, target, loss_kw: dict | None = None
                     ) -> tuple[float, float]:
    """(loss, expected): the network's loss on a batch before training, in training mode, and the loss of
    `uninformed_output` on it. The model's state (BatchNorm statistics included) is left as it was."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    try:
        inp, tgt = network_input(predictor, x), _to(target, predictor.device)
        out = model(inp)
        opts = _loss_options(predictor, inp, loss_kw)
        loss = compute_loss(predictor.task, out, tgt, **opts)
        expected = compute_loss(predictor.task, uninformed_output(predictor.task, out, inp, predictor.arch), tgt,
                                **opts)
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
    return float(loss), float(expected)


@torch.no_grad()
def validation_loss(model: nn.Module, predictor: Predictor, loader, loss_kw: dict | None = None) -> float:
    """The training loss over the validation split, in evaluation mode (no augmentation)."""
    model.eval()
    total, seen = 0.0, 0
    for x, target in loader:
        inp = network_input(predictor, x)
        out = model(inp)
        loss = compute_loss(predictor.task, out, _to(target, predictor.device),
                            **_loss_options(predictor, inp, loss_kw))
        total, seen = total + float(loss) * len(x), seen + len(x)
    return total / max(seen, 1)


def data_warnings(task: str, arch: str, ds, params: int, *, pretrained: bool) -> list[str]:
    """What makes the training split too small or too unbalanced for the network, as sentences."""
    out = []
    n = len(ds)
    if task == "detect":
        counts = Counter(c for i in range(n) for c in ds.box_classes(i))
        names = {i: name for i, name in enumerate(ds.classes)}
        what = "boxes"
    else:
        counts = Counter(ds.stratum(i) for i in range(n))
        names = ({i: name for i, name in enumerate(ds.classes)} if task == "classify"
                 else {0: "without a defect", 1: "with a defect"})
        what = "pictures"
    if task != "thermal":
        for i in sorted(names):
            if counts.get(i, 0) < MIN_PER_CLASS:
                out.append(f"{names[i]}: {counts.get(i, 0)} {what} in the training split; {MIN_PER_CLASS} or more "
                           f"are needed to learn it")
        present = [c for c in counts.values() if c > 0]
        if len(present) > 1 and max(present) / min(present) > MAX_IMBALANCE:
            desc = ", ".join(f"{names.get(i, i)} {counts.get(i, 0)}" for i in sorted(names))
            out.append(f"unbalanced training split ({desc}: {max(present) / min(present):.0f} to 1)"
                       + ("; the loss weighs each class by its rarity, but more of the rare ones would help"
                          if task == "classify" else "; collect more of the rare ones"))
    if not pretrained and n and params / n > MAX_WEIGHTS_PER_PICTURE:
        out.append(f"{arch} has {params / 1e6:.1f} M weights for {n} training pictures "
                   f"({params / n / 1e3:.0f} k per picture): from scratch it will memorise them"
                   + (f"; the default {DEFAULTS[task]['arch']} suits a few hundred pictures"
                      if arch != DEFAULTS[task]["arch"] else "; use more pictures or a smaller network"))
    return out


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


class WeightAverage:
    """An exponential moving average of a network's weights and BatchNorm statistics, over about
    ``EMA_EPOCHS`` epochs of steps (sooner at the start, so the random initial weights fade out fast).

    Validation, the kept checkpoint and the deployed model use the average: on a few hundred pictures
    single steps move a network a lot, and the average ends in a flatter place, with a validation curve
    that does not swing from epoch to epoch.
    """

    def __init__(self, model: nn.Module, steps_per_epoch: int):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = 1.0 - 1.0 / max(1, steps_per_epoch * EMA_EPOCHS)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(current[k].detach(), alpha=1 - d)
            else:
                v.copy_(current[k])


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW; BatchNorm weights and biases (one-dimensional tensors) are not decayed, as in the ResNet recipes."""
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (keep if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": keep, "weight_decay": 0.0}],
                             lr=lr)


def lr_factor(step: int, total: int, warmup: int, scheduler: str = "cosine") -> float:
    """The learning rate's share at optimisation step ``step`` of ``total``: linear warm-up from 1/warmup
    over ``warmup`` steps, then cosine decay to 0 (``cosine``) or ×0.1 at one and two thirds (``step``)."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    if scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return 0.1 ** min(2, int(done * 3))


def _splits(task: str, data_dir, seed: int, progress: bool):
    """(train, val, how val was made)."""
    train_ds = _load_split(task, data_dir, "train")
    if has_split(task, data_dir, "val"):
        val_ds, how = _load_split(task, data_dir, "val"), "val split"
    else:
        train_ds, val_ds = stratified_holdout(train_ds, VAL_FRACTION, seed)
        how = f"{VAL_FRACTION:.0%} of train held out, stratified"
        if progress:
            print(f"no val split in {data_dir}: holding out a stratified {VAL_FRACTION:.0%} of train "
                  f"({len(val_ds)} of {len(train_ds) + len(val_ds)}) for validation", file=sys.stderr)
    if list(train_ds.classes) != list(val_ds.classes):
        raise DataError(f"{data_dir}: train classes {list(train_ds.classes)} differ from val classes "
                        f"{list(val_ds.classes)}")
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise DataError(f"{data_dir}: the train and val splits both need images "
                        f"(found {len(train_ds)} and {len(val_ds)})")
    return train_ds, val_ds, how


def _good_only_splits(data_dir, seed: int, progress: bool):
    """(train, val, held-out good pictures, how val was made) for good-only training: a share of the good
    pictures held out, validated with anomalies pasted in at fixed draws."""
    good = anomaly.good_pictures(data_dir)
    train_good, val_good = stratified_holdout(good, VAL_FRACTION, seed)
    if len(train_good) == 0 or len(val_good) == 0:
        raise DataError(f"{data_dir}: {len(good)} good pictures are too few to hold some out for the threshold")
    how = f"{VAL_FRACTION:.0%} of the good pictures held out, with anomalies pasted in"
    if progress:
        print(f"good-only training on {len(train_good)} good pictures of {data_dir}; {len(val_good)} held out for "
              f"validation and the anomaly threshold", file=sys.stderr)
    return (anomaly.SyntheticAnomalies(train_good, seed), anomaly.SyntheticAnomalies(val_good, seed + 1),
            val_good, how)


def _set_good_threshold(out: Path, good, dev: torch.device, batch_size: int) -> float:
    """Store in the saved model the mask threshold that held-out good pictures stay under; returns it."""
    model, meta = load_model_dir(out, dev)
    _, samples = evaluate_dataset(Predictor(model, meta, dev), good, batch_size=batch_size, keep=len(good))
    threshold = anomaly.good_threshold([s["score"] for s in samples])
    meta.thresholds = {**meta.thresholds, "mask": round(threshold, 6)}
    meta.metrics = {**meta.metrics, "training": anomaly.GOOD_ONLY,
                    "threshold_from": f"{anomaly.THRESHOLD_QUANTILE:.1%} of {len(good)} held-out good pictures' scores"}
    save_model_dir(out, model, meta)
    return threshold


def _class_weight(task: str, ds, dev: torch.device) -> torch.Tensor | None:
    """Inverse class frequency, scaled so that a balanced split has every weight 1."""
    if task != "classify":
        return None
    counts = Counter(ds.stratum(i) for i in range(len(ds)))
    k = len(ds.classes)
    return torch.tensor([len(ds) / (k * counts[c]) if counts.get(c) else 0.0 for c in range(k)],
                        dtype=torch.float32, device=dev)


def train(task: str, data_dir, out_dir, *, arch: str | None = None, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, device: str = "auto", seed: int = 0,
          freeze: bool | None = None, pretrained=None, patience: int | None = PATIENCE, scheduler: str = "cosine",
          progress: bool = True, options: dict | None = None, good_only: bool = False) -> dict:
    """Train `task` on DATA_DIR's train split, validate on its val split (or a stratified share of train),
    keep the checkpoint with the lowest validation loss in OUT_DIR.

    `good_only` (segment): learn from good pictures alone, with anomalies pasted in (shared/training/anomaly.py);
    DATA_DIR is MVTec AD's folder (its train/good) or a folder of good pictures, and the saved model's mask
    threshold is set from held-out good pictures.

    Returns that epoch's validation metrics with model_dir, version, best_epoch, epochs_run, history, curves,
    initial_loss and expected_initial_loss, validation (how the val split was made), warnings and seconds.
    """
    started = time.monotonic()
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

    if good_only:
        if task != "segment":
            raise ValueError(f"good-only training is for the segment task (an anomaly map), not {task}")
        train_ds, val_ds, held_good, validation = _good_only_splits(data_dir, seed, progress)
    else:
        train_ds, val_ds, validation = _splits(task, data_dir, seed, progress)
    model, meta = _build(task, arch, list(train_ds.classes), dev, freeze, pretrained, options)
    predictor = Predictor(model, meta, dev)  # its normalisation, and the validation path
    size = tuple(meta.input_size)
    params = sum(p.numel() for p in model.parameters())
    if good_only:
        warnings = [w for w in data_warnings(task, arch, train_ds.good, params, pretrained=pretrained is not None)
                    if "with a defect" not in w]
    else:
        warnings = data_warnings(task, arch, train_ds, params, pretrained=pretrained is not None)

    tr = PreparedDataset(train_ds, task, size, meta.normalisation, train=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    workers = min(4, torch.get_num_threads()) if dev.type == "cuda" else 0
    loader = DataLoader(tr, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate,
                        num_workers=workers, pin_memory=dev.type == "cuda")
    val_loader = DataLoader(PreparedDataset(val_ds, task, size, meta.normalisation, train=False, seed=seed),
                            batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers)
    loss_kw = {"class_weight": _class_weight(task, train_ds, dev),
               "label_smoothing": LABEL_SMOOTHING} if task == "classify" else {}
    opt = _optimizer(model, lr)
    steps = epochs * len(loader)
    warmup = max(1, min(len(loader), steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, warmup, scheduler))
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    average = WeightAverage(model, len(loader))
    averaged = Predictor(average.model, meta, dev)  # validates, and is saved

    tr.epoch = 1
    x0, y0 = collate([tr[i] for i in range(min(batch_size, len(tr)))])
    initial, expected = first_batch_loss(model, predictor, x0, y0, loss_kw)
    if expected > 0 and abs(initial / expected - 1) > INITIAL_LOSS_TOLERANCE:
        warnings.append(f"the training loss starts at {initial:.3g}, not near {expected:.3g} (an uninformed "
                        f"{task} network's): check the normalisation and the network's last layer")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    key = MAIN_METRIC[task][0]
    out = Path(out_dir)
    history, best, best_metrics, best_epoch, stale = [], math.inf, {}, 0, 0
    for epoch in range(1, epochs + 1):
        t0 = time.monotonic()
        tr.epoch = epoch
        if good_only:
            train_ds.epoch = epoch  # fresh anomalies every epoch
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"{task} epoch {epoch}/{epochs}", unit="batch", file=sys.stderr,
                   disable=not progress, leave=True)
        for x, target in bar:
            cur_lr = opt.param_groups[0]["lr"]
            loss = train_step(model, predictor, opt, x, target, scaler=scaler, amp=amp, loss_kw=loss_kw)
            sched.step()
            average.update(model)
            total, seen = total + loss * len(x), seen + len(x)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        bar.close()
        val_loss = validation_loss(average.model, averaged, val_loader, loss_kw)
        metrics, _ = evaluate_dataset(averaged, val_ds, batch_size=batch_size, progress=progress,
                                      desc=f"{task} val {epoch}")
        metrics.pop("pr", None)
        metrics.pop("scores", None)
        value = metrics.get(key)
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss, "lr": cur_lr,
                        key: value, "seconds": round(time.monotonic() - t0, 2)})
        if progress:
            print(f"epoch {epoch}: loss {total / max(seen, 1):.4f}, val loss {val_loss:.4f}, val {key} {value}",
                  file=sys.stderr)
        if val_loss < best or not best_metrics:
            best, best_metrics, best_epoch, stale = val_loss, metrics, epoch, 0
            meta.metrics = jsonable({**metrics, "val_loss": val_loss, "epoch": epoch, "split": "val",
                                     "validation": validation})
            if task == "detect" and metrics.get("best_conf") is not None:
                # keep what the validation split says a deployed detector should keep (F1 at IoU 0.5)
                meta.thresholds = {**meta.thresholds, "conf": round(min(max(metrics["best_conf"], 0.05), 0.95), 3)}
            save_model_dir(out, average.model, meta)
        else:
            stale += 1
            if patience and stale >= patience and epoch >= epochs // 2:
                if progress:
                    print(f"early stop: no lower validation loss for {patience} epochs", file=sys.stderr)
                break
    if good_only:
        best_metrics["threshold"] = _set_good_threshold(out, held_good, dev, batch_size)
    curves = plots.training_curves(history, key, out / CURVES)
    return jsonable({"task": task, "arch": arch, "model_dir": str(out), "version": meta.version,
                     "best_epoch": best_epoch, "epochs_run": len(history), **best_metrics, "val_loss": best,
                     "history": history, "curves": str(curves), "initial_loss": initial,
                     "expected_initial_loss": expected, "validation": validation, "warnings": warnings,
                     "seconds": round(time.monotonic() - started, 1)})
