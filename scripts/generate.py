"""Answer a prompt set with a model, k samples a prompt; keep the answers a reward model accepts (rejection
sampling, best-of-n); write them as a chat dataset the SFT stage reads.

    accelerate launch --num_processes 1 scripts/generate.py --config recipes/tiny/generate.yaml

Reads the recipe strictly, loads the prompts, checks that the reward model (if any) reads the model's
tokens, answers the prompts in batches (each batch written whole: a rerun resumes at the first missing
one, with the same answers), and writes output_dir/train.jsonl (the kept answers as `messages`),
output_dir/batches/ (every answer, its score and whether it was kept) and trellis_run.json.
"""

from trellis.core.errors import exit_on_error
from trellis.stages import parse_recipe


def main() -> None:
    (args,) = parse_recipe("generate")

    from accelerate import PartialState

    from trellis.core.run_record import RunRecord
    from trellis.train import generation
    from trellis.train.run import setup_logging

    if PartialState().num_processes > 1:
        raise generation.GenerationError(
            "the generate stage runs in one process: launch it with --num_processes 1"
        )
    setup_logging()
    with RunRecord("generate", args.output_dir, {"generate": args}) as record:
        prompts = generation.prompts_of(args)
        model, tokenizer, reward_model = generation.load_models(args)
        summary = generation.generate(args, model, tokenizer, reward_model, prompts)
        record.set_metrics("generated", summary)


if __name__ == "__main__":
    with exit_on_error():
        main()
