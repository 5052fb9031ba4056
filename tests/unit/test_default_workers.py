"""`hsmgw serve` runs one worker per CPU it may use: a container's CPU limit counts, not the node's cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cpus import default_workers

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", AFFINITY),               # no limit: every CPU this process may run on
    ("100000 100000\n", 1),                    # limits: cpu: "1"
    ("150000 100000\n", min(AFFINITY, 2)),     # 1.5 CPUs: rounded up
    ("50000 100000\n", 1),                     # half a CPU: still one worker
    (f"{AFFINITY * 400000} 100000\n", AFFINITY),  # a limit above the CPUs there are
    ("garbage\n", AFFINITY),
])
def test_default_workers_follow_the_cgroup_cpu_limit(tmp_path: Path, cpu_max: str, expected: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert default_workers(path) == expected


def test_without_a_cgroup_file_every_usable_cpu_gets_a_worker(tmp_path: Path) -> None:
    assert default_workers(tmp_path / "missing") == AFFINITY
