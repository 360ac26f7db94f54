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
    threads = args.threads or os.cpu_count() or 1

    with RunRecord("export", args.output_dir, {"export": args}) as record:
        record.set_input("model", gguf_export.input_fingerprint(str(model_dir)))
        paths = gguf_export.write_files(args, model_dir, pre_tokenizer)

        checks, texts, original, tokens = {}, [], None, 0
        if args.check_datasets:
            texts = gguf_export.check_texts(args, tokenizer)
            full_ids = gguf_export.encode(texts, tokenizer)
            token_ids = [ids[: args.check_max_length] for ids in full_ids]
            tokens = sum(len(ids) for ids in token_ids)
            reference = gguf_export.reference_logits(model_dir, token_ids, args.trust_remote_code)
            original = gguf_export.perplexity(reference, token_ids)
            for gguf_type, path in paths.items():
                gguf_export.logger.info("Checking %s against the original", path.name)
                checks[gguf_type] = gguf_export.check_file(
                    path, texts, full_ids, reference, args.check_max_length, threads
                )
                record.set_metrics(gguf_type, checks[gguf_type])
        parameters = gguf_export.parameter_count(model_dir)
        report = gguf_export.build_report(args, paths, checks, original, parameters, len(texts), tokens)
        gguf_export.write_report(args.output_dir, report)
        gguf_export.model_card(args, report).save(os.path.join(args.output_dir, CARD))
        gguf_export.logger.info("Wrote %s", os.path.join(args.output_dir, f"{gguf_export.REPORT_NAME}.md"))


if __name__ == "__main__":
    with exit_on_error():
        main()
