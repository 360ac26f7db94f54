"""Quantize a trained model into deployable variants and measure what each costs in quality and saves in size;
with `compressed_models` (the model pruned, or distilled into a student), those too, in the same table.

    accelerate launch scripts/quantize.py --config recipes/tiny/quantize.yaml

Reads the recipe strictly, checks the input models, the task names and that every GPTQ group size fits
each model's layer widths before any weights load, makes each variant (GPTQ, bitsandbytes, torchao) of
each model in output_dir/<name>/ (a complete variant with the same settings is kept on a rerun),
measures the original, the compressed models and every variant (size, load memory, tokens/s,
perplexity, lm-eval tasks), writes quantization_report.md/.json and quality_vs_size.png with the best
variant marked, a model card per variant, and with push_to_hub uploads each variant.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("quantize")

    from accelerate import PartialState

    from trellis.compress import calibration, measurement, results, variants
    from trellis.core.run_record import RunRecord
    from trellis.evaluate import evaluation
    from trellis.train.run import setup_logging

    state = PartialState()
    if state.num_processes > 1:
        raise variants.QuantizationError(
            "quantization runs in one process: launch it with --num_processes 1 (one GPU is enough)"
        )
    setup_logging()
    variants.check_input(args)
    sources = variants.sources(args)
    for source in sources:
        if any(variant.method == "gptq" for variant in source.variants):
            widths = variants.quantized_layer_widths(source.path, args.trust_remote_code)
            variants.check_group_sizes(source, widths)
    eval_args = args.eval_arguments([checkpoint for *_, checkpoint in variants.checkpoints(args)])
    manager = evaluation.task_manager(eval_args) if args.tasks else None
    if manager is not None:
        evaluation.check_tasks(eval_args, manager)

    with RunRecord("quantize", args.output_dir, {"quantize": args}) as record:
        record.set_input("models", {s.name: variants.input_fingerprint(s.path) for s in sources})
        tokenizers = {}
        for source in sources:
            tokenizer = tokenizers[source.name] = calibration.load_tokenizer(
                source.path, args.trust_remote_code
            )
            to_make = [v for v in source.variants if not variants.is_complete(args, source, v)]
            for variant in (v for v in source.variants if v not in to_make):
                variants.logger.info("%r is complete with these settings; kept", source.variant_name(variant))
            samples = None
            if any(v.method == "gptq" for v in to_make):
                samples = calibration.calibration_data(args, tokenizer)
            for variant in to_make:
                variants.quantize_variant(args, source, variant, tokenizer, samples)

        measured = {}
        for source, _, checkpoint in variants.checkpoints(args):
            result = measurement.measure(args, checkpoint, tokenizers[source.name], manager)
            record.set_metrics(checkpoint.name, {**result["metrics"], **result["resources"]})
            measured[checkpoint.name] = result
        report = results.build_report(args, measured)
        results.write_report(args.output_dir, report)
        results.write_model_cards(args, report)
        record.data["best_variant"] = report["best"]

        if args.push_to_hub:
            results.push_to_hub(args)


if __name__ == "__main__":
    with exit_on_error():
        main()
