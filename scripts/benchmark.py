"""Measure a stage recipe's training speed, alone or side by side with the plain-TRL baseline.

    python scripts/benchmark.py --config recipes/tiny/sft.yaml --steps 60 --vs baseline [--key value ...]
    python scripts/benchmark.py --config recipes/benchmarks/pretrain_llama-3.2-1b.yaml \
        --synthetic_data 128256,2048,2000 --launcher "accelerate launch --config_file accelerate_configs/single_gpu.yaml"

Each run is the stage script itself (a separate process) for a fixed number of steps without
checkpoints or evaluation during training. Per run it prints non-padding tokens/s, padding
efficiency (real / processed tokens), median step time, peak memory (RSS on CPU, allocated and
reserved on GPU) and, on GPU, model FLOPs utilisation against the measured bf16 matmul peak.
`--vs baseline` alternates Trellis's recipe with the same recipe whose speed settings
(trellis.benchmark.SPEED_KEYS) are back at the trainer's defaults, and prints the ratio of every
figure (median and spread over the pairs), including the training loss at equal tokens.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from trellis.core.errors import exit_on_error

SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a recipe of a stage that records tokens/s: pretrain, sft, reward, dpo, ...",
    )
    parser.add_argument("--stage", help="the recipe's stage (default: from its file name)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, alternating")
    parser.add_argument("--vs", choices=["baseline"], help="also run the plain-TRL baseline and compare")
    parser.add_argument("--launcher", default=sys.executable, help="e.g. 'accelerate launch --config_file X'")
    parser.add_argument("--work_dir", default="outputs/benchmark", help="where the runs write")
    parser.add_argument(
        "--synthetic_data",
        metavar="VOCAB,BLOCK,BLOCKS",
        help="pretraining only: first write random packed blocks to the recipe's dataset_path",
    )
    parser.add_argument("--json", help="also write every run's figures and the comparison here")
    return parser.parse_known_args()


def main() -> None:
    args, overrides = parse_args()

    from trellis.core.recipe import load_recipe_file
    from trellis.stages import STAGES, stage_flag, stage_of_recipe, stage_types
    from trellis.train import benchmark
    from trellis.train.throughput import WARMUP_STEPS

    stage = args.stage or stage_of_recipe(args.config)
    timed = [name for name, kind in STAGES.items() if kind.measures_throughput]
    if stage not in timed:
        raise SystemExit(f"error: {args.config}: benchmarks cover {', '.join(timed)}, not {stage!r}")
    recipe, _ = load_recipe_file(args.config)
    if args.synthetic_data:
        vocab, block, blocks = (int(part) for part in args.synthetic_data.split(","))
        benchmark.write_synthetic_corpus(recipe["dataset_path"], vocab, block, blocks, max(blocks // 100, 8))

    variants = {"trellis": []}
    if args.vs:
        changed = benchmark.baseline_overrides(stage_types(stage), recipe)
        print(f"baseline: {args.config} with the trainer's defaults for {json.dumps(changed, default=str)}")
        variants["baseline"] = [arg for key, value in changed.items() for arg in (f"--{key}", str(value))]
    fixed = benchmark.timed_run_arguments(stage, args.steps)
    runs = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, variant_args in variants.items():
            output_dir = os.path.join(args.work_dir, f"{stage}-{name}-{repeat}")
            command = [
                *shlex.split(args.launcher),
                os.path.join(SCRIPTS, STAGES[stage].script),
                *("--config", args.config, "--output_dir", output_dir, *stage_flag(stage)),
                *fixed,
                *overrides,
                *variant_args,
            ]
            print(f"[{repeat + 1}/{args.repeats}] {name}: {shlex.join(command)}", flush=True)
            start = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
                raise SystemExit(f"error: the {name} run failed (exit {result.returncode}); output above")
            run = benchmark.read_run(output_dir)
            run["figures"]["wall_seconds"] = time.monotonic() - start
            runs[name].append(run)
        if args.vs:
            benchmark.add_equal_token_loss({name: runs[name][-1] for name in variants})

    figures = {name: [run["figures"] for run in variant_runs] for name, variant_runs in runs.items()}
    comparison = benchmark.ratios(figures["trellis"], figures["baseline"]) if args.vs else None
    print(f"\n{stage}: {args.config}, {args.steps} steps per run (the first {WARMUP_STEPS} not measured)")
    print(benchmark.table(figures, comparison))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"stage": stage, "config": args.config, "runs": figures, "ratios": comparison},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    with exit_on_error():
        main()
