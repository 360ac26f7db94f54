"""The pipeline gives each stage process its share of the cores that are free when the stage starts."""

from __future__ import annotations

import subprocess
import sys
import time

from trellis.core import threads


def test_each_process_gets_its_share_of_the_free_cores_and_at_least_one_thread():
    assert threads.threads_per_process(1, free=1.96) == 2  # idle 2-core machine
    assert threads.threads_per_process(1, free=0.97) == 1  # one of the two cores busy
    assert threads.threads_per_process(1, free=0.1) == 1
    assert threads.threads_per_process(4, free=2.0) == 1  # 4 gloo processes on 2 cores
    assert threads.threads_per_process(2, free=7.6) == 4


def test_a_busy_core_is_not_counted_free():
    cores = len(threads.usable_cores())
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the loop is running
        free = threads.free_cores(0.5)
        environment = threads.stage_environment({}, 1)
        by_hand = threads.stage_environment({"OMP_WAIT_POLICY": "ACTIVE"}, 1)
    finally:
        busy.kill()
    # The loop holds a whole core for the sample (other work on the machine only lowers the figure).
    assert 0 <= free <= cores - 0.5, (free, cores)
    assert environment["OMP_WAIT_POLICY"] == "PASSIVE"  # waiting threads sleep rather than spin
    assert 1 <= int(environment["OMP_NUM_THREADS"]) <= max(cores - 1, 1)
    assert "OMP_WAIT_POLICY" not in by_hand and "OMP_NUM_THREADS" in by_hand  # what is set by hand stays


def test_threads_set_by_hand_are_kept():
    assert threads.stage_environment({"OMP_NUM_THREADS": "3"}, 1) == {}  # e.g. make test's single thread
