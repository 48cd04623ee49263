"""shared.models.gradcam: Grad-CAM maps, overlays, `explain_image` and the `plantsight explain` command."""

import argparse
import warnings

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from shared.imaging import stretch
from shared.models import ModelError, Predictor, build, default_meta, save_model_dir
from shared.models.gradcam import conv_layers, gradcam, overlay
from shared.training.commands import add_parsers
from shared.training.explain import explain_image

SIZE = 32
RED = (slice(4, 14), slice(2, 12))      # rows, cols of the red square (100 px)
GREEN = (slice(20, 26), slice(22, 28))  # the green square (36 px)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ColourNet(nn.Module):
    """Logit 0 = mean red, logit 1 = mean green, through two convs whose activations are known exactly."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)  # identity
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)  # picks R and G
        self.act2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv1.weight.zero_()
            for c in range(3):
                self.conv1.weight[c, c, 1, 1] = 1.0
            self.conv2.weight.zero_()
            self.conv2.weight[0, 0] = 1.0
            self.conv2.weight[1, 1] = 1.0
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _squares(n: int = 1) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    x = torch.zeros(n, 3, SIZE, SIZE)
    x[:, 0, RED[0], RED[1]] = 1.0
    x[:, 1, GREEN[0], GREEN[1]] = 1.0
    red = np.zeros((SIZE, SIZE), np.float32)
    red[RED] = 1
    green = np.zeros((SIZE, SIZE), np.float32)
    green[GREEN] = 1
    return x, red, green


def _small_cnn_dir(tmp_path, size=(64, 64)):
    model = build("simple_cnn", input_size=size)
    meta = default_meta("simple_cnn")
    meta.input_size, meta.options = size, {"input_size": list(size)}
    return save_model_dir(tmp_path / "cnn", model, meta), model, meta


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               and not m._backward_pre_hooks for m in model.modules())


# ---- the known answer -------------------------------------------------------------------------

def test_cam_of_each_class_is_exactly_its_colour_square():
    model = ColourNet()
    x, red, green = _squares(2)
    cams = gradcam(model, x, "conv2", class_index=[0, 1])
    assert cams.shape == (2, SIZE, SIZE) and cams.dtype == np.float32
    np.testing.assert_allclose(cams[0], red, atol=1e-6)    # class 0 "red" looks only at the red square
    np.testing.assert_allclose(cams[1], green, atol=1e-6)  # class 1 "green" only at the green one
    # An int class index applies to every image.
    np.testing.assert_allclose(gradcam(model, x, "conv2", class_index=1), np.stack([green, green]), atol=1e-6)


def test_default_layer_is_the_last_conv_and_default_class_the_top_one():
    model = ColourNet()
    x, red, _ = _squares(1)
    assert conv_layers(model) == ["conv1", "conv2"]
    assert model(x).argmax(1).item() == 0  # the red square is the larger one
    np.testing.assert_allclose(gradcam(model, x)[0], red, atol=1e-6)
    # An earlier layer: conv1 is the identity, the score's gradient reaches only the red channel.
    np.testing.assert_allclose(gradcam(model, x, "conv1")[0], red, atol=1e-6)


def test_class_with_no_positive_evidence_gives_an_all_zero_map():
    model = ColourNet()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # class 1 = "not red"
    x, _, _ = _squares(1)
    cam = gradcam(model, x, class_index=1)
    assert cam.shape == (1, SIZE, SIZE) and not cam.any()


# ---- hooks and model state ----------------------------------------------------------------------

def test_hooks_removed_and_model_state_restored_after_success_and_failure():
    model = ColourNet().train()
    model.conv1.weight.requires_grad_(False)
    names = [n for n, _ in model.named_modules()]
    x, _, _ = _squares(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: no deprecated hook API, no in-place trouble
        gradcam(model, x)
    with pytest.raises(ValueError, match="out of range"):
        gradcam(model, x, class_index=5)
    assert _no_hooks(model)
    assert model.training  # restored, though the pass ran in eval mode
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient accumulated
    assert model.act1.inplace and model.act2.inplace
    assert [n for n, _ in model.named_modules()] == names and isinstance(model.conv2, nn.Conv2d)


def test_unknown_layer_names_it_and_lists_the_conv_layers():
    model = build("simple_cnn", input_size=(32, 32))
    with pytest.raises(ValueError) as e:
        gradcam(model, torch.randn(1, 3, 32, 32), "features.9")
    msg = str(e.value)
    assert "'features.9'" in msg and "features.0.0, features.1.0, features.2.0" in msg
    assert _no_hooks(model)


def test_batched_equals_per_image_on_simple_cnn_with_its_default_layer():
    model = build("simple_cnn", input_size=(64, 64)).eval()
    x = torch.randn(3, 3, 64, 64)
    cams = gradcam(model, x)
    assert cams.shape == (3, 64, 64) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    assert all(c.max() == pytest.approx(1.0) for c in cams)  # each image scaled to its own peak
    single = np.concatenate([gradcam(model, x[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(cams, single, atol=1e-5)
    # The default is the last conv: naming it gives the same maps.
    np.testing.assert_allclose(gradcam(model, x, "features.2.0"), cams, atol=1e-6)


def test_layer_whose_output_is_added_to_in_place_works_inside_inference_mode():
    model = build("resnet18").eval()  # BasicBlock does `out += identity` on bn2's output
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        cams = gradcam(model, x, "layer4.1.bn2")
    assert cams.shape == (2, 64, 64) and 0.0 <= cams.min() and cams.max() == pytest.approx(1.0)
    with torch.no_grad():
        logits = model(x)  # the model still works, unchanged
    assert logits.shape == (2, 2) and _no_hooks(model)


def test_non_classifier_output_is_refused():
    with pytest.raises(ValueError, match=r"\[B, classes\]"):
        gradcam(build("unet_small"), torch.randn(1, 3, 32, 32))


# ---- overlay and explain_image ------------------------------------------------------------------

def test_overlay_resizes_the_cam_and_uses_jet():
    image = np.full((40, 60, 3), 100, np.uint8)
    cam = np.zeros((10, 15), np.float32)
    cam[:, 8:] = 1.0
    assert np.array_equal(overlay(image, cam, alpha=0.0), image)
    heat = overlay(np.zeros((40, 60), np.uint8), cam, alpha=1.0)  # a grey image is accepted
    assert heat.shape == (40, 60, 3) and heat.dtype == np.uint8
    assert heat[0, 0].tolist() == [0, 0, 128] and heat[0, -1].tolist() == [128, 0, 0]  # JET: 0 blue, 1 dark red
    mixed = overlay(image, cam)
    assert mixed.shape == image.shape and not np.array_equal(mixed, image)


def test_explain_image_writes_an_overlay_of_the_image_size_and_matches_the_predictor(tmp_path):
    model_dir, model, meta = _small_cnn_dir(tmp_path)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "sub" / "cam.png"
    info = explain_image(model_dir, tmp_path / "img.png", out)
    written = cv2.imread(str(out))
    assert written.shape == (80, 100, 3)
    # Label and probability are those of the pipeline's Predictor on the stretched frame.
    frame, _ = stretch(rgb, (64, 64))
    want = Predictor.from_spec("classify", path=str(model_dir)).predict(torch.from_numpy(frame)[None])[0]
    assert info["label"] == want["label"] and info["prob"] == pytest.approx(max(want["probs"]), abs=1e-5)
    assert info["layer"] == "features.2.0"
    assert explain_image(model_dir, tmp_path / "img.png", out, layer="features.0.0")["layer"] == "features.0.0"


def test_explain_image_refuses_a_non_classifier(tmp_path):
    d = save_model_dir(tmp_path / "th", build("thermal_cnn"), default_meta("thermal_cnn"))
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ModelError, match="classifiers"):
        explain_image(d, tmp_path / "img.png", tmp_path / "cam.png")


def test_explain_command_exit_codes(tmp_path, capsys):
    model_dir, _, _ = _small_cnn_dir(tmp_path)
    cv2.imwrite(str(tmp_path / "img.png"), np.full((50, 70, 3), 90, np.uint8))
    p = argparse.ArgumentParser(prog="plantsight")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["explain", "--model", str(model_dir), str(tmp_path / "img.png"), "--out",
                         str(tmp_path / "o.png")])
    assert args.fn(args) == 0
    assert cv2.imread(str(tmp_path / "o.png")).shape == (50, 70, 3)
    assert "features.2.0" in capsys.readouterr().out
    args = p.parse_args(["explain", "--model", str(model_dir), str(tmp_path / "img.png"), "--out",
                         str(tmp_path / "o2.png"), "--layer", "nope"])
    assert args.fn(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and "features.0.0" in err
    args = p.parse_args(["explain", "--model", str(tmp_path / "missing"), str(tmp_path / "img.png"), "--out", "x.png"])
    assert args.fn(args) == 2 and "model.json" in capsys.readouterr().err
