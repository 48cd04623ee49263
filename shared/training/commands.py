"""`plantsight synth | train | eval | export | explain`; `add_parsers` is wired into services/cli.py.

Nothing heavy is imported at module level: torch, ONNX and OpenCV load when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.names import TASKS

__all__ = ["add_parsers", "cmd_synth", "cmd_train", "cmd_eval", "cmd_export", "cmd_explain"]

FORMATS = ("onnx", "torchscript")

# Keys printed first in text output (the documented --json keys); everything else follows in --json.
HEADLINE = ("accuracy", "macro_f1", "map50", "map50_95", "dice", "iou", "image_auroc", "pixel_auroc", "pro_auc",
            "threshold", "mae_max_k", "mae_avg_k", "mae_min_k")


def _guarded(fn):
    """Run a command; data, model and value errors become one line on stderr and exit code 2."""

    name = fn.__name__.removeprefix("cmd_")

    def run(args) -> int:
        try:
            return fn(args)
        except ValueError as e:  # DataError, ModelError, ExportError are ValueErrors
            print(f"plantsight {name}: {e}".replace("\n", " "), file=sys.stderr)
            return 2
        except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
            print(f"plantsight {name}: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    return run


def _print_metrics(result: dict, as_json: bool) -> None:
    from .evaluate import jsonable

    if as_json:
        print(json.dumps(jsonable(result)))
        return
    for k in HEADLINE:
        if k in result:
            v = result[k]
            print(f"{k:<12} {v:.4f}" if isinstance(v, float) else f"{k:<12} {v}")
    if "per_class" in result:
        for name, c in result["per_class"].items():
            print(f"  {name:<12} AP50 {c['ap50']:.4f}  AP50:95 {c['ap50_95']:.4f}  ({c['n_gt']} boxes)")
    if "confusion_matrix" in result:
        print("confusion matrix (rows true, columns predicted):", result.get("classes", ""))
        for row in result["confusion_matrix"]:
            print("  " + " ".join(f"{v:5d}" for v in row))
    for name, path in (result.get("plots") or {}).items():
        print(f"plot {name}: {path}")


@_guarded
def cmd_synth(args) -> int:
    from shared.data.synth import write_dataset

    info = write_dataset(args.task, args.out, n=args.n, seed=args.seed, progress=True)
    print(json.dumps(info, default=str) if args.json else f"wrote a synthetic {args.task} dataset to {args.out}")
    return 0


@_guarded
def cmd_train(args) -> int:
    from .train import PATIENCE, train

    res = train(args.task, args.data, args.out, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, device=args.device, seed=args.seed, freeze=args.freeze, pretrained=args.pretrained,
                patience=PATIENCE if args.patience is None else args.patience, scheduler=args.scheduler,
                progress=True, good_only=args.good_only)
    if args.json:
        _print_metrics(res, True)
    else:
        print(f"model {res['arch']}@{res['version']} in {res['model_dir']} "
              f"(best epoch {res['best_epoch']} of {res['epochs_run']}); curves {res['curves']}")
        _print_metrics({k: v for k, v in res.items() if k in HEADLINE}, False)
    return 0


@_guarded
def cmd_eval(args) -> int:
    from .evaluate import evaluate, evaluate_predictions

    if (args.model is None) == (args.predictions is None):
        print("plantsight eval: give either --model MODEL_DIR or --predictions DIR", file=sys.stderr)
        return 2
    if args.predictions is not None:
        if args.task != "detect":
            print("plantsight eval: --predictions scores saved detections; use it with 'eval detect'", file=sys.stderr)
            return 2
        res = evaluate_predictions(args.data, args.predictions, split=args.split)
    else:
        res = evaluate(args.task, args.model, args.data, split=args.split, out_dir=args.out, device=args.device)
    _print_metrics(res, args.json)
    return 0


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@_guarded
def cmd_export(args) -> int:
    from shared.models.export import export_model

    path = export_model(args.model, args.format, args.out)
    print(f"exported {args.model} as {args.format} to {path} (outputs match the eager model)")
    return 0


@_guarded
def cmd_explain(args) -> int:
    from .explain import explain_image

    info = explain_image(args.model, args.image, args.out, layer=args.layer, device=_device(args.device))
    print(f"{info['label']} {info['prob']:.3f} (Grad-CAM of layer {info['layer']}) -> {args.out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `synth`, `train`, `eval`, `export` and `explain` to the plantsight command line."""
    sy = sub.add_parser("synth", help="write a synthetic dataset of a task's scene in its training layout")
    sy.add_argument("task", choices=TASKS)
    sy.add_argument("--out", required=True, metavar="DIR")
    sy.add_argument("--n", type=int, default=500, metavar="N", help="images (default 500)")
    sy.add_argument("--seed", type=int, default=0, metavar="S")
    sy.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    sy.set_defaults(fn=cmd_synth)

    tr = sub.add_parser("train", help="train a task's network on a dataset; writes a model directory")
    tr.add_argument("task", choices=TASKS)
    tr.add_argument("--data", required=True, metavar="DIR")
    tr.add_argument("--out", required=True, metavar="MODEL_DIR")
    tr.add_argument("--arch", metavar="A", help="architecture (default: the task's CPU-sized one)")
    tr.add_argument("--epochs", type=int, metavar="N")
    tr.add_argument("--batch-size", type=int, metavar="B")
    tr.add_argument("--lr", type=float, metavar="LR")
    tr.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:1, mps")
    tr.add_argument("--seed", type=int, default=0, metavar="S")
    tr.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=None,
                    help="transfer architectures: train only the new head (--no-freeze: fine-tune all)")
    tr.add_argument("--pretrained", metavar="imagenet|FILE",
                    help="transfer architectures: start from torchvision's ImageNet weights (downloaded once into "
                         "torch's cache) or from a state dict FILE")
    tr.add_argument("--patience", type=int, metavar="N",
                    help="stop after N epochs without a lower validation loss, not before half the epochs (default 10)")
    tr.add_argument("--scheduler", choices=("cosine", "step"), default="cosine")
    tr.add_argument("--good-only", action="store_true",
                    help="segment: learn an anomaly map from good pictures alone (MVTec AD's train/good, or a folder "
                         "of good pictures), with anomalies pasted in; the threshold comes from held-out good ones")
    tr.add_argument("--json", action="store_true", help="print the best validation metrics as one JSON object")
    tr.set_defaults(fn=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model directory, or saved detections, on a dataset split")
    ev.add_argument("task", choices=TASKS)
    ev.add_argument("--model", metavar="MODEL_DIR")
    ev.add_argument("--predictions", metavar="DIR", help="detect: YOLO txt per image with confidence as column 6")
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--split", default="val", choices=("train", "val", "test"))
    ev.add_argument("--out", metavar="DIR", help="plots (default MODEL_DIR/eval-SPLIT)")
    ev.add_argument("--device", default="auto", metavar="D")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.set_defaults(fn=cmd_eval)

    ex = sub.add_parser("export", help="export a model directory to ONNX or TorchScript, checked against eager")
    ex.add_argument("--model", required=True, metavar="MODEL_DIR")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument("--out", metavar="PATH", help="default MODEL_DIR/model.onnx or MODEL_DIR/model.ts")
    ex.set_defaults(fn=cmd_export)

    xp = sub.add_parser("explain", help="Grad-CAM of a classifier on an image, written as an overlay PNG")
    xp.add_argument("image", metavar="IMAGE")
    xp.add_argument("--model", required=True, metavar="MODEL_DIR")
    xp.add_argument("--out", required=True, metavar="PNG")
    xp.add_argument("--layer", metavar="NAME", help="module name of the layer (default: the last Conv2d)")
    xp.add_argument("--device", default="cpu", metavar="D", help="cpu, cuda, cuda:1, mps or auto")
    xp.set_defaults(fn=cmd_explain)
