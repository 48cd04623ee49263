"""`plantsight models import`: files in the layouts plants bring become model directories whose outputs are
the network's own, decoded; files that fit no layout are refused by name and leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from shared.models import ModelError, Predictor
from shared.models.imported import import_model
from tests.support.environment import env_without_plantsight
from tests.support.foreign_models import (
    Classifier,
    Segmenter,
    UltralyticsDetect,
    UltralyticsSegment,
    WithNms,
    export_onnx,
    reference_instance_mask,
    reference_yolo,
    ultralytics_metadata,
)
from tests.support.paths import ROOT

NAMES = ["pump", "valve", "motor"]
SIZE = 64


def frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))


def run_onnx(path, frames_u8: torch.Tensor, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The network's own output, image by image, on the frames normalised as the model directory says."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = frames_u8.permute(0, 3, 1, 2).float().numpy() / 255.0
    x = (x - np.array(mean, np.float32).reshape(1, 3, 1, 1)) / np.array(std, np.float32).reshape(1, 3, 1, 1)
    return np.concatenate([sess.run(None, {"images": x[i:i + 1].astype(np.float32)})[0] for i in range(len(x))])


def detector(tmp_path, **meta_extra):
    f = export_onnx(UltralyticsDetect(len(NAMES), SIZE), tmp_path / "yolo-plant.onnx", SIZE,
                    ultralytics_metadata("detect", NAMES, SIZE, **meta_extra))
    return f


def test_an_ultralytics_detect_export_reads_its_metadata_and_gives_the_networks_own_boxes(tmp_path):
    f = detector(tmp_path)
    meta = import_model(f, "detect", tmp_path / "m")
    on_disk = json.loads((tmp_path / "m" / "model.json").read_text())
    assert (on_disk["format"], on_disk["layout"], on_disk["classes"], on_disk["input_size"]) == (
        "onnx", "yolo", NAMES, [SIZE, SIZE])
    assert on_disk["normalisation"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # pixels / 255
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.onnx"]
    assert meta.arch == "yolo-plant" and len(meta.version) == 12

    predictor = Predictor.from_spec("detect", path=str(tmp_path / "m"))
    batch = frames(3)  # the file takes batches of one: the predictor feeds it image by image
    outs = predictor.predict(batch)
    raw = run_onnx(f, batch)
    th = meta.thresholds
    for out, r in zip(outs, raw):
        want = reference_yolo(r, th["conf"], th["iou"])
        got = sorted(out["boxes"], key=lambda b: -b[4])
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
        assert out["classes"] == NAMES
    assert predictor.runtime_label == "onnxruntime/CPUExecutionProvider"


def test_the_end_to_end_layout_keeps_the_boxes_over_the_threshold_as_they_are(tmp_path):
    f = export_onnx(WithNms(UltralyticsDetect(len(NAMES), SIZE)), tmp_path / "e2e.onnx", SIZE,
                    ultralytics_metadata("detect", NAMES, SIZE, nms=True))
    meta = import_model(f, "detect", tmp_path / "m")
    assert meta.layout == "yolo_nms"
    batch = frames(2, seed=1)
    outs = Predictor.from_spec("detect", path=str(tmp_path / "m")).predict(batch)
    for out, r in zip(outs, run_onnx(f, batch)):
        want = r[r[:, 4] >= meta.thresholds["conf"]]
        np.testing.assert_allclose(np.array(out["boxes"], dtype=np.float64).reshape(-1, 6), want, atol=1e-5)


def test_classifiers_give_the_networks_probabilities(tmp_path):
    probs = export_onnx(Classifier(3, probs=True), tmp_path / "cls.onnx", SIZE,
                        ultralytics_metadata("classify", NAMES, SIZE))
    logits = export_onnx(Classifier(3, probs=False), tmp_path / "plain.onnx", SIZE)
    assert import_model(probs, "classify", tmp_path / "p").layout == "probs"
    meta = import_model(logits, "classify", tmp_path / "l", names=NAMES, normalisation="unit")
    assert meta.layout == "logits" and meta.classes == NAMES
    batch = frames(4, seed=2)
    for d, f, softmax in ((tmp_path / "p", probs, False), (tmp_path / "l", logits, True)):
        outs = Predictor.from_spec("classify", path=str(d)).predict(batch)
        want = run_onnx(f, batch)
        if softmax:
            want = torch.from_numpy(want).softmax(1).numpy()
        np.testing.assert_allclose(np.array([o["probs"] for o in outs]), want, atol=1e-5)
        assert [o["label"] for o in outs] == [NAMES[i] for i in want.argmax(1)]


def test_a_torchscript_classifier_imports_with_its_input_size_given(tmp_path):
    net = Classifier(3, probs=False).eval()
    f = tmp_path / "line-state.ts"
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, SIZE, SIZE)), str(f))
    with pytest.raises(ModelError, match="give --input-size"):
        import_model(f, "classify", tmp_path / "m")
    meta = import_model(f, "classify", tmp_path / "m", input_size=(SIZE, SIZE), names=NAMES)
    assert (meta.format, meta.layout) == ("torchscript", "logits")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.ts"]
    batch = frames(2, seed=3)
    outs = Predictor.from_spec("classify", path=str(tmp_path / "m")).predict(batch)
    x = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor(meta.normalisation["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(meta.normalisation["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = net(x).softmax(1).numpy()
    np.testing.assert_allclose(np.array([o["probs"] for o in outs]), want, atol=1e-5)


def test_a_segmenter_gives_the_networks_mask(tmp_path):
    f = export_onnx(Segmenter(), tmp_path / "seg.onnx", SIZE)
    meta = import_model(f, "segment", tmp_path / "m", normalisation="unit")
    assert meta.layout == "logits" and meta.classes == ["defect"]
    batch = frames(2, seed=4)
    outs = Predictor.from_spec("segment", path=str(tmp_path / "m")).predict(batch)
    want = torch.from_numpy(run_onnx(f, batch)).sigmoid()[:, 0].numpy() > meta.thresholds["mask"]
    np.testing.assert_array_equal(np.stack([o["mask"] for o in outs]), want.astype(np.uint8))


@pytest.mark.parametrize("case, error", [
    ("text", "not an ONNX or TorchScript model"),
    ("detect_as_classify", r"output of shape \[1, 7, 64\] is not \[batch, classes\]; a classify model's output "
                           r"must be one of: logits: .*; probs: "),
    ("wrong_names", "the network scores 3 classes but --names gives 2 (a, b)"),
    ("grey_input", "takes 1-channel input; a detect model must take 3-channel RGB"),
    ("metadata_task", "its metadata says it is a detect model, not a segment model"),
])
def test_a_file_that_fits_no_layout_is_refused_by_name_and_leaves_the_old_directory_as_it_was(tmp_path, case, error):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.json").write_text("the running model's\n")
    kw, task = {}, "detect"
    if case == "text":
        f = tmp_path / "notes.onnx"
        f.write_text("not a model")
    elif case == "grey_input":
        f = export_onnx(torch.nn.Conv2d(1, 7, 1), tmp_path / "grey.onnx", SIZE, channels=1)
    else:
        f = detector(tmp_path)
        task = {"detect_as_classify": "classify", "metadata_task": "segment"}.get(case, "detect")
        if case == "wrong_names":
            kw["names"] = ["a", "b"]
        if case == "detect_as_classify":  # no metadata to contradict the task: the output decides
            f = export_onnx(UltralyticsDetect(len(NAMES), SIZE), tmp_path / "bare.onnx", SIZE)
    with pytest.raises(ModelError, match=error if case == "detect_as_classify" else None) as e:
        import_model(f, task, out, **kw)
    assert str(f) in str(e.value)
    if case != "detect_as_classify":
        assert error in str(e.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")] == []  # no work folder left
    assert sorted(p.name for p in out.iterdir()) == ["model.json"]
    assert (out / "model.json").read_text() == "the running model's\n"


def test_the_command_writes_the_directory_and_prints_what_it_found(tmp_path):
    f = detector(tmp_path)
    cmd = [sys.executable, "-m", "services.cli", "models", "import", str(f), "--task", "detect",
           "--out", str(tmp_path / "m"), "--names", "pump", "valve", "motor"]
    res = subprocess.run(cmd, cwd=ROOT, env=env_without_plantsight(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["task"], out["format"], out["layout"], out["classes"]) == ("detect", "onnx", "yolo", NAMES)
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing.onnx"), *cmd[6:]], cwd=ROOT, env=env_without_plantsight(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "missing.onnx: no such file" in bad.stderr


def test_eval_scores_an_imported_detector_on_the_native_dataset_layout(tmp_path):
    from shared.data.synth import write_dataset
    from shared.models.registry import DEFAULT_CLASSES
    from shared.training.evaluate import evaluate

    classes = DEFAULT_CLASSES["detect"]
    data = write_dataset("detect", tmp_path / "data", n=10, seed=3, progress=False)
    f = export_onnx(UltralyticsDetect(len(classes), SIZE), tmp_path / "site-yolo.onnx", SIZE,
                    ultralytics_metadata("detect", classes, SIZE))
    import_model(f, "detect", tmp_path / "m")
    m = evaluate("detect", tmp_path / "m", data["out"], device="cpu", progress=False)
    assert 0.0 <= m["map50"] <= 1.0 and 0.0 <= m["map50_95"] <= m["map50"]
    assert (tmp_path / "m" / "eval-val" / "predictions.png").is_file()


def test_an_ultralytics_segment_export_gives_the_union_of_its_instance_masks(tmp_path):
    names = ["scratch", "stain"]
    f = export_onnx(UltralyticsSegment(len(names), SIZE), tmp_path / "defects-seg.onnx", SIZE,
                    ultralytics_metadata("segment", names, SIZE), outputs=("output0", "output1"))
    meta = import_model(f, "segment", tmp_path / "m")
    assert (meta.layout, meta.classes) == ("yolo_seg", names)
    assert {k: meta.thresholds[k] for k in ("conf", "iou", "mask")} == {"conf": 0.25, "iou": 0.45, "mask": 0.5}
    batch = frames(2, seed=5)
    outs = Predictor.from_spec("segment", path=str(tmp_path / "m")).predict(batch)
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    for out, img in zip(outs, batch):
        det, proto = sess.run(None, {"images": img.permute(2, 0, 1)[None].float().numpy() / 255.0})
        want = reference_instance_mask(det[0], proto[0], 0.25, 0.45, SIZE)
        assert want.any() and out["instances"]
        assert (out["mask"].astype(bool) != want).mean() < 0.002  # bilinear edges may round either way
    with pytest.raises(ModelError, match=r"is not \[batch, classes, height, width\]"):
        bare = export_onnx(UltralyticsDetect(len(NAMES), SIZE), tmp_path / "bare.onnx", SIZE)  # no metadata
        import_model(bare, "segment", tmp_path / "m2", layout="logits")


def test_a_thermal_regressor_reports_its_own_kelvin_beside_the_frames_exact_statistics(tmp_path):
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, 3))
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[100.0], [50.0], [10.0]]))
        net[2].bias.copy_(torch.tensor([400.0, 300.0, 280.0]))
    f = export_onnx(net, tmp_path / "kiln.onnx", (24, 32), channels=1)
    meta = import_model(f, "thermal", tmp_path / "m")
    assert (meta.layout, meta.channels, meta.classes) == ("kelvin", 1, [])
    kelvin = np.full((1, 24, 32, 1), 30_000, np.uint16)  # 300.00 K in centikelvin
    kelvin[0, 5, 7, 0] = 45_000
    out = Predictor.from_spec("thermal", path=str(tmp_path / "m")).predict(torch.from_numpy(kelvin))[0]
    assert (out["max_k"], out["min_k"], out["source"]) == (450.0, 300.0, "radiometric")
    x = (torch.from_numpy(kelvin.astype(np.float32)).permute(0, 3, 1, 2) / 100 - 300) / 100  # model.json's kelvin
    with torch.inference_mode():
        np.testing.assert_allclose(out["cnn"], net(x)[0].numpy(), atol=1e-3)
