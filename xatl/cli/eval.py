"""`xatl eval MODEL_DIR --data PATH... [--json]`: cross-entropy and perplexity on text.

Every token after the first is scored once, in windows of `--block-size` tokens (compare models at
the same window). With `--json` one JSON object is printed: `loss` (nats/token), `perplexity`,
`tokens` (predicted tokens).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model directory written by `xatl convert` or `xatl train`")
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help=".txt/.jsonl files, directories, globs, or datasets.save_to_disk folders")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl and datasets")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from xatl.eval import evaluate_text
    from xatl.loader import load_model

    model, tokenizer = load_model(args.model_dir, device=args.device)
    result = evaluate_text(model, tokenizer, args.data, block_size=args.block_size, batch_size=args.batch_size,
                           text_field=args.text_field)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f}, "
              f"{result.tokens:,} tokens ({args.block_size}-token windows)")
    return 0
