"""The CloudWatch publisher's promises: it never blocks, it drops (and counts) what does not
fit, and what it sends is what CloudWatch (moto_server) stores."""

from __future__ import annotations

import threading
import time
import uuid

from prometheus_client import CollectorRegistry

from gateway.cloudwatch import Datum, Publisher, make_client
from tests.moto import free_port
from tests.observability.conftest import MotoProcess, boto


def _sum(cw: object, namespace: str, name: str) -> tuple[float, float]:
    now = time.time()
    points = cw.get_metric_statistics(  # type: ignore[attr-defined]
        Namespace=namespace, MetricName=name, Dimensions=[{"Name": "Cluster", "Value": "c1"}],
        StartTime=now - 600, EndTime=now + 60, Period=3600, Statistics=["Sum", "SampleCount"],
    )["Datapoints"]
    return sum(p["Sum"] for p in points), sum(p["SampleCount"] for p in points)


def test_a_full_queue_drops_and_counts_instead_of_waiting(moto_process: MotoProcess) -> None:
    registry = CollectorRegistry()
    namespace = f"T{uuid.uuid4().hex[:8]}"
    publisher = Publisher(make_client("cloudwatch", "us-east-1", moto_process.endpoint), namespace,
                          max_queue=5, batch_size=2, registry=registry)
    dims = (("Cluster", "c1"),)
    started = time.monotonic()
    accepted = [publisher.offer(Datum("Keys", float(v), "Count", dims)) for v in range(1, 9)]
    assert time.monotonic() - started < 0.1  # no waiting, even with nobody draining
    assert accepted == [True] * 5 + [False] * 3
    assert registry.get_sample_value("hsmgw_cloudwatch_datums_dropped_total") == 3
    assert registry.get_sample_value("hsmgw_cloudwatch_queue_depth") == 5

    assert publisher.flush() == 5  # three PutMetricData calls of at most 2
    assert registry.get_sample_value("hsmgw_cloudwatch_datums_sent_total") == 5
    assert registry.get_sample_value("hsmgw_cloudwatch_queue_depth") == 0
    cw = boto("cloudwatch", moto_process.endpoint)
    assert _sum(cw, namespace, "Keys") == (1 + 2 + 3 + 4 + 5, 5)  # the first five, each once


def test_an_unreachable_cloudwatch_costs_datums_not_the_caller() -> None:
    registry = CollectorRegistry()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    publisher = Publisher(make_client("cloudwatch", "us-east-1", dead), "T", registry=registry)
    for v in range(3):
        assert publisher.offer(Datum("Keys", v))
    assert publisher.flush() == 0  # logged and counted, never raised
    assert registry.get_sample_value("hsmgw_cloudwatch_errors_total") == 1
    assert registry.get_sample_value("hsmgw_cloudwatch_datums_dropped_total") == 3
    assert registry.get_sample_value("hsmgw_cloudwatch_queue_depth") == 0  # not requeued: memory stays bounded


def test_the_thread_samples_every_interval_and_stops_with_a_last_sample(moto_process: MotoProcess) -> None:
    namespace = f"T{uuid.uuid4().hex[:8]}"
    publisher = Publisher(make_client("cloudwatch", "us-east-1", moto_process.endpoint), namespace)
    calls = []
    lock = threading.Lock()

    def sampler() -> list[Datum]:
        with lock:
            calls.append(time.monotonic())
        return [Datum("Keys", 1.0, "Count", (("Cluster", "c1"),))]

    publisher.start(sampler, 0.2)
    time.sleep(0.9)
    publisher.stop(sampler, timeout=5)
    total, count = _sum(boto("cloudwatch", moto_process.endpoint), namespace, "Keys")
    assert 4 <= len(calls) <= 7  # about one per 0.2 s, plus the last one
    assert count == len(calls) and total == len(calls)
