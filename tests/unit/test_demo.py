"""The built-in demo config: every task has two synthetic cameras and runs the trained demo model of its task."""

from __future__ import annotations

import collections

import torch

from shared.config import DEMO_MODELS, demo_config
from shared.models import build, default_meta, load_meta, save_model_dir


def test_demo_has_two_synthetic_cameras_per_task_and_untrained_nets_by_default(tmp_path):
    cfg = demo_config({"PLANTSIGHT_DEMO_MODELS": str(tmp_path / "none")})
    per_task = collections.Counter(t for c in cfg.cameras for t in c.tasks)
    assert per_task == {"classify": 2, "detect": 2, "segment": 2, "thermal": 2}
    assert all(c.source.startswith("synthetic://") for c in cfg.cameras)
    assert {t: m.arch for t, m in cfg.models.items()} == {"classify": "simple_cnn", "detect": "simple_yolo",
                                                         "segment": "unet_small", "thermal": "thermal_cnn"}


def test_demo_uses_the_trained_models_of_make_demo_models(tmp_path):
    save_model_dir(tmp_path / "thermal", build("thermal_cnn"), default_meta("thermal_cnn"))
    cfg = demo_config({"PLANTSIGHT_DEMO_MODELS": str(tmp_path)})
    assert cfg.models["thermal"].path == tmp_path / "thermal" and cfg.models["thermal"].arch is None
    assert cfg.models["classify"].arch == "simple_cnn"  # not trained: stays an untrained net


def test_the_demo_runs_the_trained_models_that_come_with_plantsight():
    cfg = demo_config({})
    for task, spec in cfg.models.items():
        assert spec.path == DEMO_MODELS / task and (spec.path / "model.json").is_file(), task
    meta = load_meta(cfg.models["classify"].path)
    assert meta.arch == "compact_cnn" and meta.metrics["accuracy"] >= 0.95
    weights = torch.load(cfg.models["detect"].path / "model.pt", weights_only=True)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}  # half the bytes
