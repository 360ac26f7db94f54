"""How long a user waits for a recipe check: `trellis validate`, a stage script stopping on a bad recipe,
and `trellis run --dry-run` on the tiny pipeline.

    python scripts/benchmark_validate.py [--repeats 5] [--importtime] [--json FILE]

Each check runs as a fresh process (imports included, as a user meets them) in a scratch directory
with the tiny world's data generated once (`trellis tiny-data`). Prints, per check, the median and
range of wall-clock and CPU seconds (user + system) over the repeats and names the machine: CPU model,
cores and load average, since a shared machine stretches wall-clock time. With --importtime, also the
modules that take longest to import for `trellis validate recipes/tiny/sft.yaml` (python -X importtime).
The tests assert what a check does (exit code, message, nothing opened); its speed is measured here.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from trellis.core.errors import exit_on_error

REPO = Path(__file__).resolve().parents[1]
BAD_RECIPE = """\
model_config: recipes/tiny/model.json
tokenizer_name_or_path: data/tiny/tokenizer
datasets:
  - path: data/tiny/sft/train.jsonl
output_dir: outputs/never-written
learnig_rate: 0.1
"""


def checks(python: str) -> dict[str, tuple[list[str], int]]:
    """Check name -> (command, expected exit code), run in the scratch directory."""
    trellis = [python, "-m", "trellis.cli"]
    return {
        "trellis validate recipes/tiny/sft.yaml": ([*trellis, "validate", "recipes/tiny/sft.yaml"], 0),
        "trellis validate recipes/tiny/data.yaml": ([*trellis, "validate", "recipes/tiny/data.yaml"], 0),
        "scripts/sft.py on a bad recipe (exit 2)": (
            [python, str(REPO / "scripts" / "sft.py"), "--config", "bad/sft.yaml"],
            2,
        ),
        "trellis run recipes/tiny/pipeline.yaml --dry-run": (
            [*trellis, "run", "recipes/tiny/pipeline.yaml", "--dry-run"],
            0,
        ),
    }


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {name: metadata.version(name) for name in ("torch", "transformers", "trl")}
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), **versions}


def run_once(command: list[str], expected: int, cwd: Path) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one run (the children's rusage grows by this run only)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != expected:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"error: {' '.join(command)} exited {result.returncode}, expected {expected}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def slowest_imports(python: str, cwd: Path, count: int = 12) -> list[tuple[float, str]]:
    """The modules with the largest cumulative import time (seconds), outermost first among equals."""
    result = subprocess.run(
        [python, "-X", "importtime", "-m", "trellis.cli", "validate", "recipes/tiny/sft.yaml"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            depth = (len(name) - len(name.lstrip())) // 2
            if depth <= 2:  # a top-level import and what it pulls in directly
                rows.append((int(cumulative) / 1e6, name.rstrip()))
    return sorted(rows, reverse=True)[:count]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per check (median and range reported)")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports of validate")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    env_python = sys.executable
    with tempfile.TemporaryDirectory(prefix="trellis-validate-") as scratch:
        work = Path(scratch)
        for name in ("recipes", "accelerate_configs"):
            (work / name).symlink_to(REPO / name)
        (work / "bad").mkdir()
        (work / "bad" / "sft.yaml").write_text(BAD_RECIPE)
        subprocess.run(
            [env_python, "-m", "trellis.cli", "tiny-data", "--output_dir", "data/tiny"],
            cwd=work,
            check=True,
            capture_output=True,
        )
        figures = {}
        for name, (command, expected) in checks(env_python).items():
            runs = [run_once(command, expected, work) for _ in range(args.repeats)]
            figures[name] = {"wall_s": [wall for wall, _ in runs], "cpu_s": [cpu for _, cpu in runs]}
        imports = slowest_imports(env_python, work) if args.importtime else []

    host = machine()
    load = os.getloadavg()
    print(f"machine: {host['cpu']}, {host['cores']} cores, load average {load[0]:.2f} (1 min)")
    print(
        f"python {host['python']}, torch {host['torch']}, transformers {host['transformers']}, trl {host['trl']}"
    )
    print(f"\n{'check':<50} {'wall s: median [min, max]':>28} {'CPU s: median [min, max]':>28}")
    for name, values in figures.items():
        print(f"{name:<50} {summary(values['wall_s']):>28} {summary(values['cpu_s']):>28}")
    if imports:
        print("\nslowest imports of `trellis validate recipes/tiny/sft.yaml` (cumulative seconds):")
        for seconds, module in imports:
            print(f"  {seconds:6.2f}  {module}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"machine": host, "load_average": load, "repeats": args.repeats, "checks": figures},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    with exit_on_error():
        main()
