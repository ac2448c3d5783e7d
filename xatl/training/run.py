"""One training run from things on disk: the model folder, the text, the donor as teacher.

    run_training(TrainingRun(model_dir="runs/gla", data=TrainingData(["corpus/"]),
                             config=TrainConfig(max_tokens=3_000_000), out_dir="runs/gla-trained"),
                 on_event=print, should_stop=lambda: False)

This is the set-up every caller shares — `xatl train`, the job pipeline (`xatl.pipeline`, which
the workers and the benchmark run); `run_attention_transfer` is the same for the attention-transfer
stage: processes and device, the model in float32, which weights
came from the donor (its transfer report), the teacher, the blocks of text — before handing them
to `xatl.training.train`. Under `torchrun` it joins the process group (gloo on CPU, NCCL on GPUs)
and each process takes its share of every batch; the caller ends the group (`end_distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from xatl.artifacts import TRANSFER_REPORT, read_tensor_origins
from xatl.training.attention_transfer import AttentionTransferConfig, AttentionTransferResult, attention_transfer
from xatl.training.freeze import transferred_names
from xatl.training.loop import TrainConfig, TrainResult, train


@dataclass
class TrainingData:
    """Text to train on, and how it is cut: see `xatl.data` for the formats and the split."""

    data: Sequence[str]
    valid_data: Sequence[str] | None = None  # default: hold out `valid_fraction` of `data`
    valid_fraction: float = 0.01  # 0: no validation
    split_by: str = "document"  # or "block", for a corpus of one long text
    text_field: str = "text"
    block_size: int = 512


@dataclass
class TrainingRun:
    """Everything a run reads besides the text's blocks; plain values."""

    model_dir: str | Path
    config: TrainConfig
    out_dir: str | Path
    data: TrainingData | None = None  # None when the caller passes blocks
    teacher: str | None = None  # the donor (a model folder, a Hugging Face donor, a llama2.c .bin)
    teacher_tokenizer: str | None = None
    freeze_initialised: bool = False  # also freeze tensors the report calls initialised
    device: str | None = None  # default: the process's GPU under torchrun, cuda when available, else cpu
    resume: bool | str | Path = False  # True: the latest checkpoint in out_dir


@dataclass
class AttentionTransferRun:
    """Layer-wise attention transfer of a converted model folder (`xatl.training.attention_transfer`)."""

    model_dir: str | Path
    config: AttentionTransferConfig
    out_dir: str | Path
    teacher: str  # the donor
    teacher_tokenizer: str | None = None
    data: TrainingData | None = None  # None when the caller passes blocks
    device: str | None = None
    resume: bool | str | Path = False  # True: the latest checkpoint in out_dir


def start_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun; (rank, world size)."""
    if torch.distributed.is_torchelastic_launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def end_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_training(
    run: TrainingRun,
    *,
    blocks: Iterable[torch.Tensor] | None = None,
    valid_blocks: Iterable[torch.Tensor] | None = None,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `run.model_dir` into `run.out_dir` (metrics, checkpoints, the final model with its
    tokenizer and transfer report). `blocks`/`valid_blocks` replace `run.data` for callers that
    tokenise their text themselves (the benchmark)."""
    from transformers.utils import logging as transformers_logging

    from xatl.data import resolve_paths
    from xatl.loader import load_model, load_teacher, pick_device

    config, model_dir, out = run.config, Path(run.model_dir), Path(run.out_dir)
    if config.distill and not run.teacher:
        raise ValueError(f"distill={config.distill!r} needs a teacher (the donor)")
    if blocks is None:
        if run.data is None:
            raise ValueError("give the text to train on (TrainingData) or its blocks")
        resolve_paths(list(run.data.data) + list(run.data.valid_data or []))  # a wrong path fails now
    transformers_logging.disable_progress_bar()

    # 1. Processes and device
    rank, _ = start_distributed()
    device = pick_device(run.device)

    # 2. Model, transferred weights, teacher
    model, tokenizer = load_model(model_dir, device=device, dtype=torch.float32, dequantize=True)
    transferred: set[str] = set()
    if (model_dir / TRANSFER_REPORT).is_file():
        transferred = transferred_names(read_tensor_origins(model_dir), include_initialised=run.freeze_initialised)
    elif config.freeze != "none" or config.transferred_lr_scale != 1.0:
        raise ValueError(f"freezing and transferred_lr_scale need {model_dir / TRANSFER_REPORT} "
                         "(written by `xatl convert`)")
    teacher = load_teacher(run.teacher, run.teacher_tokenizer, device) if config.distill else None

    # 3. Data
    blocks, valid_blocks = _text_blocks(run.data, tokenizer, config.seed, blocks, valid_blocks)

    # 4. Train
    resume = run.resume
    if resume and resume is not True:
        resume = Path(resume)
    result = train(model, blocks, config, valid_blocks=valid_blocks, teacher=teacher, transferred=transferred,
                   out_dir=out, resume=resume, tokenizer=tokenizer, on_step=on_event, should_stop=should_stop)
    if rank == 0 and not result.stopped and (model_dir / TRANSFER_REPORT).is_file():
        (out / TRANSFER_REPORT).write_text((model_dir / TRANSFER_REPORT).read_text())  # keep the provenance
    return result


def run_attention_transfer(
    run: AttentionTransferRun,
    *,
    blocks: Iterable[torch.Tensor] | None = None,
    valid_blocks: Iterable[torch.Tensor] | None = None,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AttentionTransferResult:
    """Attention transfer of `run.model_dir` into `run.out_dir` (metrics, checkpoints, the final model
    with its tokenizer and transfer report, ready for `run_training`). One process."""
    from transformers.utils import logging as transformers_logging

    from xatl.data import resolve_paths
    from xatl.loader import load_model, load_teacher, pick_device

    config, model_dir, out = run.config, Path(run.model_dir), Path(run.out_dir)
    if blocks is None:
        if run.data is None:
            raise ValueError("give the text for attention transfer (TrainingData) or its blocks")
        resolve_paths(list(run.data.data) + list(run.data.valid_data or []))  # a wrong path fails now
    transformers_logging.disable_progress_bar()
    device = pick_device(run.device)
    model, tokenizer = load_model(model_dir, device=device, dtype=torch.float32, dequantize=True)
    teacher = load_teacher(run.teacher, run.teacher_tokenizer, device)
    blocks, valid_blocks = _text_blocks(run.data, tokenizer, config.seed, blocks, valid_blocks)
    resume = Path(run.resume) if run.resume and run.resume is not True else run.resume
    result = attention_transfer(model, teacher, blocks, config, valid_blocks=valid_blocks, out_dir=out,
                                resume=resume, tokenizer=tokenizer, on_step=on_event, should_stop=should_stop)
    if not result.stopped and (model_dir / TRANSFER_REPORT).is_file():
        (out / TRANSFER_REPORT).write_text((model_dir / TRANSFER_REPORT).read_text())  # keep the provenance
    return result


def _text_blocks(data: TrainingData | None, tokenizer, seed: int, blocks, valid_blocks):
    """The blocks given, else those of `data`; an empty validation split is an error."""
    if blocks is None:
        blocks = _blocks(data, tokenizer, "train", seed)
        valid_blocks = _blocks(data, tokenizer, "validation", seed)
    if valid_blocks is not None and next(iter(valid_blocks), None) is None:
        raise ValueError("the validation split is empty: give validation text, split by block, a larger "
                         "validation fraction, or a fraction of 0 for none")
    return blocks, valid_blocks


def _blocks(data: TrainingData, tokenizer, split: str, seed: int):
    """Training or validation blocks; None when there is no validation text."""
    from xatl.data import TextBlocks

    common = dict(text_field=data.text_field, seed=seed)
    if split == "validation" and data.valid_data:
        return TextBlocks(list(data.valid_data), tokenizer, data.block_size, keep_partial=True, **common)
    if data.valid_data or data.valid_fraction == 0:
        return None if split == "validation" else TextBlocks(list(data.data), tokenizer, data.block_size, **common)
    return TextBlocks(list(data.data), tokenizer, data.block_size, split=split, valid_fraction=data.valid_fraction,
                      split_by=data.split_by, keep_partial=split == "validation", **common)


__all__ = ["AttentionTransferRun", "TrainingData", "TrainingRun", "end_distributed", "run_attention_transfer",
           "run_training", "start_distributed"]
