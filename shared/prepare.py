"""One frame into the ``prepared`` message of each task its camera feeds: preprocess's work.

preprocess does it for every frame it reads. With ``inference.read_from: frames`` infer does it itself,
for its own task, in its reader thread (no preprocess process, one Redis hop less per frame); both use
this module, so the two paths give the same messages and the same pixels.

Stays uint8 (radiometric thermal frames stay uint16 at their own resolution so that the temperatures stay
exact); normalisation happens on the inference device. An 8-bit colour JPEG for a task that infer can
decode itself (``ROUTABLE``) goes on undecoded when ``route_jpeg`` (``inference.decode: infer``, or
``read_from: frames``): a ``PreparedJpeg`` whose letterbox and ROI come from the frame's shape alone.
"""

from __future__ import annotations

import time

import cv2
import numpy as np

from shared.config import CameraConfig, Config
from shared.imaging import crop, decode_frame, is_colour_jpeg, jpeg_reduction, letterbox, stretch
from shared.messages import DecodeError, Frame, Prepared, PreparedJpeg
from shared.models import input_size_for

ROUTABLE = ("classify", "detect", "segment")  # thermal needs the pixels (radiometric PNG, or gray conversion)
SPATIAL = ("detect", "segment")  # letterboxed so boxes and masks map back exactly


def plan(frame_hw: tuple[int, int], roi: tuple | None, task: str, size: tuple[int, int]) -> tuple[tuple, tuple]:
    """(letterbox, roi used) for a frame of ``frame_hw`` without decoding it: the arithmetic of
    ``imaging.crop`` and ``imaging.letterbox``/``stretch``."""
    h, w = frame_hw
    if roi is None:
        used, rh, rw = (0, 0, 0, 0), h, w
    else:
        x, y, qw, qh = roi
        x1, y1 = min(x, w - 1), min(y, h - 1)
        x2, y2 = min(x + qw, w), min(y + qh, h)
        used, rh, rw = (x1, y1, x2 - x1, y2 - y1), y2 - y1, x2 - x1
    if task not in SPATIAL:
        return (1.0, 0, 0), used
    th, tw = size
    scale = min(th / rh, tw / rw)
    nh, nw = max(1, round(rh * scale)), max(1, round(rw * scale))
    return (scale, (tw - nw) // 2, (th - nh) // 2), used


def prepare(image: np.ndarray, cam: CameraConfig, task: str, size: tuple[int, int],
            reduced: int = 1) -> tuple[np.ndarray, tuple, tuple]:
    """(prepared image, letterbox (scale, pad_x, pad_y), roi used) for one task; DecodeError if the pixels don't fit.

    ``reduced``: the image was decoded at 1/reduced of the frame's size (``imaging.jpeg_reduction``); the
    letterbox and ROI returned are still in the frame's own pixels, the same numbers as without it.
    """
    if reduced != 1:
        roi = None if cam.roi is None else tuple(v // reduced for v in cam.roi)
        region, used = crop(image, roi)
        used = tuple(v * reduced for v in used)
        if task in SPATIAL:
            out, (_, px, py) = letterbox(region, size)
            rh, rw = region.shape[0] * reduced, region.shape[1] * reduced
            return out, (min(size[0] / rh, size[1] / rw), px, py), used
        return stretch(region, size)[0], (1.0, 0, 0), used
    region, roi = crop(image, cam.roi)
    if task == "thermal":
        if region.dtype == np.uint8 and region.shape[2] == 3:  # an 8-bit IR picture: the CNN estimates
            region = cv2.cvtColor(region, cv2.COLOR_RGB2GRAY)[:, :, None]
        return np.ascontiguousarray(region), (1.0, 0, 0), roi
    if region.dtype != np.uint8:
        raise DecodeError(f"camera {cam.id}: a {region.dtype} frame cannot feed the {task} network (needs 8-bit RGB)")
    if region.shape[2] == 1:
        region = cv2.cvtColor(region, cv2.COLOR_GRAY2RGB)
    if task in SPATIAL:
        out, box = letterbox(region, size)
        return out, box, roi
    out, _ = stretch(region, size)
    return out, (1.0, 0, 0), roi


class Preparer:
    """Builds the prepared messages of a frame for the configured networks' input sizes."""

    def __init__(self, cfg: Config, stage: str, route_jpeg: bool):
        self.stage, self.route_jpeg = stage, route_jpeg
        self.sizes = {t: input_size_for(t, path=cfg.model(t).path, arch=cfg.model(t).arch) for t in cfg.tasks()}

    def reduction(self, frame: Frame, cam: CameraConfig, tasks: list[str]) -> int:
        """How much smaller than the frame libjpeg may decode it for these tasks (1: full size)."""
        if not tasks or not is_colour_jpeg(frame) or "thermal" in tasks:
            return 1
        return jpeg_reduction(frame.shape[:2], cam.roi, [(self.sizes[t], t in SPATIAL) for t in tasks])

    def jpeg_tasks(self, frame: Frame, tasks: list[str]) -> list[str]:
        """The tasks an 8-bit colour JPEG goes to undecoded (infer decodes the batch)."""
        if not self.route_jpeg or not is_colour_jpeg(frame):
            return []
        return [t for t in tasks if t in ROUTABLE]

    def messages(self, frame: Frame, cam: CameraConfig, tasks: list[str], frame_id: str,
                 t0: float) -> list[Prepared]:
        """The prepared message of each of ``tasks`` (in that order); DecodeError when the frame's bytes do not
        decode or its pixels cannot feed a task's network. ``t0``: when the stage began on the frame."""
        routed = self.jpeg_tasks(frame, tasks)
        decoded = [t for t in tasks if t not in routed]
        k = self.reduction(frame, cam, decoded)
        image = decode_frame(frame, k) if decoded else None
        pixels = {t: prepare(image, cam, t, self.sizes[t], k) for t in decoded}
        spent = time.perf_counter() - t0
        out = []
        for task in tasks:
            if task in pixels:
                img, lb, roi = pixels[task]
                out.append(Prepared(camera=cam.id, seq=frame.seq, ts=frame.ts, task=task, frame_id=frame_id,
                                    shape=img.shape, dtype=str(img.dtype), data=img.tobytes(),
                                    orig=frame.shape[:2], letterbox=lb, roi=roi, t={self.stage: spent}))
            else:
                lb, roi = plan(frame.shape[:2], cam.roi, task, self.sizes[task])
                out.append(PreparedJpeg(camera=cam.id, seq=frame.seq, ts=frame.ts, task=task, frame_id=frame_id,
                                        shape=(*self.sizes[task], 3), dtype="uint8", data=frame.data,
                                        orig=frame.shape[:2], letterbox=lb, roi=roi, t={self.stage: spent},
                                        enc="jpeg"))
        return out
