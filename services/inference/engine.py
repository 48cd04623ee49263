"""How a task's network runs: eager, frozen TorchScript, ONNX Runtime or INT8, with AMP, channels-last,
torch.compile and CUDA graphs as options (``inference.*`` in the config).

On the CPU the default is a frozen TorchScript trace (``jit.trace`` → ``jit.freeze`` →
``optimize_for_inference``): it removes Python from the forward pass and fuses layers, so it runs faster
than eager. ``int8`` (dynamic INT8 linear layers in the same trace) is faster still for networks whose
weights sit mostly in linear layers, at the cost of outputs close to eager's rather than equal; ``onnx``
runs through ONNX Runtime. ``plantsight bench engines`` measures them on the machine at hand and
docs/performance.md has the figures. On CUDA the default is eager with fp16 autocast and channels-last.
Every engine is checked against the eager network on a random batch when it is built; one that fails to
build or differs beyond tolerance falls back to eager with a warning naming the reason, so an option never
stops a service that eager could run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from shared.models.export import OnnxModule, export_module

log = logging.getLogger("plantsight.engine")

ENGINES = ("auto", "eager", "torchscript", "onnx", "int8")
AMPS = ("auto", "fp16", "bf16", "off")
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Parity against eager, |engine − eager| ≤ ATOL + RTOL·max|eager|: fp32 engines agree to float
# rounding; autocast and INT8 change the arithmetic, so they get a looser bound.
TOL_FP32 = (1e-3, 1e-4)
TOL_REDUCED = (5e-2, 2e-2)


@dataclass(frozen=True)
class EngineOptions:
    """The ``inference.*`` keys that choose how a network runs."""

    engine: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    cuda_graphs: bool = False
    batch_buckets: bool | None = None
    max_batch: int = 1

    @classmethod
    def from_config(cls, inf) -> "EngineOptions":
        return cls(engine=inf.engine, amp=inf.amp, channels_last=inf.channels_last, compile=inf.compile,
                   cuda_graphs=inf.cuda_graphs, batch_buckets=inf.batch_buckets, max_batch=inf.max_batch)

    def bucket_sizes(self) -> tuple[int, ...]:
        """The batch sizes a batch is padded up to: powers of two below ``max_batch``, and ``max_batch``."""
        if not self.batch_buckets:
            return ()
        return tuple(sorted({*(1 << k for k in range(self.max_batch.bit_length()) if 1 << k < self.max_batch),
                             self.max_batch}))

    def resolved(self, device: torch.device) -> "EngineOptions":
        """The concrete choices on ``device`` ("auto" and None replaced, CUDA-only options dropped on CPU)."""
        cuda = device.type == "cuda"
        engine = self.engine
        if engine == "auto":
            engine = "eager" if (cuda or self.compile) else "torchscript"
        amp = self.amp if self.amp != "auto" else ("fp16" if cuda else "off")
        channels_last = cuda if self.channels_last is None else self.channels_last
        buckets = cuda if self.batch_buckets is None else self.batch_buckets
        return EngineOptions(engine=engine, amp=amp, channels_last=channels_last,
                             compile=self.compile and engine == "eager", cuda_graphs=self.cuda_graphs and cuda,
                             batch_buckets=buckets, max_batch=self.max_batch)


@dataclass
class Engine:
    """A built engine: ``forward`` takes the normalised float32 NCHW batch the eager network takes."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    options: EngineOptions
    label: str  # e.g. "torchscript", "eager+fp16+cl", or "eager (torchscript failed: …)"
    memory_format: torch.memory_format = torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


@contextlib.contextmanager
def _quiet():
    """torch.jit and the ONNX exporter warn about their own deprecation and about tracing; none of it is news here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        yield


def _torchscript(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """jit.trace → jit.freeze (constants folded, conv+BN fused) → optimize_for_inference (MKLDNN on CPU)."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        return torch.jit.optimize_for_inference(frozen)


def _onnx(model: nn.Module, example: torch.Tensor, device: torch.device) -> nn.Module:
    cpu_model = copy.deepcopy(model).cpu().float().eval()  # export_module moves its argument to the CPU
    with tempfile.TemporaryDirectory(prefix="plantsight-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with _quiet():
            export_module(cpu_model, example.detach().cpu().float(), "onnx", path)
        return OnnxModule(path, device)  # the session holds the graph in memory; the file can go


def _int8(model: nn.Module, example: torch.Tensor, device: torch.device) -> nn.Module:
    """Linear layers dynamically quantised to INT8 (weights stored as int8, activations quantised per
    batch), the rest of the network frozen and traced as ``_torchscript`` does.

    A quarter of the weight bytes to read from memory: a network that keeps most of its weights in a large
    linear layer (the SimpleCNN: 51.4 M of 51.5 M) is bound by reading them at small batches. The
    convolutions stay fp32 and traced, because eager convolutions would cost more than the trace saves.
    """
    if device.type != "cpu":
        raise RuntimeError("dynamic INT8 quantisation runs on the CPU only")
    from torch.ao.quantization import quantize_dynamic  # noqa: PLC0415 (only the int8 engine needs it)

    with _quiet():
        quantized = quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)
    return _torchscript(quantized, example)


class _Autocast:
    """Runs ``fn`` under autocast to ``dtype``; the output comes back as float32."""

    def __init__(self, fn, device: torch.device, dtype: torch.dtype):
        self.fn, self.device_type, self.dtype = fn, device.type, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.fn(x).float()


class Buckets:
    """Pads a batch with copies of its last image up to the next of a few fixed sizes and returns the
    real rows. On a GPU every new batch size costs a stall (kernels loaded and chosen, a CUDA graph
    captured); with buckets the few sizes are all warmed at start and a half-full batch at low load
    runs as fast as a warm one. A batch above the largest size runs as it is."""

    def __init__(self, fn, sizes: tuple[int, ...], memory_format: torch.memory_format):
        self.fn, self.sizes, self.memory_format = fn, sizes, memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = next((s for s in self.sizes if s >= n), n)
        if size == n:
            return self.fn(x)
        padded = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])]).contiguous(memory_format=self.memory_format)
        return self.fn(padded)[:n]


class CudaGraphs:
    """Replays one captured CUDA graph per batch size (captured on first use, after a warm-up on a side stream).

    Python and kernel-launch overhead disappear for the sizes a batcher produces most (``max_batch``
    under load); the output is cloned out of the graph's static buffer before the next replay.
    """

    def __init__(self, fn, memory_format: torch.memory_format):
        self.fn, self.memory_format = fn, memory_format
        self.graphs: dict[tuple, tuple] = {}

    def _capture(self, x: torch.Tensor):
        static_in = x.clone(memory_format=self.memory_format)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        raise RuntimeError(f"output shape {list(b.shape)} differs from eager {list(a.shape)}")
    if not a.numel():
        return 0.0, 0.0
    return (a - b).abs().max().item(), a.abs().max().item()


def check_parity(eager: nn.Module, engine: Callable, example: torch.Tensor, reduced: bool) -> float:
    """Largest |engine − eager| on one image of ``example``; RuntimeError beyond tolerance.

    One image keeps the check cheap (a detector at 448×448 costs seconds per image on one CPU thread)
    and, being another batch size than the trace's, catches a batch dimension baked into it.
    """
    atol, rtol = TOL_REDUCED if reduced else TOL_FP32
    worst = 0.0
    for x in [example[:1]]:
        with torch.inference_mode():
            want = eager(x.contiguous())
            got = engine(x)
        diff, scale = _max_diff(want, got)
        if not diff <= atol + rtol * scale:  # also catches NaN
            raise RuntimeError(f"differs from eager by {diff:.3g} on a batch of {x.shape[0]} "
                               f"(tolerance {atol:g} + {rtol:g}×{scale:.3g})")
        worst = max(worst, diff)
    return worst


def build_engine(model: nn.Module, example: torch.Tensor, options: EngineOptions,
                 device: str | torch.device = "cpu", *, check: bool = True) -> Engine:
    """The engine ``options`` ask for around the eager ``model`` (on ``device``, eval mode).

    ``example`` is a normalised float32 [B, C, H, W] batch (B ≥ 2, so the one-image parity check runs
    another batch size than the trace); it is what traces are made with. A failure to build, or a
    difference from eager beyond tolerance, gives eager (with the reason in ``label`` and the log).
    """
    device = torch.device(device)
    opts = options.resolved(device)
    example = example.to(device)
    model = model.eval()
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    tags = []
    try:
        net = copy.deepcopy(model).to(memory_format=fmt) if opts.channels_last else model
        x = example.contiguous(memory_format=fmt)
        if opts.engine == "torchscript":
            fn = _torchscript(net, x)
        elif opts.engine == "onnx":
            fn = _onnx(net, x, device)
        elif opts.engine == "int8":
            fn = _int8(net, x, device)
        else:
            fn = net
        if opts.compile:
            fn = torch.compile(fn, dynamic=False)
            tags.append("compile")
        reduced = opts.engine == "int8"
        if opts.amp != "off":
            if opts.engine == "onnx":
                tags.append("amp ignored: onnx")
            else:
                fn = _Autocast(fn, device, _AMP_DTYPES[opts.amp])
                tags.append(opts.amp)
                reduced = True
        if opts.channels_last:
            tags.append("cl")
        if opts.cuda_graphs:
            fn = CudaGraphs(fn, fmt)
            tags.append("cudagraphs")
        if opts.bucket_sizes():
            fn = Buckets(fn, opts.bucket_sizes(), fmt)
            tags.append("buckets")
        label = "+".join([opts.engine, *tags])
        if check:
            diff = check_parity(model, fn, x, reduced)
            log.info("engine %s: within %.2g of eager", label, diff)
        return Engine(fn, opts, label, fmt)
    except Exception as e:  # every engine error type (trace, ORT, compile, capture) falls back the same way
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        log.warning("engine %s on %s failed (%s); running eager", opts.engine, device, why)
        eager = EngineOptions(engine="eager", amp="off", channels_last=False)
        return Engine(model, eager, f"eager ({opts.engine} failed: {why})")


def example_batch(channels: int, size: tuple[int, int], batch: int, seed: int = 0) -> torch.Tensor:
    """A random normalised [batch, C, H, W] input (what the Predictor feeds after normalising)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *size, generator=gen)
