"""The anchor-free multi-scale detector (shared/models/detect_af.py): shapes, decoding, targets, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.models import DEFAULT_CLASSES, Predictor, build, describe
from shared.models.detect_af import (
    STRIDES,
    AnchorFreeDet,
    anchor_free_loss,
    anchor_free_targets,
    decode_anchor_free,
    level_points,
)

NC = len(DEFAULT_CLASSES["detect"])
TINY = {"width": 8, "neck": 32}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registered_and_described():
    row = {r["arch"]: r for r in describe()}["anchor_free"]
    assert row["task"] == "detect" and row["input"] == [3, 448, 448]
    assert row["output"] == [56 * 56 + 28 * 28 + 14 * 14, 5 + NC]
    assert 0 < row["params"] < 5_000_000  # CPU-sized


@pytest.mark.parametrize("size", [448, 224])
def test_output_shapes_per_level(size):
    model = AnchorFreeDet(NC, **TINY).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    grids = [size // s for s in STRIDES]
    assert y.shape == (2, sum(g * g for g in grids), 5 + NC)
    points, stride, level = level_points(size)
    assert len(points) == y.shape[1]
    counts = torch.bincount(level).tolist()
    assert counts == [g * g for g in grids]  # 56², 28², 14² at 448
    assert stride.unique().tolist() == list(map(float, STRIDES))
    # first location of each level sits half a stride into the image
    starts = [0, grids[0] ** 2, grids[0] ** 2 + grids[1] ** 2]
    for k, s in zip(starts, STRIDES):
        assert points[k].tolist() == [s / 2, s / 2]


def _hand_built(boxes: list[tuple[int, float, float, float, float, int]]) -> torch.Tensor:
    """Raw output where location `a` predicts xyxy box of class c with certainty; everything else is background."""
    points, stride, _ = level_points(448)
    raw = torch.full((1, len(points), 5 + NC), -20.0)
    raw[..., :4] = 0.0
    for a, x1, y1, x2, y2, c in boxes:
        px, py = points[a].tolist()
        s = float(stride[a])
        raw[0, a, :4] = torch.tensor([math.log((px - x1) / s), math.log((py - y1) / s),
                                      math.log((x2 - px) / s), math.log((y2 - py) / s)])
        raw[0, a, 4] = 20.0
        raw[0, a, 5 + c] = 20.0
    return raw


def test_decode_returns_the_exact_boxes():
    # location 56*25 + 26 of stride 8 sits at (212, 204); location 3136 + 28*5 + 7 of stride 16 at (120, 88)
    a1, a2 = 56 * 25 + 26, 56 * 56 + 28 * 5 + 7
    raw = _hand_built([(a1, 200.0, 190.0, 230.0, 221.0, 4), (a2, 80.0, 60.0, 170.0, 130.0, 2)])
    dets = decode_anchor_free(raw, conf_threshold=0.5, iou_threshold=0.5, input_size=448)
    assert len(dets) == 1 and dets[0].shape == (2, 6)
    got = sorted(dets[0].tolist(), key=lambda r: r[5])
    assert got[0][:4] == pytest.approx([80.0, 60.0, 170.0, 130.0], abs=1e-3) and got[0][5] == 2
    assert got[1][:4] == pytest.approx([200.0, 190.0, 230.0, 221.0], abs=1e-3) and got[1][5] == 4
    assert all(r[4] == pytest.approx(1.0, abs=1e-6) for r in got)
    # batched: an empty image beside it, and the same boxes again
    raw2 = torch.cat([torch.full_like(raw, -20.0), raw])
    d2 = decode_anchor_free(raw2, 0.5, 0.5, 448)
    assert len(d2[0]) == 0 and len(d2[1]) == 2


def test_decode_nms_keeps_one_of_two_overlapping():
    a1, a2 = 56 * 25 + 26, 56 * 25 + 27  # neighbours predicting nearly the same box
    raw = _hand_built([(a1, 200.0, 190.0, 230.0, 221.0, 1), (a2, 201.0, 190.0, 231.0, 221.0, 1)])
    raw[0, a2, 5 + 1] = 3.0  # a lower score
    dets = decode_anchor_free(raw, 0.1, 0.5, 448)[0]
    assert len(dets) == 1 and dets[0, :4].tolist() == pytest.approx([200.0, 190.0, 230.0, 221.0], abs=1e-3)


def _two_in_one_cell() -> torch.Tensor:
    # two 14-px hot spots whose centres (207, 207) and (221, 211) share the 32-px cell (col 6, row 6)
    boxes = [(4, 200.0, 200.0, 214.0, 214.0), (4, 214.0, 204.0, 228.0, 218.0)]
    return torch.tensor([[c, (x1 + x2) / 2 / 448, (y1 + y2) / 2 / 448, (x2 - x1) / 448, (y2 - y1) / 448]
                         for c, x1, y1, x2, y2 in boxes])


def test_two_objects_in_one_32px_cell_both_get_locations():
    t = _two_in_one_cell()
    cells = {(int(cx * 14), int(cy * 14)) for _, cx, cy, _, _ in t.tolist()}
    assert len(cells) == 1  # SimpleYOLO: one responsible cell, so one of the two objects is lost
    assign, tboxes = anchor_free_targets([t], (448, 448))
    pos = assign[0] >= 0
    assert set(assign[0][pos].tolist()) == {0, 1}
    for k in (0, 1):
        sel = assign[0] == k
        assert sel.sum() >= 1
        x1, y1, x2, y2 = tboxes[0][sel][0].tolist()
        cx, cy = float(t[k, 1]) * 448, float(t[k, 2]) * 448
        assert (x1 + x2) / 2 == pytest.approx(cx) and (y1 + y2) / 2 == pytest.approx(cy)
    # each positive lies inside its own box, on the stride-8 level (small objects)
    points, stride, _ = level_points(448)
    p, b = points[pos], tboxes[0][pos]
    assert ((p[:, 0] > b[:, 0]) & (p[:, 0] < b[:, 2]) & (p[:, 1] > b[:, 1]) & (p[:, 1] < b[:, 3])).all()
    assert (stride[pos] == 8).all()


def test_big_and_small_objects_use_different_levels():
    # a motor-sized box and a hot spot on it: the spot goes to stride 8, the motor to a coarser level
    t = torch.tensor([[2, 0.5, 0.5, 160 / 448, 90 / 448], [4, 0.52, 0.5, 16 / 448, 16 / 448]])
    assign, _ = anchor_free_targets([t], (448, 448))
    _, stride, _ = level_points(448)
    assert set(stride[assign[0] == 1].tolist()) == {8.0}
    assert stride[assign[0] == 0].min() >= 16
    # a box smaller than a stride still gets one location
    tiny = torch.tensor([[4, 101 / 448, 101 / 448, 3 / 448, 3 / 448]])
    assign, _ = anchor_free_targets([tiny], (448, 448))
    assert (assign[0] == 0).sum() == 1


def _scene_with_two_spots(size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A 256×256 crop (fully convolutional: the same strides and cells as at 448) with both spots on a block."""
    img = np.full((size, size, 3), 110, np.uint8)
    img[150:260, 120:300] = (40, 150, 70)  # a motor-ish block
    t = _two_in_one_cell()
    t[:, 1:] *= 448 / size  # normalised to the crop
    for _, cx, cy, w, h in t.tolist():
        x1, y1, x2, y2 = (int(round(v * size)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        img[y1:y2, x1:x2] = (255, 200, 60)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    return (x - 0.45) / 0.25, t


def test_loss_decreases_and_finds_both_objects():
    x, t = _scene_with_two_spots()
    model = AnchorFreeDet(NC, **TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        model.train()
        opt.zero_grad()
        loss = anchor_free_loss(model(x), [t], (256, 256))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    model.eval()
    with torch.no_grad():
        dets = decode_anchor_free(model(x), conf_threshold=0.05, iou_threshold=0.5, input_size=256)[0]
    hot = dets[dets[:, 5] == 4]
    gt = torch.tensor([[200.0, 200.0, 214.0, 214.0], [214.0, 204.0, 228.0, 218.0]])
    from torchvision.ops import box_iou

    assert len(hot) >= 2
    assert (box_iou(gt, hot[:, :4]).amax(1) > 0.5).all()  # both hot spots found, though they share a cell


def test_loss_with_no_objects_is_finite_and_differentiable():
    model = AnchorFreeDet(NC, **TINY)
    out = model(torch.randn(2, 3, 224, 224))
    loss = anchor_free_loss(out, [torch.zeros(0, 5), torch.zeros(0, 5)], (224, 224))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0


def test_predictor_decodes_the_anchor_free_arch():
    pred = Predictor.from_spec("detect", arch="anchor_free")
    out = pred.predict(torch.zeros(2, 448, 448, 3, dtype=torch.uint8))
    assert len(out) == 2 and all(isinstance(o["boxes"], list) for o in out)
    assert build("anchor_free").num_classes == NC
