"""Evaluate one or several checkpoints on lm-eval tasks and held-out perplexity, side by side.

    accelerate launch [--num_processes N] scripts/evaluate.py --config recipes/tiny/eval.yaml

Reads the recipe strictly, checks task names (suggesting the closest), task data and checkpoint
paths before any model loads, evaluates each checkpoint (skipping those already evaluated with the
same weights and settings), writes results.json, results.md and a bar chart per metric, checks the
gates on the candidate (a failed gate exits non-zero; with `select_from`, the candidate is the best of those
checkpoints that pass them) and writes its model card. Under `accelerate
launch` with several processes, lm-eval shards the examples of path checkpoints over them.
"""

import os

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("eval")

    from accelerate import PartialState

    from trellis.core.run_record import RunRecord
    from trellis.evaluate import comparison, evaluation
    from trellis.evaluate.gates import check_gates, select_candidate
    from trellis.train.run import setup_logging

    state = PartialState()
    setup_logging()
    manager = evaluation.task_manager(args)
    evaluation.check_tasks(args, manager)
    evaluation.check_checkpoints(args)
    baseline = args.baseline or args.checkpoints[0].name

    with RunRecord("eval", args.output_dir, {"eval": args}, state.is_main_process) as record:
        per_checkpoint = {}
        for checkpoint in args.checkpoints:
            key = evaluation.fingerprint(args, checkpoint)
            result = evaluation.cached_metrics(args.output_dir, checkpoint, key)
            if result is None:
                result = evaluation.evaluate_checkpoint(args, checkpoint, manager)
                if state.is_main_process:
                    evaluation.save_metrics(args.output_dir, checkpoint, key, result)
            else:
                evaluation.logger.info("Checkpoint %r already evaluated with these settings", checkpoint.name)
            if state.is_main_process:
                per_checkpoint[checkpoint.name] = result
                record.set_metrics(checkpoint.name, result["metrics"])
        if not state.is_main_process:
            return

        candidate = args.candidate or args.checkpoints[-1].name
        if args.select_from:
            candidate, values = select_candidate(args.gates, per_checkpoint, args.select_from, args.select_by)
            record.data["selection"] = {"by": args.select_by, "values": values, "chosen": candidate}
            evaluation.logger.info("Candidate by %s among %s: %s", args.select_by, values, candidate)
        result = comparison.comparison(per_checkpoint, baseline, candidate)
        comparison.write_comparison(args.output_dir, result)
        candidate_metrics = per_checkpoint[candidate]["metrics"]
        record.data["gates"] = check_gates(args.gates, candidate_metrics, candidate)

        if args.model_card:
            checkpoint = next(c for c in args.checkpoints if c.name == candidate)
            sources = {p.label: p.path for p in args.perplexity}
            model_name = os.path.basename(os.path.normpath(checkpoint.path)) if checkpoint.path else candidate
            card = comparison.model_card(model_name, candidate_metrics, sources, comparison.markdown(result))
            card.save(os.path.join(args.output_dir, comparison.MODEL_CARD))
            if checkpoint.path and os.path.isdir(checkpoint.path):
                comparison.update_checkpoint_card(checkpoint.path, card)


if __name__ == "__main__":
    with exit_on_error():
        main()
