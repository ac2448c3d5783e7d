"""`xatl attention-transfer MODEL_DIR --teacher DONOR --data PATH... --tokens N --out DIR`

Trains each converted layer's mixer to reproduce the donor's attention at that layer, from the
donor's own hidden states (see `xatl.training.attention_transfer`); everything else stays as it
was. The output is a model directory like `xatl convert`'s (transfer report included), to train end
to end next with `xatl train`. Validation (`--valid-data`, or a `--valid-fraction` of `--data`)
reports the mean relative error of the layers and each layer's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model directory written by `xatl convert`")
    parser.add_argument("--teacher", required=True,
                        help="the donor: a GGUF file, Hugging Face directory, llama2.c .bin, or a saved "
                             "all-attention xatl model")
    parser.add_argument("--teacher-tokenizer", help="tokenizer .bin of a llama2.c teacher")
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, metavar="PATH",
                      help=".txt/.jsonl files, directories, globs, or datasets.save_to_disk folders")
    data.add_argument("--valid-data", nargs="+", metavar="PATH", help="validation text (default: split --data)")
    data.add_argument("--valid-fraction", type=float, default=0.01,
                      help="share of --data held out for validation when --valid-data is not given (0: none)")
    data.add_argument("--split-by", choices=["document", "block"], default="document")
    data.add_argument("--text-field", default="text", help="field holding the text in .jsonl and datasets")
    data.add_argument("--block-size", type=int, default=512, help="tokens per block")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=_count, help="budget in tokens (e.g. 3M, 2e6)")
    budget.add_argument("--steps", type=int, help="budget in optimizer steps")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--layers", type=_layer_list, metavar="I,J", help="converted layers to train (default: all)")
    optim.add_argument("--batch-size", type=int, default=8)
    optim.add_argument("--grad-accum", type=int, default=1)
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--warmup-steps", type=int, default=0)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1)
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--grad-clip", type=float, default=1.0, help="per layer; 0 turns clipping off")
    optim.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    optim.add_argument("--seed", type=int, default=0)
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", required=True, help="output directory (metrics, checkpoints, final model)")
    run_group.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    run_group.add_argument("--eval-batches", type=int, help="at most this many validation batches per evaluation")
    run_group.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    run_group.add_argument("--keep-checkpoints", type=int, help="keep only the last N checkpoints")
    run_group.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                           help="resume from a checkpoint directory (default: the latest in --out)")
    run_group.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from xatl.training.attention_transfer import AttentionTransferConfig
    from xatl.training.run import AttentionTransferRun, TrainingData, run_attention_transfer

    config = AttentionTransferConfig(
        max_tokens=args.tokens, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None, layers=args.layers, precision=args.precision, seed=args.seed,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
    )
    data = TrainingData(data=args.data, valid_data=args.valid_data, valid_fraction=args.valid_fraction,
                        split_by=args.split_by, text_field=args.text_field, block_size=args.block_size)
    bar = tqdm(total=None, unit="step", disable=args.no_progress, dynamic_ncols=True)

    def on_step(event: dict) -> None:
        if event["event"] == "train":
            bar.total = event["total_steps"]
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}",
                            tok_s=f"{event['tokens_per_second'] or 0:.0f}")
        elif event["event"] == "eval":
            bar.write(f"step {event['step']}: validation error {event['valid_loss']:.4f} (mean over layers)")

    resume = (True if args.resume == "latest" else Path(args.resume)) if args.resume else False
    # the set-up the job pipeline shares: device, model, teacher, the text's blocks and split
    result = run_attention_transfer(
        AttentionTransferRun(model_dir=args.model_dir, config=config, out_dir=args.out, teacher=args.teacher,
                             teacher_tokenizer=args.teacher_tokenizer, data=data, device=args.device, resume=resume),
        on_event=on_step)
    bar.close()
    print(json.dumps({"steps": result.step, "tokens": result.tokens, "loss": result.loss,
                      "valid_loss": result.valid_loss, "layer_losses": result.layer_losses,
                      "stopped": result.stopped, "out": args.out}))
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 1,3, got {text!r}") from None


def _count(text: str) -> int:
    """A token count: 1000000, 1e6, 3M, 500k, 2G."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 3M or 2e6, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the budget must be at least 1 token, got {text!r}")
    return int(value)
