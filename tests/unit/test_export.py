"""shared.models.export: ONNX / TorchScript export parity, ONNX Runtime in the Predictor, `plantsight export`."""

import argparse
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from shared.models import ModelError, Predictor, build, default_meta, load_model_dir, save_model_dir
from shared.models.export import ExportError, OnnxModule, export_model, export_module
from shared.training.commands import add_parsers

# Small inputs where the network allows them; SimpleYOLO keeps its 448 input (14×14 grid) at 1/8 width.
CASES = {
    "simple_cnn": ((64, 64), {"input_size": [64, 64]}),
    "thermal_cnn": ((64, 64), {}),
    "unet_small": ((64, 64), {}),
    "simple_yolo": ((448, 448), {"width": 0.125}),
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics, so that eval-mode BN is not the identity in the exported graph."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    arch = request.param
    size, options = CASES[arch]
    torch.manual_seed(0)
    model = build(arch, **options)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    meta = default_meta(arch)
    meta.input_size, meta.options = size, dict(options)
    if arch == "simple_yolo":
        meta.thresholds["conf"] = 0.05  # an untrained detector scores low; keep boxes to compare
    root = tmp_path_factory.mktemp(arch)
    full = save_model_dir(root / "full", model, meta)
    meta_text = (full / "model.json").read_text()
    onnx_path = export_model(full, "onnx")
    ts_path = export_model(full, "torchscript")
    only = root / "onnx_only"
    only.mkdir()
    shutil.copy(full / "model.json", only)
    shutil.copy(onnx_path, only)
    return SimpleNamespace(arch=arch, task=meta.task, meta=meta, full=full, only=only, onnx=onnx_path, ts=ts_path,
                           meta_text=meta_text)


def test_export_writes_into_the_model_dir_and_leaves_model_json(exported):
    assert exported.onnx == exported.full / "model.onnx" and exported.onnx.is_file()
    assert exported.ts == exported.full / "model.ts" and exported.ts.is_file()
    assert (exported.full / "model.json").read_text() == exported.meta_text
    assert not list(exported.full.glob("*.tmp")) and not (exported.full / "model.onnx.data").exists()


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_and_torchscript_outputs_equal_eager(exported, batch):
    model, meta = load_model_dir(exported.full)
    x = torch.randn(batch, meta.channels, *meta.input_size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = model(x)
    sess = ort.InferenceSession(str(exported.onnx), providers=["CPUExecutionProvider"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch axis
    got_onnx = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the file still loads
        got_ts = torch.jit.load(str(exported.ts))(x)
    assert want.abs().max() > 0.01  # not a trivially zero output
    for got in (got_onnx, got_ts):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-3


def _frames(exported, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    h, w = exported.meta.input_size
    if exported.task == "thermal":  # radiometric centikelvin frames and plain uint8 ones
        ck = (torch.rand(batch, h, w, 1, generator=gen) * 20000 + 25000).to(torch.int32).to(torch.uint16)
        return [ck, torch.randint(0, 256, (batch, h, w, 1), generator=gen, dtype=torch.uint8)]
    return [torch.randint(0, 256, (batch, h, w, 3), generator=gen, dtype=torch.uint8)]


def _assert_same(task: str, want: list[dict], got: list[dict]) -> None:
    assert len(want) == len(got)
    for w, g in zip(want, got):
        if task == "classify":
            assert g["label"] == w["label"] and g["index"] == w["index"]
            np.testing.assert_allclose(g["probs"], w["probs"], atol=1e-4)
        elif task == "detect":
            assert len(g["boxes"]) == len(w["boxes"])
            if w["boxes"]:
                gb, wb = np.array(g["boxes"]), np.array(w["boxes"])
                assert np.array_equal(gb[:, 5], wb[:, 5])           # classes
                np.testing.assert_allclose(gb[:, :4], wb[:, :4], atol=1e-2)  # pixels
                np.testing.assert_allclose(gb[:, 4], wb[:, 4], atol=1e-4)    # scores
        elif task == "segment":
            assert np.array_equal(g["mask"], w["mask"])
            assert g["prob_max"] == pytest.approx(w["prob_max"], abs=1e-4)
        else:
            assert g["source"] == w["source"] and g["hotspots"] == w["hotspots"]
            np.testing.assert_allclose(g["cnn"], w["cnn"], atol=1e-2)  # kelvin: 1e-4 normalised × 100 K
            stats = ("max_k", "avg_k", "min_k")
            if w["source"] == "radiometric":  # exact statistics: computed in torch on both paths
                assert [g[k] for k in stats] == [w[k] for k in stats]
            else:
                np.testing.assert_allclose([g[k] for k in stats], [w[k] for k in stats], atol=1e-2)


@pytest.mark.parametrize("batch", [1, 4])
def test_predictor_on_an_onnx_only_dir_matches_the_eager_predictor(exported, batch):
    eager = Predictor.from_spec(exported.task, path=str(exported.full))
    onnx = Predictor.from_spec(exported.task, path=str(exported.only))
    assert eager.runtime == "torch" and not isinstance(eager.model, OnnxModule)
    assert onnx.runtime == "onnx" and isinstance(onnx.model, OnnxModule)
    assert onnx.name == eager.name and onnx.input_size() == eager.input_size()
    gen = torch.Generator().manual_seed(10 + batch)
    for frames in _frames(exported, batch, gen):
        want, got = eager.predict(frames), onnx.predict(frames)
        if exported.task == "detect":
            assert sum(len(o["boxes"]) for o in want) > 0  # something to compare
        _assert_same(exported.task, want, got)
    # runtime="onnx" picks model.onnx even beside model.pt.
    forced = Predictor.from_spec(exported.task, path=str(exported.full), runtime="onnx")
    assert forced.runtime == "onnx"
    frames = _frames(exported, batch, torch.Generator().manual_seed(3))[0]
    _assert_same(exported.task, eager.predict(frames), forced.predict(frames))


def test_runtime_errors_are_clear(tmp_path):
    d = save_model_dir(tmp_path / "m", build("thermal_cnn"), default_meta("thermal_cnn"))
    with pytest.raises(ModelError, match="model.onnx"):
        Predictor.from_spec("thermal", path=str(d), runtime="onnx")  # no model.onnx there
    with pytest.raises(ModelError, match="runtime 'tensorrt'"):
        Predictor.from_spec("thermal", path=str(d), runtime="tensorrt")
    with pytest.raises(ModelError, match="needs a model directory"):
        Predictor.from_spec("thermal", arch="thermal_cnn", runtime="onnx")
    (d / "model.onnx").write_bytes(b"not onnx")
    (d / "model.pt").unlink()
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        Predictor.from_spec("thermal", path=str(d))  # auto: only model.onnx → ONNX Runtime
    with pytest.raises(ModelError, match="model.pt"):
        Predictor.from_spec("thermal", path=str(d), runtime="torch")


class BatchBaked(nn.Module):
    """Right only for a batch of two: tracing bakes the Python branch, a fixed-shape graph the size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y if x.shape[0] == 2 else y + 1


@pytest.mark.parametrize("fmt,match", [("torchscript", "differs from the eager one by 1"),
                                       ("onnx", "fails on a random batch of 3")])
def test_an_export_that_does_not_match_eager_is_refused_and_removed(tmp_path, fmt, match):
    path = tmp_path / f"bad.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the baked branch is the point here
        with pytest.raises(ExportError, match=match):
            export_module(BatchBaked(), torch.randn(2, 3, 16, 16), fmt, path)
    assert not path.exists()
    # The same network without the branch exports fine, with parity checked on a batch of 3.
    ok = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert export_module(ok, torch.randn(2, 3, 16, 16), fmt, path) == path and path.is_file()


def test_export_model_errors(tmp_path):
    with pytest.raises(ModelError, match="model.json"):
        export_model(tmp_path / "missing", "onnx")
    d = save_model_dir(tmp_path / "m", build("thermal_cnn"), default_meta("thermal_cnn"))
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(d, "tflite")


def test_export_command(tmp_path, capsys):
    size, options = CASES["thermal_cnn"]
    meta = default_meta("thermal_cnn")
    meta.input_size = size
    d = save_model_dir(tmp_path / "m", build("thermal_cnn"), meta)
    p = argparse.ArgumentParser(prog="plantsight")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["export", "--model", str(d), "--format", "torchscript", "--out", str(tmp_path / "x" / "t.ts")])
    assert args.fn(args) == 0 and (tmp_path / "x" / "t.ts").is_file()
    assert "t.ts" in capsys.readouterr().out
    args = p.parse_args(["export", "--model", str(tmp_path / "missing"), "--format", "onnx"])
    assert args.fn(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("plantsight export:") and "model.json" in err
    with pytest.raises(SystemExit):
        p.parse_args(["export", "--model", str(d), "--format", "tflite"])
