"""The demo's trained networks: how the model directories in ``shared/demo_models/`` are made.

``python -m shared.training.demo_models`` (``make demo-models``) draws a synthetic dataset per task from
the scene the demo's cameras show, trains the compact network below on it with fixed seeds, and keeps the
weights as float16 (half the bytes; the pipeline loads them into float32), so the repository carries a
few megabytes and ``make demo`` shows trained networks from its first frame. The datasets' scenes get
random seeds, none of them the 0 and 2 of the demo's cameras, so what the demo shows is data the
networks never saw. On two CPU cores the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from shared.data.synth import write_dataset
from shared.models.modeldir import WEIGHTS

from .train import train

OUT = Path(__file__).resolve().parents[1] / "demo_models"
DATA_SEED = 100
# task: (architecture, synthetic images, epochs, learning rate)
RECIPES = {
    "classify": ("compact_cnn", 300, 8, 2e-3),
    "detect": ("anchor_free", 300, 6, 2e-3),
    "segment": ("unet_small", 200, 4, 1e-3),
    "thermal": ("thermal_cnn", 300, 6, 1e-3),
}


def halve(model_dir: Path) -> None:
    """Store the model's floating-point weights as float16 (loading copies them into the float32 network)."""
    f = model_dir / WEIGHTS
    state = torch.load(f, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, f)


def build(out: Path = OUT, tasks: tuple[str, ...] = tuple(RECIPES)) -> dict[str, dict]:
    """Train the demo model of each task into ``out/<task>``; returns the validation metrics per task."""
    metrics = {}
    with tempfile.TemporaryDirectory(prefix="plantsight-demo-") as tmp:
        for task in tasks:
            arch, n, epochs, lr = RECIPES[task]
            data = write_dataset(task, Path(tmp) / f"data-{task}", n=n, seed=DATA_SEED)["out"]
            work = Path(tmp) / f"model-{task}"
            res = train(task, data, work, arch=arch, epochs=epochs, lr=lr, device="cpu", seed=0)
            halve(work)
            target = out / task
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for name in (WEIGHTS, "model.json"):  # the curves and plots stay out of the repository
                shutil.copy(work / name, target / name)
            metrics[task] = {k: v for k, v in res.items() if isinstance(v, (int, float)) and k != "epochs_run"}
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared.training.demo_models", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"where the model directories go (default {OUT})")
    ap.add_argument("--task", action="append", choices=list(RECIPES), help="only these tasks (default all)")
    args = ap.parse_args(argv)
    for task, m in build(args.out, tuple(args.task or RECIPES)).items():
        print(f"{task}: " + ", ".join(f"{k} {v:.3g}" for k, v in m.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
