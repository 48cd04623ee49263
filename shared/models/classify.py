"""Process-state classifiers: the chapter's SimpleCNN, compact networks for a plant's few hundred pictures, and
torchvision's transfer networks."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from .registry import ModelError, register

INPUT_SIZE = (224, 224)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class SimpleCNN(nn.Module):
    """Three conv blocks 3→32→64→128, then FC 512 → num_classes (the book chapter's network)."""

    def __init__(self, num_classes: int, in_channels: int = 3, input_size: tuple[int, int] = INPUT_SIZE):
        super().__init__()
        self.features = nn.Sequential(_block(in_channels, 32), _block(32, 64), _block(64, 128))
        h, w = input_size[0] // 8, input_size[1] // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * h * w, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("simple_cnn", task="classify", input_size=INPUT_SIZE)
def simple_cnn(num_classes: int, input_size: tuple[int, int] = INPUT_SIZE) -> nn.Module:
    return SimpleCNN(num_classes, input_size=tuple(input_size))


IMAGENET = "imagenet"  # --pretrained imagenet: torchvision's ImageNet weights of the architecture


def imagenet_state(weights: torchvision.models.WeightsEnum) -> dict:
    """torchvision's ImageNet weights, from torch's cache (``$TORCH_HOME/hub/checkpoints``) or downloaded into it
    once; ModelError saying what to do when neither works (a machine without internet)."""
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, OSError, a hash mismatch: all mean the same to the user
        where = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ModelError(f"cannot fetch ImageNet weights {weights} ({type(e).__name__}: {e}); on a machine without "
                         f"internet, download {weights.url} elsewhere and pass --pretrained FILE, or put it at "
                         f"{where}") from None


class CompactCNN(nn.Module):
    """Four stride-2 conv blocks 3→16→32→64→128 and global average pooling: about 100 k weights, so a few
    hundred pictures train it on a CPU in minutes without it memorising them (no large dense layer)."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        chans = [in_channels, 16, 32, 64, 128]
        self.features = nn.Sequential(*(nn.Sequential(
            nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))
            for a, b in zip(chans, chans[1:])))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                        nn.Linear(chans[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("compact_cnn", task="classify", input_size=INPUT_SIZE)
def compact_cnn(num_classes: int) -> nn.Module:
    return CompactCNN(num_classes)


class _Residual(nn.Module):
    """Two 3×3 convolutions with a shortcut (ResNet's basic block); the last BatchNorm starts at zero, so
    every block starts as the identity and a fresh network's output does not grow with its depth."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        # The shortcut first, so that a block's last Conv2d is its body's (the one Grad-CAM's default would pick).
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.body[-1].weight)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


class SmallResNet(nn.Module):
    """A stride-2 stem and four residual stages 32→64→128→192 (224 px in, a 14×14 map out), then a score per
    class at every place of that map, pooled into the picture's score by log-sum-exp (a soft maximum):
    0.9 M weights, a quarter of a GFLOP per picture.

    Scoring places, not the whole picture, is what lets a few hundred pictures teach it: a picture labelled
    good says that every one of its 196 places is good, a defective one that at least one place is not, and
    the soft maximum lets the place that looks wrong decide instead of averaging it away (multiple-instance
    learning). ``sharpness`` sets how close to a plain maximum the pooling is: 4 learnt half as fast as 10
    on photographs with small defects, 30 no faster. There is no large dense layer to memorise with.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 192),
                 strides: tuple[int, ...] = (2, 2, 2, 1), sharpness: float = 10.0):
        super().__init__()
        stem = widths[0]
        layers = [nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        cin = stem
        for w, st in zip(widths, strides):
            layers.append(_Residual(cin, w, st))
            cin = w
        self.features = nn.Sequential(*layers)
        self.sharpness = float(sharpness)
        self.dropout = nn.Dropout(0.2)
        self.score = nn.Conv2d(cin, num_classes, 1)
        nn.init.zeros_(self.score.weight)  # equal odds for every class at the start: the first loss is ln(classes)
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(self.dropout(self.features(x))).flatten(2) * self.sharpness
        return (torch.logsumexp(s, 2) - math.log(s.shape[2])) / self.sharpness


@register("small_resnet", task="classify", input_size=INPUT_SIZE)
def small_resnet(num_classes: int, sharpness: float = 10.0) -> nn.Module:
    return SmallResNet(num_classes, sharpness=sharpness)


def _load_imagenet(model: nn.Module, pretrained: str | Path, weights: torchvision.models.WeightsEnum) -> None:
    if str(pretrained) == IMAGENET:
        state, where = imagenet_state(weights), str(weights)
    else:
        where = str(pretrained)
        try:
            state = torch.load(Path(pretrained), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types (OSError, UnpicklingError, RuntimeError) for a bad file
            raise ModelError(f"{where}: cannot load ImageNet weights: {e}") from e
    try:
        model.load_state_dict(state)
    except Exception as e:  # a state dict of another architecture
        raise ModelError(f"{where}: does not fit {type(model).__name__}: {e}") from e


def _transfer(model: nn.Module, head: str, num_classes: int, pretrained, freeze: bool,
              weights: torchvision.models.WeightsEnum) -> nn.Module:
    # Load the ImageNet state dict while the 1000-class head still matches, then replace it.
    if pretrained is not None:
        _load_imagenet(model, pretrained, weights)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))  # new head: trainable even when frozen
    return model


@register("resnet18", task="classify", input_size=INPUT_SIZE)
def resnet18(num_classes: int, pretrained: str | Path | None = None, freeze: bool = False) -> nn.Module:
    return _transfer(torchvision.models.resnet18(weights=None), "fc", num_classes, pretrained, freeze,
                     torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


@register("resnet50", task="classify", input_size=INPUT_SIZE)
def resnet50(num_classes: int, pretrained: str | Path | None = None, freeze: bool = False) -> nn.Module:
    return _transfer(torchvision.models.resnet50(weights=None), "fc", num_classes, pretrained, freeze,
                     torchvision.models.ResNet50_Weights.IMAGENET1K_V2)


@register("efficientnet_b0", task="classify", input_size=INPUT_SIZE)
def efficientnet_b0(num_classes: int, pretrained: str | Path | None = None, freeze: bool = False) -> nn.Module:
    return _transfer(torchvision.models.efficientnet_b0(weights=None), "classifier.1", num_classes, pretrained,
                     freeze, torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1)
