"""Layer-wise attention transfer: a training stage before end-to-end training.

    attention_transfer(model, teacher, blocks, AttentionTransferConfig(max_tokens=...), out_dir=...)

Every converted layer's mixer learns to reproduce what the donor's attention outputs at that layer,
from the input that attention gets in the donor (LoLCATs' attention transfer; MOHAWK's and CALD's
layer-wise alignment). One forward pass of the teacher (the donor as an all-attention model) per
micro-batch records, at each converted layer i, the normalised hidden state x_i that enters its
attention and the attention's output y_i; the student's mixer i is then run on x_i alone and trained
on

    loss_i = ‖mixer_i(x_i) − y_i‖² / ‖y_i‖²        (relative: 0 is exact, 1 is as good as outputting 0)

Inputs come from the donor, not from the student's earlier layers, so the layers are independent
problems solved together in one pass: each has its own loss, its own backward (freed before the
next layer's) and its own gradient clipping, so training layer i alongside the others gives it the
same updates as training it alone. Everything but the trained mixers is frozen.

Same conventions as `xatl.training.train`: a budget in tokens or steps, AdamW with warm-up and cosine
decay, gradient accumulation, bf16/fp16 autocast, periodic evaluation and checkpoints
(`xatl.training.checkpoint`), exact resume, and events (JSON-ready dicts) passed to `on_step` and
appended to `OUT/metrics.jsonl`:

    {"event": "train", "step", "total_steps", "tokens", "loss", "layer_losses": {"1": ..., ...},
     "lr", "grad_norm", "tokens_per_second"}
    {"event": "eval", "step", "tokens", "valid_loss", "valid_layer_losses"}
    {"event": "checkpoint", "step", "path"}      {"event": "done" | "stopped", **result}

`loss` is the mean of the layer losses. One process (the stage is a small fraction of the cost of
end-to-end training); the model and the teacher on the same device.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import groupby, islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from xatl.data import BatchStream
from xatl.training.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from xatl.training.optim import LRSchedule

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "attention_transfer_config.json"


@dataclass
class AttentionTransferConfig:
    """Everything that shapes the stage; plain values, so a worker can pass it as JSON.

    Budget: exactly one of `max_tokens` (input tokens) and `max_steps`. `layers`: the converted layers
    to train (default: every layer whose mixer is not attention). `grad_clip` applies to each layer's
    gradient on its own. Other fields as in `TrainConfig`.
    """

    max_tokens: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    layers: list[int] | None = None
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
        for name in ("max_tokens", "max_steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("warmup_steps", "eval_every", "save_every", "shuffle_buffer", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"layers must be a non-empty list of distinct indices, got {self.layers!r}")

    @classmethod
    def from_dict(cls, values: dict) -> AttentionTransferConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown attention-transfer option(s) {sorted(unknown)}")
        return cls(**values)


@dataclass
class AttentionTransferResult:
    step: int
    total_steps: int
    tokens: int
    loss: float | None  # mean over layers, last logged interval
    layer_losses: dict[str, float]  # per trained layer, last logged interval
    valid_loss: float | None  # last evaluation
    stopped: bool  # True when `should_stop` ended the stage early (resumable)


def attention_transfer(
    model: nn.Module,
    teacher: nn.Module,
    blocks: Iterable[torch.Tensor],
    config: AttentionTransferConfig,
    *,
    valid_blocks: Iterable[torch.Tensor] | None = None,
    out_dir: str | Path | None = None,
    resume: str | Path | bool = False,
    tokenizer=None,
    on_step: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AttentionTransferResult:
    """Train the converted mixers of `model` to reproduce `teacher`'s attention, layer by layer.

    Args:
        model: the converted `XatlForCausalLM`, on its device.
        teacher: the donor as an all-attention `XatlForCausalLM` of the same shape, same device.
        blocks: equal-length LongTensors of token ids (re-iterable), as for `train`.
        valid_blocks: scored (mean layer loss) every `eval_every` steps and at the end.
        out_dir: where `metrics.jsonl`, checkpoints and the final model (with `tokenizer`) go.
        resume: a checkpoint directory, or True for the latest checkpoint in `out_dir`.
        on_step: called with each event dict. should_stop: polled after every step; True saves a
            checkpoint (with `out_dir`) and returns early.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("attention transfer runs in one process; launch it without torchrun")
    layers = trained_layers(model, teacher, config.layers)
    device = next(model.parameters()).device
    out_dir = Path(out_dir) if out_dir is not None else None
    if (config.save_every or resume is True) and out_dir is None:
        raise ValueError("checkpoints (save_every, resume=True) need out_dir")
    autocast_dtype = PRECISIONS[config.precision]
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32)")

    # 1. Data, budget, what trains, optimizer
    torch.manual_seed(config.seed)
    stream = BatchStream(blocks, config.batch_size * config.grad_accum, shuffle_buffer=config.shuffle_buffer,
                         seed=config.seed)
    tokens_per_step = config.batch_size * config.grad_accum * stream.block_size
    total_steps = config.max_steps or math.ceil(config.max_tokens / tokens_per_step)
    was_trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    mixers = {i: model.model.layers[i].mixer for i in layers}
    for mixer in mixers.values():
        mixer.requires_grad_(True)
    optimizer = torch.optim.AdamW(_parameter_groups(mixers, config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)
    schedule = LRSchedule(config.lr, total_steps, config.warmup_steps, config.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    teacher.eval().requires_grad_(False)
    recorder = _AttentionRecorder(teacher, layers)

    # 2. Start fresh or resume
    step = 0
    if resume:
        path = latest_checkpoint(out_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {out_dir}")
        state = load_checkpoint(path, model)
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = state["step"]
    log = _EventLog(out_dir, on_step, resume_step=step if resume else None)
    if out_dir is not None:
        (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    model.train()

    # 3. Optimizer steps: one teacher pass per micro-batch, then each layer's forward and backward
    interval, last = _Interval(), {}
    valid_loss, stopped = None, False
    try:
        while step < total_steps:
            lr = schedule.lr * schedule.factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = stream.next_batch().to(device)  # (batch_size * grad_accum, T)
            losses = dict.fromkeys(layers, 0.0)
            for micro in batch.split(config.batch_size):
                for i, loss in _layer_losses(model, recorder, micro, autocast_dtype, backward=True,
                                             scale=1 / config.grad_accum, scaler=scaler):
                    losses[i] += loss / config.grad_accum
            if scaler:
                scaler.unscale_(optimizer)
            norms = [_clip(mixers[i], config.grad_clip) for i in layers]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            interval.add(losses, tokens_per_step)
            if step % config.log_every == 0 or step == total_steps:
                last = interval.flush()
                log.write({"event": "train", "step": step, "total_steps": total_steps,
                           "tokens": step * tokens_per_step, **last, "lr": lr,
                           "grad_norm": math.sqrt(sum(n * n for n in norms))})
            if valid_blocks is not None and config.eval_every and step % config.eval_every == 0:
                valid_loss = _evaluate(model, recorder, valid_blocks, config, log, step, tokens_per_step)
            stopped = should_stop is not None and step < total_steps and bool(should_stop())
            save_now = config.save_every and step % config.save_every == 0 and step < total_steps
            if out_dir is not None and (save_now or stopped):
                state = {"step": step, "optimizer": optimizer.state_dict(), "data": stream.state_dict(),
                         "config": asdict(config), "scaler": scaler.state_dict() if scaler else None}
                path = save_checkpoint(checkpoint_path(out_dir, step), model, state, keep_last=config.keep_checkpoints)
                log.write({"event": "checkpoint", "step": step, "path": str(path)})
            if stopped:
                break

        # 4. Final evaluation and model
        if valid_blocks is not None and not stopped and not (config.eval_every and step % config.eval_every == 0):
            valid_loss = _evaluate(model, recorder, valid_blocks, config, log, step, tokens_per_step)
    finally:
        recorder.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(was_trainable[name])
    if out_dir is not None and not stopped:
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    result = AttentionTransferResult(step, total_steps, step * tokens_per_step, last.get("loss"),
                                     last.get("layer_losses", {}), valid_loss, stopped)
    log.write({"event": "stopped" if stopped else "done", **asdict(result)})
    log.close()
    return result


def trained_layers(model: nn.Module, teacher: nn.Module, layers: Sequence[int] | None = None) -> list[int]:
    """The layers attention transfer trains: `layers`, or every converted one (its mixer is not
    attention), checked against the teacher (attention there, same shape)."""
    plan, donor_plan = model.config.layer_mixers, teacher.config.layer_mixers
    if len(plan) != len(donor_plan) or model.config.hidden_size != teacher.config.hidden_size:
        raise ValueError(f"the teacher ({len(donor_plan)} layers of width {teacher.config.hidden_size}) does not "
                         f"match the model ({len(plan)} layers of width {model.config.hidden_size})")
    converted = [i for i, name in enumerate(plan) if name != "attention"]
    chosen = sorted(layers) if layers is not None else converted
    if not chosen:
        raise ValueError("the model has no converted layer: every mixer is attention, nothing to transfer")
    for i in chosen:
        if i not in converted:
            raise ValueError(f"layer {i} is not a converted layer of the model (converted: {converted})")
        if donor_plan[i] != "attention":
            raise ValueError(f"the teacher's layer {i} is {donor_plan[i]!r}, not attention")
    return chosen


@torch.no_grad()
def evaluate_attention_transfer(
    model: nn.Module, teacher: nn.Module, blocks: Iterable[torch.Tensor], *, layers: Sequence[int] | None = None,
    batch_size: int = 8, max_batches: int | None = None,
) -> dict[str, float]:
    """Relative error of each converted layer's mixer against the teacher's attention on `blocks`
    (squared errors and squared targets summed over every token, then divided); key "mean" too."""
    layers = trained_layers(model, teacher, layers)
    recorder = _AttentionRecorder(teacher, layers)
    was_training = model.training
    model.eval()
    try:
        errors = _sum_errors(model, recorder, blocks, batch_size, max_batches, None)
    finally:
        recorder.remove()
        model.train(was_training)
    return {**{str(i): e for i, e in errors.items()}, "mean": sum(errors.values()) / len(errors)}


# ---- one micro-batch ------------------------------------------------------------------------------


class _AttentionRecorder:
    """Forward hooks on the teacher's attention at the trained layers: each forward records
    (input, output) per layer, the input being the normalised hidden state the attention receives."""

    def __init__(self, teacher: nn.Module, layers: Sequence[int]):
        self.teacher = teacher
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [teacher.model.layers[i].mixer.register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, index: int):
        def record(module, args, output):
            self.records[index] = (args[0].detach(), output[0].detach())
        return record

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        self.records = {}
        self.teacher.model(input_ids=input_ids, use_cache=False)  # the LM head is not needed
        records, self.records = self.records, {}
        return records

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _layer_losses(model, recorder, input_ids, autocast_dtype, *, backward, scale=1.0, scaler=None):
    """(layer, loss value) for each trained layer on one micro-batch; with `backward`, each layer's
    loss × `scale` is back-propagated before the next layer runs (its activations freed)."""
    device = input_ids.device
    with _autocast(device, autocast_dtype):
        records = recorder.run(input_ids)
    positions = torch.arange(input_ids.shape[1], device=device)[None].expand_as(input_ids)
    for i in sorted(records):
        inputs, target = records.pop(i)
        with _autocast(device, autocast_dtype), torch.set_grad_enabled(backward):
            output, _ = model.model.layers[i].mixer(inputs, position_ids=positions)
            loss = _relative_error(output, target)
        if backward:
            scaled = loss * scale
            (scaler.scale(scaled) if scaler else scaled).backward()
        yield i, loss.item()


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.float()
    return (output.float() - target).square().sum() / target.square().sum().clamp_min(1e-12)


def _sum_errors(model, recorder, blocks, batch_size, max_batches, autocast_dtype) -> dict[int, float]:
    """Per layer: summed squared error / summed squared target over the batches."""
    sums: dict[int, list[float]] = {}
    device = next(model.parameters()).device
    for batch in islice(_batched(blocks, batch_size), max_batches):
        batch = batch.to(device)
        with _autocast(device, autocast_dtype):
            records = recorder.run(batch)
        positions = torch.arange(batch.shape[1], device=device)[None].expand_as(batch)
        for i in sorted(records):
            inputs, target = records.pop(i)
            with _autocast(device, autocast_dtype):
                output, _ = model.model.layers[i].mixer(inputs, position_ids=positions)
            target = target.float()
            pair = sums.setdefault(i, [0.0, 0.0])
            pair[0] += (output.float() - target).square().sum().item()
            pair[1] += target.square().sum().item()
    if not sums:
        raise ValueError("nothing to evaluate: no validation block")
    return {i: error / max(norm, 1e-12) for i, (error, norm) in sums.items()}


def _batched(blocks: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Consecutive blocks of equal length stacked `size` at a time (a text's last block is shorter)."""
    for _, same_length in groupby(blocks, key=len):
        same_length = iter(same_length)
        while chunk := list(islice(same_length, size)):
            yield torch.stack(chunk)


def _evaluate(model, recorder, valid_blocks, config, log, step, tokens_per_step) -> float:
    model.eval()
    with torch.no_grad():
        errors = _sum_errors(model, recorder, valid_blocks, config.batch_size, config.eval_batches,
                             PRECISIONS[config.precision])
    model.train()
    mean = sum(errors.values()) / len(errors)
    log.write({"event": "eval", "step": step, "tokens": step * tokens_per_step, "valid_loss": mean,
               "valid_layer_losses": {str(i): e for i, e in errors.items()}})
    return mean


def _parameter_groups(mixers: dict[int, nn.Module], weight_decay: float) -> list[dict]:
    """Per layer, matrices (decayed) and the rest (not), in a fixed order so optimizer state reloads."""
    groups = []
    for i, mixer in mixers.items():
        params = list(mixer.parameters())
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "layer": i, "weight_decay": weight_decay if decay else 0.0})
    return groups


def _clip(mixer: nn.Module, max_norm: float | None) -> float:
    """Clip one layer's gradient; return its norm before clipping."""
    params = [p for p in mixer.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf).item()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class _Interval:
    """Mean layer losses and throughput since the last train event."""

    def __init__(self):
        self.sums: dict[int, float] = {}
        self.steps = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, losses: dict[int, float], tokens: int) -> None:
        for i, value in losses.items():
            self.sums[i] = self.sums.get(i, 0.0) + value
        self.steps += 1
        self.tokens += tokens

    def flush(self) -> dict:
        elapsed = time.perf_counter() - self.start
        layer_losses = {str(i): value / self.steps for i, value in self.sums.items()}
        event = {"loss": sum(layer_losses.values()) / len(layer_losses), "layer_losses": layer_losses,
                 "tokens_per_second": self.tokens / elapsed if elapsed > 0 else None}
        self.sums, self.steps, self.tokens, self.start = {}, 0, 0, time.perf_counter()
        return event


class _EventLog:
    """Sends each event to `on_step` and appends it to `metrics.jsonl`; on resume, the events an
    interrupted run logged after the checkpoint's step are dropped, so the file reads as one run."""

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


__all__ = [
    "AttentionTransferConfig",
    "AttentionTransferResult",
    "attention_transfer",
    "evaluate_attention_transfer",
    "trained_layers",
]
