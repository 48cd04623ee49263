"""The training recipe on data the scenes did not draw: photographs with drawn defects (bench/photo_defects.py).

What a plant team meets first: where its loss starts, how validation is made when it brought no val
split, what `train` warns about, and how the learning rate moves.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from bench.photo_defects import write_photo_dataset
from shared.data.datasets import has_split, load_split, stratified_holdout
from shared.models import Predictor
from shared.training.augment import PreparedDataset, collate
from shared.training.train import (
    DEFAULTS,
    INITIAL_LOSS_TOLERANCE,
    _build,
    data_warnings,
    first_batch_loss,
    lr_factor,
    train,
)
from tests.unit.test_training import _cli

TASKS = ("classify", "detect", "segment", "thermal")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for task in TASKS:
        write_photo_dataset(task, root / task, n_good=12, n_defect=12, split="train", seed=5)
    return root


@pytest.mark.parametrize("task", TASKS)
def test_each_default_network_starts_at_an_uninformed_loss(task, photos):
    """The first loss of each task's default network is within 25 % of an uninformed network's: ln 2 for the
    two-class classifier, the defect prior everywhere for the segmenter, the prior for the detector, the input's own
    statistics for the thermal network."""
    ds = load_split(task, photos / task, "train")
    arch = DEFAULTS[task]["arch"]
    torch.manual_seed(0)
    model, meta = _build(task, arch, list(ds.classes), torch.device("cpu"), None, None, None)
    pred = Predictor(model, meta)
    prepared = PreparedDataset(ds, task, meta.input_size, meta.normalisation, train=True, seed=0)
    x, y = collate([prepared[i] for i in range(8)])
    loss, expected = first_batch_loss(model, pred, x, y)
    if task == "classify":
        assert expected == pytest.approx(math.log(2), rel=1e-6)
    assert abs(loss / expected - 1) <= INITIAL_LOSS_TOLERANCE, (loss, expected)
    # the check leaves the network as it was: BatchNorm statistics included
    loss_again, _ = first_batch_loss(model, pred, x, y)
    assert loss_again == pytest.approx(loss, rel=1e-6)


def test_a_badly_started_network_is_caught_and_an_oversized_one_warned_about(photos, capsys):
    """A network that starts with confident answers is far from ln 2; the chapter's SimpleCNN has too many weights
    for a few pictures, and `train` says so and names the default."""
    ds = load_split("classify", photos / "classify", "train")
    model, meta = _build("classify", "small_resnet", list(ds.classes), torch.device("cpu"), None, None, None)
    with torch.no_grad():
        model.score.bias.copy_(torch.tensor([4.0, -4.0]))  # sure of one class from the start, as a bad init would be
    pred = Predictor(model, meta)
    x, y = collate([PreparedDataset(ds, "classify", meta.input_size, meta.normalisation, train=True)[i]
                    for i in range(8)])
    loss, expected = first_batch_loss(model, pred, x, y)
    assert abs(loss / expected - 1) > INITIAL_LOSS_TOLERANCE, (loss, expected)

    res = train("classify", photos / "classify", photos / "m-simple", arch="simple_cnn", epochs=1, batch_size=8,
                device="cpu", progress=False)
    err = capsys.readouterr().err
    oversized = [w for w in res["warnings"] if "simple_cnn has 51.5 M weights" in w]
    assert oversized and "small_resnet" in oversized[0] and f"warning: {oversized[0]}" in err


def test_a_dataset_without_val_holds_out_a_stratified_share_and_says_so(photos, capsys):
    assert not has_split("classify", photos / "classify", "val")
    full = load_split("classify", photos / "classify", "train")
    tr, val = stratified_holdout(full, 0.2, seed=0)
    share = Counter(val.stratum(i) for i in range(len(val)))
    assert share == {0: 2, 1: 2}  # 20 % of 12 of each class, rounded
    assert sorted(map(str, tr.files + val.files)) == sorted(map(str, full.files)) and not set(tr.files) & set(val.files)
    assert (tr.split, val.split) == ("train", "val")

    res = train("classify", photos / "classify", photos / "m", epochs=1, batch_size=8, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert res["validation"] == "20% of train held out, stratified"
    assert "no val split" in err and "holding out a stratified 20% of train (4 of 24)" in err
    meta = json.loads((photos / "m" / "model.json").read_text())
    assert meta["metrics"]["validation"] == res["validation"] and meta["metrics"]["val_loss"] == res["val_loss"]


def test_a_segment_holdout_keeps_pictures_with_and_without_defects(photos):
    ds = load_split("segment", photos / "segment", "train")
    _, val = stratified_holdout(ds, 0.25, seed=1)
    assert Counter(val.stratum(i) for i in range(len(val))) == {0: 3, 1: 3}


def test_small_and_unbalanced_data_is_warned_about(tmp_path):
    write_photo_dataset("classify", tmp_path / "c", n_good=60, n_defect=8, split="train", seed=2)
    ds = load_split("classify", tmp_path / "c", "train")
    warnings = data_warnings("classify", "small_resnet", ds, 887_522, pretrained=False)
    assert any(w.startswith("defect: 8 pictures in the training split; 20 or more") for w in warnings), warnings
    assert any(w.startswith("unbalanced training split (defect 8, good 60: 8 to 1)") for w in warnings), warnings
    assert not any("weights for" in w for w in warnings)  # small_resnet suits 68 pictures
    assert any("weights for 68 training pictures" in w for w in data_warnings(
        "classify", "resnet18", ds, 11_177_538, pretrained=False))
    assert not any("weights for" in w for w in data_warnings("classify", "resnet18", ds, 11_177_538, pretrained=True))
    write_photo_dataset("detect", tmp_path / "d", n_good=4, n_defect=40, split="train", seed=2)
    det = data_warnings("detect", "anchor_free", load_split("detect", tmp_path / "d", "train"), 1, pretrained=False)
    assert sum("boxes in the training split" in w for w in det) == 5  # about 10 of each of 5 kinds: all too few


def test_cli_train_prints_the_warnings(tmp_path, capsys):
    write_photo_dataset("classify", tmp_path / "c", n_good=30, n_defect=5, split="train", seed=3)
    code, out, err = _cli(["train", "classify", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "m"),
                           "--epochs", "1", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["warnings"] and all(f"warning: {w}" in err for w in res["warnings"])


def test_learning_rate_warms_up_then_decays_to_zero():
    f = [lr_factor(i, 100, 10) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))  # rising through the warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then only falling
    assert f[55] == pytest.approx(0.5, abs=0.02) and f[-1] < 1e-3
    s = [lr_factor(i, 100, 10, "step") for i in range(100)]
    assert (s[10], s[45], s[99]) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
