"""How many threads this process can really use (standard library only).

A profile names the device's cores (rpi4: 4), but the process may be pinned to
fewer (taskset, a container's cpuset) or capped by a cgroup CPU quota (v2 cpu.max, v1 CFS)
(`docker run --cpus 1.5`, Kubernetes CPU limits). An inference thread pool larger
than that runs its threads in turns: every parallel operator waits for the one that
is not scheduled, so latency gets worse, not better.

The quota is rounded down (at least 1): a quota of 1.5 CPUs gives 1 thread. Inference
pools run in lock-step and ONNX Runtime's spin while they wait, so a second thread on
half a CPU burns the quota and then the whole group is throttled until the next
period (CFS bandwidth control); p99 suffers far more than p50 gains. One thread on
1.5 CPUs is never throttled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from edgekit.runtime.cgroup import cgroup_folders

CPU_MAX_ENV = "EDGEKIT_CGROUP_CPU_MAX"


def parse_cpu_max(text: str) -> Optional[float]:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD", QUOTA may be "max") -> CPUs allowed, None for no limit.

    Raises ValueError for text that is not in that format."""
    parts = text.split()
    if not parts or len(parts) > 2:
        raise ValueError(f"not a cpu.max line: {text!r}")
    if parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) == 2 else 100000
    if quota <= 0 or period <= 0:
        raise ValueError(f"not a cpu.max line: {text!r}")
    return quota / period


def cgroup_cpu_limit(cpu_max: Optional[str] = None) -> Optional[float]:
    """CPUs allowed by cgroup quotas, v2 and v1 (the tightest along the hierarchy), None when unlimited.

    cpu_max: a file to read instead (the env var EDGEKIT_CGROUP_CPU_MAX does the same)."""
    path = cpu_max or os.environ.get(CPU_MAX_ENV)
    if path:  # a file the caller named must be there and be right
        try:
            return parse_cpu_max(Path(path).read_text())
        except (OSError, ValueError) as e:
            from edgekit.errors import EdgekitError

            raise EdgekitError(f"cannot read the CPU quota from {path} ({e})",
                               hint=f"give a cgroup v2 cpu.max file ('QUOTA PERIOD' or 'max PERIOD'), "
                                    f"or unset {CPU_MAX_ENV}") from None
    limit: Optional[float] = None
    for version, folder in cgroup_folders("cpu"):   # the tightest level, v2 and v1, up to the root
        cpus = _level_cpus(version, Path(folder))
        if cpus is not None and (limit is None or cpus < limit):
            limit = cpus
    return limit


def _level_cpus(version: int, folder: Path) -> Optional[float]:
    """CPUs one cgroup folder allows: v2's cpu.max, v1's cpu.cfs_quota_us / cpu.cfs_period_us (older Docker
    hosts, a systemd slice's CPUQuota; the kernel applies a parent's quota to an unlimited child, so every level
    counts); None where it sets none or has no such files (no cpu controller there)."""
    try:
        if version == 2:
            return parse_cpu_max((folder / "cpu.max").read_text())
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (taskset, cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def usable_cpus(cpu_max: Optional[str] = None) -> int:
    """min(affinity, floor(cgroup quota)), at least 1."""
    n = affinity_cpus()
    limit = cgroup_cpu_limit(cpu_max)
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def cpu_budget(cpu_max: Optional[str] = None) -> Dict[str, object]:
    """What the clamp was computed from (recorded in reports)."""
    limit = cgroup_cpu_limit(cpu_max)
    return {"affinity": affinity_cpus(), "cgroup_cpu_limit": limit, "usable": usable_cpus(cpu_max)}


# An explicit thread count may oversubscribe the usable CPUs (a user measuring that, a quota read lower than the
# cores a burst may use), but not without bound: 1000 threads on 2 CPUs take ~45 s to load and run, 100000 never
# finish. 4 per usable CPU leaves every sensible experiment possible (192 cores: up to 768).
MAX_THREADS_PER_CPU = 4


def check_threads(explicit: int, cpu_max: Optional[str] = None) -> int:
    """An explicit thread count (--threads, load(threads=)): at least 1 and at most MAX_THREADS_PER_CPU x the usable
    CPUs; returns it as an int. Raises EdgekitError (one line, naming the usable CPUs) otherwise."""
    from edgekit.errors import EdgekitError

    n = int(explicit)
    if n < 1:
        raise EdgekitError(f"threads must be at least 1 (got {explicit})")
    usable = usable_cpus(cpu_max)
    cap = MAX_THREADS_PER_CPU * usable
    if n > cap:
        aff, limit = affinity_cpus(), cgroup_cpu_limit(cpu_max)
        why = f"its CPU affinity {aff}" + (f", cgroup CPU quota {limit:g}" if limit is not None else "")
        raise EdgekitError(f"threads {n} is more than {MAX_THREADS_PER_CPU} per usable CPU; this process can use "
                           f"{usable} ({why})",
                           hint=f"give at most {cap}, or leave it out to let edgekit choose")
    return n


def choose_threads(explicit: Optional[int], profile: Optional[int],
                   cpu_max: Optional[str] = None) -> Optional[int]:
    """Threads to run with: an explicit request as given (check_threads: at least 1, at most
    MAX_THREADS_PER_CPU x the usable CPUs); otherwise the profile's count clamped to the CPUs this
    process may use; with neither, the usable CPUs."""
    if explicit is not None:
        return check_threads(explicit, cpu_max)
    usable = usable_cpus(cpu_max)
    if profile is None:
        return usable
    return max(1, min(int(profile), usable))
