"""Thermal: ThermalCNN regressing max/avg/min kelvin, plus exact statistics for radiometric frames."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register

INPUT_SIZE = (224, 224)
# The net works in normalised units y = (kelvin - KELVIN_MEAN) / KELVIN_STD; fixed so that
# a saved model means the same temperatures wherever it is loaded.
KELVIN_MEAN = 300.0
KELVIN_STD = 100.0


def to_kelvin(y: torch.Tensor) -> torch.Tensor:
    return y * KELVIN_STD + KELVIN_MEAN


def from_kelvin(kelvin: torch.Tensor) -> torch.Tensor:
    return (kelvin - KELVIN_MEAN) / KELVIN_STD


class ThermalCNN(nn.Module):
    """One-channel image → normalised (max, avg, min) temperature; map back with `to_kelvin`.

    The chapter's conv stack, with two changes that take the max error from ~8 K to about 1 K: the
    head sees max- and min-pooled features beside the mean (a hot spot is a local event that
    averaging washes out), and it predicts a correction to the input image's own max/mean/min rather
    than the temperatures from scratch (resizing to 224×224 blurs a small hot spot's peak; the net
    learns how much from the spot's shape).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers, cin = [], 1
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(3 * cin + 3, 64), nn.ReLU(inplace=True), nn.Linear(64, 3))
        nn.init.zeros_(self.head[-1].weight)  # start from "the input's own statistics"
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        stats = torch.stack([x.amax((1, 2, 3)), x.mean((1, 2, 3)), x.amin((1, 2, 3))], 1)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3)), f.amin((2, 3)), stats], 1)
        return stats + self.head(pooled)


@register("thermal_cnn", task="thermal", input_size=INPUT_SIZE, channels=1)
def thermal_cnn(num_classes: int = 0) -> nn.Module:
    return ThermalCNN()  # always three outputs; the thermal task has no classes


def radiometric_stats(kelvin: torch.Tensor) -> torch.Tensor:
    """[B, H, W] kelvin → [B, 3] = (max, mean, min) per image, in the input's dtype."""
    flat = kelvin.flatten(1)
    # Accumulate the mean in float64 where the device has it: 300 K × a million pixels in float32 drifts.
    acc = torch.float32 if kelvin.device.type == "mps" else torch.float64
    mean = flat.to(acc).mean(1).to(kelvin.dtype)
    return torch.stack([flat.amax(1), mean, flat.amin(1)], 1)


def find_hotspots(kelvin: torch.Tensor, threshold_k: float, max_spots: int = 8, radius: int = 5) -> list[list[list]]:
    """Per image, up to `max_spots` local maxima hotter than `threshold_k` as [x, y, peak_k], hottest first.

    A local maximum equals the max of its (2·radius+1)² window; a flat hot plateau yields one
    spot per pixel of it, hottest-first order then keeps the first `max_spots`.
    """
    b, h, w = kelvin.shape
    pooled = F.max_pool2d(kelvin.unsqueeze(1), 2 * radius + 1, stride=1, padding=radius).squeeze(1)
    peak = (kelvin == pooled) & (kelvin > threshold_k)
    score = torch.where(peak, kelvin, torch.full_like(kelvin, float("-inf"))).flatten(1)
    vals, idx = score.topk(min(max_spots, h * w), dim=1)
    ok = torch.isfinite(vals).cpu()
    xs, ys, vals = (idx % w).cpu(), (idx // w).cpu(), vals.cpu()
    return [
        [list(s) for s in zip(xs[i][ok[i]].tolist(), ys[i][ok[i]].tolist(), vals[i][ok[i]].tolist())] for i in range(b)
    ]
