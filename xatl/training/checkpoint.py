"""Checkpoints that resume exactly: weights as safetensors (the directory loads with
`from_pretrained`), plus the trainer state (step, optimizer, freeze schedule, data position) and
each process's RNG state.

Layout: `OUT/checkpoints/step-00000100/{config.json, model.safetensors, trainer_state.pt,
rng-rank0.pt, ...}`. A checkpoint is written to a `.tmp` folder and renamed when complete, so a
crash mid-write never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
PREFIX = "step-"


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    path: Path, model: nn.Module, state: dict, *, rank: int = 0, keep_last: int | None = None
) -> Path:
    """Write a checkpoint (every process calls this; rank 0 writes the shared files)."""
    partial = path.with_name(path.name + ".tmp")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        torch.save(state, partial / STATE_FILE)
    _barrier()
    torch.save(rng_state(), partial / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        if keep_last:
            for old in list_checkpoints(path.parent.parent)[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    return path


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load `save_pretrained` safetensors (single file or sharded) into `model` in place."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
        state.update(load_file(directory / name))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"checkpoint {directory} does not fit the model: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_checkpoint(path: str | Path, model: nn.Module, *, rank: int = 0) -> dict:
    """Load weights into `model`, restore this process's RNG, and return the trainer state."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    load_weights(model, path)
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{path} has no RNG state for rank {rank}: resume with the same number of processes")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / STATE_FILE, weights_only=True)


__all__ = [
    "CHECKPOINTS",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]
