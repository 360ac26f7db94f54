"""The `trellis` command: `trellis validate RECIPE...`, `trellis tiny-data`, `trellis --version`."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

from trellis import __version__
from trellis.errors import TrellisError, exit_on_error


def _recipe_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*.yaml"), recursive=True))
        else:
            files.append(path)
    return files


def validate(args: argparse.Namespace) -> int:
    from trellis.config import validate_recipe_file

    failures = 0
    for path in _recipe_files(args.recipes):
        try:
            stage = validate_recipe_file(path, args.stage)
        except TrellisError as error:
            failures += 1
            print(f"FAIL {error}", file=sys.stderr)
        else:
            print(f"ok   {path} ({stage})")
    return 1 if failures else 0


def tiny_data(args: argparse.Namespace) -> int:
    from trellis.tiny import write_tiny_data

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_data(args.output_dir, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trellis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("validate", help="check stage recipes strictly, without training")
    check.add_argument("recipes", nargs="+", help="recipe files, or directories to search for *.yaml")
    check.add_argument("--stage", help="the stage the recipes are for (default: from the file name)")
    check.set_defaults(run=validate)

    tiny = commands.add_parser("tiny-data", help="generate the tiny default's datasets and tokenizer")
    tiny.add_argument("--output_dir", default="data/tiny")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=tiny_data)

    args = parser.parse_args(argv)
    with exit_on_error():
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
