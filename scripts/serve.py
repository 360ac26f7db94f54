"""Serve a model with vLLM's OpenAI-compatible server and check it answers as the model does in transformers.

    python scripts/serve.py --config recipes/tiny/serve.yaml

Reads the recipe strictly and checks, before any model loads, that vllm_python has vLLM (`make
serve-env`). Answers the held-out prompts greedily with transformers (the generate stage's code), then
starts `vllm serve` from its own environment, sends every prompt as a chat request over HTTP with
`concurrency` in flight at once, stops the server, and compares: the share of answers equal to
transformers' (the stage fails below min_match_rate), output tokens/s, latency p50/p95 and the server's
start time, in serving_report.md/.json, answers.jsonl and the run record.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("serve")

    from pathlib import Path

    from trellis.core.run_record import RunRecord
    from trellis.deploy import serving
    from trellis.train import generation
    from trellis.train.run import setup_logging

    setup_logging()
    vllm_version = serving.check_vllm(args.vllm_python)
    greedy = generation.GenerateArguments(
        model_name_or_path=args.model_name_or_path,
        output_dir=args.output_dir,
        datasets=args.datasets,
        temperature=0.0,
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts,
        dtype=args.dtype,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    prompts = generation.prompts_of(greedy)
    conversations = [prompt.conversation for prompt in prompts]
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    with RunRecord("serve", args.output_dir, {"serve": args}) as record:
        model, tokenizer, _ = generation.load_models(greedy)
        expected = []
        for start in range(0, len(prompts), greedy.batch_size):
            batch = prompts[start : start + greedy.batch_size]
            records = generation.answer_batch(greedy, model, tokenizer, None, batch, start)
            expected += [r["messages"][-1]["content"] for r in records]
        del model
        serving.logger.info("transformers answered %d prompts greedily", len(expected))

        with serving.vllm_server(args) as (url, startup_s):
            replies, wall_s = serving.ask_concurrently(url, conversations, args)
        report = serving.build_report(args, vllm_version, startup_s, expected, replies, wall_s, conversations)
        serving.write_report(args, report, replies, expected)
        record.set_metrics("serving", report["metrics"])
        serving.logger.info("\n%s", serving.report_markdown(report))
        if report["metrics"]["match_rate"] < args.min_match_rate:
            raise serving.ServingError(
                f"vLLM's answers equal transformers' greedy answers on {report['metrics']['match_rate']:.1%} of "
                f"the prompts, below min_match_rate ({args.min_match_rate:.0%}); the differing answers are in "
                f"{Path(args.output_dir, serving.REPORT_NAME)}.json (`mismatches`)"
            )


if __name__ == "__main__":
    with exit_on_error():
        main()
