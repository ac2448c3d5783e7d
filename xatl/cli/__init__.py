"""The `xatl` command line: one table of subcommands.

Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`, imported only
when used (so `xatl --help` stays fast); one that sets `PASS_THROUGH = True` gets the arguments it
does not declare in `args.extra`. Packages outside `xatl/` (the service) add commands
through the `xatl.commands` entry-point group, so `xatl` never imports them by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

COMMANDS = {
    "convert": ("xatl.cli.convert", "build a linear-cost model from a donor and transfer its weights"),
    "attention-transfer": ("xatl.cli.attention_transfer",
                           "train each converted layer to reproduce the donor's attention (before `train`)"),
    "train": ("xatl.cli.train", "continue training a converted model (optionally distilling from the donor)"),
    "eval": ("xatl.cli.eval", "cross-entropy and perplexity of a model on text"),
    "generate": ("xatl.cli.generate", "stream a completion with the constant-memory engine"),
    "quantize": ("xatl.cli.quantize", "save a copy of a model with int8 (or bf16) weights that loads that way"),
    "lm-eval": ("xatl.cli.lm_eval", "lm-evaluation-harness's command line, with xatl models loadable"),
    "sample": ("xatl.cli.sample", "find or download the sample donor (stories260K) and its text"),
}


def _all_commands() -> dict[str, tuple[str, str]]:
    commands = dict(COMMANDS)
    for ep in entry_points(group="xatl.commands"):
        commands.setdefault(ep.name, (ep.value, _summary(ep.value)))
    return commands


def _summary(module_name: str) -> str:
    """A command's help from its module's docstring, after the usage in backquotes."""
    try:
        doc = importlib.import_module(module_name).__doc__ or ""
    except ImportError as error:  # a broken plug-in must not take the whole CLI down
        return f"(unavailable: {error})"
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return first.split("`: ", 1)[-1].rstrip(".") if "`: " in first else first


class CLIError(Exception):
    """An error to report as one line on stderr, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = _all_commands()
    parser = argparse.ArgumentParser(prog="xatl", description="Cross-architecture transfer learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in commands else None
    modules = {}
    for name, (module_name, help_text) in commands.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that runs
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(command_parser)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(modules[args.command], "PASS_THROUGH", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        print(f"xatl {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
