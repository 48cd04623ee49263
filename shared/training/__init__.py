"""Training and evaluation (DESIGN §6, §8): `plantsight train`, `plantsight eval`, metrics and plots."""

from .evaluate import evaluate, evaluate_predictions
from .train import train

__all__ = ["train", "evaluate", "evaluate_predictions"]
