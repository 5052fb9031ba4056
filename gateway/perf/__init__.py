"""Load testing and benchmarking: drive a gateway (or the PKCS #11 module directly) and measure.

``hsmctl loadtest`` and ``hsmgw bench`` are built from these parts:

- :class:`Workload` — the operation, keys, concurrency (processes × calls in flight),
  unary/batch/stream, target rate and duration;
- drivers — :class:`GatewayTarget` (gRPC, one connection per call in flight) and
  :class:`DirectTarget` (python-pkcs11 straight on the module: the baseline);
- :func:`run` — client processes with a shared start, a live progress line, and a
  merged :class:`Report` (throughput, p50/p95/p99/max latency, errors by status).
"""

from gateway.perf.direct import DirectTarget
from gateway.perf.grpc_driver import GatewayTarget
from gateway.perf.report import Report, Sample
from gateway.perf.runner import RunError, default_progress, run
from gateway.perf.workload import DEFAULT_ALGORITHM, KEY_FOR, MODES, OPS, Workload, WorkloadError

__all__ = [
    "DEFAULT_ALGORITHM",
    "DirectTarget",
    "GatewayTarget",
    "KEY_FOR",
    "MODES",
    "OPS",
    "Report",
    "RunError",
    "Sample",
    "Workload",
    "WorkloadError",
    "default_progress",
    "run",
]
