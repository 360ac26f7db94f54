"""The `trellis` command: `run PIPELINE`, `report DIR`, `validate RECIPE...`, `tiny-data`, `average CHECKPOINT...`."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

from trellis import __version__
from trellis.core.errors import TrellisError, exit_on_error


def _recipe_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "**", "*.yaml"), recursive=True))
        else:
            files.append(path)
    return files


def validate(args: argparse.Namespace) -> int:
    from trellis.stages import validate_recipe_file

    failures = 0
    for path in _recipe_files(args.recipes):
        try:
            if os.path.basename(path) == "pipeline.yaml":
                from trellis.pipeline.spec import load_pipeline

                load_pipeline(path)  # the file and every stage recipe it names, with its overrides
                stage = "pipeline"
            else:
                stage = validate_recipe_file(path, args.stage, check_paths=not args.no_path_check)
        except TrellisError as error:
            failures += 1
            print(f"FAIL {error}", file=sys.stderr)
        else:
            print(f"ok   {path} ({stage})")
    return 1 if failures else 0


def tiny_data(args: argparse.Namespace) -> int:
    from trellis.data.tiny import write_tiny_data

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_data(args.output_dir, seed=args.seed)
    return 0


def average(args: argparse.Namespace) -> int:
    from trellis.train.averaging import average_checkpoints, last_checkpoints

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.last:
        if len(args.paths) != 1:
            raise TrellisError("with --last N, give one run directory (the output_dir holding checkpoint-*/)")
        checkpoints = last_checkpoints(args.paths[0], args.last)
    else:
        checkpoints = args.paths
    # A run directory's final model lends its config and tokenizer to sharded FSDP checkpoints.
    run_dir = os.path.dirname(os.path.abspath(checkpoints[-1])) if checkpoints else None
    average_checkpoints(checkpoints, args.output_dir, args.weights, model_files_from=run_dir)
    print(f"averaged {len(checkpoints)} checkpoints into {args.output_dir}")
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.seeds:
        from trellis.pipeline.sweep import run_sweep

        run_sweep(args.pipeline, args.seeds, start=args.start, only=args.only, dry_run=args.dry_run)
        return 0
    from trellis.pipeline.runner import run_pipeline

    run_pipeline(args.pipeline, start=args.start, only=args.only, dry_run=args.dry_run)
    return 0


def _seeds(text: str) -> list[int]:
    from trellis.pipeline.sweep import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def report(args: argparse.Namespace) -> int:
    from trellis.pipeline.report import write_report

    print(f"wrote {write_report(args.directory)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trellis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    pipeline = commands.add_parser(
        "run", help="run a pipeline: every stage in order, skipping those already done with the same inputs"
    )
    pipeline.add_argument("pipeline", help="a pipeline file, e.g. recipes/tiny/pipeline.yaml")
    pipeline.add_argument(
        "--from", dest="start", metavar="STAGE", help="rerun this stage and every later one"
    )
    pipeline.add_argument("--only", metavar="STAGE", help="rerun this stage only")
    pipeline.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print what would run, with memory estimates",
    )
    pipeline.add_argument(
        "--seeds",
        type=_seeds,
        metavar="SEEDS",
        help="run once per seed (e.g. 0-4 or 0,2,5) into OUTPUT_DIR/seeds/seed-N/ and write "
        "OUTPUT_DIR/seeds/sweep.md: every target and evaluation metric as median [min, max]",
    )
    pipeline.set_defaults(run=run)

    rebuild = commands.add_parser(
        "report", help="rebuild a pipeline's report.md and report.html from its records"
    )
    rebuild.add_argument("directory", help="the pipeline's output_dir (holding pipeline_run.json)")
    rebuild.set_defaults(run=report)

    check = commands.add_parser("validate", help="check stage recipes strictly, without training")
    check.add_argument("recipes", nargs="+", help="recipe files, or directories to search for *.yaml")
    check.add_argument("--stage", help="the stage the recipes are for (default: from the file name)")
    check.add_argument(
        "--no-path-check",
        action="store_true",
        help="do not require local inputs to exist yet (e.g. outputs of earlier stages)",
    )
    check.set_defaults(run=validate)

    tiny = commands.add_parser("tiny-data", help="generate the tiny default's datasets and tokenizer")
    tiny.add_argument("--output_dir", default="data/tiny")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=tiny_data)

    mean = commands.add_parser(
        "average", help="average the weights of several checkpoints into a model directory"
    )
    mean.add_argument("paths", nargs="+", help="checkpoint directories, or one run directory with --last")
    mean.add_argument("--last", type=int, help="average the last N complete checkpoints of the run directory")
    mean.add_argument("--weights", type=float, nargs="+", help="one weight per checkpoint (default: uniform)")
    mean.add_argument("--output_dir", required=True)
    mean.set_defaults(run=average)

    args = parser.parse_args(argv)
    with exit_on_error():
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
