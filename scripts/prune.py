"""Prune a model into a smaller one of the same architecture: fewer layers, MLP channels or attention heads.

    accelerate launch scripts/prune.py --config recipes/tiny/prune.yaml

Reads the recipe strictly and checks the cuts against the model's config before any weights load; ranks
layers (block influence), MLP channels and key/value head groups on calibration text; keeps the most
important, writes the pruned model (safetensors) and its tokenizer to output_dir, and measures both
models' parameters and held-out perplexity into prune_report.json and the run record. Recover what was
lost with a distillation or SFT run from the pruned model.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("prune")

    from accelerate import PartialState

    from trellis.compress import calibration, pruning, variants
    from trellis.core.run_record import RunRecord
    from trellis.train.run import setup_logging

    if PartialState().num_processes > 1:
        raise pruning.PruningError("pruning runs in one process: launch it with --num_processes 1")
    setup_logging()
    pruning.check_model(pruning.load_config(args), args.cuts())

    with RunRecord("prune", args.output_dir, {"prune": args}) as record:
        record.set_input("model", variants.input_fingerprint(args.model_name_or_path))
        tokenizer = calibration.load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        model = pruning.load_model(args)
        importance = pruning.measure_importance(model, calibration.calibration_data(args, tokenizer))
        pruned, kept = pruning.prune(model, importance, args.cuts())
        pruned.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)

        report = pruning.build_report(args, model, pruned, tokenizer, importance, kept)
        pruning.write_report(args.output_dir, report)
        for name in ("original", "pruned"):
            record.set_metrics(name, report["models"][name])


if __name__ == "__main__":
    with exit_on_error():
        main()
