"""Surface-defect segmenter: U-Net with a one-channel defect logit, and its Dice+BCE loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register

INPUT_SIZE = (256, 256)
# Every pixel starts as defect-free at 1 % (the focal-loss prior): defects cover a few percent of a plant's pictures,
# and a network starting at 0.5 everywhere spends its first hundreds of steps only learning that most pixels are
# clean, which is all a few hundred pictures' worth of steps can buy.
DEFECT_PRIOR = 0.01
PRIOR_LOGIT = -math.log((1 - DEFECT_PRIOR) / DEFECT_PRIOR)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with widths base·(1, 2, 4, 8, 16); input sides must be multiples of 16."""

    def __init__(self, base: int = 64, in_channels: int = 3, out_channels: int = 1, levels: int = 5):
        super().__init__()
        widths = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_double_conv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(w * 2, w, 2, stride=2) for w in reversed(widths[:-1]))
        self.merge = nn.ModuleList(_double_conv(w * 2, w) for w in reversed(widths[:-1]))
        self.out = nn.Conv2d(widths[0], out_channels, 1)
        nn.init.constant_(self.out.bias, PRIOR_LOGIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], 1))
        return self.out(x)


@register("unet", task="segment", input_size=INPUT_SIZE)
def unet(num_classes: int = 1, base: int = 64) -> nn.Module:
    # One defect logit whatever the class list says: the mask is defect / no defect.
    return UNet(base=base)


@register("unet_small", task="segment", input_size=INPUT_SIZE)
def unet_small(num_classes: int = 1, base: int = 16) -> nn.Module:
    return UNet(base=base)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE-with-logits plus (1 − soft Dice), Dice pooled over the batch; target 0/1, [N,1,H,W] or [N,H,W].

    Pooled (Σ overlaps over Σ sizes, as evaluation pools it over a split), not averaged per picture: a picture of
    good product has an empty mask, and its own soft Dice is near 0 for any probability mass at all, so a
    per-picture mean would reward pushing every pixel of every picture towards zero over finding the defects.
    """
    target = target.to(logits.dtype).reshape(logits.shape)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    # `smooth` keeps a batch with no defect predicted empty at Dice 1 instead of 0/0.
    dice = (2 * (prob * target).sum() + smooth) / (prob.sum() + target.sum() + smooth)
    return bce + (1 - dice)
