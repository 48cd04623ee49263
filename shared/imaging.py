"""Image encode/decode, ROI and resize/letterbox: the pixel work shared by the services.

Arrays are RGB uint8 H×W×3, or radiometric uint16 H×W×1 in centikelvin.
"""

from __future__ import annotations

import cv2
import numpy as np

from shared.messages import DecodeError, Frame


def encode(image: np.ndarray, quality: int = 90) -> tuple[str, bytes]:
    """(enc, bytes): JPEG for 8-bit colour, lossless PNG for 16-bit radiometric or single-channel."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        enc = "jpeg"
    else:
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        enc = "png"
    if not ok:
        raise ValueError(f"could not encode a {image.dtype} {image.shape} image")
    return enc, buf.tobytes()


def decode_frame(frame: Frame) -> np.ndarray:
    """The frame's pixels; DecodeError when the bytes are not an image or disagree with ``shape``/``dtype``."""
    if frame.enc == "raw":
        image = frame.array()
    else:
        buf = np.frombuffer(frame.data, np.uint8)
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
        if image is None:
            raise DecodeError(f"frame {frame.camera}#{frame.seq}: {frame.enc} bytes do not decode to an image")
        if image.ndim == 3 and image.shape[2] == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.ndim == 2:
        image = image[:, :, None]
    want = tuple(frame.shape) if len(frame.shape) == 3 else (*frame.shape, 1)
    if image.shape != want or image.dtype != np.dtype(frame.dtype):
        raise DecodeError(f"frame {frame.camera}#{frame.seq}: decoded {image.dtype} {list(image.shape)} "
                          f"but the message says {frame.dtype} {list(want)}")
    return image


def crop(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The ROI (clipped to the image) and the ROI actually used; ``(0,0,0,0)`` means the whole frame."""
    if roi is None:
        return image, (0, 0, 0, 0)
    h, w = image.shape[:2]
    x, y, rw, rh = roi
    x1, y1 = min(x, w - 1), min(y, h - 1)
    x2, y2 = min(x + rw, w), min(y + rh, h)
    return image[y1:y2, x1:x2], (x1, y1, x2 - x1, y2 - y1)


def letterbox(image: np.ndarray, size: tuple[int, int], fill: int = 114) -> tuple[np.ndarray, tuple[float, int, int]]:
    """Resize keeping the aspect ratio and pad to ``size`` (h, w); returns (image, (scale, pad_x, pad_y))."""
    h, w = image.shape[:2]
    th, tw = size
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    out = np.full((th, tw, image.shape[2]), fill, dtype=image.dtype)
    px, py = (tw - nw) // 2, (th - nh) // 2
    out[py:py + nh, px:px + nw] = resized
    return out, (scale, px, py)


def stretch(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize to ``size`` (h, w) ignoring the aspect ratio; returns (image, (scale_x, scale_y))."""
    h, w = image.shape[:2]
    th, tw = size
    out = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if th * tw < h * w else cv2.INTER_LINEAR)
    if out.ndim == 2:
        out = out[:, :, None]
    return out, (tw / w, th / h)
