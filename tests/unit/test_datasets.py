"""Dataset loaders (shared/data/datasets.py) and `plantsight synth` datasets (shared/data/synth.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.data.datasets import DataError, detect_layout, load_split
from shared.data.scenes import make_scene
from shared.data.synth import ANOMALY_RATE, SCENE, write_dataset
from shared.models.registry import DEFAULT_CLASSES

TASKS = ("classify", "detect", "segment", "thermal")
LAYOUT = {"classify": "imagefolder", "detect": "yolo", "segment": "images_masks", "thermal": "thermal"}
SHAPE = {"classify": (240, 320, 3), "detect": (448, 448, 3), "segment": (256, 256, 3), "thermal": (120, 160, 1)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {t: (root / t, write_dataset(t, root / t, n=24, seed=1, progress=False)) for t in TASKS}


def _copy(synth, task, tmp_path) -> Path:
    dst = tmp_path / task
    shutil.copytree(synth[task][0], dst)
    return dst


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- synth -> load_split round trip ------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_synth_dataset_loads_with_the_scene_truth(task, synth):
    root, info = synth[task]
    train, val = load_split(task, root, "train"), load_split(task, root, "val")
    assert detect_layout(task, root) == LAYOUT[task]
    assert len(train) + len(val) == 24 and (info["train"], info["val"]) == (len(train), len(val)) == (19, 5)
    assert info["classes"] == train.classes == val.classes
    assert set(map(str, train.files)).isdisjoint(map(str, val.files))
    # every item must equal the scene frame it came from, as recorded in the manifest
    manifest = json.loads((root / "synth.json").read_text())
    assert manifest["complete"] is True and manifest["n"] == 24
    by_file = {it["file"]: it for it in manifest["items"]}
    scenes = [make_scene(SCENE[task], seed=s, anomaly_rate=ANOMALY_RATE[task]) for s in manifest["scene_seeds"]]
    anomalous = 0
    for ds in (train, val):
        for i, f in enumerate(ds.files):
            it = by_file[f.relative_to(root).as_posix()]
            assert it["split"] == ds.split
            frame, truth = scenes[it["scene"]].render(it["seq"])
            img, target = ds[i]
            assert img.shape == SHAPE[task] and img.dtype == (np.uint16 if task == "thermal" else np.uint8)
            anomalous += truth["anomaly"]
            if task == "classify":
                assert isinstance(target, int) and ds.classes[target] == truth["label"] == f.parent.name
            elif task == "detect":
                assert target.dtype == np.float32 and target.shape == (len(truth["boxes"]), 5)
                assert (target[:, 1:] >= 0).all() and (target[:, 1:] <= 1).all() and (target[:, 3:] > 0).all()
                h, w = frame.shape[:2]
                want = [[c, (x1 + x2 + 1) / 2 / w, (y1 + y2 + 1) / 2 / h, (x2 - x1 + 1) / w, (y2 - y1 + 1) / h]
                        for x1, y1, x2, y2, c in truth["boxes"]]
                np.testing.assert_allclose(target, np.asarray(want, np.float32).reshape(-1, 5), atol=1e-6)
            elif task == "segment":
                assert target.dtype == np.uint8 and target.shape == frame.shape[:2]
                assert set(np.unique(target)) <= {0, 1}
                np.testing.assert_array_equal(target, truth["mask"])
            else:
                np.testing.assert_array_equal(img, frame)  # npy kelvin round-trips to the exact centikelvin
                stats = [img.max() / 100, img.astype(np.float64).mean() / 100, img.min() / 100]
                np.testing.assert_array_equal(target, np.asarray(stats, np.float32))
                np.testing.assert_array_equal(target, np.float32([truth["max_k"], truth["avg_k"], truth["min_k"]]))
            if task != "thermal":  # JPEG 95 of the noisy frame: PSNR about 34..39 dB
                assert 10 * np.log10(255 ** 2 / ((img.astype(float) - frame) ** 2).mean()) > 32
    assert anomalous == round(24 * ANOMALY_RATE[task])
    if task == "classify":  # balanced, and both classes in both splits
        for ds in (train, val):
            assert {ds[i][1] for i in range(len(ds))} == {0, 1}
        assert train.classes == sorted(DEFAULT_CLASSES["classify"])
    if task == "segment":
        assert any(train[i][1].any() for i in range(len(train)))
        assert any(not train[i][1].any() for i in range(len(train)))
    if task == "thermal":
        assert any(train[i][1][0] > 460 for i in range(len(train)))  # hot anomalies are in the set


@pytest.mark.parametrize("task", TASKS)
def test_synth_same_seed_same_bytes_other_seed_other_images(task, synth, tmp_path):
    again = tmp_path / "again"
    write_dataset(task, again, n=24, seed=1, progress=False)
    first = _files(synth[task][0])
    assert _files(again) == first
    other = tmp_path / "other"
    write_dataset(task, other, n=24, seed=2, progress=False)
    data = {k: v for k, v in _files(other).items() if k.endswith((".jpg", ".npy"))}
    assert len(data) == 24
    assert not set(data.values()) & set(first.values())  # no image of seed 2 equals one of seed 1


def test_synth_replaces_its_own_dataset_and_refuses_a_foreign_folder(tmp_path):
    out = tmp_path / "d"
    write_dataset("thermal", out, n=20, seed=0, progress=False)
    info = write_dataset("thermal", out, n=5, seed=0, progress=False)
    assert len(list(out.rglob("*.npy"))) == 5 == info["train"] + info["val"]  # no stale files left over
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        write_dataset("thermal", tmp_path / "mine", n=5, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(DataError, match="unknown task"):
        write_dataset("audio", tmp_path / "x", n=5, progress=False)


# --- classify ------------------------------------------------------------------------------
def test_classify_converts_to_rgb_and_rejects_empty_or_unknown_classes(tmp_path):
    for split, cls in (("train", "bad"), ("train", "good"), ("val", "good")):
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
    red_bgr = np.zeros((8, 10, 3), np.uint8)
    red_bgr[..., 2] = 255
    cv2.imwrite(str(tmp_path / "train" / "bad" / "a.png"), red_bgr)
    cv2.imwrite(str(tmp_path / "train" / "good" / "b.png"), np.full((6, 4), 77, np.uint8))  # grayscale
    cv2.imwrite(str(tmp_path / "val" / "good" / "c.bmp"), red_bgr)
    ds = load_split("classify", tmp_path, "train")
    assert ds.classes == ["bad", "good"] and [ds[i][1] for i in range(2)] == [0, 1]
    assert ds[0][0][0, 0].tolist() == [255, 0, 0]  # RGB order
    assert ds[1][0].shape == (6, 4, 3) and ds[1][0].dtype == np.uint8 and (ds[1][0] == 77).all()
    val = load_split("classify", tmp_path, "val")
    assert val.classes == ["bad", "good"] and val[0][1] == 1  # indices follow the train split
    (tmp_path / "val" / "bad").mkdir()
    with pytest.raises(DataError, match="empty class folder") as e:
        load_split("classify", tmp_path, "val")
    assert str(tmp_path / "val" / "bad") in str(e.value)
    (tmp_path / "val" / "bad").rmdir()
    (tmp_path / "val" / "rusty").mkdir()
    cv2.imwrite(str(tmp_path / "val" / "rusty" / "d.png"), red_bgr)
    with pytest.raises(DataError, match="not one of the train split's classes") as e:
        load_split("classify", tmp_path, "val")
    assert str(tmp_path / "val" / "rusty") in str(e.value)
    with pytest.raises(DataError, match="split 'test' not found") as e:
        load_split("classify", tmp_path, "test")
    assert str(tmp_path / "test") in str(e.value)
    with pytest.raises(DataError, match="unknown split"):
        load_split("classify", tmp_path, "holdout")


def test_classify_corrupt_image_is_named(synth, tmp_path):
    root = _copy(synth, "classify", tmp_path)
    ds = load_split("classify", root, "train")
    ds.files[0].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="not a readable image") as e:
        ds[0]
    assert str(ds.files[0]) in str(e.value)


# --- detect --------------------------------------------------------------------------------
@pytest.mark.parametrize("line, why", [
    ("0 0.5 0.5 0.1", "expected 5 fields"),
    ("0 0.5 0.5 0.1 0.1 0.9", "expected 5 fields"),
    ("7 0.5 0.5 0.1 0.1", "class 7 is not an index 0..4"),
    ("-1 0.5 0.5 0.1 0.1", "class -1"),
    ("1.5 0.5 0.5 0.1 0.1", "class 1.5"),
    ("0 0.5 abc 0.1 0.1", "not numbers"),
    ("0 1.01 0.5 0.1 0.1", "outside 0..1"),
    ("0 0.5 0.5 0 0.1", "must be within"),
    ("0 0.5 0.5 0.1 -0.2", "must be within"),
    ("0 0.5 0.5 nan 0.1", "not finite"),
])
def test_malformed_yolo_line_names_file_and_line(line, why, synth, tmp_path):
    root = _copy(synth, "detect", tmp_path)
    label = sorted((root / "labels" / "val").glob("*.txt"))[0]
    label.write_text(f"2 0.5 0.5 0.2 0.2\n\n{line}\n")
    with pytest.raises(DataError, match=why) as e:
        load_split("detect", root, "val")
    assert f"{label}, line 3" in str(e.value)
    load_split("detect", root, "train")  # the other split is still fine


def test_yolo_missing_label_is_background_and_tolerance_clips(synth, tmp_path):
    root = _copy(synth, "detect", tmp_path)
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    labels[0].unlink()
    labels[1].write_text("4 1.0005 0.5 0.2 1.0008\n")
    ds = load_split("detect", root, "train")
    assert ds[0][1].shape == (0, 5) and ds[0][1].dtype == np.float32
    np.testing.assert_array_equal(ds[1][1], np.float32([[4, 1.0, 0.5, 0.2, 1.0]]))


def test_yolo_data_yaml_missing_or_dict_names(synth, tmp_path):
    root = _copy(synth, "detect", tmp_path)
    (root / "data.yaml").write_text("names: {0: pump, 1: valve, 2: motor, 3: leak, 4: hot_spot}\n")
    assert load_split("detect", root, "val").classes == DEFAULT_CLASSES["detect"]
    (root / "data.yaml").write_text("names: {0: pump, 2: valve}\n")
    with pytest.raises(DataError, match="class indices"):
        load_split("detect", root, "val")
    (root / "data.yaml").unlink()
    with pytest.raises(DataError, match="missing") as e:
        load_split("detect", root, "train")
    assert str(root / "data.yaml") in str(e.value)


# --- segment -------------------------------------------------------------------------------
def test_missing_or_wrong_size_mask_is_named(synth, tmp_path):
    root = _copy(synth, "segment", tmp_path)
    img = sorted((root / "images" / "val").glob("*.jpg"))[1]
    mask = root / "masks" / "val" / f"{img.stem}.png"
    cv2.imwrite(str(mask), np.zeros((10, 10), np.uint8))
    ds = load_split("segment", root, "val")
    with pytest.raises(DataError, match="mask is 10x10 but its image is 256x256") as e:
        ds[1]
    assert str(mask) in str(e.value)
    mask.unlink()
    with pytest.raises(DataError, match="no mask for this image") as e:
        load_split("segment", root, "val")
    assert str(img) in str(e.value)


def _mvtec(root: Path) -> dict[str, np.ndarray]:
    """A tiny MVTec AD folder: 6 train/good, 2 test/good, 3 crack and 3 scratch with masks."""
    masks = {}
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "train" / "good" / f"{i:03d}.png"), rng.integers(0, 255, (16, 20), np.uint8))
    for defect, n in (("good", 2), ("crack", 3), ("scratch", 3)):
        (root / "test" / defect).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "test" / defect / f"{i:03d}.png"), rng.integers(0, 255, (16, 20, 3), np.uint8))
            if defect != "good":
                m = np.zeros((16, 20), np.uint8)
                m[i:i + 3, 2 * i:2 * i + 4] = 255
                (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / "ground_truth" / defect / f"{i:03d}_mask.png"), m)
                masks[f"test/{defect}/{i:03d}.png"] = m // 255
    return masks


def test_mvtec_splits(tmp_path):
    masks = _mvtec(tmp_path)
    assert detect_layout("segment", tmp_path) == "mvtec"
    split = {s: load_split("segment", tmp_path, s) for s in ("train", "val", "test")}
    rel = {s: [f.relative_to(tmp_path).as_posix() for f in ds.files] for s, ds in split.items()}
    # every 5th by sorted path goes to val: defective #0 and #5, good #0 and #5
    assert rel["val"] == ["test/crack/000.png", "test/scratch/002.png", "train/good/000.png", "train/good/005.png"]
    assert rel["train"] == ["test/crack/001.png", "test/crack/002.png", "test/scratch/000.png",
                            "test/scratch/001.png", "train/good/001.png", "train/good/002.png",
                            "train/good/003.png", "train/good/004.png"]
    # test: test/good and the defective images training did not see; the whole of test/ for a model that saw
    # good pictures only
    assert rel["test"] == ["test/crack/000.png", "test/good/000.png", "test/good/001.png", "test/scratch/002.png"]
    whole = load_split("segment", tmp_path, "test", good_only_model=True)
    assert [f.relative_to(tmp_path).as_posix() for f in whole.files] == [
        "test/crack/000.png", "test/crack/001.png", "test/crack/002.png", "test/good/000.png", "test/good/001.png",
        "test/scratch/000.png", "test/scratch/001.png", "test/scratch/002.png"]
    assert not set(rel["train"]) & set(rel["test"])
    assert [f.name for f in load_split("segment", tmp_path, "train").files] == [f.name for f in split["train"].files]
    for s, ds in split.items():
        assert ds.classes == ["defect"] and ds.layout == "mvtec"
        for i, name in enumerate(rel[s]):
            img, mask = ds[i]
            assert img.shape == (16, 20, 3) and img.dtype == np.uint8 and mask.dtype == np.uint8
            # defective images carry their mask as 0/1; good ones (train negatives, test/good) are all zeros
            np.testing.assert_array_equal(mask, masks.get(name, np.zeros((16, 20), np.uint8)))
    assert sum(split["train"][i][1].any() for i in range(8)) == 4


def test_mvtec_missing_mask_is_named(tmp_path):
    _mvtec(tmp_path)
    (tmp_path / "ground_truth" / "scratch" / "001_mask.png").unlink()
    for s in ("train", "val", "test"):
        with pytest.raises(DataError, match="defective test image has no mask") as e:
            load_split("segment", tmp_path, s)
        assert str(tmp_path / "test" / "scratch" / "001.png") in str(e.value)
        assert "001_mask.png" in str(e.value)


# --- thermal -------------------------------------------------------------------------------
def test_thermal_png_and_npy_agree(tmp_path):
    k = np.random.default_rng(0).uniform(290.0, 480.0, (12, 16))
    (tmp_path / "train").mkdir()
    np.save(tmp_path / "train" / "a.npy", k)
    cv2.imwrite(str(tmp_path / "train" / "b.png"), np.rint(k * 100).astype(np.uint16))
    ds = load_split("thermal", tmp_path, "train")
    (a, ta), (b, tb) = ds[0], ds[1]
    assert a.dtype == np.uint16 and a.shape == (12, 16, 1) and ds.classes == []
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :, 0], np.rint(k * 100).astype(np.uint16))
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(ta, [k.max(), k.mean(), k.min()], atol=0.005)  # centikelvin resolution


@pytest.mark.parametrize("name, write, why", [
    ("eight.png", lambda p: cv2.imwrite(str(p), np.full((8, 8), 30, np.uint8)), "this one is 8-bit grayscale"),
    ("rgb16.png", lambda p: cv2.imwrite(str(p), np.full((8, 8, 3), 30000, np.uint16)), "16-bit RGB"),
    ("cube.npy", lambda p: np.save(p, np.full((4, 8, 8), 300.0)), r"shape \(4, 8, 8\)"),
    ("line.npy", lambda p: np.save(p, np.full(8, 300.0)), r"shape \(8,\)"),
    ("text.npy", lambda p: p.write_text("hello"), "not a readable .npy"),
])
def test_bad_thermal_file_is_named(name, write, why, tmp_path):
    (tmp_path / "val").mkdir()
    np.save(tmp_path / "val" / "ok.npy", np.full((8, 8), 300.0))
    write(tmp_path / "val" / name)
    with pytest.raises(DataError, match=why) as e:
        load_split("thermal", tmp_path, "val")
    assert str(tmp_path / "val" / name) in str(e.value)


def test_layout_and_split_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="no such dataset folder"):
        detect_layout("classify", tmp_path / "nowhere")
    for task in TASKS:
        with pytest.raises(DataError, match=f"not a {task} dataset") as e:
            load_split(task, tmp_path, "train")
        assert str(tmp_path) in str(e.value)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no thermal maps") as e:
        load_split("thermal", tmp_path, "val")
    assert str(tmp_path / "val") in str(e.value)
