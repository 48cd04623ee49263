"""Architecture registry: task modules register builders here; everything else looks them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from shared.names import TASKS

# Class names the synthetic scenes use; an untrained net or a fresh training run starts from these.
DEFAULT_CLASSES: dict[str, list[str]] = {
    "classify": ["normal", "anomaly"],
    "detect": ["pump", "valve", "motor", "leak", "hot_spot"],
    "segment": ["defect"],
    "thermal": [],
}


class ModelError(ValueError):
    """A model directory, its metadata or an architecture name is unusable."""


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchInfo:
    name: str
    task: str
    input_size: tuple[int, int]  # (h, w)
    channels: int
    builder: Builder


ARCHS: dict[str, ArchInfo] = {}


def register(name: str, *, task: str, input_size: tuple[int, int], channels: int = 3) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(num_classes, **options) -> nn.Module` under `name`."""
    if task not in TASKS:
        raise ValueError(f"architecture {name!r}: unknown task {task!r}; known: {', '.join(TASKS)}")
    if channels not in (1, 3):
        raise ValueError(f"architecture {name!r}: channels must be 1 or 3, not {channels}")

    def deco(builder: Builder) -> Builder:
        # Two plugins claiming one name is a bug; failing at import shows it at once.
        if name in ARCHS:
            raise ValueError(f"architecture {name!r} is registered twice")
        ARCHS[name] = ArchInfo(name, task, (int(input_size[0]), int(input_size[1])), channels, builder)
        return builder

    return deco


def get(name: str) -> ArchInfo:
    """The registered architecture `name`; ModelError (a ValueError) naming it and the known ones otherwise."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}") from None


def build(name: str, num_classes: int | None = None, **options) -> nn.Module:
    """A fresh network for `name`; `num_classes` defaults to the task's DEFAULT_CLASSES."""
    info = get(name)
    if num_classes is None:
        num_classes = len(DEFAULT_CLASSES[info.task])
    return info.builder(num_classes, **options)


def describe() -> list[dict]:
    """Every architecture with its parameter count and per-image input/output shapes."""
    out = []
    for info in ARCHS.values():
        # The meta device allocates nothing and computes nothing: resnet50 and the full U-Net
        # describe themselves in milliseconds.
        with torch.device("meta"):
            model = build(info.name).eval()
            x = torch.empty(1, info.channels, *info.input_size)
            with torch.no_grad():
                y = model(x)
        out.append({
            "arch": info.name,
            "task": info.task,
            "params": int(sum(p.numel() for p in model.parameters())),
            "input": [info.channels, *info.input_size],
            "output": list(y.shape[1:]),
        })
    return out
