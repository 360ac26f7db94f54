"""The data stage: raw text -> a tokenized, packed dataset for pretraining, with a report of what was kept.

    python scripts/prepare_data.py --config recipes/tiny/data.yaml [--any_recipe_key value ...]

The cleaning, filtering, deduplication and decontamination run as datatrove pipelines on the recipe's
`executor` (local processes, Slurm job arrays or Ray; reruns skip completed tasks); `engine: datasets`
runs the previous datasets.map implementation instead. Reads the recipe strictly, and stops at once if output_dir already holds the result of exactly
these inputs, recipe and code (the fingerprint covers all of them). Otherwise it cleans, filters,
deduplicates and decontaminates the corpus, trains (or copies) the tokenizer, tokenizes and packs
it, and writes packed/, tokenizer/, data_report.{json,md} and trellis_run.json to output_dir.
"""

import logging
import os
import sys

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("data")
    if int(os.environ.get("RANK", "0")) > 0:
        return  # under a multi-process launcher one process does the work, with num_proc workers

    from trellis.core.run_record import RunRecord
    from trellis.data import corpus

    logging.basicConfig(
        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO, stream=sys.stdout
    )
    fingerprint = corpus.fingerprint(args)
    if corpus.is_up_to_date(args.output_dir, fingerprint):
        logging.info("%s is up to date with this recipe and its inputs: nothing to do", args.output_dir)
        return
    num_proc = args.num_proc or os.cpu_count() or 1
    with RunRecord("data", args.output_dir, {"data": args}) as record:
        corpus.clear_outputs(args.output_dir)
        record.set_input("fingerprint", fingerprint)
        if args.engine == "datatrove":
            from trellis.data import datatrove_stage

            report = datatrove_stage.prepare(args, fingerprint, record)
            if report is None:
                print(
                    f"The data steps were submitted to Slurm (logs under {args.output_dir}/datatrove/). Run "
                    "this command again once the jobs are done: it skips completed tasks and packs."
                )
                record.data["status_on_success"] = "submitted"  # not complete: nothing is packed yet
                return
        else:
            report = corpus.prepare(args, num_proc, record)
        record.data["report"] = report.as_dict()["steps"]
    print(report.markdown().split("\n## ")[0])


if __name__ == "__main__":
    with exit_on_error():
        main()
