"""AdamW with a warm-up + cosine learning-rate schedule, and parameter groups by role.

Two roles: `new` (the mixers' fresh weights, trained from the first step) and `transferred` (the
weights copied from the donor; they may be frozen first, get their own learning-rate scale, and
when unfrozen their own warm-up from that step on). Weight decay goes to matrices and embeddings
only, never to norms and biases.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

ROLES = ("new", "transferred")


def parameter_groups(model: nn.Module, transferred: Collection[str], weight_decay: float) -> list[dict]:
    """AdamW groups, one per (role, decay or not), in a fixed order so optimizer state reloads."""
    groups = {(role, decay): [] for role in ROLES for decay in (True, False)}
    for name, param in model.named_parameters():  # tied weights appear once, under their first name
        role = "transferred" if name in transferred else "new"
        groups[(role, param.ndim >= 2)].append(param)
    return [
        {"params": params, "role": role, "weight_decay": weight_decay if decay else 0.0}
        for (role, decay), params in groups.items()
        if params
    ]


def build_optimizer(
    model: nn.Module,
    transferred: Collection[str],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.AdamW:
    # frozen parameters are in the optimizer from the start: AdamW skips a parameter without a
    # gradient (no step, no decay), and begins its moments on the first step after unfreezing.
    return torch.optim.AdamW(
        parameter_groups(model, transferred, weight_decay), lr=lr, betas=betas, weight_decay=weight_decay
    )


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at `total_steps`."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def factor(self, step: int) -> float:
        """Multiplier of `lr` for the update made at `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rates(
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    step: int,
    *,
    transferred_lr_scale: float = 1.0,
    unfreeze_step: int | None = 0,
    unfreeze_warmup_steps: int = 0,
) -> float:
    """Set every group's lr for the update at `step`; return the `new` weights' lr.

    Transferred weights use `transferred_lr_scale` times the schedule, ramped up linearly over
    `unfreeze_warmup_steps` from `unfreeze_step` (None: still frozen, lr 0).
    """
    base = schedule.lr * schedule.factor(step)
    if unfreeze_step is None:
        ramp = 0.0
    elif unfreeze_warmup_steps and unfreeze_step > 0:
        ramp = min(1.0, (step - unfreeze_step + 1) / unfreeze_warmup_steps)
    else:
        ramp = 1.0
    for group in optimizer.param_groups:
        group["lr"] = base * transferred_lr_scale * ramp if group["role"] == "transferred" else base
    return base


__all__ = ["LRSchedule", "build_optimizer", "parameter_groups", "set_learning_rates"]
