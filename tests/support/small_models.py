"""Small model directories for tests that swap or shadow models: simple_cnn at 32×32 frames, quick to run."""

from __future__ import annotations

import torch

from shared.models.modeldir import default_meta, save_model_dir
from shared.models.registry import build

SIZE = [32, 32]  # small frames keep the networks quick; preprocess sizes frames from model.json


def model_dir(path, version: str, seed: int):
    """A classify model directory at ``path``: simple_cnn for SIZE frames, weights drawn from ``seed``."""
    torch.manual_seed(seed)
    meta = default_meta("simple_cnn")
    meta.input_size, meta.options, meta.version = tuple(SIZE), {"input_size": SIZE}, version
    save_model_dir(path, build("simple_cnn", input_size=SIZE), meta)
    return path
