"""Model directories: `model.pt` (a state dict) beside `model.json` (what it is)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shared.names import TASKS

from .registry import DEFAULT_CLASSES, ModelError, build, get

__all__ = ["ModelError", "ModelMeta", "default_meta", "save_model_dir", "load_model_dir", "WEIGHTS", "META"]

WEIGHTS = "model.pt"
ONNX = "model.onnx"
TORCHSCRIPT = "model.ts"
META = "model.json"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_THRESHOLDS = {
    "classify": {},
    "detect": {"conf": 0.25, "iou": 0.45},
    "segment": {"mask": 0.5},
    "thermal": {"hotspot_k": 400.0},
}
_REQUIRED = ("task", "arch", "input_size", "channels", "classes", "normalisation", "thresholds", "version")


# What an imported model's output holds, per task (``format`` onnx or torchscript; ``shared/models/imported.py``).
LAYOUTS = {
    "classify": {"logits": "[B, classes] scores (softmax applied here)",
                 "probs": "[B, classes] probabilities (Ultralytics classify)"},
    "detect": {"yolo": "[B, 4 + classes, N]: cx, cy, w, h in input pixels, then class scores (Ultralytics "
                       "YOLOv5u/v8/v11 detect, no NMS in the graph)",
               "yolo_nms": "[B, N, 6]: x1, y1, x2, y2, score, class in input pixels (Ultralytics nms=True or "
                           "end-to-end)"},
    "segment": {"logits": "[B, 1, H, W] defect logits, or [B, C, H, W] class logits with class 0 the background",
                "probs": "[B, 1, H, W] defect probabilities, or [B, C, H, W] class probabilities",
                "yolo_seg": "two outputs, [B, 4 + classes + 32, N] boxes with 32 mask coefficients and [B, 32, H/4, "
                            "W/4] mask prototypes (Ultralytics segment); the instances' masks make the defect mask"},
    "thermal": {"kelvin": "[B, 3]: max, avg and min temperature in kelvin"},
}
FILES = {"pt": WEIGHTS, "onnx": ONNX, "torchscript": TORCHSCRIPT}  # format -> the file that holds the network


@dataclass
class ModelMeta:
    """What `model.json` says about a model; `options` are extra builder arguments (e.g. width).

    ``format`` says which file holds the network: ``pt`` (a state dict of one of plantsight's architectures),
    ``onnx`` or ``torchscript`` (an imported network, whose ``arch`` is a free name and whose ``layout``
    says what its output holds).
    """

    task: str
    arch: str
    input_size: tuple[int, int]
    channels: int
    classes: list[str]
    normalisation: dict[str, list[float]]
    thresholds: dict[str, float]
    version: str
    metrics: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    format: str = "pt"
    layout: str = ""

    @property
    def imported(self) -> bool:
        return self.format != "pt"

    def to_json(self) -> str:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = META) -> "ModelMeta":
        """Parse and check; ModelError naming `source` and the problem otherwise."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{source}: not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ModelError(f"{source}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ModelError(f"{source}: missing key(s) {', '.join(missing)}")

        def bad(key: str, why: str) -> ModelError:
            return ModelError(f"{source}: {key} {why} (got {d.get(key)!r})")

        if d["task"] not in TASKS:
            raise bad("task", f"must be one of {', '.join(TASKS)}")
        fmt = d.get("format", "pt")
        if fmt not in FILES:
            raise bad("format", f"must be one of {', '.join(FILES)}")
        if fmt == "pt":
            try:
                info = get(d["arch"])
            except ModelError as e:
                raise ModelError(f"{source}: {e}") from None
            if info.task != d["task"]:
                raise bad("arch", f"is a {info.task} architecture, not {d['task']}")
        elif d.get("layout") not in LAYOUTS[d["task"]]:
            raise bad("layout", f"must be one of {', '.join(LAYOUTS[d['task']])} for an imported {d['task']} model")
        if not (isinstance(d["arch"], str) and d["arch"]):
            raise bad("arch", "must be a name")
        size = d["input_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            raise bad("input_size", "must be [h, w] with positive integers")
        if d["channels"] not in (1, 3):
            raise bad("channels", "must be 1 or 3")
        if not (isinstance(d["classes"], list) and all(isinstance(c, str) for c in d["classes"])):
            raise bad("classes", "must be a list of strings")
        norm = d["normalisation"]
        if not (isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and len(norm[k]) == d["channels"]
            and all(isinstance(v, (int, float)) for v in norm[k]) for k in ("mean", "std")
        )):
            raise bad("normalisation", f"must be {{mean: [...], std: [...]}} with {d['channels']} number(s) each")
        if any(v == 0 for v in norm["std"]):
            raise bad("normalisation", "std must not be 0")
        th = d["thresholds"]
        if not (isinstance(th, dict) and all(isinstance(v, (int, float)) for v in th.values())):
            raise bad("thresholds", "must map names to numbers")
        missing_th = [k for k in DEFAULT_THRESHOLDS[d["task"]] if k not in th]
        if missing_th:
            raise bad("thresholds", f"lacks {', '.join(missing_th)} for a {d['task']} model")
        for key in ("metrics", "options"):
            if not isinstance(d.get(key, {}), dict):
                raise bad(key, "must be an object")
        return cls(
            task=d["task"], arch=d["arch"], input_size=(size[0], size[1]), channels=d["channels"],
            classes=list(d["classes"]), normalisation={"mean": list(norm["mean"]), "std": list(norm["std"])},
            thresholds=dict(th), version=str(d["version"]), metrics=dict(d.get("metrics", {})),
            options=dict(d.get("options", {})), format=fmt, layout=str(d.get("layout", "")),
        )


def default_meta(arch: str, classes: list[str] | None = None) -> ModelMeta:
    """Metadata for an untrained `arch`: the task's default classes, thresholds and normalisation."""
    info = get(arch)
    if info.channels == 1:
        norm = {"mean": [300.0], "std": [100.0]}  # kelvin, matching thermal.KELVIN_MEAN/STD
    else:
        norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return ModelMeta(
        task=info.task, arch=arch, input_size=info.input_size, channels=info.channels,
        classes=list(DEFAULT_CLASSES[info.task] if classes is None else classes), normalisation=norm,
        thresholds=dict(DEFAULT_THRESHOLDS[info.task]), version="untrained",
    )


def build_for(meta: ModelMeta) -> nn.Module:
    """A fresh network shaped as `meta` describes (class count and builder options)."""
    return build(meta.arch, num_classes=len(meta.classes), **meta.options)


def save_model_dir(path: str | os.PathLike, model: nn.Module, meta: ModelMeta) -> Path:
    """Write `model.pt` and `model.json` into `path` (created if needed); returns the directory."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    # Write beside, then rename: a service loading the directory never sees half a file.
    tmp_pt, tmp_json = d / (WEIGHTS + ".tmp"), d / (META + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp_pt)
    tmp_json.write_text(meta.to_json() + "\n", encoding="utf-8")
    os.replace(tmp_pt, d / WEIGHTS)
    os.replace(tmp_json, d / META)
    return d


def load_meta(path: str | os.PathLike) -> ModelMeta:
    """Read and check `path/model.json`."""
    f = Path(path) / META
    if not f.is_file():
        raise ModelError(f"{f}: no such file (a model directory needs {META} and {WEIGHTS})")
    try:
        text = f.read_bytes()
    except OSError as e:
        raise ModelError(f"{f}: cannot read: {e}") from e
    return ModelMeta.from_json(text, source=str(f))


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The network of a model directory on `device`, in eval mode, with its metadata."""
    meta = load_meta(path)
    f = Path(path) / WEIGHTS
    if not f.is_file():
        raise ModelError(f"{f}: no such file (a model directory needs {META} and {WEIGHTS})")
    try:
        model = build_for(meta)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{Path(path) / META}: cannot build {meta.arch!r} with options {meta.options}: {e}") from e
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise ModelError(f"{f}: not a loadable state dict: {e}") from e
    if not isinstance(state, dict):
        raise ModelError(f"{f}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{f}: does not match {meta.arch!r} with {len(meta.classes)} classes: {e}") from e
    return model.to(device).eval(), meta


def input_size_for(task: str, *, path: str | os.PathLike | None = None, arch: str | None = None) -> tuple[int, int]:
    """(h, w) a task's network takes, read from model.json or the architecture; no weights are loaded."""
    meta = load_meta(path) if path is not None else default_meta(arch)
    if meta.task != task:
        raise ModelError(f"{path or arch}: is a {meta.task} model, not a {task} model")
    return tuple(meta.input_size)
