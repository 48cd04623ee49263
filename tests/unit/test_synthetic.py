"""Synthetic scenes: determinism, shapes, anomaly episodes and exact truth."""

from __future__ import annotations

import time

import numpy as np
import pytest

from shared.data.scenes import EPISODE_BLOCK, SCENE_TYPES, SCENES, Scene, make_scene, scene_from_source

SHAPES = {"process": ((240, 320, 3), np.uint8), "equipment": ((448, 448, 3), np.uint8),
          "surface": ((256, 256, 3), np.uint8), "thermal": ((120, 160, 1), np.uint16)}
N = 200


def test_registry_holds_every_scene():
    assert set(SCENE_TYPES) == set(SCENES)
    for name in SCENES:
        scene = make_scene(name)
        assert isinstance(scene, Scene) and scene.name == name


@pytest.mark.parametrize("name", SCENES)
def test_default_shapes_and_dtypes(name):
    shape, dtype = SHAPES[name]
    for seq in (0, 1, 57, 1000):
        img, truth = make_scene(name).render(seq)
        assert img.shape == shape and img.dtype == dtype
        assert isinstance(truth["anomaly"], bool)


@pytest.mark.parametrize("name", SCENES)
def test_custom_size(name):
    img, _ = make_scene(name, width=200, height=150, seed=2).render(3)
    assert img.shape[:2] == (150, 200)


@pytest.mark.parametrize("name", SCENES)
def test_deterministic(name):
    a, b = make_scene(name, seed=7), make_scene(name, seed=7)
    for seq in (0, 13, 45, 199):
        ia, ta = a.render(seq)
        ib, tb = b.render(seq)
        assert ia.tobytes() == ib.tobytes()
        assert a.render(seq)[0].tobytes() == ia.tobytes()  # no hidden state between calls
        assert ta.keys() == tb.keys()
    assert a.render(10)[0].tobytes() != a.render(11)[0].tobytes()
    assert make_scene(name, seed=8).render(10)[0].tobytes() != a.render(10)[0].tobytes()


@pytest.mark.parametrize("name", SCENES)
def test_anomaly_episodes(name):
    scene = make_scene(name)
    flags = [scene.render(q)[1]["anomaly"] for q in range(N)]
    assert any(flags) and not all(flags)
    assert flags == [scene.anomalous(q) for q in range(N)]
    assert abs(sum(flags) / N - scene.anomaly_rate) <= 0.05
    # episodes are runs of consecutive frames, long enough for a for_frames: 3 rule
    runs, run = [], 0
    for f in flags + [False]:
        if f:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs and min(runs) >= 3 and max(runs) <= EPISODE_BLOCK


def test_anomaly_rate_extremes():
    never, always = make_scene("surface", anomaly_rate=0.0), make_scene("surface", anomaly_rate=1.0)
    assert not any(never.anomalous(q) for q in range(N))
    assert all(always.anomalous(q) for q in range(N))
    half_scene = make_scene("thermal", anomaly_rate=0.5, seed=3)
    half = sum(half_scene.anomalous(q) for q in range(N))
    assert abs(half / N - 0.5) <= 0.05


def test_process_labels_and_separability():
    scene = make_scene("process", seed=1)
    assert scene.classes == ("normal", "anomaly")
    seen = set()
    for q in range(N):
        img, truth = scene.render(q)
        assert truth["label"] == scene.classes[truth["index"]]
        assert truth["index"] == int(truth["anomaly"])
        seen.add(truth["label"])
    assert seen == {"normal", "anomaly"}
    # foaming paints many near-white pixels; a colour shift leaves no amber/olive liquid
    normal = make_scene("process", anomaly_rate=0.0, seed=1)
    anom = make_scene("process", anomaly_rate=1.0, seed=1)
    for q in (5, 25, 45, 65, 85):
        n_img, a_img = normal.render(q)[0].astype(int), anom.render(q)[0].astype(int)
        kind = anom.render(q)[1]["kind"]
        def white(im):
            return int(((im.min(axis=2) > 195) & (np.ptp(im, axis=2) < 25)).sum())

        def purple(im):
            return int(((im[..., 2] > im[..., 1] + 30) & (im[..., 0] > im[..., 1] + 30)).sum())

        if kind == "foaming":
            assert white(a_img) > white(n_img) + 1000
        else:
            assert kind == "discolouration" and purple(a_img) > 3000 and purple(n_img) < 100


def test_equipment_boxes():
    scene = make_scene("equipment")
    assert scene.classes == ("pump", "valve", "motor", "leak", "hot_spot")
    h, w = scene.height, scene.width
    anomaly_classes = set()
    for q in range(N):
        img, truth = scene.render(q)
        boxes = truth["boxes"]
        items = [b for b in boxes if b[4] < 3]
        assert 2 <= len(items) <= 5
        for x1, y1, x2, y2, cls in boxes:
            assert all(isinstance(v, int) for v in (x1, y1, x2, y2, cls))
            assert 0 <= x1 < x2 < w and 0 <= y1 < y2 < h
            assert 0 <= cls < len(scene.classes)
        extra = {b[4] for b in boxes if b[4] >= 3}
        assert bool(extra) == truth["anomaly"]
        anomaly_classes |= extra
    assert anomaly_classes <= {3, 4} and anomaly_classes
    # items move slightly between frames
    b0, b1 = scene.render(0)[1]["boxes"], scene.render(3)[1]["boxes"]
    assert [b[4] for b in b0] == [b[4] for b in b1] and b0 != b1
    assert max(abs(u - v) for p, r in zip(b0, b1) for u, v in zip(p[:4], r[:4])) < 20


def test_equipment_hot_spot_and_leak_look_right():
    scene = make_scene("equipment", anomaly_rate=1.0, seed=5)
    found = set()
    for q in range(0, 400, 20):
        img, truth = scene.render(q)
        for x1, y1, x2, y2, cls in truth["boxes"]:
            roi = img[y1:y2 + 1, x1:x2 + 1].astype(int)
            if cls == 4:  # orange-red glow: strongly red pixels
                assert ((roi[..., 0] > 230) & (roi[..., 2] < 120)).sum() > 5
                found.add(cls)
            elif cls == 3:  # dark puddle
                assert (roi.max(axis=2) < 50).sum() > 20
                found.add(cls)
    assert found == {3, 4}


def test_surface_mask_is_exactly_the_defect_pixels():
    clean = make_scene("surface", anomaly_rate=0.0, seed=11)
    dirty = make_scene("surface", anomaly_rate=1.0, seed=11)
    kinds = set()
    for q in range(0, 200, 7):
        c_img, c_truth = clean.render(q)
        d_img, d_truth = dirty.render(q)
        assert c_truth["mask"].dtype == np.uint8 and not c_truth["mask"].any() and c_truth["defects"] == []
        mask = d_truth["mask"]
        assert mask.shape == d_img.shape[:2] and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        changed = (c_img != d_img).any(axis=2)
        assert np.array_equal(changed, mask.astype(bool))
        assert (c_img != d_img).all(axis=2)[mask.astype(bool)].all()
        assert d_truth["defects"] and set(d_truth["defects"]) <= {"scratch", "stain", "crack"}
        kinds |= set(d_truth["defects"])
    assert kinds == {"scratch", "stain", "crack"}


def test_surface_mask_nonzero_iff_anomaly():
    scene = make_scene("surface")
    for q in range(N):
        _, truth = scene.render(q)
        assert bool(truth["mask"].any()) == truth["anomaly"] == bool(truth["defects"])


def test_thermal_truth_matches_image():
    scene = make_scene("thermal", seed=2)
    hot = 0
    for q in range(N):
        img, t = scene.render(q)
        plane = img[:, :, 0]
        assert t["max_k"] == int(plane.max()) / 100.0
        assert t["min_k"] == int(plane.min()) / 100.0
        assert t["avg_k"] == pytest.approx(float(plane.astype(np.float64).mean()) / 100.0, rel=1e-12)
        assert 290 < t["min_k"] < 310 < 330 < t["max_k"]
        assert 295 < t["avg_k"] < 320
        for x, y, peak in t["hotspots"]:
            assert peak > 400 and int(plane[y, x]) / 100.0 == peak
        if t["anomaly"]:
            hot += 1
            assert t["max_k"] > 460 and t["hotspots"]
        else:
            assert t["max_k"] < 400 and t["hotspots"] == []
    assert hot > 0


def test_thermal_spots_move_smoothly():
    scene = make_scene("thermal", anomaly_rate=0.0, seed=4)
    peaks = []
    for q in range(0, 30):
        plane = scene.render(q)[0][:, :, 0]
        peaks.append(np.unravel_index(int(np.argmax(plane)), plane.shape))
    steps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(peaks, peaks[1:])]
    assert max(steps) <= 8 and peaks[0] != peaks[-1]


def test_scene_from_source():
    s = scene_from_source("synthetic://thermal?w=80&h=60&seed=3&anomaly=0.2")
    assert (s.name, s.width, s.height, s.seed, s.anomaly_rate) == ("thermal", 80, 60, 3, 0.2)
    assert s.render(0)[0].shape == (60, 80, 1)
    assert scene_from_source("synthetic://surface").width == 256
    assert scene_from_source("synthetic://process", seed=9).seed == 9
    assert scene_from_source("synthetic://process?seed=1", seed=9).seed == 1  # the URL wins


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'kitchen'.*process, equipment, surface, thermal"):
        make_scene("kitchen")
    with pytest.raises(ValueError, match="kitchen"):
        scene_from_source("synthetic://kitchen")
    with pytest.raises(ValueError, match="zoom"):
        scene_from_source("synthetic://process?zoom=2")
    with pytest.raises(ValueError, match="not a number"):
        scene_from_source("synthetic://process?w=big")
    with pytest.raises(ValueError, match="anomaly_rate"):
        make_scene("process", anomaly_rate=1.5)
    with pytest.raises(ValueError, match="size"):
        make_scene("surface", width=8, height=8)
    with pytest.raises(ValueError, match="seq"):
        make_scene("surface").render(-1)


def test_render_speed_printed():
    """Prints the cost of a frame; the only bound is a generous one against pathological slowness."""
    for name in SCENES:
        for size in (None, (640, 480)):
            scene = make_scene(name) if size is None else make_scene(name, width=size[0], height=size[1])
            scene.render(0)
            t = time.perf_counter()
            for q in range(20):
                scene.render(q)
            ms = (time.perf_counter() - t) / 20 * 1000
            print(f"{name} {scene.width}x{scene.height}: {ms:.2f} ms/frame")
            assert ms < 200
