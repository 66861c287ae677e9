"""How many CPU threads llama.cpp should use when the user does not say.

llama.cpp's own tools (``common/common.cpp``, ``cpu_get_num_math``) default to the number of
physical cores, not logical ones: a second hyper-thread on a core adds little to matrix work and
oversubscription costs a lot. llama-cpp-python's context parameters default to a fixed 4 instead
(``GGML_DEFAULT_N_THREADS``), which on a 2-core machine is 2.6x slower at decode. Here the
physical cores are counted among the CPUs this process may run on (its affinity mask), and capped
by a cgroup CPU quota (containers), so that a container with 2 of a host's 64 cores gets 2.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _allowed_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> int | None:
    """Distinct cores among ``cpus`` (CPUs sharing a core list the same thread siblings), if sysfs says."""
    cores = set()
    for cpu in cpus:
        siblings = _SYS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            return None
    return len(cores) or None


def _cgroup_quota() -> int | None:
    """CPUs a cgroup v2 quota allows (``cpu.max`` = "quota period"), rounded up; None without a quota."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


@lru_cache(maxsize=1)
def default_threads() -> int:
    """Physical cores this process may use (at least 1): the thread count for decode and for batches."""
    cpus = _allowed_cpus()
    n = _physical_cores(cpus) or len(cpus) or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def resolve_threads(n_threads: int | None) -> int:
    """``n_threads`` if given (must be positive), else :func:`default_threads`."""
    if n_threads is None:
        return default_threads()
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive integer (got {n_threads!r})")
    return n_threads
