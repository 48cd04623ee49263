"""The runtimes an imported network runs on: ONNX Runtime (``export.OnnxModule``) or TorchScript."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .export import OnnxModule
from .modeldir import FILES, ModelMeta
from .registry import ModelError


class TorchScriptModule(nn.Module):
    """A TorchScript network from ``torch.jit.load``, marked so that infer runs it as it is."""

    runtime = "torchscript"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__()
        self.path = Path(path)
        try:
            with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; the files still load
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(self.path), map_location=torch.device(device))
        except Exception as e:  # torch raises RuntimeError and others for a foreign or corrupt file
            raise ModelError(f"{self.path}: not a loadable TorchScript model: {e}") from e
        self.net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The network's output; a tuple when it gives several (an Ultralytics segmenter's two)."""
        y = self.net(x)
        if isinstance(y, (tuple, list)):
            return y[0] if len(y) == 1 else tuple(y)
        return y


def load_imported(path: str | os.PathLike, meta: ModelMeta, device: str | torch.device = "cpu") -> nn.Module:
    """The network of an imported model directory (``format`` onnx or torchscript)."""
    f = Path(path) / FILES[meta.format]
    if not f.is_file():
        raise ModelError(f"{f}: no such file (model.json says format {meta.format})")
    return OnnxModule(f, device) if meta.format == "onnx" else TorchScriptModule(f, device)
