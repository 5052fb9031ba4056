"""The CPUs this process may use: how many worker processes ``hsmgw serve`` starts by default.

Apart from ``gateway.workers``, which imports grpc: ``hsmgw`` builds its command line with this
before grpc is imported, as gRPC core reads its log level then (``gateway.logs.quiet_grpc_core``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def default_workers(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """One worker per core this process may use: the CPUs it may run on, capped by a
    cgroup CPU quota (a container's CPU limit), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cpu_max)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _cgroup_quota(cpu_max: Path) -> float | None:
    """CPUs' worth of time the cgroup (v2) may use per period; None when unlimited or unknown."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


__all__ = ["default_workers"]
