"""This process's resident memory on Linux: now, its peak, and resetting the peak so that one piece of
work shows in it."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path


def rss_kib(field_name: str = "VmRSS") -> int | None:
    """A memory field of /proc/self/status in KiB (`VmRSS` now, `VmHWM` the peak); None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Make the peak resident memory start again from now; False where the kernel does not allow it."""
    if not sys.platform.startswith("linux"):
        return False
    # Hand memory freed by earlier work back to the system (glibc), so that the next work shows in the peak.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak resident set size
    except OSError:  # a kernel or sandbox without it
        return False
    return True
