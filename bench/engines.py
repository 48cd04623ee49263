"""Engines side by side: the bare network as eager, frozen TorchScript, ONNX Runtime and INT8, one process.

    python -m bench engines [--arch simple_cnn resnet18] [--batch 8] [--seconds 10] [--device auto]

For each architecture, every engine runs the same random batch through the same ``Predictor`` code
infer uses (normalisation on the device, postprocessing) for a fixed time after a warm-up; prints one
JSON object with images per second per engine, which engine ``auto`` picks, and how it compares with
eager measured in the same run. This is the measurement behind ``inference.engine: auto``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch

from bench.common import machine, say, versions

ENGINES = ("eager", "torchscript", "onnx", "int8")
# On CUDA the choices are precision, layout and launch overhead rather than the runtime.
CUDA_VARIANTS = {
    "eager": {"engine": "eager", "amp": "off", "channels_last": False},
    "fp16": {"engine": "eager", "amp": "fp16", "channels_last": False},
    "fp16+channels_last": {"engine": "eager", "amp": "fp16", "channels_last": True},
    "bf16+channels_last": {"engine": "eager", "amp": "bf16", "channels_last": True},
    "fp16+channels_last+cuda_graphs": {"engine": "eager", "amp": "fp16", "channels_last": True, "cuda_graphs": True},
}


def measure(predictors: list, batch: int, seconds: float, size: tuple[int, int], channels: int) -> dict:
    """Images per second of ``predict`` on a random uint8 batch (after two warm-up calls), every predictor at
    once on a thread of its own (as infer's replicas run on one machine): the images of all of them per
    second, and the mean wall time of one batch."""
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (batch, *size, channels), dtype=np.uint8))
    counts = [0] * len(predictors)
    start = threading.Barrier(len(predictors) + 1)

    def run(i: int, predictor) -> None:
        x = frames.to(predictor.device)
        for _ in range(2):
            predictor.predict(x)
        start.wait()
        t0 = time.perf_counter()
        while True:
            predictor.predict(x)
            counts[i] += 1
            if time.perf_counter() - t0 >= seconds and counts[i] >= 3:
                break
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()

    workers = [threading.Thread(target=run, args=(i, p), daemon=True) for i, p in enumerate(predictors)]
    for w in workers:
        w.start()
    start.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.join()
    wall, cpu, n = time.perf_counter() - t0, time.process_time() - cpu0, sum(counts)
    return {"img_per_s": round(n * batch / wall, 1), "ms_per_batch": round(wall * len(predictors) / n * 1000, 2),
            "cpu_ms_per_img": round(cpu / (n * batch) * 1000, 2)}


def bare_model(task: str, arch: str | None, path: str | None, device: str, inf, seconds: float,
               workers: int = 1) -> tuple[dict, list]:
    """(figures, predictors) of the engine the config picks, as infer would load it: ``workers`` predictors
    running at once (infer's replicas), each with torch's threads as they are set in this process."""
    from services.inference.loading import load_predictor
    from shared.heap import keep_tensor_heap

    keep_tensor_heap()  # the heap infer runs with
    predictors = [load_predictor(task, path=path, arch=arch, device=device, inf=inf) for _ in range(workers)]
    out = measure(predictors, inf.max_batch, seconds, predictors[0].input_size(), predictors[0].meta.channels)
    out.update(engine=predictors[0].engine, workers=workers, torch_threads=torch.get_num_threads())
    return out, predictors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench engines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="classify")
    ap.add_argument("--arch", nargs="+", default=["simple_cnn", "resnet18"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="per engine and architecture")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engines", nargs="+", choices=[*ENGINES, *CUDA_VARIANTS],
                    help=f"default: {' '.join(ENGINES)} on the CPU, {' '.join(CUDA_VARIANTS)} on CUDA")
    args = ap.parse_args(argv)

    from services.inference.engine import EngineOptions, build_engine
    from services.inference.loading import pick_device
    from shared.config import InferenceConfig
    from shared.heap import keep_tensor_heap
    from shared.models import Predictor

    keep_tensor_heap()  # the heap infer runs with
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    variants = {name: CUDA_VARIANTS.get(name, {"engine": name, "amp": "off"}) if cuda
                else {"engine": name, "amp": "off"}
                for name in args.engines or (CUDA_VARIANTS if cuda else ENGINES)}
    auto = EngineOptions().resolved(torch.device(device))
    auto_name = next((n for n, v in variants.items()
                      if EngineOptions.from_config(InferenceConfig(device=device, **v)).resolved(torch.device(device))
                      == auto), auto.engine)
    out = {"mode": "engines", "task": args.task, "batch": args.batch, "seconds": args.seconds,
           **machine(device), "auto": auto_name, "archs": {}}
    for arch in args.arch:
        rows = {}
        for name, variant in variants.items():
            say(f"{arch}: {name} for {args.seconds:g} s")
            p = Predictor.from_spec(args.task, arch=arch, device=device)
            inf = InferenceConfig(device=device, max_batch=args.batch, **variant)
            engine = build_engine(p.model, p.example_input(args.batch), EngineOptions.from_config(inf), device)
            p.set_engine(engine)
            rows[name] = {**measure([p], args.batch, args.seconds, p.input_size(), p.meta.channels),
                          "engine": engine.label}
        best = max(rows, key=lambda k: rows[k]["img_per_s"])
        out["archs"][arch] = {"engines": rows, "fastest": best,
                              "auto": auto_name,
                              "auto_vs_eager": round(rows[auto_name]["img_per_s"] / rows["eager"]["img_per_s"], 3)
                              if auto_name in rows and "eager" in rows else None}
    out["load_average_end"] = machine(device)["load_average"]
    out["versions"] = versions()
    print(json.dumps(out))
    return 0
