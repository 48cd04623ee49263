"""Export a model directory to ONNX or TorchScript, checked against the eager network, and run ONNX models.

`export_model(dir, "onnx")` writes `dir/model.onnx` (dynamic batch axis, opset 18) and
`export_model(dir, "torchscript")` writes `dir/model.ts`; right after writing, the exported file
is loaded and run beside the eager network on a random normalised batch of another batch size,
and an `ExportError` is raised when they differ by `atol` (1e-3) or more. `model.json` is left
as it is: a directory holding `model.json` and `model.onnx` (with or without `model.pt`) is what
`Predictor` runs through ONNX Runtime, by way of `OnnxModule` here.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .modeldir import META, ONNX, TORCHSCRIPT, ModelMeta, load_meta, load_model_dir
from .registry import ModelError

log = logging.getLogger("plantsight.models")

__all__ = ["FORMATS", "ONNX", "TORCHSCRIPT", "ExportError", "OnnxModule", "export_model", "export_module",
           "load_onnx_dir", "ort_providers"]

FORMATS = {"onnx": ONNX, "torchscript": TORCHSCRIPT}
OPSET = 18
ATOL = 1e-3
EXPORT_BATCH, CHECK_BATCH = 2, 3  # checking on another batch size exercises the dynamic axis
_EXTERNAL_BYTES = 1_500_000_000  # weights above this go to model.onnx.data (protobuf's 2 GB limit)


class ExportError(ModelError):
    """An export failed, or the exported model's outputs differ from the eager network's."""


# --- exporting -----------------------------------------------------------------------------------
def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = nbytes > _EXTERNAL_BYTES
    # A self-contained file is written beside and renamed in; external weights need their final name.
    target = path if external else path.with_name(path.name + ".tmp")
    try:
        torch.onnx.export(
            model, (example,), str(target), dynamo=True, opset_version=OPSET, external_data=external,
            input_names=["input"], output_names=["output"], verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    except Exception as e:  # the dynamo exporter raises many types; the TorchScript-based one is the fallback
        warnings.warn(f"torch.onnx dynamo export failed ({type(e).__name__}: {e}); using the legacy exporter",
                      stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            torch.onnx.export(
                model, (example,), str(target), dynamo=False, opset_version=OPSET,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    if target != path:
        os.replace(target, path)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated (FutureWarning) but TorchScript is still what some runtimes load.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        traced = torch.jit.trace(model, example, check_trace=False)  # parity is checked below, on another batch
        tmp = path.with_name(path.name + ".tmp")
        torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)


def _load_exported(fmt: str, path: Path):
    """A callable Tensor → Tensor running the exported file on the CPU."""
    if fmt == "onnx":
        return OnnxModule(path, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        return torch.jit.load(str(path), map_location="cpu").eval()


def _check_parity(model: nn.Module, example: torch.Tensor, fmt: str, path: Path, atol: float, check_batch: int) -> None:
    """ExportError unless the file at `path` gives the eager outputs, within `atol`, on a fresh random batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(check_batch, *example.shape[1:], generator=gen)
    with torch.no_grad():
        want = model(x).float()
        try:
            got = _load_exported(fmt, path)(x).float()
        except Exception as e:  # ORT and TorchScript raise their own types, e.g. for a batch size baked in
            raise ExportError(f"{path}: the exported {fmt} model fails on a random batch of {check_batch} "
                              f"(the export used {example.shape[0]}): {type(e).__name__}: {e}") from e
    if want.shape != got.shape:
        raise ExportError(f"{path}: exported model gives shape {list(got.shape)} for a batch of {check_batch}, "
                          f"the eager one {list(want.shape)}")
    diff = (want - got).abs().max().item() if want.numel() else 0.0
    if not diff < atol:  # also catches NaN
        raise ExportError(f"{path}: exported {fmt} model differs from the eager one by {diff:.3g} "
                          f"(tolerance {atol:g}) on a random batch of {check_batch}")


def export_module(model: nn.Module, example: torch.Tensor, fmt: str, path: str | os.PathLike,
                  *, atol: float = ATOL, check_batch: int = CHECK_BATCH) -> Path:
    """Export `model` (on the CPU, in eval mode) traced with `example` [B, C, H, W] to `path`; check parity.

    The check runs the eager and the exported model on a fresh random batch of `check_batch` images
    and raises `ExportError` when any output differs by `atol` or more.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = example.detach().cpu().float()
    try:
        with torch.no_grad():
            (_export_onnx if fmt == "onnx" else _export_torchscript)(model, example, path)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{path}: {fmt} export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e

    try:
        _check_parity(model, example, fmt, path, atol, check_batch)
    except ExportError:
        # A file that does not do what the model does must not be picked up by anything.
        for f in (path, path.with_name(path.name + ".data")):
            f.unlink(missing_ok=True)
        raise
    return path


def example_input(meta: ModelMeta, batch: int = EXPORT_BATCH, seed: int = 0) -> torch.Tensor:
    """A random normalised [batch, C, H, W] network input for `meta`'s model."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, meta.channels, *meta.input_size, generator=gen)


def export_model(model_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
                 *, atol: float = ATOL) -> Path:
    """Export a model directory's network to `out` (default `model_dir/model.onnx` or `model.ts`); its path."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    model, meta = load_model_dir(model_dir, "cpu")
    path = Path(out) if out is not None else Path(model_dir) / FORMATS[fmt]
    return export_module(model, example_input(meta), fmt, path, atol=atol)


# --- running ONNX models -------------------------------------------------------------------------
def ort_providers(device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None) -> tuple[list, str]:
    """(ONNX Runtime providers, best first, and why the first one): on a CUDA device TensorRT where the installed
    ORT offers it (its engines cached in ``cache_dir``, so a restart does not rebuild them), then CUDA; the CPU
    always last."""
    import onnxruntime as ort  # noqa: PLC0415 (ONNX Runtime loads only for ONNX models)

    device = torch.device(device)
    available = ort.get_available_providers()
    providers: list = ["CPUExecutionProvider"]
    if device.type != "cuda":
        return providers, "the device is the CPU"
    why = "the device is CUDA"
    if "CUDAExecutionProvider" in available:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    else:
        why = "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    if "TensorrtExecutionProvider" in available and cache_dir is not None:
        providers.insert(0, ("TensorrtExecutionProvider", {
            "device_id": device.index or 0, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir), "trt_fp16_enable": True}))
        why += " and this onnxruntime offers TensorRT"
    return providers, why


class OnnxModule(nn.Module):
    """An `nn.Module`-like wrapper of an ONNX Runtime session: float32 NCHW tensor in, tensor out.

    The input is copied to the host for ORT and the output comes back on the input's device, so
    the Predictor's normalisation and decoding run exactly as for the eager network.
    """

    runtime = "onnx"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__()
        import onnxruntime as ort  # noqa: PLC0415 (as in ort_providers)

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())  # the same budget as torch's
        opts.log_severity_level = 3
        providers, why = ort_providers(device, cache_dir=self.path.parent / "tensorrt-cache")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelError(f"{self.path}: not a loadable ONNX model: {e}") from e
        self.provider = self.session.get_providers()[0]
        log.info("%s: ONNX Runtime runs it on %s (%s)", self.path, self.provider, why)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        # Exports often fix the batch at 1 (Ultralytics' default): such a network runs image by image.
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The network's output; a tuple when the graph has several (an Ultralytics segmenter's two)."""
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.fixed_batch is None or self.fixed_batch == len(feed):
            ys = self.session.run(None, {self.input_name: feed})
        elif self.fixed_batch == 1:
            runs = [self.session.run(None, {self.input_name: feed[i:i + 1]}) for i in range(len(feed))]
            ys = [np.concatenate(parts) for parts in zip(*runs)]
        else:
            raise ModelError(f"{self.path}: takes batches of exactly {self.fixed_batch}, not {len(feed)}")
        out = tuple(torch.from_numpy(y).to(x.device) for y in ys)
        return out[0] if len(out) == 1 else out

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"


def load_onnx_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[OnnxModule, ModelMeta]:
    """The ONNX Runtime network of a model directory (`model.onnx` + `model.json`), with its metadata."""
    meta = load_meta(path)
    f = Path(path) / ONNX
    if not f.is_file():
        raise ModelError(f"{f}: no such file (an ONNX model directory needs {META} and {ONNX})")
    return OnnxModule(f, device), meta
