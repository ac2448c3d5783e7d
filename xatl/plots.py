"""Plots of a run, as PNG files: the loss curve from `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve(metrics_file: str | Path, out: str | Path, *, title: str = "training") -> Path | None:
    """Training loss per step (and validation loss where evaluated) to `out`; None without train events."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train" and e.get("loss") is not None]
    valid = [(e["step"], e["valid_loss"]) for e in events if e.get("event") == "eval"]
    if not train:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=100)
    axes.plot(*zip(*train), label="training loss", linewidth=1)
    if valid:
        axes.plot(*zip(*valid), "o-", label="validation loss")
    unfreeze = [e["step"] for e in events if e.get("event") == "unfreeze"]
    for step in unfreeze:
        axes.axvline(step, color="grey", linestyle=":", label="transferred weights unfrozen")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return Path(out)


__all__ = ["loss_curve"]
