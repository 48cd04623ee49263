"""Predictor: one model on one device, turning a batch of prepared frames into result `out` dicts."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .detect import decode_yolo
from .detect_af import decode_anchor_free
from .detect_ultralytics import decode_ultralytics, instance_masks
from .export import ONNX, load_onnx_dir
from .modeldir import WEIGHTS, ModelMeta, build_for, default_meta, load_meta, load_model_dir
from .registry import ModelError
from .runtimes import load_imported
from .thermal import find_hotspots, radiometric_stats, to_kelvin

# Thermal frames that arrive as centikelvin integers; uint8 ones carry no temperature.
_RADIOMETRIC = (torch.uint16, torch.int16, torch.int32, torch.int64)
RUNTIMES = ("auto", "torch", "onnx")


class Predictor:
    """Runs one task's model; `predict` takes [B, H, W, C] frames already on `device`."""

    def __init__(self, model: nn.Module, meta: ModelMeta, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.task, self.arch, self.version = meta.task, meta.arch, meta.version
        self.runtime = getattr(model, "runtime", "torch")  # "onnx" for export.OnnxModule
        c = meta.channels
        mean = torch.tensor(meta.normalisation["mean"], dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        std = torch.tensor(meta.normalisation["std"], dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        # uint8 → (x/255 − mean)/std folded into one multiply-add on the device.
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        self._kmean, self._kstd = mean, std
        # What runs the network: the eager module until `set_engine` gives a faster one (services/inference/engine.py).
        self.forward = self.model
        self.engine = "eager"
        self._memory_format = torch.contiguous_format

    def set_engine(self, engine) -> None:
        """Run the network through ``engine`` (a callable on normalised NCHW float32 batches, with ``label``
        and ``memory_format``), built and checked against ``self.model`` by the caller."""
        self.forward = engine
        self.engine = engine.label
        self._memory_format = engine.memory_format

    def example_input(self, batch: int, seed: int = 0) -> torch.Tensor:
        """A random normalised [batch, C, H, W] network input on the device (for tracing and warming engines)."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.meta.channels, *self.input_size(), generator=gen).to(self.device)

    @property
    def runtime_label(self) -> str:
        """What runs the network: torch, torchscript, or onnxruntime with its execution provider."""
        return f"onnxruntime/{self.model.provider}" if self.runtime == "onnx" else self.runtime

    @property
    def name(self) -> str:
        return f"{self.arch}@{self.version}"

    @classmethod
    def from_spec(cls, task: str, *, path: str | None = None, arch: str | None = None, device: str = "cpu",
                  runtime: str = "auto") -> "Predictor":
        """A trained model directory (`path`), or else an untrained `arch` with default metadata.

        `runtime`: "torch" runs `model.pt` eagerly; "onnx" runs `model.onnx` through ONNX Runtime;
        "auto" (default) is "torch" when the directory has `model.pt`, "onnx" when it has only `model.onnx`.
        An imported model (``format`` onnx or torchscript in `model.json`) runs on its own file's runtime.
        """
        if runtime not in RUNTIMES:
            raise ModelError(f"runtime {runtime!r}: must be one of {', '.join(RUNTIMES)}")
        if path is not None:
            meta = load_meta(path)
            if meta.imported:
                model = load_imported(path, meta, device)
            else:
                if runtime == "auto":
                    only_onnx = not (Path(path) / WEIGHTS).exists() and (Path(path) / ONNX).is_file()
                    runtime = "onnx" if only_onnx else "torch"
                model, meta = load_onnx_dir(path, device) if runtime == "onnx" else load_model_dir(path, device)
            if arch is not None and arch != meta.arch:
                raise ModelError(f"{path}: holds a {meta.arch!r} model, but arch {arch!r} was asked for")
            where = str(path)
        elif arch is not None:
            if runtime == "onnx":
                raise ModelError(f"architecture {arch!r}: the onnx runtime needs a model directory with a model.onnx")
            meta = default_meta(arch)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same untrained network in every process and run (the demo, tests)
                model = build_for(meta)
            where = f"architecture {arch!r}"
        else:
            raise ModelError(f"model for task {task!r}: give a model directory path or an architecture name")
        if meta.task != task:
            raise ModelError(f"{where}: is a {meta.task} model, not a {task} model")
        return cls(model, meta, device)

    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta.input_size)

    def _check(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4 or batch.shape[-1] != self.meta.channels:
            raise ValueError(f"{self.name}: expected a [B, H, W, {self.meta.channels}] batch, got {list(batch.shape)}")
        if self.task != "thermal":
            if batch.dtype != torch.uint8:
                raise ValueError(f"{self.name}: expected uint8 frames, got {batch.dtype}")
            if tuple(batch.shape[1:3]) != self.input_size():
                raise ValueError(f"{self.name}: expected {self.input_size()} frames, got {tuple(batch.shape[1:3])}")
        elif batch.dtype != torch.uint8 and batch.dtype not in _RADIOMETRIC:
            raise ValueError(f"{self.name}: expected uint8 or uint16 centikelvin frames, got {batch.dtype}")
        return batch.to(self.device, non_blocking=True)

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        # permute is a view: the NHWC → NCHW change happens on the device, not in preprocess. One converting
        # copy into the layout the engine wants, then the multiply-add in place (one pass over memory instead
        # of out-of-place arithmetic on the permuted view followed by a contiguous copy).
        n, h, w, c = batch.shape
        x = torch.empty((n, c, h, w), dtype=torch.float32, device=batch.device, memory_format=self._memory_format)
        x.copy_(batch.permute(0, 3, 1, 2))
        return x.mul_(self._scale).add_(self._shift)

    def predict(self, batch: torch.Tensor, *, maps: bool = False) -> list[dict]:
        """One result `out` dict per image, in the prepared image's pixels, with plain Python/numpy values.

        `maps` (segment): each result also holds `prob`, the float32 defect (anomaly) probability per pixel,
        which evaluation ranks; the pipeline does not carry it.
        """
        batch = self._check(batch)
        if batch.shape[0] == 0:
            return []
        with torch.inference_mode():
            if self.task == "segment":
                return self._segment(batch, maps)
            return getattr(self, f"_{self.task}")(batch)

    def _classify(self, batch: torch.Tensor) -> list[dict]:
        probs = self.forward(self._normalise(batch)).float()
        if self.meta.layout != "probs":
            probs = probs.softmax(1)
        index = probs.argmax(1)
        classes = list(self.meta.classes)
        probs, index = probs.cpu().tolist(), index.cpu().tolist()
        return [
            {"label": classes[i] if i < len(classes) else str(i), "index": i, "probs": p, "classes": classes}
            for i, p in zip(index, probs)
        ]

    def _detect(self, batch: torch.Tensor) -> list[dict]:
        raw = self.forward(self._normalise(batch))
        th = self.meta.thresholds
        if self.meta.layout == "yolo":
            dets = decode_ultralytics(raw, th["conf"], th["iou"])
        elif self.meta.layout == "yolo_nms":
            dets = [d[d[:, 4] >= th["conf"]] for d in raw.float()]
        elif self.arch == "anchor_free":
            dets = decode_anchor_free(raw, th["conf"], th["iou"], tuple(batch.shape[1:3]))
        else:
            dets = decode_yolo(raw, th["conf"], th["iou"], tuple(batch.shape[1:3]),
                               boxes=int(self.meta.options.get("boxes", 2)))
        counts = [len(d) for d in dets]
        rows = torch.cat(dets).cpu().tolist()  # one device→host copy for the batch
        classes, out, start = list(self.meta.classes), [], 0
        for n in counts:
            out.append({"boxes": [[*r[:5], int(r[5])] for r in rows[start:start + n]], "classes": classes})
            start += n
        return out

    def _segment(self, batch: torch.Tensor, maps: bool = False) -> list[dict]:
        if self.meta.layout == "yolo_seg":
            return self._instances(batch)
        prob = self._defect_probability(self.forward(self._normalise(batch)).float(), tuple(batch.shape[1:3]))
        masks = (prob > self.meta.thresholds["mask"]).to(torch.uint8).cpu().numpy()
        prob_max = prob.amax((1, 2)).cpu().tolist()
        outs = [{"mask": m, "prob_max": p} for m, p in zip(masks, prob_max)]
        if maps:
            for o, m in zip(outs, prob.cpu().numpy()):
                o["prob"] = m
        return outs

    def _thermal(self, batch: torch.Tensor) -> list[dict]:
        x = batch[..., 0]
        radiometric = batch.dtype in _RADIOMETRIC
        if radiometric:
            # float64 keeps centikelvin/100 exact enough for the statistics; mps has no float64.
            dt = torch.float32 if self.device.type == "mps" else torch.float64
            kelvin = x.to(dt) / 100.0
            net_in = ((kelvin - self._kmean[0]) / self._kstd[0]).to(torch.float32)
        else:
            # A uint8 frame has no temperature scale: read 0..255 as 0..1 of the normalised range.
            net_in = x.to(torch.float32) / 255.0
        net_in = net_in.unsqueeze(1)
        if tuple(net_in.shape[2:]) != self.input_size():
            net_in = F.interpolate(net_in, size=self.input_size(), mode="bilinear", align_corners=False, antialias=True)
        out = self.forward(net_in).float()
        cnn = (out if self.meta.layout == "kelvin" else to_kelvin(out)).cpu().tolist()
        if not radiometric:
            return [
                {"max_k": c[0], "avg_k": c[1], "min_k": c[2], "hotspots": [], "source": "cnn", "cnn": c} for c in cnn
            ]
        stats = radiometric_stats(kelvin).cpu().tolist()
        spots = find_hotspots(kelvin, float(self.meta.thresholds["hotspot_k"]))
        return [
            {"max_k": s[0], "avg_k": s[1], "min_k": s[2], "hotspots": h, "source": "radiometric", "cnn": c}
            for s, h, c in zip(stats, spots, cnn)
        ]

    def _instances(self, batch: torch.Tensor) -> list[dict]:
        """An Ultralytics segmenter: the union of its instances' masks is the defect mask."""
        det, proto = self.forward(self._normalise(batch))
        th, out = self.meta.thresholds, []
        for dets, masks in instance_masks(det, proto, th.get("conf", 0.25), th.get("iou", 0.45),
                                          tuple(batch.shape[1:3])):
            prob = masks.amax(0) if len(masks) else torch.zeros(batch.shape[1:3])
            out.append({"mask": (prob > th["mask"]).to(torch.uint8).cpu().numpy(), "prob_max": float(prob.max()),
                        "instances": dets.cpu().tolist()})
        return out

    def _defect_probability(self, out: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[B, H, W] defect probability at the input's size from a segmenter's [B, C, h, w] output: one channel
        is the defect (logits through a sigmoid), several are classes with class 0 the background."""
        if out.shape[1] == 1:
            prob = out if self.meta.layout == "probs" else out.sigmoid()
        else:
            prob = 1 - (out if self.meta.layout == "probs" else out.softmax(1))[:, :1]
        if tuple(prob.shape[2:]) != size:
            prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        return prob[:, 0]
