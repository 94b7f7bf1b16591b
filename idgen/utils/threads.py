"""How many CPU threads and DataLoader workers a run may use, from the CPUs it is given.

A 2-core machine shared with other jobs ran a tiny training 21x slower with torch's default
thread count and 4 DataLoader workers than with one thread: every process spun a full set of
OpenMP threads over the same two cores. The CPUs a process may use are the fewer of its
affinity mask (``os.sched_getaffinity``: ``taskset``, Slurm, ``docker --cpuset-cpus``) and its
cgroup CPU quota (``docker --cpus``, Kubernetes limits: cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); ``os.cpu_count()`` sees neither.

:func:`plan_threads` splits those CPUs so that ``workers x threads <= cpus``; config keys
``threads`` (top level) and ``data.num_workers`` override either half, and ``OMP_NUM_THREADS``
set by the user counts as ``threads``. :func:`apply_threads` sets it before the task runs;
torch is not imported for it (``--help`` and config errors stay fast).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: where the cgroup filesystem is mounted (a parameter of the functions below, for tests)
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: more DataLoader workers than this buy nothing for idgen's image folders
MAX_WORKERS = 4
#: the variables OpenMP / MKL / OpenBLAS read when torch starts
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# the user's OMP_NUM_THREADS, read before apply_threads writes its own into the environment
_USER_OMP = os.environ.get("OMP_NUM_THREADS", "")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (``1.5`` = 150 ms per 100 ms), or None when there is none.

    cgroup v2: ``<root>/cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``.
    cgroup v1: ``<root>/cpu/cpu.cfs_quota_us`` (``-1`` = none) and ``cpu.cfs_period_us``
    (also looked up as ``<root>/cpu,cpuacct/...``). Unreadable or malformed files mean none.
    """
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    for folder in ("cpu", "cpu,cpuacct"):
        quota = _read(root / folder / "cpu.cfs_quota_us")
        period = _read(root / folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the OS has no masks)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_cpus(affinity: int | None = None, root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may keep busy: its affinity, capped by the cgroup quota (rounded
    up: a quota of 1.5 CPUs still runs two threads half the time), at least 1."""
    cpus = affinity_cpus() if affinity is None else affinity
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


@dataclass(frozen=True)
class ThreadPlan:
    """torch intra-op threads and DataLoader workers for one run, and where they came from."""

    threads: int
    workers: int
    cpus: int
    source: str  # "computed", or which setting chose (e.g. "threads=1, data.num_workers=0")

    def describe(self) -> str:
        """The run's first line: what was chosen, from what, and how to change it."""
        return (
            f"CPU: {self.threads} torch thread(s), {self.workers} DataLoader worker(s) "
            f"({self.cpus} CPU(s) for this process; {self.source}; "
            "set threads=N / data.num_workers=N)"
        )


def _env_threads(value: str) -> int | None:
    return int(value) if value.isdigit() and int(value) > 0 else None


def plan_threads(
    cpus: int | None = None,
    threads: int | None = None,
    workers: int | None = None,
    omp_num_threads: str | None = None,
    processes: int = 1,
) -> ThreadPlan:
    """Threads and workers so that ``workers x threads <= cpus``.

    ``threads`` / ``workers`` (None: computed) are the config's; ``threads`` falls back to
    ``omp_num_threads`` (default: the ``OMP_NUM_THREADS`` the process started with). Computed: no workers below 4 CPUs (loading in the
    training process is cheaper than a process per core there), then one worker per 4 CPUs up
    to :data:`MAX_WORKERS`; threads take the CPUs left per worker. ``processes`` training
    processes on the same CPUs (DDP on CPU) share them: each plans for ``cpus // processes``.
    """
    cpus = usable_cpus() if cpus is None else max(1, cpus)
    env = _env_threads(_USER_OMP if omp_num_threads is None else omp_num_threads)
    chosen = [f"{processes} processes share {cpus} CPUs"] if processes > 1 else []
    cpus = max(1, cpus // max(1, processes))
    if threads is not None:
        chosen.append(f"threads={threads}")
    elif env is not None:
        threads = env
        chosen.append(f"OMP_NUM_THREADS={threads}")
    if workers is not None:
        chosen.append(f"data.num_workers={workers}")
    else:
        limit = cpus if threads is None else cpus // threads
        workers = max(0, min(MAX_WORKERS, cpus // 4, limit))
    if threads is None:
        threads = max(1, cpus // max(1, workers))
    return ThreadPlan(int(threads), int(workers), cpus, ", ".join(chosen) or "computed")


def apply_threads(plan: ThreadPlan) -> None:
    """Use ``plan.threads`` in this process: torch's setting if torch is loaded, else the
    environment variables torch reads when it starts (not importing torch here keeps
    ``--help`` and config errors fast)."""
    for name in THREAD_ENV:
        os.environ[name] = str(plan.threads)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(plan.threads)
