"""Training, evaluation and their commands on tiny synthetic data (shared/training)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.data.scenes import make_scene
from shared.models import Predictor, build, default_meta, load_model_dir
from shared.models.thermal import KELVIN_STD
from shared.training.augment import PreparedDataset, augment, collate, letterbox_boxes, prepare, unletterbox_mask
from shared.training.commands import add_parsers
from shared.training.evaluate import evaluate
from shared.training.train import compute_loss, seed_everything, train, train_step

SCENE = {"classify": "process", "detect": "equipment", "segment": "surface", "thermal": "thermal"}


class SceneDataset(torch.utils.data.Dataset):
    """Scene frames with targets in the loaders' formats (independent of shared.data.datasets)."""

    def __init__(self, task: str, n: int, seed: int = 0):
        self.task, self.scene = task, make_scene(SCENE[task], seed=seed, anomaly_rate=0.5)
        self.classes = list(self.scene.classes) if task == "detect" else (["normal", "anomaly"] if task == "classify"
                                                                          else [])
        self.files = [Path(f"{i}.png") for i in range(n)]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img, t = self.scene.render(i)
        if self.task == "classify":
            return img, int(t["index"])
        if self.task == "detect":
            h, w = img.shape[:2]
            rows = [[c, (x1 + x2 + 1) / 2 / w, (y1 + y2 + 1) / 2 / h, (x2 - x1 + 1) / w, (y2 - y1 + 1) / h]
                    for x1, y1, x2, y2, c in t["boxes"]]
            return img, np.asarray(rows, np.float32).reshape(-1, 5)
        if self.task == "segment":
            return img, t["mask"].astype(np.uint8)
        return img, np.asarray([t["max_k"], t["avg_k"], t["min_k"]], np.float32)


SMALL = {"classify": ("simple_cnn", {}), "detect": ("simple_yolo", {"width": 0.25}),
         "segment": ("unet_small", {"base": 8}), "thermal": ("thermal_cnn", {})}


@pytest.mark.parametrize("task", ["classify", "detect", "segment", "thermal"])
def test_one_step_lowers_the_loss(task):
    seed_everything(0)
    ds = SceneDataset(task, 4)
    arch, opts = SMALL[task]
    meta = default_meta(arch, ds.classes)
    meta.options = opts
    model = build(arch, num_classes=len(ds.classes), **opts)
    pred = Predictor(model, meta)
    prepared = PreparedDataset(ds, task, meta.input_size, meta.normalisation, train=True, seed=0)
    x, y = collate([prepared[i] for i in range(len(ds))])
    if task == "thermal":
        # ThermalCNN starts from the input's own max/mean/min, already within a hundredth of a kelvin of
        # these frames' truth; offset the truth by 5 K (a camera that reads low) so there is a loss to lower.
        y = y + 5.0 / KELVIN_STD
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.manual_seed(1)  # the same dropout mask before and after the step
    before = train_step(model, pred, opt, x, y)
    torch.manual_seed(1)
    with torch.no_grad():
        after = float(compute_loss(task, model(pred._normalise(x) if x.dtype == torch.uint8 else x), y))
    assert np.isfinite(before) and after < before


def test_boxes_and_masks_follow_letterbox_and_augmentation():
    # A white rectangle on a wide black image: its box and its mask must land on the white pixels.
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:60, 30:90] = 255
    target = np.array([[0, 60 / 200, 40 / 100, 60 / 200, 40 / 100]], np.float32)
    out, box = prepare("detect", img, (448, 448))
    t = letterbox_boxes(target, img.shape[:2], (448, 448), box)
    rng = np.random.default_rng(3)
    for _ in range(4):  # flip + brightness: the box stays on the rectangle
        a_img, a_t = augment("detect", out, t.copy(), rng)
        _, cx, cy, w, h = a_t[0] * 448
        inside = a_img[int(cy - h / 2) + 2:int(cy + h / 2) - 2, int(cx - w / 2) + 2:int(cx + w / 2) - 2]
        assert inside.mean() > 200 and inside.size > 0
    mask = (img[:, :, 0] > 0).astype(np.uint8)
    from shared.training.augment import letterbox_mask

    seg_img, _ = prepare("segment", img, (256, 256))
    seg_mask = letterbox_mask(mask, (256, 256))
    back = unletterbox_mask(seg_mask, img.shape[:2], prepare("segment", img, (256, 256))[1])
    assert back.shape == mask.shape and (back & mask).sum() / (back | mask).sum() > 0.9  # back where it was (±1 px)
    for _ in range(4):  # flip + rotation + brightness/contrast move image and mask together
        a_img, a_mask = augment("segment", seg_img, seg_mask, rng)
        gray = a_img.mean(2)
        assert gray[a_mask == 1].mean() > gray[a_mask == 0].mean() + 100


def test_thermal_augmentation_keeps_targets_exact():
    kelvin = np.random.default_rng(0).uniform(290, 400, (12, 16))
    stats = np.array([kelvin.max(), kelvin.mean(), kelvin.min()])
    k2, t2 = augment("thermal", kelvin, stats, np.random.default_rng(1))
    np.testing.assert_allclose(t2, [k2.max(), k2.mean(), k2.min()], rtol=1e-12)


def test_prepared_samples_repeat_with_the_seed():
    ds = SceneDataset("segment", 2)
    a = PreparedDataset(ds, "segment", (256, 256), {}, train=True, seed=5)
    b = PreparedDataset(ds, "segment", (256, 256), {}, train=True, seed=5)
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])
    b.epoch = 1
    assert not torch.equal(a[1][0], b[1][0])  # a new epoch draws new augmentation


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from shared.data.synth import write_dataset

    root = tmp_path_factory.mktemp("data")
    return {t: write_dataset(t, root / t, n=16, seed=1, progress=False) and root / t for t in SCENE}


def test_train_one_epoch_writes_a_loadable_model_dir(datasets, tmp_path):
    from shared.data.datasets import load_split

    out = tmp_path / "m"
    res = train("classify", datasets["classify"], out, epochs=1, batch_size=4, device="cpu", progress=False)
    for f in ("model.pt", "model.json", "training_curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    model, meta = load_model_dir(out)
    assert meta.classes == load_split("classify", datasets["classify"], "train").classes
    assert re.fullmatch(r"\d{8}-\d{6}", meta.version) and meta.version == res["version"]
    assert meta.metrics["accuracy"] == res["accuracy"] and 0 <= res["accuracy"] <= 1
    assert meta.metrics["epoch"] == 1 and res["epochs_run"] == 1
    assert meta.input_size == (224, 224)
    assert meta.normalisation == default_meta("simple_cnn").normalisation
    ev = evaluate("classify", out, datasets["classify"], out_dir=tmp_path / "ev", device="cpu", progress=False)
    assert {"accuracy", "macro_f1", "confusion_matrix", "classes"} <= set(ev)
    assert sum(map(sum, ev["confusion_matrix"])) == ev["images"]
    assert ev["accuracy"] == pytest.approx(res["accuracy"])  # validation during training = evaluation
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file() and (tmp_path / "ev" / "predictions.png").is_file()


def test_training_repeats_with_the_seed(datasets, tmp_path):
    kw = dict(epochs=1, batch_size=4, device="cpu", progress=False, seed=3)
    a = train("thermal", datasets["thermal"], tmp_path / "a", **kw)
    b = train("thermal", datasets["thermal"], tmp_path / "b", **kw)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["mae_avg_k"] == b["mae_avg_k"]
    sa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    p = argparse.ArgumentParser(prog="plantsight")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    code = args.fn(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("task,arch", [("thermal", []), ("segment", ["--arch", "unet_small"])])
def test_cli_train_and_eval_json(task, arch, datasets, tmp_path, capsys):
    data, model = str(datasets[task]), str(tmp_path / "m")
    code, out, err = _cli(["train", task, "--data", data, "--out", model, "--epochs", "1", "--device", "cpu",
                           "--batch-size", "4", *arch], capsys)
    assert code == 0, err
    code, out, err = _cli(["eval", task, "--model", model, "--data", data, "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    res = json.loads(out)  # exactly one JSON object on stdout
    keys = {"thermal": ("mae_max_k", "mae_avg_k", "mae_min_k"), "segment": ("dice", "iou")}[task]
    assert all(isinstance(res[k], float) for k in keys)
    if task == "segment":
        assert "image_auroc" in res and 0 <= res["dice"] <= 1


def test_cli_eval_detect_predictions_perfect_and_malformed(datasets, tmp_path, capsys):
    from shared.data.datasets import load_split

    ds = load_split("detect", datasets["detect"], "val")
    pdir = tmp_path / "pred"
    pdir.mkdir()
    for i, f in enumerate(ds.files):  # the truth itself, with confidence 1: a perfect score
        rows = ds[i][1]
        (pdir / (Path(f).stem + ".txt")).write_text("".join(f"{int(r[0])} {r[1]} {r[2]} {r[3]} {r[4]} 1.0\n"
                                                            for r in rows))
    code, out, err = _cli(["eval", "detect", "--data", str(datasets["detect"]), "--predictions", str(pdir),
                           "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["map50"] == 1.0 and res["map50_95"] == 1.0 and res["prediction_files"] == len(ds)
    bad = pdir / (Path(ds.files[0]).stem + ".txt")
    bad.write_text("0 0.5 0.5 oops\n")
    code, out, err = _cli(["eval", "detect", "--data", str(datasets["detect"]), "--predictions", str(pdir),
                           "--json"], capsys)
    assert code == 2 and str(bad) in err and "Traceback" not in err and out == ""


def test_cli_malformed_dataset_exits_2_naming_the_file(tmp_path, capsys):
    from shared.data.synth import write_dataset

    data = tmp_path / "d"
    write_dataset("detect", data, n=8, seed=0, progress=False)
    labels = sorted(p for p in data.rglob("*.txt") if p.parent.name in ("train", "val"))
    assert labels, "the detect layout has YOLO label files"
    labels[0].write_text("0 0.5 not-a-number 0.1 0.1\n")
    code, out, err = _cli(["train", "detect", "--data", str(data), "--out", str(tmp_path / "m"), "--epochs", "1",
                           "--device", "cpu"], capsys)
    assert code == 2 and labels[0].name in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 0 and not (tmp_path / "m" / "model.pt").exists()


def test_cli_missing_model_dir_exits_2(datasets, tmp_path, capsys):
    code, out, err = _cli(["eval", "thermal", "--model", str(tmp_path / "none"), "--data", str(datasets["thermal"]),
                           "--json"], capsys)
    assert code == 2 and "model.json" in err and out == ""
