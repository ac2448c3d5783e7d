"""`xatl lm-eval --model hf --model_args pretrained=DIR --tasks ...`: lm-evaluation-harness's own
command line, run after `import xatl` so that `AutoModelForCausalLM` knows converted models (the
plain `lm_eval` command imports nothing of ours). Every argument goes to the harness unchanged."""

from __future__ import annotations

import argparse
import sys

PASS_THROUGH = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "All arguments are lm_eval's; see `xatl lm-eval --help-harness`."
    parser.add_argument("--help-harness", action="store_true", help="show lm_eval's own help")


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: pip install 'lm-eval[hf]'") from None

    import xatl  # noqa: F401  (registers the model type with transformers' Auto classes)

    harness_args = ["--help"] if args.help_harness else args.extra
    saved = sys.argv
    sys.argv = ["lm_eval", *harness_args]
    try:
        cli_evaluate()
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = saved
    return 0
