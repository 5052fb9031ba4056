"""Load-test results: throughput, latency percentiles and errors, merged over processes."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """What one client process measured (sent back to the parent)."""

    ops: int = 0
    """Operations that succeeded inside the measured window."""
    calls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Failed operations by status (``UNAVAILABLE``, ``INVALID_ARGUMENT``, ``CKR_…``)."""
    latencies: array[float] = field(default_factory=lambda: array("d"))
    """Seconds per call (a batch is one call)."""
    cpu: float = 0.0
    """CPU seconds the process used while measuring."""


def percentile(sorted_values: list[float] | array[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass
class Report:
    label: str
    duration: float
    ops: int
    calls: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    """p50, p95, p99, max and mean of call latency, milliseconds."""
    client_cpu: float
    """CPU seconds the client processes used while measuring."""
    workload: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.ops / self.duration if self.duration else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @classmethod
    def merge(cls, label: str, duration: float, samples: list[Sample], workload: dict[str, Any]) -> Report:
        latencies = sorted(v for s in samples for v in s.latencies)
        errors: Counter[str] = Counter()
        for s in samples:
            errors.update(s.errors)
        stats = {
            "p50": percentile(latencies, 50) * 1e3,
            "p95": percentile(latencies, 95) * 1e3,
            "p99": percentile(latencies, 99) * 1e3,
            "max": (latencies[-1] if latencies else 0.0) * 1e3,
            "mean": (sum(latencies) / len(latencies) if latencies else 0.0) * 1e3,
        }
        return cls(
            label=label,
            duration=duration,
            ops=sum(s.ops for s in samples),
            calls=sum(s.calls for s in samples),
            errors=dict(sorted(errors.items())),
            latency_ms={k: round(v, 3) for k, v in stats.items()},
            client_cpu=round(sum(s.cpu for s in samples), 3),
            workload=workload,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "throughput": round(self.throughput, 1),
            "ops": self.ops,
            "calls": self.calls,
            "duration": round(self.duration, 3),
            "errors": self.errors,
            "error_count": self.error_count,
            "latency_ms": self.latency_ms,
            "client_cpu_seconds": self.client_cpu,
            "workload": self.workload,
        }

    def table(self) -> str:
        lat = self.latency_ms
        rows = [
            ("workload", self.label),
            ("throughput", f"{self.throughput:,.0f} ops/s ({self.ops:,} ops in {self.calls:,} calls, "
                           f"{self.duration:g}s)"),
            ("latency", f"p50 {lat['p50']:.2f} ms   p95 {lat['p95']:.2f} ms   p99 {lat['p99']:.2f} ms   "
                        f"max {lat['max']:.2f} ms"),
            ("errors", ", ".join(f"{code} {n:,}" for code, n in self.errors.items()) or "none"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
