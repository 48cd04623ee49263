"""Image encode/decode, ROI and resize/letterbox: the pixel work shared by the services.

Arrays are RGB uint8 H×W×3, or radiometric uint16 H×W×1 in centikelvin.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

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


REDUCTIONS = (2, 4, 8)  # what libjpeg's scaled IDCT decodes a JPEG straight down to (besides 1, full size)


def decode_jpeg(data: bytes, hw: tuple[int, int] | None = None, reduce: int = 1) -> np.ndarray | None:
    """An 8-bit colour JPEG's RGB pixels, or None when the bytes are not a whole JPEG.

    ``reduce`` (2, 4 or 8, with ``hw`` the frame's (h, w)) decodes straight to 1/reduce of the size with
    libjpeg's scaled IDCT, a fraction of the full decode's cost (``jpeg_reduction`` says when that is
    allowed). The caller checks the shape against the message's.

    libjpeg-turbo through simplejpeg rather than ``cv2.imdecode``: it writes RGB itself (no BGR → RGB
    pass), which makes it faster than OpenCV's copy of libjpeg, to the same pixels
    (``tests/unit/test_imaging.py`` compares the two). It releases the GIL.
    """
    if not data:
        return None
    kw = {}
    if reduce != 1:
        if reduce not in REDUCTIONS or hw is None:
            raise ValueError(f"decode_jpeg: reduce {reduce} needs one of {REDUCTIONS} and the frame's size")
        kw = {"min_height": hw[0] // reduce, "min_width": hw[1] // reduce, "min_factor": reduce}
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **kw)
    except ValueError:  # not a JPEG, truncated, corrupt (strict: libjpeg's warnings count too)
        return None


def is_colour_jpeg(frame: Frame) -> bool:
    """An 8-bit colour JPEG frame: what ``decode_jpeg`` decodes (and may reduce)."""
    return frame.enc == "jpeg" and tuple(frame.shape[2:]) == (3,) and frame.dtype == "uint8"


def jpeg_reduction(frame_hw: tuple[int, int], roi: tuple | None, targets: list[tuple[tuple[int, int], bool]]) -> int:
    """The largest k in 8, 4, 2 (else 1) by which libjpeg may shrink a frame while it decodes it (a
    fraction of the full decode's cost) for networks taking ``targets`` ((h, w), letterboxed?) from its
    ROI: the shrunk region still holds at least as many pixels as each target's resize keeps, so the
    picture is only ever scaled down; and k divides the frame and the ROI, so the ROI, the letterbox
    and every box mapped back stay exact."""
    h, w = frame_hw
    x, y, rw, rh = roi if roi is not None else (0, 0, w, h)
    if x + rw > w or y + rh > h or rw <= 0 or rh <= 0 or not targets:
        return 1
    need = []
    for (th, tw), boxed in targets:
        if boxed:
            scale = min(th / rh, tw / rw)
            th, tw = max(1, round(rh * scale)), max(1, round(rw * scale))
        need.append((th, tw))
    for k in (8, 4, 2):
        if not any(v % k for v in (h, w, x, y, rw, rh)) and all(rh // k >= th and rw // k >= tw for th, tw in need):
            return k
    return 1


def decode_frame(frame: Frame, reduce: int = 1) -> np.ndarray:
    """The frame's pixels; DecodeError when the bytes are not an image or disagree with ``shape``/``dtype``.

    ``reduce`` (2, 4 or 8, for an 8-bit colour JPEG whose sides it divides; see ``jpeg_reduction``)
    decodes straight to 1/reduce of the size.
    """
    if reduce != 1:
        if reduce not in REDUCTIONS or not is_colour_jpeg(frame):
            raise ValueError(f"decode_frame: cannot reduce a {frame.enc} {frame.dtype} {list(frame.shape)} frame "
                             f"by {reduce}")
        image = decode_jpeg(frame.data, frame.shape[:2], reduce)
        want = (frame.shape[0] // reduce, frame.shape[1] // reduce, 3)
        if image is None or image.shape != want:
            raise DecodeError(f"frame {frame.camera}#{frame.seq}: jpeg bytes do not decode to a "
                              f"{frame.shape[1]}x{frame.shape[0]} image")
        return image
    if frame.enc == "raw":
        image = frame.array()
    elif is_colour_jpeg(frame):
        image = decode_jpeg(frame.data)
        if image is None:
            raise DecodeError(f"frame {frame.camera}#{frame.seq}: jpeg bytes do not decode to an image")
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


def resize_method(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    """OpenCV's interpolation for one resize: area averaging when a side shrinks by more than 2, else bilinear.

    Down to half size bilinear's 2×2 taps still read every source pixel, so it shows what area averaging
    shows at a fraction of its cost; below half it would skip
    pixels and alias. A JPEG decoded at 1/2, 1/4 or 1/8 (``jpeg_reduction``) lands in bilinear's range
    unless the frame's aspect is far from the network's (1920×480 → 224×224 still averages across).
    """
    (h, w), (th, tw) = src_hw, dst_hw
    return cv2.INTER_AREA if 2 * th < h or 2 * tw < w else cv2.INTER_LINEAR


def letterbox(image: np.ndarray, size: tuple[int, int], fill: int = 114,
              out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, int, int]]:
    """Resize keeping the aspect ratio and pad to ``size`` (h, w); returns (image, (scale, pad_x, pad_y)).

    ``out``: an [h, w, c] array of the image's dtype to write into (a row of infer's batch) instead of a
    new one; the picture and the ``fill`` around it are both written.
    """
    h, w = image.shape[:2]
    th, tw = size
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    px, py = (tw - nw) // 2, (th - nh) // 2
    if out is None:
        out = np.full((th, tw, image.shape[2]), fill, dtype=image.dtype)
    else:  # only the bands around the picture
        out[:py], out[py + nh:] = fill, fill
        out[py:py + nh, :px], out[py:py + nh, px + nw:] = fill, fill
    _resize(image, out[py:py + nh, px:px + nw])
    return out, (scale, px, py)


def stretch(image: np.ndarray, size: tuple[int, int],
            out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize to ``size`` (h, w) ignoring the aspect ratio; returns (image, (scale_x, scale_y)).

    ``out``: an [h, w, c] array of the image's dtype to write into instead of a new one.
    """
    h, w = image.shape[:2]
    th, tw = size
    if out is None:
        out = np.empty((th, tw, image.shape[2]), dtype=image.dtype)
    _resize(image, out)
    return out, (tw / w, th / h)


def _resize(image: np.ndarray, out: np.ndarray) -> None:
    """Resize ``image`` [h, w, c] into ``out`` [h', w', c] (a view is fine: OpenCV writes through its strides)."""
    src_hw, dst_hw = image.shape[:2], out.shape[:2]
    dst = out[:, :, 0] if out.shape[2] == 1 else out  # OpenCV drops a single channel's axis
    cv2.resize(image, dst_hw[::-1], dst=dst, interpolation=resize_method(src_hw, dst_hw))
