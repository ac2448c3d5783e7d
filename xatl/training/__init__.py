"""Continued training after transfer: the loop, freeze schedules, distillation, checkpoints."""

from xatl.training.freeze import parse_freeze, read_transfer_report, transferred_names
from xatl.training.loop import METRICS_FILE, TrainConfig, TrainResult, train

__all__ = [
    "METRICS_FILE",
    "TrainConfig",
    "TrainResult",
    "parse_freeze",
    "read_transfer_report",
    "train",
    "transferred_names",
]
