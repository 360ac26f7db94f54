"""Export a trained model to GGUF for llama.cpp, and check each file against the original.

    python scripts/export.py --config recipes/tiny/export.yaml

Reads the recipe strictly and checks, before any work, that llama.cpp's tools are installed (`make
export-tools`) and that the converter writes the model's architecture. Writes each GGUF type (f16 and
q8_0 with llama.cpp's converter, 4-bit and other k-quants with its quantizer, from the f16 file), with the
tokenizer, special tokens and chat template in the metadata; a file already made from the same model is
kept. Then reloads every file in llama.cpp and compares it with the original (transformers) on held-out
text: tokenization, next-token logits, the same top-1 token, perplexity. Writes export_report.md/.json, a
model card (README.md) that says how to run the files, and the run record.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("export")

    import os

    from trellis.compress.calibration import load_tokenizer
    from trellis.core.hub import CARD
    from trellis.core.run_record import RunRecord
    from trellis.deploy import gguf_export
    from trellis.train.run import setup_logging

    setup_logging()
    gguf_export.check_tools()
    model_dir = gguf_export.local_model_dir(args.model_name_or_path)
    gguf_export.check_architecture(model_dir)
    tokenizer = load_tokenizer(str(model_dir), args.trust_remote_code)
    pre_tokenizer = gguf_export.check_tokenizer(model_dir, tokenizer)

    with RunRecord("export", args.output_dir, {"export": args}) as record:
        record.set_input("model", gguf_export.input_fingerprint(str(model_dir)))
        paths = gguf_export.write_files(args, model_dir, pre_tokenizer)

        checks, original = {}, {}
        if args.check_datasets:
            texts = gguf_export.check_texts(args, tokenizer)
            checks, original = gguf_export.check_files(args, paths, model_dir, texts, tokenizer)
            for gguf_type, check in checks.items():
                record.set_metrics(gguf_type, check)
        parameters = gguf_export.parameter_count(model_dir)
        report = gguf_export.build_report(args, paths, checks, original, parameters)
        gguf_export.write_report(args.output_dir, report)
        gguf_export.model_card(args, report).save(os.path.join(args.output_dir, CARD))
        gguf_export.logger.info("Wrote %s", os.path.join(args.output_dir, f"{gguf_export.REPORT_NAME}.md"))


if __name__ == "__main__":
    with exit_on_error():
        main()
