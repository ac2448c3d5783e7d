"""Evaluation: cross-entropy and perplexity on text, and lm-evaluation-harness tasks.

`evaluate_loss` scores every predicted token of a set of blocks (nats/token, summed over tokens,
not averaged per block, so a short last block weighs what its tokens weigh). Under
`torch.distributed` the blocks are shared out among processes and the sums reduced.

lm-evaluation-harness: saved models load with `lm_eval --model hf` once `xatl` is imported (that
import registers `model_type: xatl` with transformers' `Auto*` classes). The `lm_eval` command does
not import it, so run the harness in-process, e.g. `run_lm_eval(model_dir, ["piqa"])` below, or
`python -c "import xatl, lm_eval.__main__ as m; m.cli_evaluate()" --model hf --model_args
pretrained=DIR --tasks piqa`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import groupby, islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xatl.data import TextBlocks


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy, nats per predicted token
    perplexity: float
    tokens: int  # predicted tokens

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(blocks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive blocks of equal length (only the last block of a text is shorter)."""
    for _, same_length in groupby(blocks, key=len):
        same_length = iter(same_length)
        while chunk := list(islice(same_length, batch_size)):
            yield torch.stack(chunk)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    blocks: Iterable[torch.Tensor],
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> EvalResult:
    """Cross-entropy of `model` on `blocks` (LongTensors of token ids), every target token once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed nats, tokens)
    for index, batch in enumerate(islice(_batches(blocks, batch_size), max_batches)):
        if index % world != rank:
            continue
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        totals[0] += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        ).double()
        totals[1] += batch[:, 1:].numel()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(totals)
    nats, tokens = totals.tolist()
    if tokens == 0:
        raise ValueError("nothing to evaluate: the text gives no block of two or more tokens")
    loss = nats / tokens
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=int(tokens))


def evaluate_text(
    model: nn.Module,
    tokenizer,
    data: Sequence[str | Path],
    *,
    block_size: int = 512,
    batch_size: int = 8,
    text_field: str = "text",
) -> EvalResult:
    """Cross-entropy on text files (see `xatl.data` for the formats), in windows of `block_size`."""
    blocks = TextBlocks(data, tokenizer, block_size, text_field=text_field, keep_partial=True)
    return evaluate_loss(model, blocks, batch_size=batch_size)


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
    batch_size: int = 1,
    limit: int | float | None = None,
    device: str = "cpu",
    **kwargs,
) -> dict:
    """lm-evaluation-harness `simple_evaluate` on a saved model, with `xatl` registered first.

    `include_path` adds a folder of task YAML files (tasks defined locally); `include_defaults=False`
    skips indexing the harness's thousands of built-in tasks (seconds) when only local ones run.
    Returns the harness's results dict (`results[task][metric]`).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import xatl  # noqa: F401  (the harness loads the model through AutoModelForCausalLM)

    task_manager = TaskManager(include_path=str(include_path) if include_path else None,
                               include_defaults=include_defaults)
    return simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32", "backend": "causal"},
        tasks=list(tasks),
        batch_size=batch_size,
        limit=limit,
        device=device,
        task_manager=task_manager,
        **kwargs,
    )


__all__ = ["EvalResult", "evaluate_loss", "evaluate_text", "run_lm_eval"]
