"""Small data: each task trained with its defaults on a few hundred photographs the scenes did not draw.

    python -m bench small-data [--task T ...] [--n-good 100] [--n-defect 100] [--n-test 30] [--epochs E]
                               [--arch A] [--plot PNG] [--work DIR] [--json]

``--task anomaly`` is the segmenter trained on good pictures only (``train segment --good-only``): it
writes ``--n-good`` + ``--n-defect`` good pictures for training (200 by default) and nothing defective,
and is held to image and pixel AUROC on the same held-out pictures.

Per task: ``write_photo_dataset`` (bench/photo_defects.py) writes ``--n-good`` + ``--n-defect`` pictures
(seed 0) as the training split only, so training holds out its own stratified 20 % for validation, as it
does for a plant's folder without ``val/``; then ``--n-test`` good + ``--n-test`` defective pictures with
another seed (1) are the held-out test split the model is evaluated on. Training runs with the task's
defaults unless ``--epochs``/``--arch`` say otherwise.

Prints one JSON object (``--json``; a table otherwise): per task the held-out metrics, the goal and
whether it is met, training seconds, epochs, the first loss beside the uninformed one, and the learning
curve (train and validation loss, the validation metric per epoch); ``--plot`` draws every task's curves
into one PNG. Exits 0 when every goal is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared.names import TASKS

from .common import say
from .quality import METRIC_KEYS

TRAIN_SEED, TEST_SEED = 0, 1
# (metric, comparison, goal) on the held-out photographs, with the defaults, on two CPU cores; a second goal
# where a task has one.
GOALS = {
    "classify": ("accuracy", ">=", 0.95),
    "detect": ("map50", ">=", 0.5),
    "segment": ("dice", ">=", 0.75),
    "thermal": ("mae_k", "<=", 1.0),
    "anomaly": ("pixel_auroc", ">=", 0.95),
}
MORE_GOALS = {"anomaly": [("image_auroc", ">=", 0.95)]}
ANOMALY = "anomaly"  # the segmenter, trained on good pictures only
CHOICES = (*TASKS, ANOMALY)


def met(value, op: str, goal: float) -> bool:
    return value is not None and (value >= goal if op == ">=" else value <= goal)


def run_task(task: str, work: Path, *, n_good: int, n_defect: int, n_test: int, epochs: int | None,
             arch: str | None, device: str, progress: bool) -> dict:
    from shared.training.evaluate import MAIN_METRIC, evaluate
    from shared.training.train import train

    from .photo_defects import write_photo_dataset

    name, good_only = task, task == ANOMALY
    task = "segment" if good_only else task
    data, model = work / name / "data", work / name / "model"
    if good_only:  # good pictures only, in a folder of their own: nothing defective is written for training
        write_photo_dataset(task, data / "good", n_good=n_good + n_defect, n_defect=0, split="train",
                            seed=TRAIN_SEED)
        train_dir = data / "good" / "images" / "train"
    else:
        write_photo_dataset(task, data, n_good=n_good, n_defect=n_defect, split="train", seed=TRAIN_SEED)
        train_dir = data
    write_photo_dataset(task, data, n_good=n_test, n_defect=n_test, split="test", seed=TEST_SEED)
    t0 = time.monotonic()
    res = train(task, train_dir, model, arch=arch, epochs=epochs, device=device, seed=0, progress=progress,
                good_only=good_only)
    train_s = time.monotonic() - t0
    ev = evaluate(task, model, data, split="test", out_dir=work / name / "eval", device=device, progress=progress)
    goals = [GOALS[name], *MORE_GOALS.get(name, [])]
    key, op, goal = goals[0]
    val_key = MAIN_METRIC[task][0]  # what validation measures each epoch
    keys = [*METRIC_KEYS[task], *(["pixel_auroc", "pro_auc", "image_auroc"] if good_only else [])]
    return {
        "metrics": {k: ev.get(k) for k in dict.fromkeys(keys)},
        "goal": {"metric": key, "op": op, "value": goal},
        "goals": [{"metric": k, "op": o, "value": g, "met": met(ev.get(k), o, g)} for k, o, g in goals],
        "met": all(met(ev.get(k), o, g) for k, o, g in goals),
        "threshold": res.get("threshold"),
        "arch": res["arch"],
        "train_seconds": round(train_s, 1),
        "epochs_run": res["epochs_run"],
        "best_epoch": res["best_epoch"],
        "initial_loss": res["initial_loss"],
        "expected_initial_loss": res["expected_initial_loss"],
        "warnings": res["warnings"],
        "validation": res["validation"],
        "n_train": n_good + n_defect,
        "n_test": ev.get("images"),
        "history": [{k: h.get(k) for k in ("epoch", "train_loss", "val_loss", val_key, "seconds")}
                    for h in res["history"]],
        "val_metric": val_key,
    }


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for i, task in enumerate(tasks):
        r = result["tasks"][task]
        key, vkey = r["goal"]["metric"], r["val_metric"]
        ep = [h["epoch"] for h in r["history"]]
        ax = axes[0][i]
        ax.plot(ep, [h["train_loss"] for h in r["history"]], label="train loss")
        ax.plot(ep, [h["val_loss"] for h in r["history"]], label="val loss")
        ax.axhline(r["expected_initial_loss"], color="gray", ls=":", label="uninformed start")
        ax.set(title=f"{task}: {r['arch']}", xlabel="epoch", ylabel="loss")
        ax.legend(fontsize=8)
        ax = axes[1][i]
        ax.plot(ep, [h[vkey] for h in r["history"]], color="tab:green", label=f"val {vkey}")
        if vkey == key:
            ax.axhline(r["goal"]["value"], color="tab:red", ls="--",
                       label=f"goal {r['goal']['op']} {r['goal']['value']}")
        test = r["metrics"][key]
        ax.set(xlabel="epoch", ylabel=vkey, title=f"held-out {key} {test:.3f} ({r['train_seconds']:.0f} s)")
        ax.legend(fontsize=8)
        for a in axes[:, i]:
            a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench small-data", description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=CHOICES,
                   help="a task to run, or anomaly (repeatable; default all four tasks and anomaly)")
    p.add_argument("--n-good", type=int, default=100)
    p.add_argument("--n-defect", type=int, default=100)
    p.add_argument("--n-test", type=int, default=30, help="held-out good and defective pictures, each (default 30)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--arch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", metavar="PNG", help="draw the learning curves of every task into this file")
    p.add_argument("--work", help="keep datasets and models here (default: a temporary folder, removed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)

    import torch

    from shared.training.evaluate import jsonable

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="plantsight-small-data-"))
    result = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "train_seed": TRAIN_SEED, "test_seed": TEST_SEED, "tasks": {}}
    try:
        for task in a.task or list(CHOICES):
            say(f"small-data: {task}")
            result["tasks"][task] = run_task(task, work, n_good=a.n_good, n_defect=a.n_defect, n_test=a.n_test,
                                             epochs=a.epochs, arch=a.arch, device=a.device, progress=not a.quiet)
            r = result["tasks"][task]
            say(f"small-data: {task}: {json.dumps(jsonable(r['metrics']))} in {r['train_seconds']} s, "
                f"goal met: {r['met']}")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    if a.plot:
        result["plot"] = str(plot(result, Path(a.plot)))
    result["all_met"] = all(r["met"] for r in result["tasks"].values())
    if a.json:
        print(json.dumps(jsonable(result)))
    else:
        for task, r in result["tasks"].items():
            goals = " and ".join(f"{g['metric']} {g['op']} {g['value']}" for g in r["goals"])
            ms = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items())
            print(f"{task:<9} {'met' if r['met'] else 'NOT MET'}  {ms}  (goal {goals}; "
                  f"{r['arch']}, {r['epochs_run']} epochs, {r['train_seconds']} s)")
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
