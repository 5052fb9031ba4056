"""The per-call series: kept as plain tallies, read on scrape, exposed as prometheus_client would."""

from __future__ import annotations

import re
import threading
import types
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, CallCollector, ObservabilityInterceptor, RequestMetrics

SERVICE, RPC = "hsmgw.v1.CryptoService", "Sign"
# Bounds themselves (a value equal to a bound is in that bucket), between them, 0 and past the last.
SECONDS = [0.0, 0.0005, 0.0007, 0.001, 0.0049, 0.25, 0.2500001, 10.0, 12.5, *LATENCY_BUCKETS]
OUTCOMES = [("OK", "use1-a"), ("OK", "use1-b"), ("NOT_FOUND", ""), ("OK", "use1-a"), ("DEADLINE_EXCEEDED", "use1-b")]


def _exposition(registry: CollectorRegistry) -> str:
    """The text format with the creation times (which differ by when each was made) masked."""
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


def test_the_series_read_as_prometheus_client_s_own_types_would() -> None:
    ours = CollectorRegistry()
    calls = CallCollector()
    ours.register(calls)
    theirs = CollectorRegistry()
    requests = Counter("hsmgw_requests", "RPCs finished, by service, method, status code and cluster.",
                       ["service", "rpc", "code", "cluster"], registry=theirs)
    latency = Histogram("hsmgw_request_duration_seconds", "Time from call start to its status.",
                        ["service", "rpc"], buckets=LATENCY_BUCKETS, registry=theirs)
    in_flight = Gauge("hsmgw_requests_in_flight", "RPCs being served now.", registry=theirs)
    assert _exposition(ours) == _exposition(theirs)  # nothing served yet

    for rpc in (RPC, "Verify"):
        tally = calls.tally(SERVICE, rpc)
        for i, seconds in enumerate(SECONDS):
            code, cluster = OUTCOMES[i % len(OUTCOMES)]
            tally.finish(seconds, code, cluster)
            requests.labels(SERVICE, rpc, code, cluster).inc()
            latency.labels(SERVICE, rpc).observe(seconds)
    calls.active.update({1, 2})
    in_flight.set(2)
    assert _exposition(ours) == _exposition(theirs)


def test_threads_finishing_at_once_lose_no_count() -> None:
    calls = CallCollector()
    tally = calls.tally(SERVICE, RPC)
    assert calls.tally(SERVICE, RPC) is tally  # one per RPC, however often asked
    def finish_many() -> None:
        for _ in range(5000):
            tally.finish(0.001, "OK", "c")

    threads = [threading.Thread(target=finish_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_code, seconds, timed = calls.totals()
    assert by_code == {"OK": 40000} and timed == 40000
    assert seconds == pytest.approx(40.0)


class _Context:
    def __init__(self) -> None:
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.code_: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float:
        return 5.0

    def code(self) -> grpc.StatusCode | None:
        return self.code_

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.trailing

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata


def _served(metrics: RequestMetrics, behavior: Any) -> Any:
    handler = grpc.unary_unary_rpc_method_handler(behavior)
    details = types.SimpleNamespace(method=f"/{SERVICE}/{RPC}", invocation_metadata=())
    wrapped = ObservabilityInterceptor(metrics).intercept_service(lambda _: handler, details)
    assert wrapped is not None
    return wrapped.unary_unary


def test_a_call_is_in_flight_until_it_ends_and_then_counted_once() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    running, release = threading.Event(), threading.Event()

    def slow(_request: Any, _context: Any) -> Any:
        running.set()
        release.wait(10)
        return types.SimpleNamespace(cluster="use1-a")

    call = _served(metrics, slow)
    thread = threading.Thread(target=call, args=(None, _Context()))
    thread.start()
    assert running.wait(10)
    assert registry.get_sample_value("hsmgw_requests_in_flight") == 1
    assert registry.get_sample_value("hsmgw_requests_total", {"service": SERVICE, "rpc": RPC, "code": "OK",
                                                              "cluster": "use1-a"}) is None
    release.set()
    thread.join(10)
    assert registry.get_sample_value("hsmgw_requests_in_flight") == 0
    assert registry.get_sample_value("hsmgw_requests_total", {"service": SERVICE, "rpc": RPC, "code": "OK",
                                                              "cluster": "use1-a"}) == 1
    assert registry.get_sample_value("hsmgw_request_duration_seconds_count", {"service": SERVICE, "rpc": RPC}) == 1


def test_a_call_that_raises_leaves_the_in_flight_count_and_is_counted_as_unknown() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)

    def broken(_request: Any, _context: Any) -> Any:
        raise RuntimeError("a bug")

    call = _served(metrics, broken)
    with pytest.raises(RuntimeError):
        call(None, _Context())
    assert registry.get_sample_value("hsmgw_requests_in_flight") == 0
    assert registry.get_sample_value("hsmgw_requests_total", {"service": SERVICE, "rpc": RPC, "code": "UNKNOWN",
                                                              "cluster": ""}) == 1
    assert registry.get_sample_value("hsmgw_errors_total", {"reason": "UNKNOWN", "error_class": "RuntimeError",
                                                            "cluster": ""}) == 1
