"""`xatl train MODEL_DIR --data PATH... --tokens N [--teacher DONOR --distill kl,hidden]
[--freeze lit|steps:N|norm-peak|none] --out DIR`

Continues training a converted model. Validation text comes from `--valid-data`, or else a
deterministic `--valid-fraction` of the documents (or blocks, `--split-by block`). Data-parallel
with `torchrun --standalone --nproc-per-node N $(which xatl) train ...` (gloo on CPU, NCCL on
GPUs): each process takes `--batch-size` blocks of every global batch (see `xatl.training.loop`).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model directory written by `xatl convert` (or a previous `xatl train`)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, metavar="PATH",
                      help=".txt/.jsonl files, directories, globs, or datasets.save_to_disk folders")
    data.add_argument("--valid-data", nargs="+", metavar="PATH", help="validation text (default: split --data)")
    data.add_argument("--valid-fraction", type=float, default=0.01,
                      help="share of --data held out for validation when --valid-data is not given (0: none)")
    data.add_argument("--split-by", choices=["document", "block"], default="document",
                      help="unit of the train/validation split of --data")
    data.add_argument("--text-field", default="text", help="field holding the text in .jsonl and datasets")
    data.add_argument("--block-size", type=int, default=512, help="tokens per training block")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=_count, help="training budget in tokens (e.g. 3M, 2e6)")
    budget.add_argument("--steps", type=int, help="training budget in optimizer steps")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--batch-size", type=int, default=8, help="blocks per micro-step on each process")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--warmup-steps", type=int, default=0)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to this × lr")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--grad-clip", type=float, default=1.0, help="0 turns clipping off")
    optim.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="autocast dtype (fp16 needs CUDA)")
    optim.add_argument("--seed", type=int, default=0)
    freeze = parser.add_argument_group("freezing the transferred weights")
    freeze.add_argument("--freeze", default="none",
                        help="none | steps:N | lit[:window=W,threshold=R,patience=P] | norm-peak[:window=W,patience=P]")
    freeze.add_argument("--freeze-initialised", action="store_true",
                        help="also freeze the tensors the transfer report calls initialised (default: copied only)")
    freeze.add_argument("--transferred-lr-scale", type=float, default=1.0, help="lr of transferred weights ÷ lr")
    freeze.add_argument("--unfreeze-warmup-steps", type=int, default=0, help="warm-up of weights once unfrozen")
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--teacher", help="the donor: a model directory, a Hugging Face donor, or a llama2.c .bin")
    distill.add_argument("--teacher-tokenizer", help="tokenizer .bin of a llama2.c teacher")
    distill.add_argument("--distill", default="", help="kl, hidden, or kl,hidden (needs --teacher)")
    distill.add_argument("--temperature", type=float, default=1.0)
    distill.add_argument("--kl-weight", type=float, default=0.5, help="loss = (1-w)·CE + w·KL")
    distill.add_argument("--hidden-weight", type=float, default=1.0)
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

    from xatl.training import TrainConfig
    from xatl.training.run import TrainingData, TrainingRun, end_distributed, run_training, start_distributed

    config = TrainConfig(
        max_tokens=args.tokens, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, precision=args.precision,
        seed=args.seed, freeze=args.freeze, transferred_lr_scale=args.transferred_lr_scale,
        unfreeze_warmup_steps=args.unfreeze_warmup_steps, distill=args.distill, temperature=args.temperature,
        kl_weight=args.kl_weight, hidden_weight=args.hidden_weight, eval_every=args.eval_every,
        eval_batches=args.eval_batches, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
    )
    if config.distill and not args.teacher:
        raise ValueError(f"--distill {config.distill} needs --teacher")
    data = TrainingData(data=args.data, valid_data=args.valid_data, valid_fraction=args.valid_fraction,
                        split_by=args.split_by, text_field=args.text_field, block_size=args.block_size)
    resume = (True if args.resume == "latest" else args.resume) if args.resume else False
    run_spec = TrainingRun(model_dir=args.model_dir, config=config, out_dir=args.out, data=data,
                           teacher=args.teacher, teacher_tokenizer=args.teacher_tokenizer,
                           freeze_initialised=args.freeze_initialised, device=args.device, resume=resume)

    rank, _ = start_distributed()
    bar = tqdm(total=None, unit="step", disable=args.no_progress or rank != 0, dynamic_ncols=True)

    def on_event(event: dict) -> None:
        if event["event"] == "train":
            bar.total = event["total_steps"]
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.3f}", lr=f"{event['lr']:.2e}",
                            tok_s=f"{event['tokens_per_second'] or 0:.0f}")
        elif event["event"] == "eval":
            bar.write(f"step {event['step']}: validation loss {event['valid_loss']:.4f}")
        elif event["event"] == "unfreeze":
            bar.write(f"step {event['step']}: transferred weights unfrozen ({event['rule']})")

    try:
        result = run_training(run_spec, on_event=on_event)
    finally:
        bar.close()
        end_distributed()
    if rank == 0:
        summary = {"steps": result.step, "tokens": result.tokens, "loss": result.loss,
                   "valid_loss": result.valid_loss, "unfreeze_step": result.unfreeze_step, "out": str(args.out)}
        print(json.dumps(summary))
    return 0


def _count(text: str) -> int:
    """A token count: 1000000, 1e6, 3M, 500k, 2G."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 3M or 2e6, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the token budget must be at least 1, got {text!r}")
    return int(value)
