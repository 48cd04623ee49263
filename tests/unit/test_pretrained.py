"""Transfer learning starts from torchvision's ImageNet weights: taken from torch's cache, fetched once when
the machine is online, and refused with what to do when it is not."""

from __future__ import annotations

import subprocess
import sys

import torch
import torchvision

from shared.models import build
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT


def test_imagenet_weights_come_from_torchs_cache_and_the_new_head_replaces_theirs(tmp_path, monkeypatch):
    torch.manual_seed(7)
    cached = torchvision.models.resnet18(weights=None).state_dict()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(cached, checkpoints / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build("resnet18", num_classes=2, pretrained="imagenet")
    assert torch.equal(model.conv1.weight, cached["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_mean, cached["layer4.1.bn2.running_mean"])
    assert model.fc.out_features == 2


def test_offline_the_command_says_to_pass_a_weights_file_and_writes_no_model(tmp_path):
    data, out = tmp_path / "data", tmp_path / "model"
    env = {**env_without_plantsight(), "TORCH_HOME": str(tmp_path / "torch"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    ps = [sys.executable, "-m", "services.cli"]
    synth = subprocess.run([*ps, "synth", "classify", "--out", str(data), "--n", "8"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert synth.returncode == 0, synth.stderr
    res = subprocess.run([*ps, "train", "classify", "--data", str(data), "--out", str(out), "--arch", "resnet18",
                          "--pretrained", "imagenet", "--epochs", "1", "--device", "cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "cannot fetch ImageNet weights ResNet18_Weights.IMAGENET1K_V1" in res.stderr
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth elsewhere and pass --pretrained FILE" \
        in res.stderr
    assert not out.exists()
