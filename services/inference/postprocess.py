"""Map a network's output from prepared-image pixels back to the original frame: the result's ``out``."""

from __future__ import annotations

import cv2
import numpy as np

from shared.messages import Prepared


def _roi_of(msg: Prepared) -> tuple[int, int, int, int]:
    x, y, w, h = msg.roi
    if w == 0:
        return 0, 0, msg.orig[1], msg.orig[0]
    return x, y, w, h


def boxes_to_original(boxes: list, msg: Prepared) -> list[list[float]]:
    """[[x1,y1,x2,y2,score,cls]] in prepared pixels -> original frame pixels (undo letterbox and ROI)."""
    if not boxes:
        return []
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    scale, px, py = msg.letterbox
    rx, ry, rw, rh = _roi_of(msg)
    b[:, [0, 2]] = np.clip((b[:, [0, 2]] - px) / scale, 0, rw) + rx
    b[:, [1, 3]] = np.clip((b[:, [1, 3]] - py) / scale, 0, rh) + ry
    out = np.round(b, 2).tolist()
    for row in out:
        row[5] = int(row[5])
    return out


def mask_to_original(mask: np.ndarray, msg: Prepared) -> np.ndarray:
    """A 0/1 mask over the prepared image -> a 0/1 mask of the original frame size (zero outside the ROI)."""
    scale, px, py = msg.letterbox
    rx, ry, rw, rh = _roi_of(msg)
    nh, nw = max(1, round(rh * scale)), max(1, round(rw * scale))
    inner = mask[py:py + nh, px:px + nw]
    full = np.zeros(msg.orig, dtype=np.uint8)
    full[ry:ry + rh, rx:rx + rw] = cv2.resize(inner, (rw, rh), interpolation=cv2.INTER_NEAREST)
    return full


def segment_out(mask: np.ndarray, msg: Prepared, min_area: int = 4) -> dict:
    """``{defect_ratio, regions [[x,y,w,h,area]], mask (png bytes, 0/255)}`` in original pixels."""
    full = mask_to_original(mask, msg)
    _, _, rw, rh = _roi_of(msg)
    n, _, stats, _ = cv2.connectedComponentsWithStats(full, connectivity=8)
    stats = stats[1:]  # row 0 is the background
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= min_area]
    ok, png = cv2.imencode(".png", full * 255, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return {"defect_ratio": float(full.sum()) / float(rw * rh), "regions": stats.astype(int).tolist(),
            "mask": png.tobytes()}


def hotspots_to_original(spots: list, msg: Prepared) -> list[list[float]]:
    """Hot spots ``[[x, y, peak_k]]`` in prepared pixels -> original frame pixels (thermal frames are not resized)."""
    rx, ry, _, _ = _roi_of(msg)
    return [[int(x) + rx, int(y) + ry, round(float(k), 2)] for x, y, k in spots]


def to_original(task: str, out: dict, msg: Prepared) -> dict:
    """The ``out`` of one task for one frame."""
    if task == "detect":
        return {"boxes": boxes_to_original(out["boxes"], msg), "classes": out["classes"]}
    if task == "segment":
        res = segment_out(out["mask"], msg)
        if "prob_max" in out:  # the frame's anomaly score: its highest defect probability
            res["score"] = round(float(out["prob_max"]), 5)
        if "instances" in out:  # an instance segmenter's boxes, as a detector's
            res["instances"] = boxes_to_original(out["instances"], msg)
        return res
    if task == "thermal":
        res = {k: round(float(out[k]), 3) for k in ("max_k", "avg_k", "min_k")}
        res["hotspots"] = hotspots_to_original(out.get("hotspots", []), msg)
        res["source"] = out.get("source", "cnn")
        return res
    return {"label": out["label"], "index": int(out["index"]), "probs": [round(float(p), 5) for p in out["probs"]],
            "classes": out["classes"]}


def comparable(task: str, out: dict, msg: Prepared) -> dict:
    """What ``shared.agreement.compare`` reads of a model's output, in original frame pixels, as published."""
    if task == "detect":
        return {"boxes": boxes_to_original(out["boxes"], msg)}
    if task == "segment":
        return {"mask": mask_to_original(out["mask"], msg)}
    if task == "thermal":
        return {"max_k": float(out["max_k"])}
    return {"label": out["label"]}
