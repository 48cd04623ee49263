"""Quality: train each task on synthetic data, evaluate on a held-out set made with another seed.

    python -m bench.quality [--task T ...] [--n-train N] [--n-test N] [--epochs E] [--device D] [--json]

Per task: ``write_dataset(task, WORK/T/train, n_train, seed=0)`` (split 80/20 into train and val as
``plantsight synth`` does; the model trains on ``train`` and is checkpointed / early-stopped on
``val``), then ``write_dataset(task, WORK/T/test, n_test, seed=1000, val_fraction=0)`` — a held-out set
of other scenes and frames, written whole into its ``train`` folder — and the best checkpoint is
evaluated on **all** ``n_test`` images of it. Training uses the task's defaults of
``shared.training.train.DEFAULTS`` (CPU-sized) unless ``--epochs`` etc. override them.

Prints one JSON object on stdout (``--json``; a table otherwise): per task the metrics, the target,
pass/fail, train and eval seconds, arch, epochs run, n_train, n_test. Progress goes to stderr.
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

TRAIN_SEED, TEST_SEED = 0, 1000
DEFAULT_N_TEST = {"classify": 200, "detect": 200, "segment": 200, "thermal": 200}
# (metric, comparison, threshold): the CPU targets of docs/performance.md.
TARGETS = {
    "classify": ("accuracy", ">=", 0.97),
    "detect": ("map50", ">=", 0.85),
    "segment": ("dice", ">=", 0.80),
    "thermal": ("mae_k", "<=", 1.0),
}
METRIC_KEYS = {
    "classify": ("accuracy", "macro_f1"),
    "detect": ("map50", "map50_95"),
    "segment": ("dice", "iou", "image_auroc"),
    "thermal": ("mae_max_k", "mae_avg_k", "mae_min_k", "mae_k"),
}
TIME_BUDGET_S = 15 * 60  # per task, CPU, defaults


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def run_task(task: str, work: Path, *, n_train: int | None, n_test: int | None, epochs: int | None,
             batch_size: int | None, lr: float | None, arch: str | None, device: str, progress: bool) -> dict:
    from shared.data.synth import write_dataset
    from shared.training.evaluate import evaluate
    from shared.training.train import DEFAULTS, train

    d = DEFAULTS[task]
    n_train = int(n_train or d.get("n", 500))
    n_test = int(n_test or DEFAULT_N_TEST[task])
    tdir, sdir, mdir = work / task / "train", work / task / "test", work / task / "model"
    t0 = time.monotonic()
    info = write_dataset(task, tdir, n=n_train, seed=TRAIN_SEED, progress=progress)
    write_dataset(task, sdir, n=n_test, seed=TEST_SEED, val_fraction=0.0, progress=progress)
    synth_s = time.monotonic() - t0
    log(f"{task}: wrote {info['train']}+{info['val']} training images (seed {TRAIN_SEED}) and {n_test} "
        f"held-out images (seed {TEST_SEED}) in {synth_s:.1f}s")

    t0 = time.monotonic()
    res = train(task, tdir, mdir, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                seed=0, progress=progress)
    train_s = time.monotonic() - t0
    log(f"{task}: trained {res['arch']} for {res['epochs_run']} epochs (best {res['best_epoch']}) in {train_s:.0f}s")

    t0 = time.monotonic()
    ev = evaluate(task, mdir, sdir, split="train", out_dir=work / task / "eval", device=device, progress=progress)
    eval_s = time.monotonic() - t0

    key, op, thr = TARGETS[task]
    value = ev.get(key)
    passed = value is not None and (value >= thr if op == ">=" else value <= thr)
    out = {
        "metrics": {k: ev.get(k) for k in METRIC_KEYS[task]},
        "target": {"metric": key, "op": op, "value": thr},
        "pass": bool(passed),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "synth_seconds": round(synth_s, 1),
        "within_time_budget": bool(train_s + eval_s <= TIME_BUDGET_S),
        "arch": res["arch"],
        "epochs": epochs or d["epochs"],
        "epochs_run": res["epochs_run"],
        "best_epoch": res["best_epoch"],
        "batch_size": batch_size or d["batch_size"],
        "lr": lr or d["lr"],
        "n_train": info["train"],
        "n_val": info["val"],
        "n_test": ev.get("images", n_test),
        "val_metric": res.get(key),
    }
    if task == "detect":
        out["per_class_ap50"] = {k: v.get("ap50") for k, v in (ev.get("per_class") or {}).items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=TASKS, help="a task to run (repeatable; default all)")
    p.add_argument("--n-train", type=int, help="images written for training, split 80/20 train/val "
                                                "(default: the task's DEFAULTS n)")
    p.add_argument("--n-test", type=int, help="held-out images (default 200)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--arch")
    p.add_argument("--device", default="cpu", help="cpu (default: the targets are CPU targets), auto, cuda, ...")
    p.add_argument("--work", help="keep datasets and models here (default: a temporary folder, removed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)

    import torch

    tasks = a.task or list(TASKS)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="plantsight-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "train_seed": TRAIN_SEED, "test_seed": TEST_SEED,
              "test_split": "every image of the held-out set (written with val_fraction=0)", "tasks": {}}
    t_all = time.monotonic()
    try:
        for task in tasks:
            log(f"--- {task} ---")
            result["tasks"][task] = run_task(task, work, n_train=a.n_train, n_test=a.n_test, epochs=a.epochs,
                                             batch_size=a.batch_size, lr=a.lr, arch=a.arch, device=a.device,
                                             progress=not a.quiet)
            log(f"{task}: {json.dumps(result['tasks'][task]['metrics'])} "
                f"pass={result['tasks'][task]['pass']}")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    result["all_pass"] = all(r["pass"] for r in result["tasks"].values())
    result["total_seconds"] = round(time.monotonic() - t_all, 1)
    from shared.training.evaluate import jsonable

    if a.json:
        print(json.dumps(jsonable(result)))
    else:
        for task, r in result["tasks"].items():
            key, op, thr = r["target"]["metric"], r["target"]["op"], r["target"]["value"]
            ms = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items())
            print(f"{task:<9} {'PASS' if r['pass'] else 'FAIL'}  {ms}  (target {key} {op} {thr}; {r['arch']}, "
                  f"{r['epochs_run']} epochs, train {r['train_seconds']}s, eval {r['eval_seconds']}s, "
                  f"n_train {r['n_train']}, n_test {r['n_test']})")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
