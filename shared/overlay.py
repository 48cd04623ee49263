"""Draw a frame's results over the frame: the one overlay of alert evidence and the viewer.

Everything is drawn in original frame pixels, as the Result ``out`` dicts carry them (docs/wire-format.md):
classify ``label``/``probs`` as a caption; detect ``boxes`` as outlined boxes with class and score;
segment ``mask`` (PNG bytes, 255 = defect) as a translucent fill with its outline, with the defect share and the
anomaly score as a caption; thermal ``hotspots`` as
markers with their temperature and the frame's max/avg/min.
Thermal frames (one channel: uint16 centikelvin, or uint8 grey) are shown through the INFERNO
colour map; zones are outlined, the alert's own zone thicker; a Grad-CAM map is blended first
with ``shared.models.gradcam.overlay`` so the drawings stay legible on top of it.
Pixel work is vectorised (numpy / OpenCV calls); loops run over boxes, spots and zones only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import cv2
import numpy as np

__all__ = ["draw", "encode_jpeg", "render_base", "decode_mask", "BOX_COLOURS", "MASK_COLOUR", "HOTSPOT_COLOUR",
           "ZONE_COLOUR", "ZONE_HIGHLIGHT"]

# RGB. Box colours cycle by class index and avoid the fixed colours below, so a viewer learns those once.
BOX_COLOURS = ((0, 255, 0), (255, 160, 0), (0, 160, 255), (255, 0, 255), (255, 80, 80), (160, 255, 160),
               (180, 120, 255), (255, 200, 120))
MASK_COLOUR = (255, 0, 80)
MASK_ALPHA = 0.4
HOTSPOT_COLOUR = (0, 255, 255)
ZONE_COLOUR = (80, 200, 255)
ZONE_HIGHLIGHT = (255, 255, 0)
TEXT_BG = (0, 0, 0)
TEXT_FG = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _style(shape: tuple[int, ...]) -> tuple[float, int]:
    """(font scale, line thickness) that stay readable from a 160×120 thermal frame to 4K."""
    side = min(shape[:2])
    return max(0.35, side / 700.0), max(1, round(side / 240.0))


def render_base(image: np.ndarray, thermal: bool = False,
                kelvin_range: tuple[float, float] | None = None) -> np.ndarray:
    """A fresh RGB uint8 H×W×3 copy of a frame; one-channel thermal frames through INFERNO.

    uint16 is centikelvin and always thermal; it is scaled from ``kelvin_range`` (default: the
    frame's own min..max), so a clip can keep one scale for all its frames. A one-channel uint8
    frame is coloured when ``thermal`` (a thermal result for it), else shown grey.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        if a.dtype == np.uint16:
            lo, hi = ((float(a.min()), float(a.max())) if kelvin_range is None
                      else (kelvin_range[0] * 100.0, kelvin_range[1] * 100.0))
            span = max(hi - lo, 1.0)
            grey = np.clip((a.astype(np.float32) - lo) * (255.0 / span) + 0.5, 0, 255).astype(np.uint8)
            thermal = True
        elif a.dtype == np.uint8:
            grey = a
        else:
            raise ValueError(f"overlay: a one-channel frame must be uint8 or uint16, not {a.dtype}")
        if thermal:
            return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    if a.ndim == 3 and a.dtype == np.uint8 and a.shape[2] in (3, 4):
        return np.ascontiguousarray(a[:, :, :3]).copy()
    raise ValueError(f"overlay: expected an H×W×3 uint8 RGB or one-channel thermal frame, "
                     f"got {a.dtype} {list(a.shape)}")


def _box_size(img: np.ndarray, text: str) -> tuple[int, int, int, int]:
    """(width, height) of a text box and the text's (height, padding)."""
    scale, thick = _style(img.shape)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    pad = max(1, th // 4)
    return tw + 2 * pad, th + base + 2 * pad, th, pad


def _text(img: np.ndarray, text: str, org: tuple[int, int], colour=TEXT_FG) -> tuple[int, int]:
    """Text on a dark box whose top-left corner is ``org`` (kept inside the image); returns (w, h) of the box."""
    scale, thick = _style(img.shape)
    bw, bh, th, pad = _box_size(img, text)
    h, w = img.shape[:2]
    x = int(min(max(org[0], 0), max(w - bw, 0)))
    y = int(min(max(org[1], 0), max(h - bh, 0)))
    cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), TEXT_BG, cv2.FILLED)
    cv2.putText(img, text, (x + pad, y + pad + th), FONT, scale, colour, thick, cv2.LINE_AA)
    return bw, bh


class _Pen:
    """The output image while drawing, and the row where the next top-left caption goes."""

    def __init__(self, img: np.ndarray):
        self.img, self.row = img, 0

    def caption(self, text: str) -> None:
        self.row += _text(self.img, text, (0, self.row))[1]


def decode_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """A segment ``mask`` (PNG bytes as carried in the Result, or an array) -> bool H×W of the frame's size."""
    if isinstance(mask, (bytes, bytearray, memoryview)):
        m = cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE) if len(mask) else None
        if m is None:
            raise ValueError("segment mask bytes do not decode as a PNG image")
    else:
        m = np.asarray(mask)
        m = m[:, :, 0] if m.ndim == 3 else m
    if m.shape != tuple(shape):
        m = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m > 0


def _segment(pen: _Pen, out: Mapping) -> None:
    img = pen.img
    mask = decode_mask(out["mask"], img.shape[:2]).view(np.uint8)
    x, y, w, h = cv2.boundingRect(mask)  # blend only where the defects are: a live view draws this per frame
    if w and h:
        roi, m = img[y:y + h, x:x + w], mask[y:y + h, x:x + w]
        tinted = cv2.addWeighted(roi, 1.0 - MASK_ALPHA, np.full_like(roi, MASK_COLOUR), MASK_ALPHA, 0.0)
        np.copyto(roi, tinted, where=m[:, :, None].astype(bool))
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, MASK_COLOUR, _style(img.shape)[1])
    ratio, score = out.get("defect_ratio"), out.get("score")
    words = [f"defect {100.0 * float(ratio):.2f} %"] if ratio is not None else []
    if score is not None:  # the frame's anomaly score: its highest defect probability
        words.append(f"score {float(score):.2f}")
    if words:
        pen.caption(", ".join(words))


def _detect(pen: _Pen, out: Mapping) -> None:
    img = pen.img
    classes = list(out.get("classes") or [])
    _, thick = _style(img.shape)
    thick = max(2, thick)
    for box in out.get("boxes") or []:
        x1, y1, x2, y2, score, cls = box[:6]
        cls = int(cls)
        colour = BOX_COLOURS[cls % len(BOX_COLOURS)]
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(img, p1, p2, colour, thick)
        name = classes[cls] if 0 <= cls < len(classes) else str(cls)
        label = f"{name} {float(score):.2f}"
        above = p1[1] - _box_size(img, label)[1] - thick
        _text(img, label, (p1[0], above if above >= 0 else p1[1] + thick), colour)


def _thermal(pen: _Pen, out: Mapping) -> None:
    img = pen.img
    _, thick = _style(img.shape)
    size = max(7, round(min(img.shape[:2]) / 16)) | 1  # odd, so the cross has a centre pixel
    for spot in out.get("hotspots") or []:
        x, y, k = int(round(spot[0])), int(round(spot[1])), float(spot[2])
        cv2.circle(img, (x, y), size, HOTSPOT_COLOUR, thick, cv2.LINE_AA)
        cv2.drawMarker(img, (x, y), HOTSPOT_COLOUR, cv2.MARKER_CROSS, size, thick, cv2.LINE_8)
        label = f"{k:.1f} K"
        tw = _box_size(img, label)[0]
        right = x + size + 2 + tw <= img.shape[1]  # else on the left, so the marker stays visible
        _text(img, label, (x + size + 2 if right else x - size - 2 - tw, y - size), HOTSPOT_COLOUR)
    if "max_k" in out:
        pen.caption(f"max {float(out['max_k']):.1f} K  avg {float(out.get('avg_k', 0)):.1f}  "
                    f"min {float(out.get('min_k', 0)):.1f}")


def _classify(pen: _Pen, out: Mapping) -> None:
    probs, index = out.get("probs") or [], int(out.get("index", -1))
    prob = float(probs[index]) if 0 <= index < len(probs) else None
    pen.caption(f"{out['label']} {prob:.2f}" if prob is not None else str(out["label"]))


def _zones(img: np.ndarray, zones: Mapping[str, Sequence], highlight: str | None) -> None:
    _, thick = _style(img.shape)
    for name, points in zones.items():
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2).round().astype(np.int32)
        if len(pts) < 2:
            continue
        hot = name == highlight
        colour, t = (ZONE_HIGHLIGHT, 3 * thick) if hot else (ZONE_COLOUR, thick)
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], True, colour, t, cv2.LINE_8)
        x, y = int(pts[:, 0].min()), int(pts[:, 1].max()) + t
        _text(img, name, (x, y), colour)


_DRAW = {"segment": _segment, "detect": _detect, "thermal": _thermal, "classify": _classify}
_ORDER = ("segment", "detect", "thermal", "classify")  # fills under boxes, markers and captions on top


def draw(image: np.ndarray, results: Mapping[str, Mapping], zones: Mapping[str, Sequence] | None = None,
         highlight_zone: str | None = None, heatmap: np.ndarray | None = None, *,
         kelvin_range: tuple[float, float] | None = None, heatmap_alpha: float = 0.45) -> np.ndarray:
    """A new H×W×3 uint8 RGB image: the frame with ``results`` (task -> Result ``out``) drawn over it.

    ``image``: H×W×3 uint8 RGB, or one channel (uint16 centikelvin / uint8 grey) for thermal.
    ``zones``: name -> polygon [[x, y], …] in frame pixels; ``highlight_zone`` is drawn thicker.
    ``heatmap``: a Grad-CAM map (0..1, any size), blended under the drawings.
    ``kelvin_range``: (low, high) K of the colour scale for uint16 frames (default: the frame's own).
    Unknown tasks are ignored; a malformed ``out`` raises ValueError naming the task.
    """
    img = render_base(image, thermal="thermal" in results, kelvin_range=kelvin_range)
    if heatmap is not None:
        from shared.models.gradcam import overlay  # noqa: PLC0415 (torch loads only when a heat map is drawn)

        img = overlay(img, heatmap, heatmap_alpha)
    img = np.ascontiguousarray(img)
    if zones:
        _zones(img, zones, highlight_zone)
    pen = _Pen(img)
    for task in _ORDER:
        out = results.get(task)
        if out is None:
            continue
        try:
            _DRAW[task](pen, out)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"overlay: cannot draw the {task} result: {type(e).__name__}: {e}") from e
    return img


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB (or grey) uint8 image."""
    a = np.asarray(rgb)
    bgr = cv2.cvtColor(a, cv2.COLOR_RGB2BGR) if a.ndim == 3 and a.shape[2] == 3 else a
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"cannot encode a {a.dtype} {list(a.shape)} image as JPEG")
    return buf.tobytes()
