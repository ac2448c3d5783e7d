"""`xatl sample [--data-dir DIR] [--link DIR] [--json]`: find or download the sample donor
(stories260K and its tokenizer) and TinyStories text, and print where they are.

Files under `--data-dir` are used as they are; missing ones are downloaded from the Hugging Face
hub into its cache. `--link DIR` also puts a symbolic link to each in DIR, under a fixed name
(`stories260K.bin`, `tok512.bin`, `tinystories_val.txt`), so that scripts can name them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="a data folder holding stories260K/ and tinystories_val_subset/ "
                        "(the Makefile passes $XATL_DATA_DIR, default ../shared/data)")
    parser.add_argument("--link", metavar="DIR", help="also link the files into DIR under fixed names")
    parser.add_argument("--no-text", action="store_true", help="only the donor and its tokenizer")
    parser.add_argument("--json", action="store_true", help="print one JSON object of paths")


def run(args: argparse.Namespace) -> int:
    from xatl.cli import CLIError
    from xatl.samples import SAMPLE_FILES, SampleUnavailable, sample_files

    roles = ("donor", "tokenizer") if args.no_text else ("donor", "tokenizer", "text")
    try:
        found = sample_files(args.data_dir, roles=roles)
    except SampleUnavailable as error:
        raise CLIError(str(error)) from None
    if args.link:
        folder = Path(args.link)
        folder.mkdir(parents=True, exist_ok=True)
        names = {sample.role: Path(sample.local).name for sample in SAMPLE_FILES}
        for role, path in found.items():
            link = folder / names[role]
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(path.resolve())
            found[role] = link
    if args.json:
        print(json.dumps({role: str(path) for role, path in found.items()}))
    else:
        for role, path in found.items():
            print(f"{role:<10} {path}")
    return 0
