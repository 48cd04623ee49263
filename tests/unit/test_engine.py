"""Every engine option gives the eager network's outputs (within tolerance) for each task's default architecture;
how many torch threads an infer process takes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from services.inference.engine import TOL_FP32, TOL_REDUCED, EngineOptions, build_engine, check_parity, example_batch
from services.inference.loading import torch_threads
from shared.config import DEFAULT_ARCH, InferenceConfig
from shared.models import Predictor
from shared.models.modeldir import default_meta
from shared.models.registry import build

# Small inputs keep the tests quick; each network is fully convolutional or takes its input size.
SMALL = {"simple_cnn": ((32, 32), {"input_size": (32, 32)}), "simple_yolo": ((64, 64), {"width": 0.25}),
         "unet_small": ((32, 32), {}), "thermal_cnn": ((32, 32), {}),
         "anchor_free": ((64, 64), {"width": 8, "neck": 16})}
ARCHS = sorted({*DEFAULT_ARCH.values(), "anchor_free"})
OPTIONS = {
    "eager": EngineOptions(engine="eager", amp="off"),
    "torchscript": EngineOptions(engine="torchscript", amp="off"),
    "onnx": EngineOptions(engine="onnx", amp="off"),
    "int8": EngineOptions(engine="int8", amp="off"),
    "channels_last": EngineOptions(engine="eager", amp="off", channels_last=True),
    "torchscript+channels_last": EngineOptions(engine="torchscript", amp="off", channels_last=True),
    "bf16": EngineOptions(engine="eager", amp="bf16"),
}


def _net(arch: str):
    torch.manual_seed(0)
    size, opts = SMALL[arch]
    net = build(arch, **opts).eval()
    with torch.no_grad():  # BatchNorm with non-trivial statistics, so folding it is really exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    channels = 1 if arch == "thermal_cnn" else 3
    return net, example_batch(channels, size, 4, seed=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_engine_option_matches_eager(arch, option):
    net, x = _net(arch)
    engine = build_engine(net, x, OPTIONS[option], "cpu", check=False)
    assert "failed" not in engine.label
    assert engine.label.split("+")[0] == OPTIONS[option].engine
    # int8 quantises the linear layers and traces the rest like torchscript (run eagerly, its convolutions were slow)
    assert isinstance(engine.forward, torch.jit.ScriptModule) == (OPTIONS[option].engine in ("torchscript", "int8"))
    reduced = option in ("int8", "bf16")
    atol, rtol = TOL_REDUCED if reduced else TOL_FP32
    fresh = example_batch(x.shape[1], tuple(x.shape[2:]), 3, seed=7)  # another batch size and other pixels
    with torch.inference_mode():
        want, got = net(fresh), engine(fresh.contiguous(memory_format=engine.memory_format))
    assert got.shape == want.shape
    diff = (want - got.float()).abs().max().item()
    assert diff <= atol + rtol * want.abs().max().item(), f"{arch} {option}: differs by {diff}"


def test_auto_is_a_frozen_trace_on_cpu_and_eager_fp16_channels_last_on_cuda():
    auto = EngineOptions.from_config(InferenceConfig())
    assert auto.resolved(torch.device("cpu")) == EngineOptions("torchscript", "off", False, False, False, False, 16)
    assert auto.resolved(torch.device("cuda")) == EngineOptions("eager", "fp16", True, False, False, True, 16)
    # CUDA-only options are dropped on the CPU; compile asks for the eager network under auto.
    opts = EngineOptions(cuda_graphs=True, compile=True)
    assert opts.resolved(torch.device("cpu")) == EngineOptions("eager", "off", False, True, False, False)


def test_batch_buckets_pad_to_a_few_sizes_and_return_the_real_rows():
    assert EngineOptions(batch_buckets=True, max_batch=64).bucket_sizes() == (1, 2, 4, 8, 16, 32, 64)
    assert EngineOptions(batch_buckets=True, max_batch=12).bucket_sizes() == (1, 2, 4, 8, 12)
    assert EngineOptions(batch_buckets=False, max_batch=12).bucket_sizes() == ()
    net, x = _net("simple_cnn")
    seen = []
    engine = build_engine(net, x, EngineOptions(engine="eager", amp="off", batch_buckets=True, max_batch=12), "cpu")
    assert engine.label == "eager+buckets"
    inner = engine.forward.fn
    engine.forward.fn = lambda t: (seen.append(t.shape[0]), inner(t))[1]
    fresh = example_batch(3, (32, 32), 13, seed=5)
    with torch.inference_mode():
        for n in (1, 3, 5, 9, 12, 13):
            got, want = engine(fresh[:n]), net(fresh[:n])
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    assert seen == [1, 4, 8, 12, 12, 13]  # 13 is above max_batch: run as it is


def test_an_engine_that_cannot_run_falls_back_to_eager_with_the_reason():
    net, x = _net("simple_cnn")
    engine = build_engine(net, x, EngineOptions(engine="int8", amp="off"), "meta")
    assert engine.label.startswith("eager (int8 failed: RuntimeError: dynamic INT8 quantisation runs on the CPU")
    assert engine.forward is net


def test_parity_check_rejects_an_engine_that_differs():
    net, x = _net("simple_cnn")
    with pytest.raises(RuntimeError, match="differs from eager by"):
        check_parity(net, lambda t: net(t) + 0.5, x, reduced=False)
    with pytest.raises(RuntimeError, match="output shape"):
        check_parity(net, lambda t: net(t)[:, :1], x, reduced=False)


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "thermal"])
def test_predictor_gives_the_same_results_through_the_default_engine(task):
    arch = DEFAULT_ARCH[task]
    size, opts = SMALL[arch]
    meta = default_meta(arch)
    meta.input_size, meta.options = size, {k: v for k, v in opts.items() if k != "input_size"}
    if arch == "simple_cnn":
        meta.options = {"input_size": list(size)}
    net, _ = _net(arch)
    eager = Predictor(net, meta, "cpu")
    fast = Predictor(net, meta, "cpu")
    engine = build_engine(net, fast.example_input(4), EngineOptions.from_config(InferenceConfig()), "cpu")
    assert engine.label == "torchscript"
    fast.set_engine(engine)
    rng = np.random.default_rng(3)
    if task == "thermal":
        frames = torch.from_numpy(rng.integers(29000, 46000, (3, 40, 48, 1), dtype=np.uint16))
    else:
        frames = torch.from_numpy(rng.integers(0, 256, (3, *size, 3), dtype=np.uint8))
    want, got = eager.predict(frames), fast.predict(frames)
    assert len(want) == len(got) == 3
    for a, b in zip(want, got):
        if task == "classify":
            assert a["index"] == b["index"] and np.allclose(a["probs"], b["probs"], atol=1e-4)
        elif task == "detect":
            assert len(a["boxes"]) == len(b["boxes"])
            assert np.allclose(np.array(a["boxes"]).reshape(-1, 6), np.array(b["boxes"]).reshape(-1, 6), atol=1e-2)
        elif task == "segment":
            assert abs(a["prob_max"] - b["prob_max"]) < 1e-4
            assert (a["mask"] != b["mask"]).mean() < 0.01
        else:
            assert a["max_k"] == b["max_k"] and np.allclose(a["cnn"], b["cnn"], atol=1e-2)


# --- on a GPU (skipped without one; run on the lent H100 by bench/gpu-check.sh) --------------------------
CUDA_OPTIONS = {
    "eager": EngineOptions(engine="eager", amp="off", channels_last=False),
    "fp16": EngineOptions(engine="eager", amp="fp16", channels_last=False),
    "fp16+channels_last": EngineOptions(engine="eager", amp="fp16", channels_last=True),
    "bf16+channels_last": EngineOptions(engine="eager", amp="bf16", channels_last=True),
    "fp16+cuda_graphs": EngineOptions(engine="eager", amp="fp16", channels_last=True, cuda_graphs=True),
    "torchscript": EngineOptions(engine="torchscript", amp="off", channels_last=False),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option", list(CUDA_OPTIONS))
def test_each_cuda_option_matches_eager_on_the_cpu(arch, option):
    net, x = _net(arch)
    fresh = example_batch(x.shape[1], tuple(x.shape[2:]), 3, seed=7)
    with torch.inference_mode():
        want = net(fresh)
    gpu = _net(arch)[0].cuda()
    engine = build_engine(gpu, x.cuda(), CUDA_OPTIONS[option], "cuda", check=False)
    assert "failed" not in engine.label, engine.label
    # Against the CPU's fp32: cuDNN may use TF32 for fp32 convolutions, so every option gets the reduced bound.
    atol, rtol = TOL_REDUCED
    with torch.inference_mode():
        for batch in (fresh, fresh[:1], fresh):  # graphs: a second size, then a replay of the first
            got = engine(batch.cuda().contiguous(memory_format=engine.memory_format)).float().cpu()
            ref = want[: len(batch)]
            diff = (ref - got).abs().max().item()
            assert diff <= atol + rtol * ref.abs().max().item(), f"{arch} {option}: differs by {diff}"


def test_infer_replicas_on_the_cpu_share_the_cores_out_unless_threads_are_set():
    cores = len(os.sched_getaffinity(0))
    plain = InferenceConfig(device="cpu")
    assert torch_threads(plain, 1, "cpu") is None  # one replica: torch's default (every core)
    assert torch_threads(plain, 2, "cpu") == max(1, cores // 2)
    assert torch_threads(plain, cores * 3, "cpu") == 1  # more replicas than cores: still one thread each
    assert torch_threads(plain, 3, "cuda") is None  # on a GPU the CPU threads are not the model's
    assert torch_threads(InferenceConfig(device="cpu", threads=3), 2, "cpu") == 3  # the key wins
    assert torch_threads(InferenceConfig(device="cpu", threads=3), 1, "cuda:0") == 3
