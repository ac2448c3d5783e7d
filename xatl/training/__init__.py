"""Continued training after transfer: the loop, freeze schedules, distillation, checkpoints."""

from xatl.artifacts import read_tensor_origins
from xatl.training.freeze import parse_freeze, transferred_names
from xatl.training.loop import METRICS_FILE, TrainConfig, TrainResult, train

__all__ = [
    "METRICS_FILE",
    "TrainConfig",
    "TrainResult",
    "parse_freeze",
    "read_tensor_origins",
    "train",
    "transferred_names",
]
