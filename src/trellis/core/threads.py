"""How many CPU threads a stage's process gets: the cores that are free when it starts.

PyTorch (through OpenMP) and `accelerate launch` size their thread pools by the machine's cores, as if the
machine were idle. When another process holds a core, OpenMP's threads wait on each other at every
parallel region: measured on 2 cores beside one busy Python loop, the tiny reward stage's steps took 2.9x
their idle time with 2 threads and 1.3x with 1 (AMD EPYC; 3.7x and 2.7x on an Intel Xeon; docs/benchmarks.md,
"CPU threads"). So the pipeline counts the
cores left idle over a short sample of /proc/stat and gives each of a stage's processes its share; when
some core is busy it also sets OpenMP's PASSIVE wait policy (threads waiting for work sleep rather than
spin on a core another process needs), which measured as fast or faster beside a busy core and up to 2x
slower on an idle machine, where the default policy stays.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

SAMPLE_SECONDS = 0.5


def usable_cores() -> list[int]:
    return (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )


def free_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """The idle share of this process's usable cores over `seconds`, summed (2 idle cores: 2.0)."""
    cores = usable_cores()
    before = _cpu_times()
    if before is None:
        return float(len(cores))  # no /proc/stat (not Linux): assume the machine is free
    time.sleep(seconds)
    after = _cpu_times()
    free = 0.0
    for core in cores:
        (idle_before, total_before), (idle_after, total_after) = before[core], after[core]
        elapsed = total_after - total_before
        free += (idle_after - idle_before) / elapsed if elapsed > 0 else 1.0
    return free


def threads_per_process(processes: int, free: float) -> int:
    """Threads for each of `processes` processes: their share of the `free` cores, at least 1."""
    return max(1, int(round(free)) // max(processes, 1))


def stage_environment(environment: Mapping[str, str], processes: int = 1) -> dict[str, str]:
    """What to add to the `environment` of a stage with `processes` processes: OMP_NUM_THREADS (and
    OMP_WAIT_POLICY on a busy machine); nothing if OMP_NUM_THREADS is set by hand, nor a variable that is."""
    if "OMP_NUM_THREADS" in environment:
        return {}
    free = free_cores()
    chosen = {"OMP_NUM_THREADS": str(threads_per_process(processes, free))}
    if free < len(usable_cores()) - 0.5:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    return {key: value for key, value in chosen.items() if key not in environment}


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """Per core: (idle + iowait jiffies, all jiffies), from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            lines = handle.readlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(value) for value in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times
