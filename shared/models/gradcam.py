"""Grad-CAM (Selvaraju et al.): where in the image a classifier's decision comes from

`gradcam` weighs a layer's activation maps by the spatial mean of the class score's gradient
with respect to them, keeps the positive part and scales each image's map to 0..1. The layer
is found by name in `model.named_modules()` (default: the last `nn.Conv2d`); its activations
come from a forward hook and its gradients from a full backward hook, both removed afterwards.
`explain` runs the pipeline's own preprocessing and Predictor and draws the map over the image; the
alert service uses it for its evidence images and `plantsight explain` (``shared/training/explain.py``)
for an image file.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.imaging import stretch

from .registry import ModelError

__all__ = ["conv_layers", "gradcam", "overlay", "explain"]


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the model's `nn.Conv2d` modules, in `named_modules()` order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _layer(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    convs = conv_layers(model)
    if name is None:
        if not convs:
            raise ValueError(f"{type(model).__name__} has no Conv2d layer; name a layer for Grad-CAM")
        name = convs[-1]
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise ValueError(f"layer {name!r} not found in {type(model).__name__}; "
                         f"conv layers: {', '.join(convs) or '(none)'}")
    return name, modules[name]


class _Tap(nn.Module):
    """Stands in for the hooked layer during Grad-CAM: the layer's output, cloned.

    A full backward hook hands the model a view of the layer's output; code after the layer that
    adds to it in place (`out += identity` in a ResNet block) would be refused by autograd. The
    clone gives that code a tensor of its own, and leaves the layer and its hooks as they are.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out


def _class_indices(class_index, logits: torch.Tensor) -> torch.Tensor:
    b, k = logits.shape
    if class_index is None:
        return logits.argmax(1)
    if isinstance(class_index, (int, np.integer)):
        idx = torch.full((b,), int(class_index), dtype=torch.long, device=logits.device)
    else:
        idx = torch.as_tensor(list(class_index), dtype=torch.long, device=logits.device)
        if idx.shape != (b,):
            raise ValueError(f"class_index: {len(idx)} indices for a batch of {b}")
    if ((idx < 0) | (idx >= k)).any():
        raise ValueError(f"class_index {idx.tolist()} out of range for {k} outputs")
    return idx


def gradcam(model: nn.Module, batch: torch.Tensor, target_layer: str | None = None,
            class_index: int | Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps [B, H, W] float32 in 0..1 for a normalised [B, C, H, W] batch on the model's device.

    `class_index`: None explains each image's top class; an int the same class for all; a list one
    class per image. The model runs in eval mode; its training flag, its parameters' `requires_grad`
    and in-place activations are restored afterwards, and no parameter gradient is accumulated.
    """
    if batch.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] batch, got {list(batch.shape)}")
    name, layer = _layer(model, target_layer)
    acts: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def on_forward(_m, _inp, out):
        acts.append(out)

    def on_backward(_m, _grad_in, grad_out):
        grads.append(grad_out[0])

    training = model.training
    requires = [(p, p.requires_grad) for p in model.parameters()]
    # An in-place activation after the hooked layer would overwrite the saved activation; run
    # them out of place for this one pass.
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    handles = [layer.register_forward_hook(on_forward), layer.register_full_backward_hook(on_backward)]
    try:
        model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        for m in inplace:
            m.inplace = False
        parent._modules[attr] = _Tap(layer)
        with torch.inference_mode(False), torch.enable_grad():
            x = batch.detach().clone().float().requires_grad_(True)
            logits = model(x)
            if logits.dim() != 2:
                raise ValueError(f"Grad-CAM needs [B, classes] outputs, the model gives {list(logits.shape)}")
            idx = _class_indices(class_index, logits)
            if not acts:
                raise ValueError(f"layer {name!r} did not run in the forward pass")
            a = acts[-1]
            if not isinstance(a, torch.Tensor) or a.dim() != 4:
                shape = list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"layer {name!r} gives {shape}, Grad-CAM needs [B, C, h, w] maps")
            # One backward pass for the batch: in eval mode each image's score depends on it alone.
            torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), x)
            if not grads:
                raise ValueError(f"layer {name!r}: no gradient reached it from the class score")
            g = grads[0]  # backward runs in reverse: the first gradient belongs to the last forward call
            with torch.no_grad():
                weights = g.float().mean((2, 3), keepdim=True)
                cam = F.relu((weights * a.detach().float()).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=tuple(batch.shape[2:]), mode="bilinear", align_corners=False)
                cam = cam[:, 0].clamp(min=0)
                peak = cam.amax((1, 2), keepdim=True)
                cam = torch.where(peak > 0, cam / peak.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    finally:
        parent._modules[attr] = layer
        for h in handles:
            h.remove()
        for m in inplace:
            m.inplace = True
        for p, r in requires:
            p.requires_grad_(r)
        model.train(training)
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32)


def overlay(image_rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """`cam` (0..1, any size) as a JET heat map resized onto an RGB (or grey) uint8 image."""
    img = np.asarray(image_rgb)
    if img.ndim == 2 or img.shape[-1] == 1:
        img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    img = img.astype(np.uint8, copy=False)
    h, w = img.shape[:2]
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.clip(cam * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0.0)


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    out = np.ascontiguousarray(image)
    scale = max(0.4, min(out.shape[:2]) / 500.0)
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, th // 3)
    cv2.rectangle(out, (0, 0), (tw + 2 * pad, th + base + 2 * pad), (0, 0, 0), cv2.FILLED)
    cv2.putText(out, text, (pad, pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def explain(predictor, image_rgb: np.ndarray, layer: str | None = None, alpha: float = 0.45) -> tuple[np.ndarray, dict]:
    """(overlay RGB uint8 of the image's size with label and probability drawn, {label, prob, index, layer}).

    `predictor`: a classify `Predictor` with a PyTorch model; the image is prepared as the pipeline
    does (stretched to the model's input size, normalised by the Predictor itself).
    """
    meta = predictor.meta
    if meta.task != "classify":
        raise ModelError(f"Grad-CAM explains classifiers; {predictor.name} is a {meta.task} model")
    image = np.asarray(image_rgb)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1 and meta.channels == 3:
        image = np.repeat(image, 3, axis=2)
    prepared, _ = stretch(image, tuple(meta.input_size))
    batch = torch.from_numpy(np.ascontiguousarray(prepared))[None].to(predictor.device)
    out = predictor.predict(batch)[0]
    name, _ = _layer(predictor.model, layer)
    cam = gradcam(predictor.model, predictor._normalise(batch), name, class_index=out["index"])[0]
    prob = float(out["probs"][out["index"]])
    picture = _caption(overlay(image, cam, alpha), f"{out['label']} {prob:.2f}")
    return picture, {"label": out["label"], "prob": prob, "index": out["index"], "layer": name}
