"""Which weights came from the donor, and when to stop freezing them.

`xatl convert` writes `transfer_report.json` beside the model, naming the origin of each tensor:
`copied` (bit-identical to a donor tensor), `initialised` (derived from donor tensors), `set` (a
fixed value with no donor source) or `random`; only the first two came from the donor.
A freeze schedule keeps the transferred weights fixed while the fresh mixers learn to use them, then
releases them:

- `none`: nothing is frozen.
- `steps:N`: unfreeze after N optimizer steps.
- `lit[:window=W,threshold=R,patience=P]`: the XATL paper's loss-improvement threshold. The mean
  training loss of each window of W steps is compared with the previous window's; when the
  relative improvement stays below R for P windows in a row, unfreeze.
- `norm-peak[:window=W,patience=P]`: every W steps the norm of the weights being trained is
  measured; once it has stayed below its peak for P measurements (the new weights have stopped
  growing into their role), unfreeze.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def transferred_names(origins: dict[str, str], *, include_initialised: bool = False) -> set[str]:
    """Tensors a freeze schedule holds: the copied ones, optionally also the initialised ones."""
    kinds = {"copied", "initialised"} if include_initialised else {"copied"}
    return {name for name, origin in origins.items() if origin in kinds}


class FreezeSchedule:
    """Decides, step by step, when the transferred weights are released."""

    spec = "none"
    frozen_at_start = True

    def observe(self, step: int, loss: float, model: nn.Module) -> bool:
        """Called after each optimizer step (`step` updates done, `loss` its mean training loss);
        True once the weights should be unfrozen."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoFreeze(FreezeSchedule):
    frozen_at_start = False

    def observe(self, step, loss, model):
        return True


class FixedSteps(FreezeSchedule):
    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"freeze steps:N needs N >= 1, got {steps}")
        self.steps = steps
        self.spec = f"steps:{steps}"

    def observe(self, step, loss, model):
        return step >= self.steps


class LossImprovementThreshold(FreezeSchedule):
    def __init__(self, window: int = 50, threshold: float = 0.01, patience: int = 2):
        if window < 1 or patience < 1:
            raise ValueError(f"lit needs window >= 1 and patience >= 1, got {window}, {patience}")
        if not 0 < threshold < 1:
            raise ValueError(f"lit threshold must be in (0, 1), got {threshold}")
        self.window, self.threshold, self.patience = window, threshold, patience
        self.spec = f"lit:window={window},threshold={threshold},patience={patience}"
        self.losses: list[float] = []
        self.previous_mean: float | None = None
        self.strikes = 0

    def observe(self, step, loss, model):
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return False
        mean = sum(self.losses) / len(self.losses)
        self.losses = []
        if self.previous_mean is not None:
            improvement = (self.previous_mean - mean) / abs(self.previous_mean)
            self.strikes = self.strikes + 1 if improvement < self.threshold else 0
        self.previous_mean = mean
        return self.strikes >= self.patience

    def state_dict(self):
        return {"losses": list(self.losses), "previous_mean": self.previous_mean, "strikes": self.strikes}

    def load_state_dict(self, state):
        self.losses, self.previous_mean, self.strikes = list(state["losses"]), state["previous_mean"], state["strikes"]


class WeightNormPeak(FreezeSchedule):
    def __init__(self, window: int = 10, patience: int = 3):
        if window < 1 or patience < 1:
            raise ValueError(f"norm-peak needs window >= 1 and patience >= 1, got {window}, {patience}")
        self.window, self.patience = window, patience
        self.spec = f"norm-peak:window={window},patience={patience}"
        self.peak = -math.inf
        self.strikes = 0

    def observe(self, step, loss, model):
        if step % self.window:
            return False
        with torch.no_grad():
            norm = math.sqrt(sum(p.float().square().sum().item() for p in model.parameters() if p.requires_grad))
        if norm > self.peak:
            self.peak, self.strikes = norm, 0
        else:
            self.strikes += 1
        return self.strikes >= self.patience

    def state_dict(self):
        return {"peak": self.peak, "strikes": self.strikes}

    def load_state_dict(self, state):
        self.peak, self.strikes = state["peak"], state["strikes"]


RULES = {"lit": LossImprovementThreshold, "norm-peak": WeightNormPeak}
_ARG_TYPES = {"window": int, "patience": int, "threshold": float}


def parse_freeze(spec: str) -> FreezeSchedule:
    """`none`, `steps:N`, `lit[:k=v,...]` or `norm-peak[:k=v,...]` (see the module docstring)."""
    name, _, args = spec.strip().partition(":")
    if name == "none" and not args:
        return NoFreeze()
    if name == "steps":
        if not args.isdigit():
            raise ValueError(f"freeze {spec!r}: expected steps:N with N a whole number")
        return FixedSteps(int(args))
    if name not in RULES:
        raise ValueError(f"unknown freeze schedule {spec!r}; expected none, steps:N, lit or norm-peak")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        if key not in _ARG_TYPES or not value:
            raise ValueError(f"freeze {spec!r}: bad argument {item!r}; expected window=, threshold=, patience=")
        try:
            kwargs[key] = _ARG_TYPES[key](value)
        except ValueError:
            raise ValueError(f"freeze {spec!r}: {key} must be a {_ARG_TYPES[key].__name__}") from None
    try:
        return RULES[name](**kwargs)
    except TypeError:
        raise ValueError(f"freeze {spec!r}: {name} takes no argument {sorted(kwargs)}") from None


__all__ = [
    "FixedSteps",
    "FreezeSchedule",
    "LossImprovementThreshold",
    "NoFreeze",
    "WeightNormPeak",
    "parse_freeze",
    "transferred_names",
]
