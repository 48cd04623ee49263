"""infer's batch decoder for JPEG-routed ``prepared`` messages (``inference.decode: infer``).

With ``decode: infer``, preprocess does not decode 8-bit colour JPEG frames: it computes the ROI
and the letterbox from the frame's shape alone and routes the encoded bytes (a fraction of the raw
pixels' Redis traffic) as a ``PreparedJpeg`` (``shared.messages``) with ``enc: "jpeg"`` whose ``shape`` is the network
input the frame becomes. infer decodes and resizes the whole batch: on CUDA with
``torchvision.io.decode_jpeg(device="cuda")`` and a resize/letterbox on the GPU, so CPU decode stops
being the ceiling; without CUDA with libjpeg-turbo (``imaging.decode_jpeg``) and exactly the resize
preprocess would have done, so the option works everywhere and gives the same results as the CPU path there.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from shared.imaging import crop, decode_jpeg, jpeg_reduction, letterbox, stretch
from shared.messages import Prepared
from shared.prepare import SPATIAL

FILL = 114  # the letterbox border, as imaging.letterbox pads


def _region(msg: Prepared) -> tuple[int, int, int, int]:
    x, y, w, h = msg.roi
    return (0, 0, msg.orig[1], msg.orig[0]) if w == 0 else (x, y, w, h)


class DeviceDecoder:
    """Decodes and resizes a batch of ``PreparedJpeg`` into a uint8 [n, h, w, 3] tensor.

    ``method``: "auto" is "torch" on CUDA (nvJPEG through torchvision, resize on the GPU) and "cpu"
    elsewhere (libjpeg-turbo and OpenCV's resize, the same pixels as the preprocess path); "torch" on
    the CPU runs the GPU code path with torchvision's CPU decoder (the tests compare it with "cpu").
    """

    def __init__(self, device: str | torch.device = "cpu", method: str = "auto"):
        self.device = torch.device(device)
        if method == "auto":
            method = "torch" if self.device.type == "cuda" else "cpu"
        if method not in ("torch", "cpu"):
            raise ValueError(f"jpeg decode method {method!r}: must be auto, torch or cpu")
        self.method = method

    def decode_batch(self, msgs: list[Prepared], out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """(frames [n, h, w, 3] uint8, indexes that did not decode: their rows are left filled).

        ``out``: a reusable uint8 [n, h, w, 3] CPU buffer for the "cpu" method to decode into (the
        batcher's pool); the "torch" method makes its batch on the device.
        """
        if not msgs:
            raise ValueError("decode_batch needs at least one message")
        if self.method == "cpu":
            return self._cpu(msgs, out)
        return self._torch(msgs)

    # --- on the CPU: exactly preprocess's pixels ----------------------------------------------------
    def _cpu(self, msgs, out: torch.Tensor | None):
        th, tw, _ = msgs[0].shape
        if out is None:
            out = torch.empty((len(msgs), th, tw, 3), dtype=torch.uint8)
        rows = out.numpy()  # every row is written whole: picture, letterbox fill, or fill for a bad JPEG
        bad = []
        for i, m in enumerate(msgs):
            roi = None if m.roi[2] == 0 else tuple(m.roi)
            boxed = m.task in SPATIAL
            k = jpeg_reduction(tuple(m.orig), roi, [((th, tw), boxed)])  # as preprocess decodes
            img = decode_jpeg(m.data, tuple(m.orig), k)
            if img is None or img.shape != (m.orig[0] // k, m.orig[1] // k, 3):
                bad.append(i)
                rows[i] = FILL
                continue
            region, _ = crop(img, None if roi is None else tuple(v // k for v in roi))
            if boxed:
                letterbox(region, (th, tw), FILL, out=rows[i])
            else:
                stretch(region, (th, tw), out=rows[i])
        return out, bad

    # --- torchvision decode (nvJPEG on CUDA) and resize on the device ------------------------------
    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        # torchvision.io takes a second to import: only the torch decode method (CUDA) loads it
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

        dev = self.device if self.device.type == "cuda" else "cpu"
        with warnings.catch_warnings():  # torchvision 0.29 marks its image codecs deprecated (torchcodec next)
            warnings.simplefilter("ignore", DeprecationWarning)
            return self._decode_all(datas, dev, decode_jpeg, ImageReadMode)

    @staticmethod
    def _decode_all(datas, dev, decode_jpeg, ImageReadMode):  # noqa: N803
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev))
        except RuntimeError:  # one bad JPEG fails the whole call: find it
            out = []
            for d in datas:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=dev))
                except RuntimeError:
                    out.append(None)
            return out

    def _torch(self, msgs):
        th, tw, _ = msgs[0].shape
        with warnings.catch_warnings():  # the bytes are read-only; decode_jpeg only reads them
            warnings.simplefilter("ignore", UserWarning)
            datas = [torch.frombuffer(m.data, dtype=torch.uint8) for m in msgs]
        images = self._decode(datas)
        dev = images[0].device if images and images[0] is not None else self.device
        out = torch.full((len(msgs), th, tw, 3), FILL, dtype=torch.uint8, device=dev)
        bad = [i for i, (img, m) in enumerate(zip(images, msgs))
               if img is None or tuple(img.shape[1:]) != tuple(m.orig)]
        # Frames of one camera share size, ROI and letterbox: resize each such group in one call.
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(msgs):
            if i not in bad:
                groups.setdefault((tuple(m.orig), tuple(m.roi), tuple(m.letterbox), m.task), []).append(i)
        for (_, _, (scale, px, py), task), idx in groups.items():
            x, y, w, h = _region(msgs[idx[0]])
            region = torch.stack([images[i][:, y:y + h, x:x + w] for i in idx]).float()
            if task in SPATIAL:
                nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            else:
                nh, nw, px, py = th, tw, 0, 0
            resized = F.interpolate(region, size=(nh, nw), mode="bilinear", align_corners=False,
                                    antialias=nh * nw < h * w)
            pix = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            out[idx, py:py + nh, px:px + nw] = pix
        return out, bad
