"""`xatl convert DONOR --mixer M [--attention-layers 1,3] [--transfer xatl] --out DIR`"""

from __future__ import annotations

import argparse
import json

import torch

from xatl.mixers import DEFAULT_MIXER, MIXERS
from xatl.transfer import DEFAULT_TRANSFER, TRANSFER_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("donor", help="a local Hugging Face directory, a hub id, a GGUF file (or a folder "
                        "holding one), or a llama2.c .bin checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer file of a llama2.c checkpoint (its tokenizer .bin)")
    parser.add_argument("--mixer", default=DEFAULT_MIXER, choices=list(MIXERS),
                        help=f"mixer replacing attention (default: {DEFAULT_MIXER})")
    parser.add_argument("--attention-layers", default="", type=_layer_list, metavar="I,J",
                        help="comma-separated layer indices that keep attention (a hybrid), e.g. 1,3")
    parser.add_argument("--transfer", default=DEFAULT_TRANSFER, choices=TRANSFER_MODES,
                        help=f"what to copy from the donor (default: {DEFAULT_TRANSFER}; mamba: xatl)")
    parser.add_argument("--mixer-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a mixer hyperparameter, e.g. state_size=64 (repeatable)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="dtype of the new model (default: the donor's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from xatl.convert import convert

    transformers_logging.disable_progress_bar()  # a one-file save needs no "Writing model shards" bar

    options = dict(_option(o) for o in args.mixer_option)
    result = convert(
        args.donor,
        tokenizer=args.tokenizer,
        mixer=args.mixer,
        attention_layers=args.attention_layers,
        transfer=args.transfer,
        mixer_options={args.mixer: options} if options else None,
        dtype=DTYPES.get(args.dtype),
        seed=args.seed,
        out=args.out,
    )
    summary = result.report.summary()
    print(f"donor       {result.donor.source} ({result.donor.model_type}, "
          f"{result.report.donor['parameters']:,} parameters)")
    if result.donor.quantization:
        q = result.donor.quantization
        types = ", ".join(f"{kind} {count}" for kind, count in q["tensor_types"].items())
        print(f"quantised   {q['file_type']} (tensors: {types}), dequantised to {q['dequantised_to']}")
    print(f"layers      {' '.join(result.model.config.layer_mixers)}")
    print(f"transfer    {args.transfer}: {summary['fraction_copied']:.1%} of {summary['parameters']:,} "
          f"parameters copied, {summary['fraction_transferred']:.1%} transferred")
    print(f"saved       {args.out}")
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 1,3, got {text!r}") from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--mixer-option expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
