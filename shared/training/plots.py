"""Training and evaluation plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import auroc

__all__ = ["training_curves", "confusion_matrix", "pr_curves", "image_scores", "prediction_grid"]


def _plt():
    # matplotlib loads when a plot is drawn, with the file backend chosen before pyplot
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path


def training_curves(history: list[dict], metric: str, path) -> Path:
    """Training and validation loss, and the main validation metric, per epoch."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    if any("val_loss" in h for h in history):
        ax[0].plot(epochs, [h.get("val_loss", np.nan) for h in history], "o-", color="tab:orange", label="val loss")
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
    ax[0].legend()
    vals = [h.get(metric) for h in history]
    ax[1].plot(epochs, [np.nan if v is None else v for v in vals], "o-", color="tab:green", label=f"val {metric}")
    ax[1].set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    ax[1].legend()
    for a in ax:
        a.grid(alpha=0.3)
    return _save(fig, path)


def confusion_matrix(cm, classes: list[str], path) -> Path:
    plt = _plt()
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.2 * n + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    return _save(fig, path)


def pr_curves(pr: dict, path) -> Path:
    """Precision–recall (envelope) per class at IoU 0.5."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, c in pr.items():
        if len(c["recall"]):
            ax.plot(c["recall"], c["precision"], label=name)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.05), title="PR curves at IoU 0.5")
    ax.grid(alpha=0.3)
    if pr:
        ax.legend(loc="lower left")
    return _save(fig, path)


def image_scores(scores: dict, threshold: float | None, path) -> Path:
    """A segmenter's picture scores (the maximum of each defect map): the ROC curve of defective against
    good pictures, and both histograms with the model's threshold."""
    plt = _plt()
    good, bad = np.asarray(scores["good"], float), np.asarray(scores["defective"], float)
    fig, (roc, hist) = plt.subplots(1, 2, figsize=(10, 4))
    ts = np.unique(np.concatenate([good, bad, [np.inf]]))[::-1]
    roc.plot([(good >= t).mean() for t in ts], [(bad >= t).mean() for t in ts], color="tab:blue")
    roc.plot([0, 1], [0, 1], color="gray", ls=":")
    area = auroc(np.concatenate([good, bad]), np.r_[np.zeros(len(good)), np.ones(len(bad))])
    roc.set(xlabel="good pictures flagged", ylabel="defective pictures flagged",
            title=f"ROC of picture scores (AUROC {area:.3f})")
    both = np.concatenate([good, bad, [threshold] if threshold is not None else []])
    bins = np.linspace(both.min(), both.max() + 1e-9, 41)  # the scores' own range: good ones can all be near 0
    hist.hist(good, bins=bins, alpha=0.6, label=f"good ({len(good)})", color="tab:green")
    hist.hist(bad, bins=bins, alpha=0.6, label=f"defective ({len(bad)})", color="tab:red")
    if threshold is not None:
        hist.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3g}")
    hist.set(xlabel="picture score (highest defect probability)", ylabel="pictures", title="scores")
    hist.legend(fontsize=8)
    return _save(fig, path)


def _show(img: np.ndarray):
    if img.dtype != np.uint8:  # thermal centikelvin: stretch for display
        k = img[..., 0].astype(np.float64)
        lo, hi = k.min(), k.max()
        return (k - lo) / (hi - lo if hi > lo else 1.0), "inferno"
    return img, None


def prediction_grid(task: str, samples: list[dict], meta, path, conf: float | None = None) -> Path:
    """A grid of images with what the model saw: labels, boxes, mask outlines or temperatures."""
    plt = _plt()
    n = max(1, len(samples))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    classes = list(meta.classes)
    conf = meta.thresholds.get("conf", 0.25) if conf is None else conf
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        img, cmap = _show(s["image"])
        ax.imshow(img, cmap=cmap)
        if task == "classify":
            truth = classes[int(s["target"])] if int(s["target"]) < len(classes) else str(s["target"])
            ok = s["pred"]["label"] == truth
            ax.set_title(f"{s['pred']['label']} ({max(s['pred']['probs']):.2f})\ntruth {truth}", fontsize=8,
                         color="green" if ok else "red")
        elif task == "detect":
            h, w = s["image"].shape[:2]
            for c, cx, cy, bw, bh in np.asarray(s["target"]).reshape(-1, 5):
                ax.add_patch(plt.Rectangle(((cx - bw / 2) * w, (cy - bh / 2) * h), bw * w, bh * h,
                                           fill=False, ec="lime", lw=1, ls="--"))
            for x1, y1, x2, y2, sc, c in np.asarray(s["pred"]).reshape(-1, 6):
                if sc < conf:
                    continue
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2))
                name = classes[int(c)] if int(c) < len(classes) else str(int(c))
                ax.text(x1, y1, f"{name} {sc:.2f}", color="white", fontsize=6, va="bottom",
                        bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "lw": 0})
            ax.set_title("dashed: truth, red: predicted", fontsize=7)
        elif task == "segment":
            if np.asarray(s["target"]).any():
                ax.contour(np.asarray(s["target"]), levels=[0.5], colors="lime", linewidths=0.8)
            if np.asarray(s["pred"]).any():
                ax.contour(np.asarray(s["pred"]), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title("green: truth, red: predicted", fontsize=7)
        else:
            p, t = s["pred"], np.asarray(s["target"], dtype=float)
            ax.set_title(f"CNN max/avg/min {p[0]:.1f}/{p[1]:.1f}/{p[2]:.1f} K\n"
                         f"truth {t[0]:.1f}/{t[1]:.1f}/{t[2]:.1f} K", fontsize=7)
    fig.suptitle(f"{meta.arch} @ {meta.version}", fontsize=9)
    return _save(fig, path)
