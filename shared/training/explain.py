"""`plantsight explain`: Grad-CAM of a classifier model directory on one image file, as an overlay PNG."""

from __future__ import annotations

import os
from pathlib import Path

import cv2

from shared.data.datasets import read_rgb
from shared.models.gradcam import explain
from shared.models.modeldir import load_model_dir
from shared.models.predictor import Predictor


def explain_image(model_dir: str | os.PathLike, image_path: str | os.PathLike, out_png: str | os.PathLike,
                  layer: str | None = None, device: str = "cpu") -> dict:
    """Grad-CAM of a classifier model directory on one image file, written as an overlay PNG; {label, prob, layer}."""
    model, meta = load_model_dir(model_dir, device)
    predictor = Predictor(model, meta, device)
    picture, info = explain(predictor, read_rgb(image_path), layer)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{out}: cannot encode the overlay as PNG")
    out.write_bytes(buf.tobytes())
    return info
