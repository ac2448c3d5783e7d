"""`xatl generate MODEL_DIR --prompt "…" [--max-new-tokens N] [--precision fp32|bf16|int8] [--json]`

Streams the completion to the terminal as it is produced, then prints the request's figures: time
to first token, decode tokens/s, state bytes, peak memory. With `--json` the text streams to
stderr and stdout holds one JSON object at the end (`tokens`, `tokens_per_s`, `ttft_s`,
`state_bytes`, and the rest of the figures and the text).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model folder written by `xatl convert` or `save_pretrained`")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable, up to 4)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate past the end-of-sequence token")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", "--dtype", choices=["fp32", "bf16", "int8"], default=None,
                        help="weights in float32, bfloat16 or int8 (CPU; see xatl.serving.precision); "
                        "default: as saved")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="one JSON object with the figures on stdout")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from xatl.serving import Engine, SamplingParams

    transformers_logging.disable_progress_bar()  # stderr is for the text (with --json) and figures
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    engine = Engine.from_pretrained(args.model_dir, device=args.device, precision=args.precision,
                                     background=False)
    text_out = sys.stderr if args.json else sys.stdout
    pieces = []
    for event in engine.generate(args.prompt, params):
        pieces.append(event.text)
        text_out.write(event.text)
        text_out.flush()
    text_out.write("\n")
    if event.finish_reason == "error":
        print(f"xatl generate: error: {event.error}", file=sys.stderr)
        return 1
    figures = event.figures
    if args.json:
        print(json.dumps({
            "tokens": figures.completion_tokens,
            "tokens_per_s": figures.tokens_per_s,
            "ttft_s": figures.ttft_s,
            "state_bytes": figures.state_bytes,
            "prompt_tokens": figures.prompt_tokens,
            "e2e_s": figures.e2e_s,
            "peak_memory_bytes": figures.peak_memory_bytes,
            "finish_reason": event.finish_reason,
            "text": "".join(pieces),
        }))
    else:
        rate = f"{figures.tokens_per_s:.1f} tokens/s" if figures.tokens_per_s else "n/a tokens/s"
        print(
            f"[{figures.completion_tokens} tokens ({event.finish_reason}) · {rate} · "
            f"first token {figures.ttft_s * 1000:.0f} ms · state {_size(figures.state_bytes)} · "
            f"peak memory {_size(figures.peak_memory_bytes)}]",
            file=sys.stderr,
        )
    return 0


def _size(nbytes: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, unit = float(nbytes), 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.1f} {units[unit]}"
