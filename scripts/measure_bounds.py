"""Re-measure the spread behind a learning test's bounds: run the test under pytest once per seed and torch
thread count and tabulate what it recorded.

A learning test records its metrics with pytest's `record_property` before it asserts, so a failing run is
measured too. This script only reruns pytest (`--seed N`, OMP_NUM_THREADS=T) and reads the JUnit XML, so
the measurement is the test's own code. One pytest session per (seed, threads), one at a time:

    python scripts/measure_bounds.py tests/test_pretrain.py::test_tiny_pretraining_learns_with_ema_and_averaging
    python scripts/measure_bounds.py tests/test_quantize.py -k quality --seeds 0-4 --threads 1,2 --json out.json

It prints one row per (test, metric): min / median / max over all runs, and the runs that failed. Copy the
range next to the bound and into docs/test_bounds.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_range(text: str) -> list[int]:
    """'0-4' or '0,2,5' or '3'."""
    values: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        values.extend(range(int(low), int(high or low) + 1))
    return values


def run_pytest(tests: list[str], extra: list[str], seed: int, threads: int) -> tuple[dict, list[str]]:
    """One pytest session; returns {(test, metric): value} and the tests that failed."""
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRELLIS_TEST_SEED": str(seed)}
        command = [sys.executable, "-m", "pytest", *tests, *extra, "-q", "-p", "no:cacheprovider"]
        # xunit1: the JUnit flavour that keeps record_property's values without a warning.
        command += ["--seed", str(seed), f"--junitxml={xml_path}", "-o", "junit_family=xunit1"]
        subprocess.run(command, cwd=REPO, env=env, check=False)
        if not xml_path.exists():
            sys.exit(f"pytest wrote no report for seed {seed}, {threads} thread(s): {' '.join(command)}")
        values, failed = {}, []
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            name = case.get("name")
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            for prop in case.iter("property"):
                values[(name, prop.get("name"))] = float(prop.get("value"))
        return values, failed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tests", nargs="+", help="pytest node ids or files")
    parser.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 (default) or 0,3")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (OMP_NUM_THREADS), default 1,2")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--json", type=Path, help="also write every run's values here")
    args = parser.parse_args()
    extra = ["-k", args.keyword] if args.keyword else []

    runs = []
    for threads in parse_range(args.threads):
        for seed in parse_range(args.seeds):
            values, failed = run_pytest(args.tests, extra, seed, threads)
            runs.append({"seed": seed, "threads": threads, "values": values, "failed": failed})
            shown = ", ".join(f"{metric} {value:.5g}" for (_, metric), value in sorted(values.items()))
            print(f"seed {seed}, {threads} thread(s): {shown}; failed: {failed or 'none'}", flush=True)

    series: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        for key, value in run["values"].items():
            series[key].append(value)
    print(f"\nseeds {args.seeds}, threads {args.threads}\n")
    print("| test | metric | min | median | max | spread | runs |\n|---|---|---|---|---|---|---|")
    for (test, metric), values in sorted(series.items()):
        low, mid, high = min(values), statistics.median(values), max(values)
        row = f"| {test} | {metric} | {low:.5g} | {mid:.5g} | {high:.5g} | {high - low:.5g} | {len(values)} |"
        print(row)
    failures = [(r["seed"], r["threads"], name) for r in runs for name in r["failed"]]
    print(f"\nfailed runs: {failures or 'none'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**r, "values": {f"{t}::{m}": v for (t, m), v in r["values"].items()}} for r in runs],
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
