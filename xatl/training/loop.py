"""The one training loop, used by `xatl train`, the workers and the benchmark.

    train(model, blocks, TrainConfig(max_tokens=..., lr=...), valid_blocks=..., teacher=...,
          transferred=..., out_dir=..., on_step=..., should_stop=...)

A budget in tokens or steps; AdamW with warm-up and cosine decay; gradient accumulation and
clipping; bf16/fp16 autocast; a freeze schedule for the transferred weights (with their own lr scale
and their own warm-up once unfrozen); optional distillation from the donor; periodic evaluation and
checkpoints; exact resume. Every event (train, eval, unfreeze, checkpoint, done) is one JSON-ready
dict, passed to `on_step` and appended to `OUT/metrics.jsonl`.

Data-parallel: launched with `torchrun`, with the process group initialised, each step's global
batch of `batch_size * grad_accum * world_size` blocks is shared out by rank and gradients are
averaged by one all-reduce after accumulation (no DDP wrapper: parameters that change from frozen
to trainable mid-run would break its hooks). Ranks stay bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from xatl.artifacts import METRICS_FILE
from xatl.data import BatchStream
from xatl.eval import evaluate_loss
from xatl.training.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from xatl.training.distill import hidden_alignment, kl_divergence, parse_distill
from xatl.training.freeze import parse_freeze
from xatl.training.optim import LRSchedule, build_optimizer, set_learning_rates

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that shapes a run; plain values, so a worker can pass it as JSON.

    Budget: exactly one of `max_tokens` (input tokens over all processes) and `max_steps`.
    Batches: `batch_size` blocks per micro-step on each process, `grad_accum` micro-steps per update.
    Freezing: `freeze` is a schedule spec (`none`, `steps:N`, `lit`, `norm-peak`; see
    `xatl.training.freeze`); transferred weights train at `transferred_lr_scale` × lr, warmed up over
    `unfreeze_warmup_steps` after they are released.
    Distillation: `distill` is "", "kl", "hidden" or "kl,hidden"; the loss is
    (1 − kl_weight)·CE + kl_weight·KL(τ = temperature) + hidden_weight·alignment.
    """

    max_tokens: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    freeze: str = "none"
    transferred_lr_scale: float = 1.0
    unfreeze_warmup_steps: int = 0
    distill: str = ""
    temperature: float = 1.0
    kl_weight: float = 0.5
    hidden_weight: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    shuffle_buffer: int = 10_000
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int | None = None
    save_every: int = 0
    keep_checkpoints: int | None = None

    def __post_init__(self):
        if (self.max_tokens is None) == (self.max_steps is None):
            raise ValueError("give exactly one budget: max_tokens or max_steps")
        for name in ("max_tokens", "max_steps", "batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("warmup_steps", "unfreeze_warmup_steps", "eval_every", "save_every", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.transferred_lr_scale < 0:
            raise ValueError(f"lr must be positive and transferred_lr_scale >= 0, got {self.lr}, "
                             f"{self.transferred_lr_scale}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.temperature <= 0 or not 0 < self.kl_weight <= 1 or self.hidden_weight < 0:
            raise ValueError("temperature must be > 0, kl_weight in (0, 1], hidden_weight >= 0")
        parse_distill(self.distill)
        parse_freeze(self.freeze)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        return cls(**values)


@dataclass
class TrainResult:
    step: int
    total_steps: int
    tokens: int
    loss: float | None  # mean training loss of the last logged interval
    valid_loss: float | None  # last evaluation
    unfreeze_step: int | None
    stopped: bool  # True when `should_stop` ended the run early (resumable)


def train(
    model: nn.Module,
    blocks: Iterable[torch.Tensor],
    config: TrainConfig,
    *,
    valid_blocks: Iterable[torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    transferred: Collection[str] = (),
    out_dir: str | Path | None = None,
    resume: str | Path | bool = False,
    tokenizer=None,
    on_step: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train `model` (already on its device) on `blocks` (equal-length LongTensors, re-iterable).

    Args:
        valid_blocks: evaluated every `eval_every` steps and at the end.
        teacher: the donor as an all-attention model, needed when `config.distill` is set.
        transferred: parameter names that came from the donor (see `freeze.transferred_names`).
        out_dir: where `metrics.jsonl`, checkpoints and the final model (with `tokenizer`) go.
        resume: a checkpoint directory, or True for the latest checkpoint in `out_dir`.
        on_step: called with each event dict. should_stop: polled after every step; True saves a
            checkpoint (with `out_dir`) and returns early.
    """
    distill = parse_distill(config.distill)
    if distill and teacher is None:
        raise ValueError(f"distill={config.distill!r} needs a teacher model")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    out_dir = Path(out_dir) if out_dir is not None else None
    if (config.save_every or resume is True) and out_dir is None:
        raise ValueError("checkpoints (save_every, resume=True) need out_dir")

    # 1. Data, budget, optimizer, schedules
    torch.manual_seed(config.seed)
    global_batch = config.batch_size * config.grad_accum * world
    stream = BatchStream(blocks, global_batch, shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    tokens_per_step = global_batch * stream.block_size
    total_steps = config.max_steps or math.ceil(config.max_tokens / tokens_per_step)
    transferred = {n for n, _ in model.named_parameters() if n in set(transferred)}
    freeze = parse_freeze(config.freeze)
    optimizer = build_optimizer(
        model, transferred, lr=config.lr, weight_decay=config.weight_decay, betas=(config.beta1, config.beta2)
    )
    schedule = LRSchedule(config.lr, total_steps, config.warmup_steps, config.min_lr_ratio)
    autocast_dtype = PRECISIONS[config.precision]
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32)")
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    # 2. Start fresh or resume
    step, unfreeze_step = 0, (None if freeze.frozen_at_start and transferred else 0)
    if resume:
        path = latest_checkpoint(out_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {out_dir}")
        state = load_checkpoint(path, model, rank=rank)
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        freeze.load_state_dict(state["freeze"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, unfreeze_step = state["step"], state["unfreeze_step"]
    elif world > 1:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)  # identical start on every rank
    for name, param in model.named_parameters():
        param.requires_grad_(unfreeze_step is not None or name not in transferred)
    if rank == 0:
        log = _EventLog(out_dir, on_step, resume_step=step if resume else None)
    else:
        log = _EventLog(None, None, None)
    if rank == 0 and out_dir is not None:
        (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    model.train()

    # every run ends with one last event: done, stopped, or failed (then the error goes on up)
    try:
        # 3. Optimizer steps
        local = slice(rank * config.batch_size * config.grad_accum, (rank + 1) * config.batch_size * config.grad_accum)
        interval = _Interval()
        valid_loss, stopped = None, False
        while step < total_steps:
            lr = set_learning_rates(
                optimizer, schedule, step, transferred_lr_scale=config.transferred_lr_scale,
                unfreeze_step=unfreeze_step, unfreeze_warmup_steps=config.unfreeze_warmup_steps,
            )
            batch = stream.next_batch()[local].to(device)  # (batch_size * grad_accum, T), this rank's share
            terms = {}
            for micro in batch.split(config.batch_size):
                with _autocast(device, autocast_dtype):
                    loss, parts = _loss(model, micro, teacher, distill, config)
                loss = loss / config.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                for key, value in parts.items():
                    terms[key] = terms.get(key, 0.0) + value.detach() / config.grad_accum
            if world > 1:
                _average_gradients(model, world)
            if scaler:
                scaler.unscale_(optimizer)
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip or math.inf)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            terms = _mean_over_ranks(terms, world)
            interval.add(terms, tokens_per_step)
            if unfreeze_step is None and freeze.observe(step, terms["loss"], model):
                unfreeze_step = step
                for name, param in model.named_parameters():
                    if name in transferred:
                        param.requires_grad_(True)
                log.write({"event": "unfreeze", "step": step, "rule": freeze.spec})
            if step % config.log_every == 0 or step == total_steps:
                log.write({
                    "event": "train", "step": step, "total_steps": total_steps, "tokens": step * tokens_per_step,
                    **interval.flush(), "lr": lr, "grad_norm": grad_norm.item(), "frozen": unfreeze_step is None,
                })
            if valid_blocks is not None and config.eval_every and step % config.eval_every == 0:
                valid_loss = _evaluate(model, valid_blocks, config, log, step, tokens_per_step)
            stopped = should_stop is not None and step < total_steps and _agree(should_stop(), world)
            save_now = config.save_every and step % config.save_every == 0 and step < total_steps
            if out_dir is not None and (save_now or stopped):
                state = {
                    "step": step, "unfreeze_step": unfreeze_step, "optimizer": optimizer.state_dict(),
                    "data": stream.state_dict(), "freeze": freeze.state_dict(), "config": asdict(config),
                    "scaler": scaler.state_dict() if scaler else None,
                }
                path = save_checkpoint(checkpoint_path(out_dir, step), model, state, rank=rank,
                                       keep_last=config.keep_checkpoints)
                log.write({"event": "checkpoint", "step": step, "path": str(path)})
            if stopped:
                break

        # 4. Final evaluation and model
        if valid_blocks is not None and not stopped and not (config.eval_every and step % config.eval_every == 0):
            valid_loss = _evaluate(model, valid_blocks, config, log, step, tokens_per_step)
        if out_dir is not None and not stopped and rank == 0:
            _save_model(model, tokenizer, out_dir)
        result = TrainResult(step, total_steps, step * tokens_per_step, interval.last_loss, valid_loss,
                             unfreeze_step, stopped)
        log.write({"event": "stopped" if stopped else "done", **asdict(result)})
        log.close()
        return result
    except BaseException as error:
        log.write({"event": "failed", "step": step, "error": f"{type(error).__name__}: {error}"})
        log.close()
        raise


def _save_model(model, tokenizer, out_dir: Path) -> None:
    """The final model into `out_dir`, each file written aside and renamed over the old one, the
    config last: a reader that waits for `config.json` (as the service's model list does) finds the
    weights beside it whole."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".final-") as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = sorted(Path(staging).iterdir(), key=lambda f: f.name == "config.json")
        for file in files:
            if file.is_file():
                os.replace(file, out_dir / file.name)
            else:
                shutil.copytree(file, out_dir / file.name, dirs_exist_ok=True)


def _loss(model, input_ids, teacher, distill, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch and its parts (for the log)."""
    outputs = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    parts = {"lm_loss": outputs.loss}
    loss = outputs.loss
    if distill:
        with torch.no_grad():
            target = teacher(input_ids=input_ids, use_cache=False, output_hidden_states="hidden" in distill)
        if "kl" in distill:
            parts["kl_loss"] = kl_divergence(outputs.logits, target.logits, config.temperature)
            loss = (1 - config.kl_weight) * loss + config.kl_weight * parts["kl_loss"]
        if "hidden" in distill:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
            parts["hidden_loss"] = hidden_alignment(model, target.hidden_states, positions)
            loss = loss + config.hidden_weight * parts["hidden_loss"]
    parts["loss"] = loss
    return loss, parts


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _average_gradients(model: nn.Module, world: int) -> None:
    """One all-reduce of every trainable gradient, flattened."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(reduced.view_as(grad))


def _mean_over_ranks(terms: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    keys = sorted(terms)
    values = torch.stack([terms[k].float() for k in keys])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(keys, values.tolist()))


def _agree(flag: bool, world: int) -> bool:
    """True on every rank when any rank says so (a cancel seen by one process stops all)."""
    if world == 1:
        return bool(flag)
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _evaluate(model, valid_blocks, config, log, step, tokens_per_step) -> float:
    result = evaluate_loss(model, valid_blocks, batch_size=config.batch_size, max_batches=config.eval_batches)
    log.write({"event": "eval", "step": step, "tokens": step * tokens_per_step, "valid_loss": result.loss,
               "valid_perplexity": result.perplexity, "valid_tokens": result.tokens})
    return result.loss


class _Interval:
    """Mean losses and throughput since the last train event."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = self.tokens = 0
        self.start = time.perf_counter()
        self.last_loss: float | None = None

    def add(self, terms: dict[str, float], tokens: int) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.tokens += tokens

    def flush(self) -> dict:
        elapsed = time.perf_counter() - self.start
        means = {key: value / self.steps for key, value in self.sums.items()}
        means["tokens_per_second"] = self.tokens / elapsed if elapsed > 0 else None
        self.sums, self.steps, self.tokens, self.start = {}, 0, 0, time.perf_counter()
        self.last_loss = means["loss"]
        return means


class _EventLog:
    """Sends each event to `on_step` and appends it to `metrics.jsonl` (on rank 0; the others log nothing).

    On resume, events logged after the checkpoint's step (by the run that was interrupted) are
    dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: Path | None, on_step, resume_step: int | None):
        self.on_step = on_step
        self.file = None
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS_FILE
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if event["step"] <= resume_step and event["event"] not in ("done", "stopped"):
                    kept.append(line + "\n")
        self.file = path.open("w")
        self.file.writelines(kept)
        self.file.flush()

    def write(self, event: dict) -> None:
        if self.on_step is not None:
            self.on_step(event)
        if self.file is not None:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


__all__ = ["METRICS_FILE", "TrainConfig", "TrainResult", "train"]
