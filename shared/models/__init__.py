"""CNNs for plantsight: registry, task networks, model directories and the Predictor."""

# Importing the task modules registers their architectures.
from . import (  # noqa: F401
    classify,
    detect,
    detect_af,  # noqa: F401
    segment,
    thermal,
)
from .classify import SimpleCNN
from .detect import SimpleYOLO, decode_yolo, yolo_loss
from .modeldir import ModelMeta, default_meta, input_size_for, load_meta, load_model_dir, save_model_dir
from .predictor import Predictor
from .registry import ARCHS, DEFAULT_CLASSES, ArchInfo, ModelError, build, describe, register
from .segment import UNet, dice_bce_loss
from .thermal import ThermalCNN, find_hotspots, radiometric_stats, to_kelvin

__all__ = [
    "ARCHS", "ArchInfo", "DEFAULT_CLASSES", "ModelError", "register", "build", "describe",
    "ModelMeta", "default_meta", "input_size_for", "load_meta", "save_model_dir", "load_model_dir", "Predictor",
    "SimpleCNN", "SimpleYOLO", "UNet", "ThermalCNN",
    "decode_yolo", "yolo_loss", "dice_bce_loss", "radiometric_stats", "find_hotspots", "to_kelvin",
]
