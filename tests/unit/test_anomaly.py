"""Good-only training's parts (shared/training/anomaly.py): the anomalies it pastes, the pictures it reads,
the threshold it sets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from bench.photo_defects import write_photo_dataset
from shared.data.datasets import DataError
from shared.training import anomaly as A
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT


def _surface(rng, shape=(128, 128)):
    return np.clip(rng.normal(120, 20, (*shape, 3)), 0, 255).astype(np.uint8)


def test_perlin_noise_is_smooth_bounded_and_seeded():
    a = A.perlin((64, 96), (4, 6), np.random.default_rng(3))
    assert a.shape == (64, 96) and np.abs(a).max() <= 1.5 and a.std() > 0.1
    assert np.array_equal(a, A.perlin((64, 96), (4, 6), np.random.default_rng(3)))
    assert np.abs(np.diff(a, axis=1)).max() < 0.2  # neighbours differ by little: blobs, not salt and pepper


def test_anomaly_regions_are_blobs_or_scars_of_bounded_size():
    shares = [A.anomaly_mask((128, 128), np.random.default_rng(s)).mean() for s in range(60)]
    assert all(0 < s < 0.17 for s in shares)
    assert min(shares) < 0.01 < max(shares)  # thin scars and small specks as well as larger blobs


def test_a_pasted_anomaly_changes_exactly_the_masked_pixels():
    rng = np.random.default_rng(0)
    img, donor = _surface(rng), _surface(rng)
    for seed in range(20):
        out, mask = A.paste_anomaly(img, donor, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8 and mask.dtype == np.uint8
        changed = np.abs(out.astype(int) - img.astype(int)).max(2) > 8
        assert mask.any() and np.array_equal(mask.astype(bool), changed)


def test_synthetic_anomalies_are_repeatable_per_epoch_and_fresh_across_epochs(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), _surface(rng, (64, 64)))
    good = A.good_pictures(tmp_path)
    ds = A.SyntheticAnomalies(good, seed=1, epoch=1)
    items = [ds[i] for i in range(len(ds))]
    with_anomaly = sum(int(m.any()) for _, m in items)
    assert 10 <= with_anomaly <= 30  # about ANOMALY_SHARE of 40
    assert all(np.array_equal(m, ds[i][1]) for i, (_, m) in enumerate(items))
    ds.epoch = 2
    assert any(not np.array_equal(m, ds[i][1]) for i, (_, m) in enumerate(items))
    for (img, m), i in zip(items, range(len(ds))):
        if not m.any():
            assert np.array_equal(img, good[i][0])  # a picture left good is the picture as it was


def test_good_pictures_of_an_mvtec_folder_are_train_good_only(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("train/good/000.png", "train/good/001.png", "test/crack/000.png", "test/good/000.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / name), _surface(rng, (32, 32)))
    ds = A.good_pictures(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["train/good/000.png", "train/good/001.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        A.good_pictures(tmp_path / "empty")
    with pytest.raises(DataError, match="not a folder"):
        A.good_pictures(tmp_path / "missing")


def test_the_threshold_is_just_above_the_good_pictures_quantile():
    scores = np.linspace(0.0, 0.5, 201)
    t = A.good_threshold(scores)
    assert t > np.quantile(scores, A.THRESHOLD_QUANTILE) and t == pytest.approx(np.quantile(scores, 0.995))
    assert (scores > t).mean() <= 1 - A.THRESHOLD_QUANTILE
    assert A.good_threshold([0.3]) > 0.3
    with pytest.raises(DataError, match="held-out good"):
        A.good_threshold([])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env_without_plantsight(),
                          capture_output=True, text=True, timeout=300)


def test_good_only_training_reads_train_good_only_and_sets_the_threshold_from_good_pictures(tmp_path):
    """`train segment --good-only` on an MVTec AD folder whose test/ could not even be read; then `eval` on the
    whole of test/ ranks pixels and plots the picture scores."""
    mvtec = tmp_path / "mvtec"
    write_photo_dataset("segment", tmp_path / "photos", n_good=30, n_defect=0, split="train", seed=0)
    (mvtec / "train").mkdir(parents=True)
    (tmp_path / "photos" / "images" / "train").rename(mvtec / "train" / "good")
    for d in ("crack", "good"):
        (mvtec / "test" / d).mkdir(parents=True)
        (mvtec / "test" / d / "000.png").write_bytes(b"not a picture")  # read for training, it would fail
    done = _cli("train", "segment", "--good-only", "--data", str(mvtec), "--out", str(tmp_path / "m"),
                "--epochs", "1", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["thresholds"]["mask"] == pytest.approx(res["threshold"], abs=1e-6) and 0 < res["threshold"] <= 1
    assert meta["metrics"]["training"] == A.GOOD_ONLY
    assert meta["metrics"]["threshold_from"] == "99.5% of 6 held-out good pictures' scores"
    assert "24 good pictures" in done.stderr and "6 held out" in done.stderr

    # the whole of test/ is the evaluation of a model that saw none of it
    write_photo_dataset("segment", tmp_path / "test", n_good=3, n_defect=3, split="test", seed=1)
    shutil.rmtree(mvtec / "test")
    for i, img in enumerate(sorted((tmp_path / "test" / "images" / "test").glob("*.png"))):
        mask = tmp_path / "test" / "masks" / "test" / img.name
        kind = "good" if not cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).any() else "crack"
        (mvtec / "test" / kind).mkdir(parents=True, exist_ok=True)
        img.rename(mvtec / "test" / kind / f"{i:03d}.png")
        if kind == "crack":
            (mvtec / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
            mask.rename(mvtec / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    done = _cli("eval", "segment", "--model", str(tmp_path / "m"), "--data", str(mvtec), "--split", "test",
                "--out", str(tmp_path / "eval"), "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    ev = json.loads(done.stdout)
    assert ev["images"] == 6 and 0 <= ev["pixel_auroc"] <= 1 and 0 <= ev["pro_auc"] <= 1
    assert 0 <= ev["image_auroc"] <= 1 and (tmp_path / "eval" / "scores.png").stat().st_size > 10_000
