"""Loading a task's model for infer: the device, torch's threads, the engine, the warm-up."""

from __future__ import annotations

import os

import torch

from services.inference.engine import EngineOptions, build_engine
from shared.models import Predictor


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"inference.device is {name!r} but no CUDA device is available")
    return name


def torch_threads(inf, replicas: int, device: str) -> int | None:
    """Torch's threads for one infer process: ``inference.threads``, else, on the CPU with more than one
    replica, this machine's cores shared out among the replicas ``plantsight up`` starts on it (two replicas
    of two threads each on two cores would fight over them); None leaves torch's default.

    On a small CPU box one single-threaded replica per core runs more frames than one replica on every
    core: its threads never wait at a barrier for one that another process pushed off its core. Each batch
    takes longer, so latency at low load rises (docs/performance.md has the figures)."""
    if inf.threads:
        return inf.threads
    if replicas > 1 and not str(device).startswith("cuda"):
        return max(1, len(os.sched_getaffinity(0)) // replicas)
    return None


def load_predictor(task: str, *, path: str | None, arch: str | None, device: str, inf) -> Predictor:
    """The task's model on ``device``, running through the configured engine, checked and warmed.

    On the CPU the engine is traced on two images and checked on one (that run is its warm-up): a
    detector at 448×448 costs seconds per image on one thread, and a slow start delays every camera.
    On CUDA it is warmed at every batch size it runs (``inference.batch_buckets``: the powers of two up to
    ``max_batch``; without buckets ``max_batch`` and 1, the sizes the batcher sends most), so kernel
    loading, cuDNN's choices and CUDA graph capture happen then, not on the first frames.
    """
    predictor = Predictor.from_spec(task, path=path, arch=arch, device=device)
    cuda = str(device).startswith("cuda")
    example = predictor.example_input(max(2, inf.max_batch) if cuda else 2)
    options = EngineOptions.from_config(inf)
    if predictor.runtime == "torch":  # an ONNX model directory already runs through ORT
        predictor.set_engine(build_engine(predictor.model, example, options, device))
    if cuda:
        with torch.inference_mode():
            for n in options.resolved(torch.device(device)).bucket_sizes() or sorted({inf.max_batch, 1}):
                predictor.forward(example[:n].contiguous(memory_format=predictor._memory_format))
        torch.cuda.synchronize()
    return predictor
