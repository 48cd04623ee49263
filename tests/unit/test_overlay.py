"""shared.overlay: results drawn where the Result says, on real frames (synthetic scenes and real photographs).

The `out` dicts are made the way infer makes them: network outputs in prepared-image pixels mapped
back by services/inference/postprocess.py, so these tests also pin the coordinate contract.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from services.inference.postprocess import to_original
from shared.data.scenes import make_scene
from shared.imaging import letterbox
from shared.messages import Prepared
from shared.overlay import (
    BOX_COLOURS,
    HOTSPOT_COLOUR,
    MASK_COLOUR,
    TEXT_BG,
    ZONE_COLOUR,
    ZONE_HIGHLIGHT,
    decode_mask,
    draw,
    encode_jpeg,
    render_base,
)

DETECT_CLASSES = ["pump", "valve", "motor", "leak", "hot_spot"]


def prepared_for(image: np.ndarray, task: str, size: tuple[int, int]) -> Prepared:
    """The Prepared message preprocess would send for this frame (letterboxed to ``size``)."""
    pic, (scale, px, py) = letterbox(image, size)
    return Prepared(camera="cam", seq=1, ts=1, task=task, frame_id="1-0", shape=pic.shape, dtype="uint8",
                    data=pic.tobytes(), orig=image.shape[:2], letterbox=(scale, px, py))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b))


def test_detect_box_edges_in_original_pixels(shared_data):
    photo = cv2.cvtColor(cv2.imread(str(shared_data / "fruits.jpg")), cv2.COLOR_BGR2RGB)
    h, w = photo.shape[:2]
    msg = prepared_for(photo, "detect", (448, 448))
    scale, px, py = msg.letterbox
    x1, y1, x2, y2 = 100, 150, 260, 300  # where the box is in the photograph
    net_box = [x1 * scale + px, y1 * scale + py, x2 * scale + px, y2 * scale + py, 0.87, 2]  # as the network sees it
    out = to_original("detect", {"boxes": [net_box], "classes": DETECT_CLASSES}, msg)
    assert [round(v) for v in out["boxes"][0][:4]] == [x1, y1, x2, y2]

    pic = draw(photo, {"detect": out})
    base = render_base(photo)
    assert pic.shape == (h, w, 3) and pic.dtype == np.uint8
    colour = np.array(BOX_COLOURS[2], np.uint8)
    ymid, xmid = (y1 + y2) // 2, (x1 + x2) // 2
    for y, x in [(ymid, x1), (ymid, x2), (y2, xmid)]:  # left, right and bottom edges (the label sits on top)
        assert same(pic[y, x], colour), (y, x)
    for y, x in [(ymid, x1 + 4), (ymid, x2 - 4), (ymid, x1 - 4), (ymid, x2 + 4), (y2 + 4, xmid), (y2 - 4, xmid)]:
        assert same(pic[y, x], base[y, x]), (y, x)  # the photograph, untouched beside the lines
    # the label ("motor 0.87") is a dark box just above the top edge, in the box's colour
    label = pic[y1 - 20:y1 - 2, x1:x1 + 60]
    assert (label == np.array(TEXT_BG, np.uint8)).all(axis=2).sum() > 200
    assert (label == colour).all(axis=2).sum() > 10
    assert same(photo, cv2.cvtColor(cv2.imread(str(shared_data / "fruits.jpg")), cv2.COLOR_BGR2RGB))  # input kept


def test_segment_mask_fill_and_outline():
    frame, _ = make_scene("surface", seed=3, anomaly_rate=0.0).render(7)
    h, w = frame.shape[:2]
    msg = prepared_for(frame, "segment", (256, 256))
    net_mask = np.zeros((256, 256), np.uint8)
    cv2.circle(net_mask, (150, 140), 40, 1, cv2.FILLED)  # the network's 0/1 mask
    out = to_original("segment", {"mask": net_mask}, msg)
    assert isinstance(out["mask"], bytes)  # PNG bytes on the wire
    mask = decode_mask(out["mask"], (h, w))
    assert mask.sum() == int((net_mask > 0).sum())  # 256×256 frame: the mapping is the identity

    pic = draw(frame, {"segment": out})
    base = render_base(frame)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    outer = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    outer[:30, :] = False  # the caption ("defect 7.67 %") sits at the top left
    fill = np.array(MASK_COLOUR, np.float32)
    dist_before = np.abs(base[inner].astype(np.float32) - fill).sum(1)
    dist_after = np.abs(pic[inner].astype(np.float32) - fill).sum(1)
    assert (dist_after < dist_before).all()  # every inside pixel pulled towards the fill colour …
    assert not (pic[inner] == fill.astype(np.uint8)).all(axis=1).any()  # … but still translucent
    assert same(pic[outer], base[outer])  # outside the mask the frame is untouched
    # the outline: every mask pixel with a 4-neighbour outside the mask is in the mask colour
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    border = mask & ~(cv2.erode(mask.astype(np.uint8), cross) > 0)
    assert border.sum() > 200 and (pic[border] == fill.astype(np.uint8)).all(axis=1).all()
    assert pic[5, 5].tolist() == list(TEXT_BG)


def test_thermal_colour_map_and_hotspot_markers():
    scene = make_scene("thermal", seed=1, anomaly_rate=1.0)
    seq = next(s for s in range(400) if scene.render(s)[1]["hotspots"])
    frame, truth = scene.render(seq)
    assert frame.dtype == np.uint16 and frame.shape[2] == 1
    out = {k: truth[k] for k in ("max_k", "avg_k", "min_k", "hotspots")}
    pic = draw(frame, {"thermal": out})
    assert pic.shape == (frame.shape[0], frame.shape[1], 3)
    # INFERNO over the frame's own kelvin range: its coldest pixel is the map's first colour
    lut = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO),
                       cv2.COLOR_BGR2RGB)[:, 0]
    plane = frame[:, :, 0]
    bare = render_base(frame)
    cy, cx = np.unravel_index(int(plane.argmin()), plane.shape)
    assert same(bare[cy, cx], lut[0])
    hy, hx = np.unravel_index(int(plane.argmax()), plane.shape)
    assert same(bare[hy, hx], lut[255])
    for x, y, k in out["hotspots"]:
        assert same(pic[y, x], np.array(HOTSPOT_COLOUR, np.uint8))  # the marker's centre is on the spot
        assert same(pic[y, x - 2], np.array(HOTSPOT_COLOUR, np.uint8))  # and its cross arms
        assert same(pic[y - 2, x], np.array(HOTSPOT_COLOUR, np.uint8))
    # a fixed kelvin range keeps one colour scale (the clip uses it): 300 K is the bottom of 300..500 K
    fixed = render_base(np.full((10, 10), 30000, np.uint16), kelvin_range=(300.0, 500.0))
    assert same(fixed[0, 0], lut[0])
    fixed = render_base(np.full((10, 10), 40000, np.uint16), kelvin_range=(300.0, 500.0))
    assert same(fixed[0, 0], lut[128])


def test_grey_thermal_frame_is_coloured_only_with_a_thermal_result():
    grey = np.tile(np.arange(160, dtype=np.uint8), (120, 1))
    coloured = draw(grey, {"thermal": {"max_k": 400.0, "avg_k": 350.0, "min_k": 300.0, "hotspots": []}})
    plain = draw(grey, {})
    assert same(plain[60, 100], np.array([100, 100, 100], np.uint8))
    lut = cv2.cvtColor(cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO),
                       cv2.COLOR_BGR2RGB)[:, 0]
    assert same(coloured[100, 100], lut[100])


def test_classify_caption_and_gradcam_heatmap():
    frame, truth = make_scene("process", seed=0, anomaly_rate=1.0).render(3)
    out = {"label": "anomaly", "index": 1, "probs": [0.06, 0.94], "classes": ["normal", "anomaly"]}
    cam = np.zeros((14, 14), np.float32)
    cam[7:, 7:] = 1.0  # the network looked at the lower right
    pic = draw(frame, {"classify": out}, heatmap=cam)
    bare = draw(frame, {"classify": out})
    from shared.models.gradcam import overlay

    expected = overlay(frame, cam)
    h, w = frame.shape[:2]
    lower_right = (slice(h // 2 + 20, h), slice(w // 2 + 20, w))
    assert same(pic[lower_right], expected[lower_right])  # gradcam.overlay itself, not a copy of it
    assert not same(pic[lower_right], bare[lower_right])
    # caption at the top left: a dark box with light text ("anomaly 0.94")
    box = pic[:12, :70]
    assert (box == np.array(TEXT_BG, np.uint8)).all(axis=2).mean() > 0.4
    assert (box.min(axis=2) > 150).sum() > 15
    assert same(bare[h - 1, w - 1], frame[h - 1, w - 1])


def test_zones_outlined_and_the_highlighted_one_thicker():
    frame, _ = make_scene("equipment", seed=0, anomaly_rate=0.0).render(0)
    zones = {"a": [[40, 60], [200, 60], [200, 200], [40, 200]], "b": [[260, 100], [400, 100], [400, 300], [260, 300]]}
    pic = draw(frame, {}, zones=zones, highlight_zone="b")

    def run(col: np.ndarray, colour) -> int:
        return int((col == np.array(colour, np.uint8)).all(axis=1).sum())

    assert run(pic[40:80, 120], ZONE_COLOUR) == 3  # 448 px frame: thickness 2, rows 59..61 around y = 60
    assert run(pic[80:120, 330], ZONE_HIGHLIGHT) == 7  # highlighted: thickness 6, rows 97..103 around y = 100
    assert run(pic[:, 330], ZONE_COLOUR) == 0 and run(pic[:, 120], ZONE_HIGHLIGHT) == 0
    assert same(pic[130, 120], frame[130, 120])  # inside a zone nothing is painted


def test_malformed_result_names_the_task_and_bad_frames_are_refused():
    frame = np.zeros((50, 60, 3), np.uint8)
    with pytest.raises(ValueError, match="detect result"):
        draw(frame, {"detect": {"boxes": [[1, 2, 3]], "classes": []}})
    with pytest.raises(ValueError, match="segment result"):
        draw(frame, {"segment": {"mask": b"not a png", "defect_ratio": 0.1}})
    with pytest.raises(ValueError, match="float32"):
        draw(np.zeros((5, 5, 3), np.float32), {})
    assert same(draw(frame, {"unknown-task": {}}), frame)


def test_encode_jpeg_round_trip(shared_data):
    photo = cv2.cvtColor(cv2.imread(str(shared_data / "baboon.jpg")), cv2.COLOR_BGR2RGB)
    data = encode_jpeg(photo, quality=90)
    assert data[:2] == b"\xff\xd8"
    back = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert back.shape == photo.shape
    err = np.abs(back.astype(int) - photo.astype(int)).mean()
    swapped = np.abs(back[:, :, ::-1].astype(int) - photo.astype(int)).mean()
    assert err < 6 and swapped > 4 * err  # RGB order kept: channels swapped would be far off
