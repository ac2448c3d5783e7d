"""`xatl quantize MODEL_DIR OUT_DIR --precision int8|bf16|fp32`: a copy of a model folder, its weights
saved in that precision.

int8: each linear layer's weight as int8 with a float32 scale per output row, and
`quantization_config` in config.json, so that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` after
`import xatl` (and `xatl generate`, `xatl serve`) loads it int8 (see xatl.quantization). bf16: every
tensor in bfloat16. The tokenizer and the folder's other files are copied as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xatl.cli import CLIError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model folder written by `xatl convert`, `xatl train` or `save_pretrained`")
    parser.add_argument("out_dir", help="the new folder (must not exist)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], required=True,
                        help="the saved weights: float32, bfloat16 or int8 linear layers (which run on the CPU)")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from xatl.serving.precision import save_at_precision

    transformers_logging.disable_progress_bar()
    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"{model_dir} is not a model folder (no config.json)")
    if out_dir.exists():
        raise CLIError(f"{out_dir} exists: give a new folder")
    save_at_precision(model_dir, out_dir, args.precision)
    sizes = [sum(f.stat().st_size for f in folder.glob("*.safetensors")) for folder in (model_dir, out_dir)]
    print(f"{out_dir}: {args.precision} weights, {sizes[1] / 2**20:.1f} MiB (from {sizes[0] / 2**20:.1f} MiB)")
    return 0
