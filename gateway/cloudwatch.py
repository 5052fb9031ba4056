"""CloudWatch: publish the gateway's core metrics, and install the alarms operators need.

**Publishing** (``[cloudwatch] enabled = true``): every ``interval`` seconds a
sampler reads the router's state and the request counters (never the hot
path) and offers datums to a bounded queue; a sender thread drains it with
``PutMetricData`` in batches. When CloudWatch is slow or unreachable the queue
fills and new datums are dropped and counted (``hsmgw_cloudwatch_dropped_total``)
— nothing ever waits for AWS. ``Publisher.offer`` is safe to call from any
thread and never blocks.

Published (namespace ``HSMGW`` unless configured), per cluster (dimension
``Cluster``): ``Keys``, ``KeyUtilization`` (% of max_keys), ``SessionsInUse``,
``SessionUtilization`` (% of pool_size), ``CircuitState`` (0/1/2, the worst of
the interval); per gateway
region (dimension ``Region``): ``Requests``, ``ServerErrors``, ``Latency``
(average ms), ``Failovers``, ``Retries``, ``RetryBudgetRefusals``,
``UnderReplicatedKeys``, ``UnhealthyClusters``, and with TLS ``TlsCertificateDaysLeft``
(days until the first certificate of the served chain expires; negative once it
has). Cluster dimensions carry no
gateway identity, so every gateway's datums for a cluster land in one metric
and an alarm on its Maximum sees the worst gateway.

**Alarms** (``hsmgw alarms install``, idempotent: ``PutMetricAlarm`` replaces by
name; ``hsmgw alarms check`` compares what is installed with what install would
make, reading only): see ``alarm_specs`` and docs/operations.md.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.metrics import GatewayMetrics, cluster_snapshots, under_replicated_keys
from gateway.tls import EXPIRY_WARNING, TlsMaterial
from router.router import Router

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "HSMGW"
MAX_DATUMS_PER_CALL = 1000
"""PutMetricData's limit on datums per request."""
SERVER_ERROR_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"})
"""Codes that say the gateway or an HSM failed (not the caller): ``ServerErrors``."""
CLOUDHSM_NAMESPACE = "AWS/CloudHSM"


@dataclass(frozen=True)
class Datum:
    name: str
    value: float
    unit: str = "Count"
    dimensions: tuple[tuple[str, str], ...] = ()
    timestamp: float = field(default_factory=time.time)
    """Seconds since the epoch."""

    def to_aws(self) -> dict[str, Any]:
        return {
            "MetricName": self.name,
            "Value": float(self.value),
            "Unit": self.unit,
            "Dimensions": [{"Name": k, "Value": v} for k, v in self.dimensions],
            "Timestamp": datetime.datetime.fromtimestamp(self.timestamp, datetime.timezone.utc),
        }


class Publisher:
    """A bounded queue of datums and the thread that sends them to CloudWatch."""

    def __init__(
        self,
        client: Any,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        max_queue: int = 10_000,
        batch_size: int = MAX_DATUMS_PER_CALL,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not 1 <= batch_size <= MAX_DATUMS_PER_CALL:
            raise ValueError(f"batch_size must be 1 to {MAX_DATUMS_PER_CALL}")
        self.client = client
        self.namespace = namespace
        self._queue: queue.Queue[Datum] = queue.Queue(maxsize=max_queue)
        self._batch_size = batch_size
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = 0.0
        self.sent = Counter("hsmgw_cloudwatch_datums_sent", "Datums CloudWatch accepted.", registry=registry)
        self.dropped = Counter("hsmgw_cloudwatch_datums_dropped",
                               "Datums dropped: the queue was full or CloudWatch refused the batch.", registry=registry)
        self.failures = Counter("hsmgw_cloudwatch_errors", "PutMetricData calls that failed.", registry=registry)
        depth = Gauge("hsmgw_cloudwatch_queue_depth", "Datums waiting to be sent.", registry=registry)
        depth.set_function(self._queue.qsize)

    def offer(self, datum: Datum) -> bool:
        """Queue a datum without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(datum)
        except queue.Full:
            self.dropped.inc()
            return False
        return True

    def flush(self) -> int:
        """Send everything queued now, in batches; returns the datums CloudWatch accepted."""
        sent = 0
        with self._send_lock:
            while True:
                batch: list[Datum] = []
                while len(batch) < self._batch_size:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if not batch:
                    return sent
                try:
                    self.client.put_metric_data(Namespace=self.namespace, MetricData=[d.to_aws() for d in batch])
                except Exception as exc:  # noqa: BLE001 - CloudWatch trouble never reaches the gateway
                    # Not requeued: fresher samples follow, and an outage must not grow memory.
                    self.failures.inc()
                    self.dropped.inc(len(batch))
                    self._warn(f"PutMetricData failed; {len(batch)} datums dropped: {exc}")
                    continue
                self.sent.inc(len(batch))
                sent += len(batch)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60.0:  # an outage logs once a minute, not once a batch
            self._last_warning = now
            log.warning("cloudwatch: %s", message)

    def start(self, sampler: Callable[[], Iterable[Datum]], interval: float) -> None:
        """Every ``interval`` seconds: offer what ``sampler`` returns, then flush."""
        if self._thread is not None:
            raise RuntimeError("publisher already started")

        def loop() -> None:
            while not self._stop.wait(interval):
                self._tick(sampler)

        self._thread = threading.Thread(target=loop, name="cloudwatch", daemon=True)
        self._thread.start()

    def _tick(self, sampler: Callable[[], Iterable[Datum]]) -> None:
        try:
            for datum in sampler():
                self.offer(datum)
        except Exception:  # noqa: BLE001 - the loop must survive anything
            log.exception("cloudwatch: sampling failed")
        self.flush()

    def stop(self, sampler: Callable[[], Iterable[Datum]] | None = None, timeout: float = 5.0) -> None:
        """Stop the thread; with ``sampler``, publish one last sample (at most ``timeout`` seconds in all)."""
        end = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if sampler is not None:
            done = threading.Thread(target=self._tick, args=(sampler,), name="cloudwatch-final", daemon=True)
            done.start()
            done.join(max(0.0, end - time.monotonic()))


class GatewaySampler:
    """Turns the router's state and the request counters into datums (deltas for counters)."""

    def __init__(self, router: Router, metrics: GatewayMetrics, *, region: str,
                 clock: Callable[[], float] = time.time, tls: Callable[[], TlsMaterial] | None = None) -> None:
        """``tls``: the TLS material served now (a gateway with ``[server.tls]``), for ``TlsCertificateDaysLeft``."""
        self.router = router
        self.tls = tls
        self.metrics = metrics
        self.requests = metrics.requests
        self.region = region
        self._clock = clock
        self._last: dict[str, float] = {}

    def _delta(self, name: str, total: float) -> float:
        previous = self._last.get(name, 0.0)
        self._last[name] = total
        return max(0.0, total - previous)

    def __call__(self) -> list[Datum]:
        now = self._clock()
        data: list[Datum] = []
        unhealthy = 0
        worst = self.metrics.take_worst_circuits()
        for snap in cluster_snapshots(self.router):
            dims = (("Cluster", snap.name),)
            circuit = max(snap.circuit, worst.get(snap.name, 0))  # an open-and-closed circuit counts
            unhealthy += circuit == 2
            data += [
                Datum("Keys", snap.keys, "Count", dims, now),
                Datum("KeyUtilization", 100.0 * snap.keys / snap.max_keys if snap.max_keys else 0.0,
                      "Percent", dims, now),
                Datum("SessionsInUse", snap.sessions_in_use, "Count", dims, now),
                Datum("SessionUtilization",
                      100.0 * snap.sessions_in_use / snap.pool_size if snap.pool_size else 0.0, "Percent", dims, now),
                Datum("CircuitState", circuit, "None", dims, now),
            ]
        by_code, seconds, count = self.requests.calls.totals()
        requests = sum(by_code.values())
        errors = sum(n for code, n in by_code.items() if code in SERVER_ERROR_CODES)
        dispatcher = self.router.dispatcher
        region = (("Region", self.region),)
        new_requests = self._delta("requests", requests)
        new_seconds, new_count = self._delta("seconds", seconds), self._delta("count", count)
        data += [
            Datum("Requests", new_requests, "Count", region, now),
            Datum("ServerErrors", self._delta("errors", errors), "Count", region, now),
            Datum("Failovers", self._delta("failovers", dispatcher.failovers), "Count", region, now),
            Datum("Retries", self._delta("retries", dispatcher.budget.retries), "Count", region, now),
            Datum("RetryBudgetRefusals", self._delta("refused", dispatcher.budget.refused), "Count", region, now),
            Datum("UnderReplicatedKeys", under_replicated_keys(self.router), "Count", region, now),
            Datum("UnhealthyClusters", unhealthy, "Count", region, now),
        ]
        if new_count:
            data.append(Datum("Latency", 1000.0 * new_seconds / new_count, "Milliseconds", region, now))
        if self.tls is not None:
            expires = min(cert.not_after.timestamp() for cert in self.tls().chain)
            data.append(Datum("TlsCertificateDaysLeft", (expires - now) / 86400, "None", region, now))
        return data


# -- alarms -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloudHsmTarget:
    """A gateway cluster backed by an AWS CloudHSM cluster, with the HSMs it has now."""

    name: str
    """The gateway's name for the cluster (``[[clusters]] name``)."""
    cluster_id: str
    hsm_ids: tuple[str, ...]


def _alarm(name: str, description: str, *, threshold: float, comparison: str, evaluation_periods: int,
           datapoints: int, actions: Sequence[str], treat_missing: str = "notBreaching",
           **metric: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "AlarmName": name,
        "AlarmDescription": description,
        "Threshold": float(threshold),
        "ComparisonOperator": comparison,
        "EvaluationPeriods": evaluation_periods,
        "DatapointsToAlarm": datapoints,
        "TreatMissingData": treat_missing,
        "ActionsEnabled": bool(actions),
        "AlarmActions": list(actions),
        "OKActions": list(actions),
        **metric,
    }
    return spec


def _per_hsm(metric: str, target: CloudHsmTarget, stat: str, prefix: str, period: int = 300) -> list[dict[str, Any]]:
    return [
        {
            "Id": f"{prefix}{i}",
            "ReturnData": False,
            "MetricStat": {
                "Metric": {
                    "Namespace": CLOUDHSM_NAMESPACE,
                    "MetricName": metric,
                    "Dimensions": [{"Name": "ClusterId", "Value": target.cluster_id},
                                   {"Name": "HsmId", "Value": hsm}],
                },
                "Period": period,
                "Stat": stat,
            },
        }
        for i, hsm in enumerate(target.hsm_ids)
    ]


def alarm_specs(
    clusters: Sequence[tuple[str, str]],
    regions: Sequence[str],
    *,
    namespace: str = DEFAULT_NAMESPACE,
    prefix: str = "hsmgw",
    actions: Sequence[str] = (),
    cloudhsm: Sequence[CloudHsmTarget] = (),
    threshold_percent: float = 80.0,
    tls: bool = True,
) -> list[dict[str, Any]]:
    """``PutMetricAlarm`` arguments for every alarm (pure: ``install_alarms`` sends them).

    ``clusters`` are (name, region) of the gateway's clusters; ``regions`` the
    regions gateways publish from. For each ``cloudhsm`` target, alarms on the
    ``AWS/CloudHSM`` metrics of its HSMs (re-run after an HSM is replaced: the
    HSM ids change). ``tls``: the gateways serve TLS, so each region gets the
    certificate expiry alarm (a plaintext development gateway publishes no expiry).
    """
    see = "Runbook: docs/operations.md"
    specs: list[dict[str, Any]] = []
    pct = f"{threshold_percent:g} %"
    for name, region in clusters:
        dims = [{"Name": "Cluster", "Value": name}]
        specs.append(_alarm(
            f"{prefix}-{name}-keys-near-limit",
            f"Cluster {name} ({region}) holds >= {pct} of its max_keys. {see}#keys-near-limit",
            threshold=threshold_percent, comparison="GreaterThanOrEqualToThreshold", evaluation_periods=1,
            datapoints=1, actions=actions, Namespace=namespace, MetricName="KeyUtilization", Dimensions=dims,
            Statistic="Maximum", Period=300,
        ))
        specs.append(_alarm(
            f"{prefix}-{name}-sessions-near-limit",
            f"Cluster {name} ({region}): >= {pct} of a gateway's pooled sessions busy in 3 of 5 minutes. "
            f"{see}#sessions-near-limit",
            threshold=threshold_percent, comparison="GreaterThanOrEqualToThreshold", evaluation_periods=5,
            datapoints=3, actions=actions, Namespace=namespace, MetricName="SessionUtilization", Dimensions=dims,
            Statistic="Maximum", Period=60,
        ))
        specs.append(_alarm(
            f"{prefix}-{name}-unhealthy",
            f"Cluster {name} ({region}): a gateway's circuit to it is open (2 of 2 minutes). {see}#cluster-unhealthy",
            threshold=2, comparison="GreaterThanOrEqualToThreshold", evaluation_periods=2, datapoints=2,
            actions=actions, Namespace=namespace, MetricName="CircuitState", Dimensions=dims,
            Statistic="Maximum", Period=60,
        ))
    for region in regions:
        dims = [{"Name": "Region", "Value": region}]
        specs.append(_alarm(
            f"{prefix}-{region}-under-replicated-keys",
            f"Gateways in {region} hold keys with fewer copies than their policy for 15 minutes "
            f"(replicas out of sync). {see}#under-replicated-keys",
            threshold=0, comparison="GreaterThanThreshold", evaluation_periods=3, datapoints=3, actions=actions,
            Namespace=namespace, MetricName="UnderReplicatedKeys", Dimensions=dims, Statistic="Maximum", Period=300,
        ))
        specs.append(_alarm(
            f"{prefix}-{region}-retry-budget-spent",
            f"Gateways in {region} refused retries (retry budget spent) in 3 of 5 minutes: clusters are failing "
            f"faster than retries can hide. {see}#retry-budget-spent",
            threshold=0, comparison="GreaterThanThreshold", evaluation_periods=5, datapoints=3, actions=actions,
            Namespace=namespace, MetricName="RetryBudgetRefusals", Dimensions=dims, Statistic="Sum", Period=60,
        ))
        if not tls:
            continue
        specs.append(_alarm(
            f"{prefix}-{region}-tls-certificate-expiring",
            f"A gateway in {region} serves a TLS certificate that expires within {EXPIRY_WARNING.days} days, or "
            f"has expired (every client then fails the handshake). {see}#tls-certificate-expiring",
            threshold=EXPIRY_WARNING.days, comparison="LessThanThreshold", evaluation_periods=1, datapoints=1,
            actions=actions, Namespace=namespace, MetricName="TlsCertificateDaysLeft", Dimensions=dims,
            Statistic="Minimum", Period=300,
        ))
    for target in cloudhsm:
        if not target.hsm_ids:
            log.warning("cloudhsm %s (%s) has no HSMs: no HSM alarms for it", target.cluster_id, target.name)
            continue
        ids = ",".join(f"h{i}" for i in range(len(target.hsm_ids)))
        specs.append(_alarm(
            f"{prefix}-{target.name}-hsm-unhealthy",
            f"An HSM of CloudHSM cluster {target.cluster_id} ({target.name}) reports HsmUnhealthy. "
            f"{see}#hsm-unhealthy",
            threshold=1, comparison="GreaterThanOrEqualToThreshold", evaluation_periods=1, datapoints=1,
            actions=actions,
            Metrics=[*_per_hsm("HsmUnhealthy", target, "Maximum", "h", period=60),
                     {"Id": "unhealthy", "Expression": f"MAX([{ids}])", "Label": "HsmUnhealthy", "ReturnData": True}],
        ))
        if len(target.hsm_ids) >= 2:
            specs.append(_alarm(
                f"{prefix}-{target.name}-hsm-key-sync",
                f"The HSMs of CloudHSM cluster {target.cluster_id} ({target.name}) hold different numbers of token "
                f"keys for 15 minutes: keys are not synchronising. {see}#hsm-key-sync",
                threshold=0, comparison="GreaterThanThreshold", evaluation_periods=3, datapoints=3,
                actions=actions,
                Metrics=[*_per_hsm("HsmKeysTokenOccupied", target, "Maximum", "h"),
                         {"Id": "spread", "Expression": f"MAX([{ids}]) - MIN([{ids}])",
                          "Label": "token key count spread between HSMs", "ReturnData": True}],
            ))
        users = ",".join(f"u{i}" for i in range(len(target.hsm_ids)))
        limits = ",".join(f"m{i}" for i in range(len(target.hsm_ids)))
        specs.append(_alarm(
            f"{prefix}-{target.name}-hsm-users-near-limit",
            f"CloudHSM cluster {target.cluster_id} ({target.name}) has used >= {pct} of its HSM users. "
            f"{see}#hsm-users-near-limit",
            threshold=threshold_percent, comparison="GreaterThanOrEqualToThreshold", evaluation_periods=1,
            datapoints=1, actions=actions,
            Metrics=[*_per_hsm("HsmUsersAvailable", target, "Minimum", "u"),
                     *_per_hsm("HsmUsersMax", target, "Maximum", "m"),
                     {"Id": "used", "Expression": f"100 * (1 - MIN([{users}]) / MAX([{limits}]))",
                      "Label": "HSM users used (%)", "ReturnData": True}],
        ))
    return specs


def install_alarms(client: Any, specs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Create or replace every alarm; returns their names."""
    names = []
    for spec in specs:
        client.put_metric_alarm(**spec)
        names.append(str(spec["AlarmName"]))
    return names


_UNORDERED = frozenset({"AlarmActions", "OKActions", "Dimensions"})
"""Lists CloudWatch may return in another order than they were given."""


def _same(want: Any, have: Any, key: str = "") -> bool:
    """Whether an installed alarm's ``have`` says what ``want`` (from its spec) says; fields
    CloudWatch adds of its own (ARNs, states, timestamps) are not looked at."""
    if key == "ReturnData":  # absent means true
        return bool(want) == (True if have is None else bool(have))
    if key == "Metrics":  # queries, matched by their ids
        if not isinstance(have, list):
            return False
        by_id = {query.get("Id"): query for query in have}
        return len(by_id) == len(want) and all(_same(query, by_id.get(query["Id"])) for query in want)
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(_same(value, have.get(name), name) for name, value in want.items())
    if isinstance(want, list | tuple):
        if not isinstance(have, list | tuple) or len(have) != len(want):
            return False
        if key in _UNORDERED:
            return sorted(map(repr, map(_plain, want))) == sorted(map(repr, map(_plain, have)))
        return all(_same(w, h) for w, h in zip(want, have, strict=True))
    if isinstance(want, float):
        return isinstance(have, int | float) and float(have) == want
    return bool(want == have)


def _plain(value: Any) -> Any:
    """A comparable form of a list element (a dimension is a dict)."""
    return sorted(value.items()) if isinstance(value, Mapping) else value


def alarm_drift(spec: Mapping[str, Any], alarm: Mapping[str, Any]) -> list[str]:
    """The fields of ``spec`` (``PutMetricAlarm`` arguments) that the installed ``alarm``
    (as ``DescribeAlarms`` returns it) does not match; empty when it is as installed."""
    return [name for name, value in spec.items() if not _same(value, alarm.get(name), name)]


def installed_alarms(client: Any, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The alarms of these names that exist, by name (``DescribeAlarms``, 100 names a request)."""
    found: dict[str, dict[str, Any]] = {}
    pages = client.get_paginator("describe_alarms")
    for start in range(0, len(names), 100):
        for page in pages.paginate(AlarmNames=list(names[start:start + 100]), AlarmTypes=["MetricAlarm"]):
            for alarm in page.get("MetricAlarms", []):
                found[alarm["AlarmName"]] = alarm
    return found


def make_client(service: str, region: str, endpoint_url: str | None = None) -> Any:
    """A boto3 client with short timeouts: monitoring must never stall the gateway for long."""
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client(service, region_name=region, endpoint_url=endpoint_url or None, config=config)


__all__ = [
    "CLOUDHSM_NAMESPACE",
    "CloudHsmTarget",
    "DEFAULT_NAMESPACE",
    "Datum",
    "GatewaySampler",
    "MAX_DATUMS_PER_CALL",
    "Publisher",
    "SERVER_ERROR_CODES",
    "alarm_drift",
    "alarm_specs",
    "install_alarms",
    "installed_alarms",
    "make_client",
]
