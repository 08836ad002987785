"""Unit conversions. The task schema defines the units: `memory` in MiB, `cputime` in CPU seconds,
`cores` in CPU cores. Each scheduler converts from those with the small functions here.
"""
from __future__ import annotations

import math

MIB = 1024 * 1024

#: Seconds between the soft CPU-time limit (SIGXCPU) and the hard one (SIGKILL), so a task that
#: ignores SIGXCPU is still stopped, and one that does not is identified by SIGXCPU.
CPU_GRACE_SECONDS = 5


def mib_to_bytes(mib: int) -> int:
    """
    >>> mib_to_bytes(1)
    1048576
    >>> mib_to_bytes(0)
    0
    """
    return mib * MIB


def bytes_to_mib(count: int) -> float:
    """
    >>> bytes_to_mib(3 * 1048576 // 2)
    1.5
    """
    return count / MIB


def cpu_rlimit(seconds: int) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_CPU pair that enforces a CPU-time limit of `seconds`.

    >>> cpu_rlimit(1)
    (1, 6)
    >>> cpu_rlimit(3600)
    (3600, 3605)
    """
    if seconds < 1:
        raise ValueError("a CPU-time limit must be at least 1 second")
    return seconds, seconds + CPU_GRACE_SECONDS


def whole_minutes(seconds: int) -> int:
    """Seconds rounded up to whole minutes (at least 1), as Slurm counts `--time`.

    >>> whole_minutes(1), whole_minutes(60), whole_minutes(61), whole_minutes(0)
    (1, 1, 2, 1)
    """
    return max(1, math.ceil(seconds / 60))


def walltime_for_cputime(cputime: int, factor: float = 2.0) -> int:
    """Wall-clock seconds to allow a task whose processes may each use `cputime` CPU seconds.

    `factor` times the CPU time leaves room for start-up, I/O and waiting; the grace between the
    soft and hard CPU-time limits is added, so a busy single-process task meets its CPU-time limit
    (and is told so) before its wall-clock limit.

    >>> walltime_for_cputime(1), walltime_for_cputime(60), walltime_for_cputime(60, 1), walltime_for_cputime(3, 1.5)
    (7, 125, 65, 10)
    """
    if cputime < 1 or factor < 1:
        raise ValueError("a CPU-time limit must be at least 1 second, the factor at least 1")
    return math.ceil(cputime * factor) + CPU_GRACE_SECONDS


def hms(seconds: int) -> str:
    """Seconds as H:MM:SS (hours unbounded), the time format of Grid Engine and Slurm.

    >>> hms(0), hms(59), hms(3600), hms(90061)
    ('0:00:00', '0:00:59', '1:00:00', '25:01:01')
    """
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def share(total: int, parts: int) -> int:
    """`total` split into `parts` equal shares, rounded up (for per-slot or per-CPU limits).

    >>> share(300, 2), share(301, 2), share(1, 4)
    (150, 151, 1)
    """
    return -(-total // max(1, parts))
