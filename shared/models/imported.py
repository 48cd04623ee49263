"""Models a plant already has: an ONNX or TorchScript file turned into a model directory.

``import_model`` reads what the file says about itself (Ultralytics writes ``names``, ``imgsz``,
``stride`` and ``task`` into an ONNX file's metadata and a TorchScript file's ``config.txt``), lets the
caller's flags override it, runs the network once to see what its output holds, checks that against
the task's accepted layouts (``modeldir.LAYOUTS``), and writes the file beside a ``model.json`` that says
``format`` and ``layout``. The pipeline then loads, hot-swaps and evaluates the directory like any other.

Nothing half-written is left behind: the directory is assembled beside ``out`` and moved into place only
after the network has run through the same ``Predictor`` the pipeline uses. A TorchScript file is a
program (it runs in TorchScript's interpreter, not as Python): import files you trust.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .export import OnnxModule
from .modeldir import DEFAULT_THRESHOLDS, FILES, IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, META, ModelMeta, load_meta
from .predictor import Predictor
from .registry import ModelError
from .runtimes import TorchScriptModule

log = logging.getLogger("plantsight.models")

NORMALISATIONS = {
    "imagenet": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "unit": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},  # pixels / 255, as Ultralytics feeds them
}
RGB_TASKS = ("classify", "detect", "segment")


@dataclass
class Found:
    """What a model file says about itself."""

    fmt: str  # onnx | torchscript
    input_shape: list = field(default_factory=list)  # [batch, channels, h, w]; None where dynamic
    meta: dict = field(default_factory=dict)  # the Ultralytics metadata, parsed


def _literal(text: str):
    """A metadata value as Ultralytics writes it (``str()`` of a Python value); the text when it is not one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def inspect_file(file: Path) -> Found:
    """The format, input shape and metadata of a model file; ModelError naming it when it is neither kind."""
    head = file.read_bytes()[:64] if file.is_file() else b""
    if not head:
        raise ModelError(f"{file}: no such file or an empty one")
    if head.startswith(b"PK"):  # a zip archive: what torch.jit.save writes
        extra = {"config.txt": ""}
        try:
            with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; the files still load
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.load(str(file), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise ModelError(f"{file}: a zip archive but not a TorchScript model ({e}); accepted: an ONNX file or "
                             "a TorchScript file saved by torch.jit.save") from e
        meta = {}
        if extra["config.txt"]:
            try:
                meta = json.loads(extra["config.txt"])
            except json.JSONDecodeError:
                meta = {}
        return Found("torchscript", [], meta if isinstance(meta, dict) else {})
    try:
        proto = onnx.load(str(file), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:  # onnx raises DecodeError, ValidationError and others
        raise ModelError(f"{file}: not an ONNX or TorchScript model ({type(e).__name__}); accepted: an ONNX file "
                         "(.onnx) or a TorchScript file saved by torch.jit.save") from None
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise ModelError(f"{file}: has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                         "accepted: one image input [batch, channels, height, width]")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ModelError(f"{file}: its input has shape {dims}; accepted: [batch, channels, height, width]")
    return Found("onnx", dims, {p.key: _literal(p.value) for p in proto.metadata_props})


def _names(meta: dict) -> list[str] | None:
    names = meta.get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


def _input_size(found: Found, file: Path, given: tuple[int, int] | None) -> tuple[int, int]:
    if given:
        return int(given[0]), int(given[1])
    h, w = found.input_shape[2:] if found.input_shape else (None, None)
    if h and w:
        return h, w
    imgsz = found.meta.get("imgsz")
    if isinstance(imgsz, int):
        return imgsz, imgsz
    if isinstance(imgsz, (list, tuple)) and len(imgsz) == 2:
        return int(imgsz[0]), int(imgsz[1])
    raise ModelError(f"{file}: its input size is not fixed and the file does not say it; give --input-size H W")


def _normalisation(given, channels: int, ultralytics: bool, task: str) -> dict:
    if isinstance(given, dict):
        norm = {"mean": [float(v) for v in given["mean"]], "std": [float(v) for v in given["std"]]}
    elif given in NORMALISATIONS:
        norm = {k: list(v) for k, v in NORMALISATIONS[given].items()}
    elif given is not None:
        raise ModelError(f"--normalisation {given!r}: give {' or '.join(NORMALISATIONS)}, "
                         "or MEAN,MEAN,MEAN/STD,STD,STD")
    elif task == "thermal":
        norm = {"mean": [300.0], "std": [100.0]}  # kelvin, as plantsight's own thermal networks
    else:
        norm = {k: list(v) for k, v in NORMALISATIONS["unit" if ultralytics else "imagenet"].items()}
    if len(norm["mean"]) != channels or len(norm["std"]) != channels:
        if len(norm["mean"]) == 3 and channels == 1:
            norm = {k: v[:1] for k, v in norm.items()}
        else:
            raise ModelError(f"normalisation has {len(norm['mean'])} value(s) but the network takes "
                             f"{channels} channel(s)")
    return norm


def _layout(task: str, outs: list[np.ndarray], probes: list[np.ndarray], found: Found, given: str | None,
            file: Path) -> tuple[str, int]:
    """(layout, class count) of a network's outputs ``outs`` (batch 1); ModelError when no layout fits."""
    accepted = "; ".join(f"{k}: {v}" for k, v in LAYOUTS[task].items())
    out, probe = outs[0], probes[0]

    def refuse(why: str) -> ModelError:
        shapes = " and ".join(str(list(o.shape)) for o in outs)
        return ModelError(f"{file}: output of shape {shapes} {why}; a {task} model's output must be "
                          f"one of: {accepted}")

    if given is not None and given not in LAYOUTS[task]:
        raise ModelError(f"--layout {given!r}: a {task} model's layout is one of {', '.join(LAYOUTS[task])}")
    if len(outs) == 2 and task == "segment":
        det, proto = outs
        if det.ndim != 3 or proto.ndim != 4 or proto.shape[1] != 32 or det.shape[1] <= 4 + 32:
            raise refuse("is not Ultralytics' segment pair")
        return "yolo_seg", det.shape[1] - 4 - 32
    if len(outs) != 1:
        raise refuse(f"has {len(outs)} outputs, not one")
    if task == "classify":
        if out.ndim != 2 or out.shape[1] < 2:
            raise refuse("is not [batch, classes]")
        if given:
            return given, out.shape[1]
        is_probs = all(np.all((o >= 0) & (o <= 1)) and abs(float(o.sum()) - 1) < 1e-3 for o in (out, probe))
        return ("probs" if found.meta.get("task") == "classify" or is_probs else "logits"), out.shape[1]
    if task == "detect":
        if out.ndim != 3:
            raise refuse("is not [batch, rows, boxes]")
        args = found.meta.get("args") if isinstance(found.meta.get("args"), dict) else {}
        nms = bool(args.get("nms") or found.meta.get("end2end") or args.get("end2end"))
        layout = given or ("yolo_nms" if out.shape[2] == 6 and (nms or out.shape[1] != 6) else "yolo")
        if layout == "yolo_nms":
            if out.shape[2] != 6:
                raise refuse("does not have 6 values per box")
            return layout, 0
        if out.shape[1] < 5:
            raise refuse("has fewer than 4 box values and one class score per box")
        return layout, out.shape[1] - 4
    if task == "segment":
        if out.ndim != 4:
            raise refuse("is not [batch, classes, height, width]")
        is_probs = all(np.all((o >= 0) & (o <= 1)) for o in (out, probe))
        return given or ("probs" if is_probs else "logits"), 0  # one defect mask, whatever the channels
    if out.ndim != 2 or out.shape[1] != 3:
        raise refuse("is not [batch, 3]")
    return given or "kelvin", 0


def _arrays(y) -> list[np.ndarray]:
    return [t.float().numpy() for t in (y if isinstance(y, tuple) else (y,))]


def _classes(task: str, n: int, from_flags: list[str] | None, from_file: list[str] | None, file: Path) -> list[str]:
    if task == "thermal":
        return []
    if task == "segment" and not n:
        return from_flags or ["defect"]
    if from_flags is not None and n and len(from_flags) != n:
        raise ModelError(f"{file}: the network scores {n} classes but --names gives {len(from_flags)} "
                         f"({', '.join(from_flags)})")
    if from_file is not None and n and len(from_file) != n and from_flags is None:
        raise ModelError(f"{file}: the network scores {n} classes but its metadata names {len(from_file)}; "
                         "give --names")
    names = from_flags or from_file
    if names is None:
        if not n:
            raise ModelError(f"{file}: an end-to-end detector does not say how many classes it has; give --names")
        names = [f"class{i}" for i in range(n)]
    return list(names)


def import_model(file: str | os.PathLike, task: str, out: str | os.PathLike, *, names: list[str] | None = None,
                 input_size: tuple[int, int] | None = None, normalisation=None, layout: str | None = None,
                 thresholds: dict | None = None) -> ModelMeta:
    """Check ``file`` and write the model directory ``out`` (``model.onnx`` or ``model.ts`` + ``model.json``)."""
    file, out = Path(file), Path(out)
    if task not in LAYOUTS:
        raise ModelError(f"task {task!r}: must be one of {', '.join(LAYOUTS)}")
    found = inspect_file(file)
    if found.meta.get("task") and found.meta["task"] != task and isinstance(found.meta["task"], str):
        raise ModelError(f"{file}: its metadata says it is a {found.meta['task']} model, not a {task} model")
    channels = found.input_shape[1] if found.input_shape and found.input_shape[1] else (1 if task == "thermal" else 3)
    if task in RGB_TASKS and channels != 3:
        raise ModelError(f"{file}: takes {channels}-channel input; a {task} model must take 3-channel RGB")
    if task == "thermal" and channels != 1:
        raise ModelError(f"{file}: takes {channels}-channel input; a thermal model must take one channel")
    size = _input_size(found, file, input_size)
    ultralytics = "names" in found.meta and ("imgsz" in found.meta or "stride" in found.meta)
    norm = _normalisation(normalisation, channels, ultralytics, task)

    gen = torch.Generator().manual_seed(0)
    blank = torch.zeros(1, channels, *size)
    noise = torch.randn(1, channels, *size, generator=gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        shutil.copyfile(file, work / FILES[found.fmt])
        net = OnnxModule(work / FILES[found.fmt]) if found.fmt == "onnx" else TorchScriptModule(work / FILES[found.fmt])
        try:
            with torch.inference_mode():
                y0, y1 = (_arrays(net(x)) for x in (blank, noise))
        except Exception as e:  # the runtime's own error for a wrong input size or channel count
            raise ModelError(f"{file}: does not run on a [1, {channels}, {size[0]}, {size[1]}] input: {e}") from e
        kind, n = _layout(task, y0, y1, found, layout, file)
        classes = _classes(task, n, names, _names(found.meta), file)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        options = {"source": file.name}
        if isinstance(found.meta.get("stride"), int):
            options["stride"] = found.meta["stride"]
        th = {**DEFAULT_THRESHOLDS[task], **(DEFAULT_THRESHOLDS["detect"] if kind == "yolo_seg" else {})}
        meta = ModelMeta(task=task, arch=file.stem, input_size=size, channels=channels, classes=classes,
                         normalisation=norm, thresholds={**th, **(thresholds or {})}, version=digest[:12],
                         options=options, format=found.fmt, layout=kind)
        (work / META).write_text(meta.to_json() + "\n", encoding="utf-8")
        load_meta(work)  # read back and checked, as every loader will
        predictor = Predictor.from_spec(task, path=str(work))
        batch = torch.zeros(1, *size, channels, dtype=torch.uint8)
        predictor.predict(batch)  # runs end to end, output decoding included, before anything is replaced
        _install(work, out, FILES[found.fmt])
    log.info("%s: imported %s as a %s %s model (%s layout, %d classes, input %dx%d)", out, file.name, found.fmt,
             task, kind, len(classes), size[0], size[1])
    return meta


def _install(work: Path, out: Path, model_file: str) -> None:
    """Move a checked model directory into place; a directory already there keeps its other files."""
    out.mkdir(parents=True, exist_ok=True)
    stale = [f for f in FILES.values() if f != model_file and (out / f).exists()]
    # The network first, model.json last: a running pipeline's model swap reloads when model.json changes,
    # by which time the network beside it is the new one.
    os.replace(work / model_file, out / model_file)
    os.replace(work / META, out / META)
    for f in stale:  # a network file the new model.json does not name would only mislead
        (out / f).unlink()
