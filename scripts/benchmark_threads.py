"""Time tiny stages under each CPU thread setting, idle and beside a busy core, against Trellis's choice.

    python scripts/benchmark_threads.py --pipeline_dir outputs/tiny --stages pretrain,sft,reward,dpo,grpo \
        --steps 20 --json /tmp/threads.json

Runs after `make tiny` (it reuses the resolved recipes and inputs in PIPELINE_DIR/recipes). For each
machine state (idle; one pure-Python busy loop, one process holding one core) and each stage, it first
asks `trellis.core.threads` what the pipeline would choose then, and runs the stage for `--steps`
optimizer steps under each setting: 1 or 2 threads (capped at the cores), OpenMP's default or PASSIVE wait
policy. The figure is the median step time of the run record (`metrics.throughput.step_seconds`), or
the trainer's runtime per step for stages that do not record throughput (GRPO, RLOO; PPO: its generation
and training time per update, over all its recipe's updates). It prints,
per state and stage, every setting's figure, the best, and the chosen setting's distance from the best.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from trellis.core.errors import exit_on_error

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pipeline_dir", default="outputs/tiny", help="a finished tiny pipeline's output_dir"
    )
    parser.add_argument(
        "--stages", default="pretrain,sft,reward,dpo,grpo", help="comma-separated stage names"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--states", default="idle,busy", help="idle, busy (one pure-Python loop on one core)")
    parser.add_argument(
        "--settings", help="only these, e.g. 1:default,1:PASSIVE (default: 1 and 2 threads x both)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per setting (the figure is their median)"
    )
    parser.add_argument("--json", help="also write every figure here")
    return parser.parse_args()


def seconds_per_step(output_dir: str, steps: int) -> float:
    with open(os.path.join(output_dir, "trellis_run.json")) as handle:
        metrics = json.load(handle)["metrics"]
    step_seconds = metrics.get("throughput", {}).get("step_seconds")
    if step_seconds:
        return step_seconds
    if "train_runtime" in metrics["train"]:
        return metrics["train"]["train_runtime"] / steps
    # PPO runs its recipe's episodes whatever --max_steps says: its generation and training time per update
    split = metrics["time_split"]
    return (split["generation_seconds"] + split["training_seconds"]) / metrics["train"]["step"]


def run_stage(stage: str, kind: str, recipe: str, steps: int, threads: int, policy: str) -> float:
    from trellis.stages import STAGES, stage_flag
    from trellis.train.benchmark import timed_run_arguments

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable,
            os.path.join(SCRIPTS, STAGES[kind].script),
            *("--config", recipe, *stage_flag(kind), "--output_dir", output_dir),
            *timed_run_arguments(kind, steps),
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-3000:])
            raise SystemExit(f"error: {stage} failed under {threads} threads, policy {policy}: output above")
        return seconds_per_step(output_dir, steps)


def main() -> None:
    args = parse_args()
    from trellis.core import threads
    from trellis.core.run_record import machine_info, machine_summary, package_versions

    with open(os.path.join(args.pipeline_dir, "pipeline_run.json")) as handle:
        stages = json.load(handle)["stages"]
    cores = len(threads.usable_cores())
    settings = [(count, policy) for count in sorted({1, min(2, cores)}) for policy in ("default", "PASSIVE")]
    if args.settings:
        settings = [
            (int(count), policy) for count, policy in (item.split(":") for item in args.settings.split(","))
        ]
    print(machine_summary(machine_info(), package_versions()), flush=True)
    results = []
    for state in args.states.split(","):
        busy = subprocess.Popen(BUSY_LOOP) if state == "busy" else None
        try:
            for name in args.stages.split(","):
                kind, recipe = stages[name]["stage"], stages[name]["resolved_recipe"]
                environment = threads.stage_environment({}, 1)
                chosen = f"{environment['OMP_NUM_THREADS']}:{environment.get('OMP_WAIT_POLICY', 'default')}"
                figures = {}
                for count, policy in settings:
                    runs = [
                        run_stage(name, kind, recipe, args.steps, count, policy) for _ in range(args.repeats)
                    ]
                    figures[f"{count}:{policy}"] = statistics.median(runs)
                best = min(figures, key=figures.get)
                mine = figures.get(chosen, float("nan"))
                row = {"state": state, "stage": name, "seconds_per_step": figures, "best": best}
                row |= {"chosen": chosen, "chosen_vs_best": mine / figures[best]}
                results.append(row)
                cells = "  ".join(f"{key} {value:.4f}" for key, value in figures.items())
                print(
                    f"{state:5} {name:9} {cells}  best {best}  chosen {chosen} (x{mine / figures[best]:.3f})"
                )
        finally:
            if busy:
                busy.kill()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"machine": machine_info(), "versions": package_versions(), "runs": results}, handle, indent=2
            )


if __name__ == "__main__":
    with exit_on_error():
        main()
