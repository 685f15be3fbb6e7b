"""What this process may do with other processes: how many cores it may use, and whether it may fork."""
from __future__ import annotations

import os


def single_threaded() -> bool:
    """Does this process run one thread, native ones included (numpy's OpenBLAS pool, torch's)? Only then is a
    fork safe: the child gets a copy of the memory but only the forking thread, so a lock another thread held
    stays locked in the child forever. Counted from /proc/self/task; where that is missing (not Linux), False."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under `taskset` or a batch scheduler), which
    ``os.cpu_count()`` over-counts when the process is pinned to fewer."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1
