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
from pathlib import Path

from xatl.training.freeze import TRANSFER_REPORT


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
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    from xatl.data import resolve_paths
    from xatl.eval import load_model
    from xatl.training import TrainConfig, read_transfer_report, train, transferred_names

    model_dir, out = Path(args.model_dir), Path(args.out)
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
    resolve_paths(args.data + (args.valid_data or []))  # a wrong path fails now, not after loading
    transformers_logging.disable_progress_bar()  # ours is the one progress bar

    # 1. Processes and device: torchrun sets up the group; one process otherwise
    if torch.distributed.is_torchelastic_launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", dist.get_node_local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # long products of decays underflow; denormals slow CPUs severalfold

    # 2. Model, transferred weights, teacher
    model, tokenizer = load_model(model_dir, device=device, dtype=torch.float32)
    transferred: set[str] = set()
    if (model_dir / TRANSFER_REPORT).is_file():
        transferred = transferred_names(read_transfer_report(model_dir), include_initialised=args.freeze_initialised)
    elif config.freeze != "none" or config.transferred_lr_scale != 1.0:
        raise ValueError(f"--freeze and --transferred-lr-scale need {model_dir / TRANSFER_REPORT} "
                         "(written by `xatl convert`)")
    teacher = _load_teacher(args.teacher, args.teacher_tokenizer, device) if args.teacher else None

    # 3. Data
    blocks = _blocks(args, tokenizer, "train")
    valid = _blocks(args, tokenizer, "validation")
    if valid is not None and next(iter(valid), None) is None:
        raise ValueError("the validation split is empty: give --valid-data, --split-by block, a larger "
                         "--valid-fraction, or --valid-fraction 0 for none")

    # 4. Train, with a progress bar on the first process
    bar = tqdm(total=None, unit="step", disable=args.no_progress or rank != 0, dynamic_ncols=True)

    def on_step(event: dict) -> None:
        if event["event"] == "train":
            bar.total = event["total_steps"]
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.3f}", lr=f"{event['lr']:.2e}",
                            tok_s=f"{event['tokens_per_second'] or 0:.0f}")
        elif event["event"] == "eval":
            bar.write(f"step {event['step']}: validation loss {event['valid_loss']:.4f}")
        elif event["event"] == "unfreeze":
            bar.write(f"step {event['step']}: transferred weights unfrozen ({event['rule']})")

    resume = (True if args.resume == "latest" else Path(args.resume)) if args.resume else False
    result = train(model, blocks, config, valid_blocks=valid, teacher=teacher, transferred=transferred,
                   out_dir=out, resume=resume, tokenizer=tokenizer, on_step=on_step)
    bar.close()
    if rank == 0:
        if (model_dir / TRANSFER_REPORT).is_file():  # the trained model keeps its provenance
            (out / TRANSFER_REPORT).write_text((model_dir / TRANSFER_REPORT).read_text())
        summary = {"steps": result.step, "tokens": result.tokens, "loss": result.loss,
                   "valid_loss": result.valid_loss, "unfreeze_step": result.unfreeze_step, "out": str(out)}
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _blocks(args, tokenizer, split: str):
    """Training or validation blocks; None when there is no validation text."""
    from xatl.data import TextBlocks

    common = dict(text_field=args.text_field, seed=args.seed)
    if split == "validation" and args.valid_data:
        return TextBlocks(args.valid_data, tokenizer, args.block_size, keep_partial=True, **common)
    if args.valid_data or args.valid_fraction == 0:
        return None if split == "validation" else TextBlocks(args.data, tokenizer, args.block_size, **common)
    return TextBlocks(args.data, tokenizer, args.block_size, split=split, valid_fraction=args.valid_fraction,
                      split_by=args.split_by, keep_partial=split == "validation", **common)


def _load_teacher(source: str, tokenizer: str | None, device):
    """The donor as an all-attention `XatlForCausalLM`: a saved xatl model directory, or any donor
    `xatl.donors.load_donor` reads (Hugging Face directory, llama2.c `.bin`), rebuilt by converting
    it with attention everywhere."""
    import torch

    from xatl.convert import convert
    from xatl.model import XatlForCausalLM

    path = Path(source)
    if (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get("model_type") == "xatl":
        return XatlForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    teacher = convert(source, tokenizer=tokenizer, mixer="attention", transfer="xatl").model
    return teacher.to(device=device, dtype=torch.float32)


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
