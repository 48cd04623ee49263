"""Preparing samples as the pipeline does (stretch / letterbox / native thermal), and augmenting them.

The pixels a network trains on are the pixels `preprocess` hands to `infer`: classify frames are
stretched to the input size, detect and segment frames letterboxed (boxes and masks moved with
them), thermal frames stay at their own size and are resized inside the model path (as
`Predictor._thermal` does). Normalisation happens on the batch through `network_input`, which runs
the Predictor's own code with the model's `ModelMeta`.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from shared.imaging import letterbox, stretch
from shared.models import Predictor
from shared.models.thermal import from_kelvin

__all__ = ["prepare", "unletterbox_mask", "unletterbox_boxes", "PreparedDataset", "collate", "network_input",
           "thermal_input"]


def prepare(task: str, image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[float, int, int]]:
    """The prepared network image and its letterbox (scale, pad_x, pad_y) ((1, 0, 0) when not letterboxed)."""
    if task == "thermal":
        return image, (1.0, 0, 0)
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if task in ("detect", "segment"):
        return letterbox(image, size)
    out, _ = stretch(image, size)
    return out, (1.0, 0, 0)


def letterbox_boxes(target: np.ndarray, shape: tuple[int, int], size: tuple[int, int], box) -> np.ndarray:
    """Normalised (cls, cx, cy, w, h) of the original image → normalised in the letterboxed image."""
    t = np.asarray(target, dtype=np.float32).reshape(-1, 5).copy()
    (h, w), (th, tw), (scale, px, py) = shape, size, box
    t[:, 1] = (t[:, 1] * w * scale + px) / tw
    t[:, 2] = (t[:, 2] * h * scale + py) / th
    t[:, 3] = t[:, 3] * w * scale / tw
    t[:, 4] = t[:, 4] * h * scale / th
    return t


def letterbox_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0/1 mask through the very same letterbox geometry as its image (padding is background)."""
    out, _ = letterbox((np.asarray(mask, np.uint8) * 255)[:, :, None], size, fill=0)
    return (out[:, :, 0] >= 128).astype(np.uint8)


def unletterbox_boxes(dets: np.ndarray, shape: tuple[int, int], box) -> np.ndarray:
    """[N, ≥4] x1,y1,x2,y2 in letterboxed pixels → original image pixels (other columns kept)."""
    d = np.asarray(dets, dtype=np.float64).copy()
    if len(d) == 0:
        return d
    (h, w), (scale, px, py) = shape, box
    d[:, [0, 2]] = np.clip((d[:, [0, 2]] - px) / scale, 0, w)
    d[:, [1, 3]] = np.clip((d[:, [1, 3]] - py) / scale, 0, h)
    return d


def unletterbox_mask(mask: np.ndarray, shape: tuple[int, int], box) -> np.ndarray:
    """A 0/1 mask over the letterboxed image → the original image size (as infer's postprocess does)."""
    (h, w), (scale, px, py) = shape, box
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return cv2.resize(np.ascontiguousarray(mask[py:py + nh, px:px + nw]), (w, h), interpolation=cv2.INTER_NEAREST)


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What another camera, lamp or lens does to a picture: brightness ±25 levels, contrast and saturation
    ×0.8–1.2, and now and then a little blur (focus) or noise (gain). Never a hue shift: the colour of a
    stain, a rust spot or a flame is what the picture is about."""
    out = img.astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-25, 25)
    if out.ndim == 3 and out.shape[2] == 3:
        gray = out.mean(axis=2, keepdims=True)
        out = gray + (out - gray) * rng.uniform(0.8, 1.2)
    if rng.random() < 0.2:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.2)).reshape(out.shape)
    if rng.random() < 0.2:
        out = out + rng.normal(0, rng.uniform(2, 6), out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _rotate(img: np.ndarray, angle: float, interp: int, border: int) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    out = cv2.warpAffine(img, m, (w, h), flags=interp, borderMode=border)
    return out.reshape(img.shape)


def augment(task: str, img: np.ndarray, target, rng: np.random.Generator):
    """Augment a prepared sample the way plant pictures vary, the target moved along.

    classify: horizontal flip, ±10° rotation, then `_photometric`. Never a vertical flip (a reactor's level
    or a flame has an up and a down), and no cropping (it can cut away the small defect that makes a
    picture defective, and teach the network that a clean picture is a defective one).
    segment: flip, ±10° rotation (the mask rotated with nearest-neighbour), photometric.
    detect: flip and photometric only — rotating an axis-aligned box can only grow it, which teaches
    loose boxes.
    thermal: flip and a linear kelvin change (offset ±2 K, contrast ×0.9–1.1 about the mean) whose effect on
    (max, avg, min) is exact; no rotation, as corners cut off by it could lose the hottest or coldest pixel.
    """
    flip = rng.random() < 0.5
    if task == "thermal":
        k, t = img, np.asarray(target, dtype=np.float64).copy()
        if flip:
            k = k[:, ::-1]
        a, b = rng.uniform(0.9, 1.1), rng.uniform(-2.0, 2.0)
        m = t[1]
        return (k - m) * a + m + b, (t - m) * a + m + b
    if flip:
        img = img[:, ::-1]
        if task == "detect":
            target = target.copy()
            target[:, 1] = 1.0 - target[:, 1]
        elif task == "segment":
            target = target[:, ::-1]
    if task in ("classify", "segment"):
        angle = rng.uniform(-10, 10)
        img = _rotate(np.ascontiguousarray(img), angle, cv2.INTER_LINEAR, cv2.BORDER_REFLECT_101)
        if task == "segment":
            target = _rotate(np.ascontiguousarray(target), angle, cv2.INTER_NEAREST, cv2.BORDER_CONSTANT)
    img = _photometric(img, rng)
    return np.ascontiguousarray(img), (np.ascontiguousarray(target) if isinstance(target, np.ndarray) else target)


class PreparedDataset(Dataset):
    """A loader's TaskDataset as network samples: (uint8 HWC image | thermal [1,H,W] input, target tensor).

    Augmentation draws from a generator seeded by (seed, epoch, index): the same run gives the same
    samples, whatever the worker count. Set `epoch` before each epoch.
    """

    def __init__(self, ds, task: str, size: tuple[int, int], norm: dict, *, train: bool, seed: int = 0):
        self.ds, self.task, self.size, self.train, self.seed = ds, task, tuple(size), train, seed
        self.norm, self.epoch = norm, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, target = self.ds[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.task == "thermal":
            kelvin = image[:, :, 0].astype(np.float64) / 100.0  # centikelvin → K, as Predictor reads uint16
            tgt = np.asarray(target, dtype=np.float64)
            if self.train:
                kelvin, tgt = augment("thermal", kelvin, tgt, rng)
            x = thermal_input(torch.from_numpy(np.ascontiguousarray(kelvin))[None], self.norm, self.size)[0]
            return x, from_kelvin(torch.as_tensor(tgt, dtype=torch.float32))
        img, box = prepare(self.task, image, self.size)
        if self.task == "detect":
            target = letterbox_boxes(target, image.shape[:2], self.size, box)
        elif self.task == "segment":
            target = letterbox_mask(target, self.size)
        if self.train:
            img, target = augment(self.task, img, target, rng)
        img = torch.from_numpy(np.ascontiguousarray(img))
        if self.task == "classify":
            return img, torch.tensor(int(target))
        if self.task == "detect":
            return img, torch.from_numpy(np.asarray(target, dtype=np.float32).reshape(-1, 5))
        return img, torch.from_numpy(np.asarray(target, dtype=np.uint8))


def collate(batch):
    xs, ys = zip(*batch)
    x = torch.stack(xs)
    if ys[0].dim() == 2 and ys[0].shape[-1] == 5 and ys[0].dtype == torch.float32:
        return x, list(ys)  # detect: a box list per image
    return x, torch.stack(ys)


def thermal_input(kelvin: torch.Tensor, norm: dict, size: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] kelvin → the thermal network's [B, 1, h, w] input, exactly as Predictor._thermal builds it."""
    mean = torch.tensor(norm["mean"][0], dtype=kelvin.dtype)
    std = torch.tensor(norm["std"][0], dtype=kelvin.dtype)
    x = ((kelvin - mean) / std).to(torch.float32).unsqueeze(1)
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x


def network_input(predictor: Predictor, batch: torch.Tensor) -> torch.Tensor:
    """A uint8 NHWC batch normalised by the Predictor's own code (thermal batches are already inputs)."""
    if batch.dtype != torch.uint8:
        return batch.to(predictor.device)
    return predictor._normalise(batch.to(predictor.device, non_blocking=True))
