"""Prometheus metrics: what the gateway serves, and the state of every cluster.

Two kinds of series live in one ``CollectorRegistry`` per gateway (never the
global one, so two gateways in one process — tests — do not share counts):

- **per request**, recorded by :class:`ObservabilityInterceptor` (the outermost
  interceptor, so refused calls count too): requests by service, RPC, status
  code and cluster; a latency histogram; errors by ``ErrorInfo`` reason and
  error class; PKCS #11 errors by CKR name; BatchSign items by code; audit records
  that could not be written, by event.
- **read on scrape** by :class:`RouterCollector`: pool sessions, key counts
  against ``max_keys``, circuit state, drained clusters and failed-over
  regions, failovers, retries and retry-budget refusals, under-replicated keys.

The router must not import the gateway, so PKCS #11 errors are counted at the
edge: the servicer turns a ``RouterError`` into a status inside its
``except`` block, so the exception grpc raises for the abort chains back
(``__context__``/``__cause__``) to the ``RouterError`` and, where the router
translated one, to the python-pkcs11 exception. Errors the router absorbed
(a retry or failover that then succeeded) never reach the edge: they show as
``hsmgw_failovers_total`` and ``hsmgw_retries_total``. docs/operations.md lists
every series and what to do when it moves.

The same interceptor sets the request id (``gateway.logs``) that every log
line of the call carries, and returns it as ``x-request-id`` trailing metadata —
with the status, so it costs no extra message (initial metadata would be a
separate send per call: ~40 µs of a ~450 µs unary call on one core).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.rpc import status_pb2
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import logs
from gateway.status import error_info, past_deadline
from gateway.tls import TlsMaterial
from router.health import CircuitState
from router.model import KeyState
from router.pkcs11._errors import ckr_name
from router.placement.store import StoreError
from router.reconcile import ReconcileReport
from router.router import Router

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: a SoftHSM ECDSA sign is ~0.15 ms, an RSA-2048 ~1.5 ms, a key creation 15-200 ms."""

CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
"""``hsmgw_circuit_state``: 0 closed (serving), 1 half-open (on trial), 2 open (skipped)."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"

def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@dataclass(frozen=True)
class Failure:
    """What the edge can tell about a failed call."""

    reason: str
    """The ``ErrorInfo`` reason, else the status code name."""
    error_class: str
    """The class of the error that caused it (``ClusterDown``, ``PermissionDenied``…), or ``""``."""
    cluster: str
    ckr: str
    """The PKCS #11 return value behind it, or ``""``."""
    store_error: bool


def describe_failure(code: grpc.StatusCode, trailing: Sequence[tuple[str, Any]] | None,
                     exc: BaseException | None) -> Failure:
    reason, cluster = code.name, ""
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # noqa: BLE001 - a malformed detail must not fail the call
                break
            info = error_info(status)
            if info is not None:
                reason = info.reason or reason
                cluster = info.metadata.get("cluster", "")
    error_class = ckr = ""
    store_error = False
    for link in _chain(exc):
        kind = type(link)
        if not error_class and kind is not Exception:  # grpc's abort raises a bare Exception
            error_class = kind.__name__
        if not ckr and kind.__module__.startswith("pkcs11"):
            ckr = ckr_name(kind)
        if isinstance(link, StoreError):
            store_error = True
    return Failure(reason, error_class, cluster, ckr, store_error)


# -- cluster state, shared with the CloudWatch publisher -------------------------------------


@dataclass(frozen=True)
class ClusterSnapshot:
    name: str
    region: str
    keys: int
    max_keys: int
    pool_size: int
    sessions_open: int
    sessions_in_use: int
    calls_hung: int
    """Calls past the cluster's call_timeout (see ``HsmBackend.hung_calls``)."""
    circuit: int
    """0 closed, 1 half-open, 2 open."""
    draining: bool


def cluster_snapshots(router: Router) -> list[ClusterSnapshot]:
    counts = router.key_counts()
    drained = router.dispatcher.drained
    snapshots = []
    for name, backend in sorted(router.backends.items()):
        stats = backend.stats()
        snapshots.append(
            ClusterSnapshot(
                name=name,
                region=backend.spec.region,
                keys=counts.get(name, 0),
                max_keys=backend.spec.max_keys,
                pool_size=stats.size,
                sessions_open=stats.open,
                sessions_in_use=stats.in_use,
                calls_hung=stats.hung,
                circuit=CIRCUIT_VALUES[router.breakers[name].state],
                draining=name in drained,
            )
        )
    return snapshots


def under_replicated_keys(router: Router) -> int:
    """Keys acknowledged with fewer copies than their policy asks (the repairer's backlog).

    Counted in the router's placement cache: the store would cost a full scan (a
    DynamoDB table scan per gateway) on every scrape.
    """
    return router.cached_keys(KeyState.UNDER_REPLICATED)


class RouterCollector(Collector):
    """Reads the router's state when Prometheus scrapes (nothing on the hot path)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self) -> Iterator[Any]:
        labels = ["cluster", "region"]
        in_use = GaugeMetricFamily("hsmgw_pool_sessions_in_use", "PKCS #11 sessions checked out by requests now.",
                                   labels=labels)
        opened = GaugeMetricFamily("hsmgw_pool_sessions_open", "PKCS #11 sessions the pool holds open.",
                                   labels=labels)
        size = GaugeMetricFamily("hsmgw_pool_size", "Sessions the pool may open (cluster pool_size).", labels=labels)
        hung = GaugeMetricFamily("hsmgw_pool_calls_hung",
                                 "PKCS #11 calls running past the cluster's call_timeout (an HSM not answering).",
                                 labels=labels)
        keys = GaugeMetricFamily("hsmgw_keys", "Keys placed on the cluster (primary or replica copies).",
                                 labels=labels)
        max_keys = GaugeMetricFamily("hsmgw_max_keys", "The cluster's configured key limit (max_keys).",
                                     labels=labels)
        circuit = GaugeMetricFamily("hsmgw_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                                    labels=labels)
        draining = GaugeMetricFamily("hsmgw_cluster_draining", "1 when an operator drained the cluster.",
                                     labels=labels)
        for snap in cluster_snapshots(self.router):
            values = [snap.name, snap.region]
            in_use.add_metric(values, snap.sessions_in_use)
            opened.add_metric(values, snap.sessions_open)
            size.add_metric(values, snap.pool_size)
            hung.add_metric(values, snap.calls_hung)
            keys.add_metric(values, snap.keys)
            max_keys.add_metric(values, snap.max_keys)
            circuit.add_metric(values, snap.circuit)
            draining.add_metric(values, 1 if snap.draining else 0)
        yield from (in_use, opened, size, hung, keys, max_keys, circuit, draining)

        failed_over = GaugeMetricFamily("hsmgw_region_failed_over", "1 when an operator failed the region over.",
                                        labels=["region"])
        for region in sorted(self.router.topology.regions):
            failed_over.add_metric([region], 1 if region in self.router.dispatcher.failed_over else 0)
        yield failed_over

        dispatcher = self.router.dispatcher
        yield CounterMetricFamily("hsmgw_failovers", "Requests served by a cluster other than their first choice.",
                                  value=dispatcher.failovers)
        yield CounterMetricFamily("hsmgw_retries", "Extra attempts (same or next cluster) taken from the retry budget.",
                                  value=dispatcher.budget.retries)
        yield CounterMetricFamily("hsmgw_open_circuit_calls",
                                  "Requests sent to a cluster whose circuit was open, as every candidate's was.",
                                  value=dispatcher.panics)
        yield CounterMetricFamily("hsmgw_retry_budget_refusals",
                                  "Retries refused because the retry budget was spent.",
                                  value=dispatcher.budget.refused)
        yield GaugeMetricFamily("hsmgw_keys_under_replicated",
                                "Keys with fewer copies than their replication policy asks.",
                                value=under_replicated_keys(self.router))
        yield GaugeMetricFamily("hsmgw_placement_cache_keys", "Placements in this process's cache.",
                                value=self.router.cached_keys())
        yield CounterMetricFamily("hsmgw_placement_cache_reloads",
                                  "Full reloads of the placement cache (a store scan each), the one at start included.",
                                  value=self.router.reloads)
        yield CounterMetricFamily("hsmgw_placement_cache_keys_reread",
                                  "Placements re-read from the store because its change log named them.",
                                  value=self.router.keys_reread)


# -- per-request metrics ----------------------------------------------------------------------


_LE = [*(floatToGoString(bound) for bound in LATENCY_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]
"""The histogram's ``le`` labels, written as prometheus_client writes them."""


class Tally:
    """One RPC's finished calls by (code, cluster), and their latency.

    Every call updates these, so they are plain numbers under one lock, read on scrape
    by :class:`CallCollector`. prometheus_client's counter, gauge and histogram took a
    lock and three to five Python calls for each of the five updates a call made: ~4 %
    of unary ECDSA throughput through the gateway, of which this keeps about half.
    """

    __slots__ = ("service", "rpc", "created", "lock", "codes", "buckets", "seconds")

    def __init__(self, service: str, rpc: str) -> None:
        self.service, self.rpc = service, rpc
        self.created = time.time()
        self.lock = threading.Lock()
        self.codes: dict[tuple[str, str], list[float]] = {}  # (code, cluster) -> [count, created]
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # not cumulative; the last is +Inf
        self.seconds = 0.0

    def finish(self, seconds: float, code: str, cluster: str) -> None:
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds, as `le` means
        with self.lock:
            self.buckets[bucket] += 1
            self.seconds += seconds
            counted = self.codes.get((code, cluster))
            if counted is None:
                self.codes[(code, cluster)] = [1, time.time()]
            else:
                counted[0] += 1

    def read(self) -> tuple[list[tuple[str, str, float, float]], list[int], float]:
        """([(code, cluster, count, created)], buckets, seconds), consistent with each other."""
        with self.lock:
            codes = [(code, cluster, count, created) for (code, cluster), (count, created) in self.codes.items()]
            return codes, list(self.buckets), self.seconds


class CallCollector(Collector):
    """``hsmgw_requests_total``, ``hsmgw_request_duration_seconds`` and ``hsmgw_requests_in_flight``
    from the tallies, exposed as prometheus_client's own types would be (``_created`` included)."""

    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._lock = threading.Lock()
        self.active: set[int] = set()
        """``id`` of each call being served (set.add and discard need no lock of their own)."""

    def tally(self, service: str, rpc: str) -> Tally:
        with self._lock:
            return self._tallies.setdefault((service, rpc), Tally(service, rpc))

    def totals(self) -> tuple[dict[str, float], float, int]:
        """(calls finished by code, seconds, calls timed): for the CloudWatch publisher."""
        by_code: dict[str, float] = {}
        seconds, timed = 0.0, 0
        for tally in self._all():
            codes, buckets, spent = tally.read()
            for code, _cluster, count, _created in codes:
                by_code[code] = by_code.get(code, 0.0) + count
            seconds += spent
            timed += sum(buckets)
        return by_code, seconds, timed

    def _all(self) -> list[Tally]:
        with self._lock:
            return list(self._tallies.values())

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("hsmgw_requests", "RPCs finished, by service, method, status code and cluster.",
                                       labels=["service", "rpc", "code", "cluster"])
        latency = HistogramMetricFamily("hsmgw_request_duration_seconds", "Time from call start to its status.",
                                        labels=["service", "rpc"])
        for tally in self._all():
            codes, buckets, seconds = tally.read()
            for code, cluster, count, created in codes:
                requests.add_metric([tally.service, tally.rpc, code, cluster], count, created=created)
            cumulative = list(itertools.accumulate(buckets))
            latency.add_metric([tally.service, tally.rpc], list(zip(_LE, cumulative, strict=True)), seconds)
            latency.add_sample("hsmgw_request_duration_seconds_created", {"service": tally.service, "rpc": tally.rpc},
                               tally.created)
        yield requests
        yield latency
        yield GaugeMetricFamily("hsmgw_requests_in_flight", "RPCs being served now.", value=len(self.active))


class RequestMetrics:
    """The per-request series, in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = CallCollector()
        registry.register(self.calls)
        self.errors = Counter("hsmgw_errors", "Failed RPCs by ErrorInfo reason, error class and cluster.",
                              ["reason", "error_class", "cluster"], registry=registry)
        self.pkcs11_errors = Counter("hsmgw_pkcs11_errors",
                                     "PKCS #11 errors behind failed RPCs and opened circuits, by CKR name.",
                                     ["ckr", "cluster"], registry=registry)
        self.store_errors = Counter("hsmgw_store_errors", "RPCs failed because the placement store was unreachable.",
                                    registry=registry)
        self.batch_items = Counter("hsmgw_batch_items", "BatchSign items, by their own status code and cluster.",
                                   ["code", "cluster"], registry=registry)
        self.circuit_changes = Counter("hsmgw_circuit_changes", "Circuit breaker state changes, by the new state.",
                                       ["cluster", "state"], registry=registry)
        self.audit_write_failures = Counter(
            "hsmgw_audit_write_failures",
            "Audit events this process could not append to the audit log (nothing of them is in the file; the next "
            "record it writes notes them as unwritten), by event.", ["event"], registry=registry)
        self.audit_sync_failures = Counter(
            "hsmgw_audit_sync_failures",
            "Audit records this process wrote to the audit log whose fsync then failed (in the file, not noted as "
            "unwritten, but may not survive a crash), by event.", ["event"], registry=registry)


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, rpc = full_method.lstrip("/").rpartition("/")
    return service, rpc


class ObservabilityInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Outermost interceptor: request id for the logs, then counts and times the call."""

    def __init__(self, metrics: RequestMetrics, *, clock: Callable[[], float] = time.perf_counter,
                 echo_request_id: bool = True) -> None:
        self.metrics = metrics
        self._clock = clock
        self._echo = echo_request_id
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._active = metrics.calls.active

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, *_split_method(details.method))
        self._cache[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, service: str, rpc: str) -> grpc.RpcMethodHandler:
        tally = self.metrics.calls.tally(service, rpc)
        args = (handler.request_deserializer, handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._streaming(handler.stream_stream, tally), *args)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, tally), *args)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._streaming(handler.unary_stream, tally), *args)
        return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, tally), *args)

    # -- per call --

    def _begin(self, context: grpc.ServicerContext) -> tuple[Any, str]:
        offered = None
        for key, value in context.invocation_metadata() or ():
            if key == logs.REQUEST_ID_HEADER and isinstance(value, str):
                offered = value
                break
        request_id = logs.accept_request_id(offered)
        token = logs.set_request_id(request_id)
        self._active.add(id(context))
        return token, request_id

    def _end(self, context: grpc.ServicerContext, begun: tuple[Any, str]) -> None:
        token, request_id = begun
        self._active.discard(id(context))
        if self._echo:
            # Runs before grpc sends the status (an abort's too), so the id rides with it.
            try:
                context.set_trailing_metadata(
                    (*(context.trailing_metadata() or ()), (logs.REQUEST_ID_HEADER, request_id)))
            except (ValueError, RuntimeError):  # the call is over: the id is in the logs anyway
                pass
        try:
            logs.reset_request_id(token)
        except ValueError:  # a stream closed from another thread's context
            pass

    def _record(self, tally: Tally, context: grpc.ServicerContext, started: float,
                response: Any, exc: BaseException | None, left: grpc.StatusCode | None = None) -> None:
        """Count a finished call; ``left``: how the client of a stream that ended without a status
        of its servicer's had left it (``_left``), None if it had not."""
        m = self.metrics
        seconds = self._clock() - started
        code = context.code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK
        if code is grpc.StatusCode.OK:
            # An answer no one got counts as what its client saw: past its deadline, or a call
            # its client cancelled (a batch that stopped for that: items CANCELLED are such items
            # only; a stream it left). Counted as errors too, with the cluster that answered late:
            # that is the slow one.
            late = left is grpc.StatusCode.DEADLINE_EXCEEDED or past_deadline(context)
            cluster = getattr(response, "cluster", "") if response is not None else ""
            cluster = cluster if isinstance(cluster, str) else ""
            if tally.rpc == "BatchSign" and response is not None:
                if self._batch_items(response, late) and not late:
                    left = grpc.StatusCode.CANCELLED
            if left is grpc.StatusCode.CANCELLED and not late:
                tally.finish(seconds, "CANCELLED", "")
                m.errors.labels("CANCELLED", "", "").inc()
                return
            if late:
                tally.finish(seconds, "DEADLINE_EXCEEDED", cluster)
                m.errors.labels("DEADLINE_EXCEEDED", "DeadlineExceeded", cluster).inc()
                return
            tally.finish(seconds, "OK", cluster)
            return
        failure = describe_failure(code, context.trailing_metadata(), exc)
        tally.finish(seconds, code.name, failure.cluster)
        m.errors.labels(failure.reason, failure.error_class, failure.cluster).inc()
        if failure.ckr:
            m.pkcs11_errors.labels(failure.ckr, failure.cluster).inc()
        if failure.store_error:
            m.store_errors.inc()

    def _batch_items(self, response: Any, late: bool = False) -> bool:
        """Counts a batch's items by status; whether some were left unsigned by a cancel. Those of
        a batch answered ``late`` (past its deadline: its caller got DEADLINE_EXCEEDED, and none of
        them) all count as DEADLINE_EXCEEDED, a signed one with the cluster that signed it late."""
        counts: dict[tuple[str, str], int] = {}
        for item in getattr(response, "responses", ()):
            if late:
                key = ("DEADLINE_EXCEEDED", item.response.cluster if item.code == 0 else "")
            elif item.code == 0:
                key = ("OK", item.response.cluster)
            else:
                status = _CODES.get(item.code)
                key = (status.name if status is not None else str(item.code), "")
            counts[key] = counts.get(key, 0) + 1
        for (code, cluster), n in counts.items():
            self.metrics.batch_items.labels(code, cluster).inc(n)
        return ("CANCELLED", "") in counts

    def _unary(self, behavior: Callable[..., Any], tally: Tally) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            begun = self._begin(context)
            started = self._clock()
            try:
                response = behavior(request, context)
            except BaseException as exc:
                self._record(tally, context, started, None, exc)
                raise
            finally:
                self._end(context, begun)
            self._record(tally, context, started, response, None)
            return response

        return call

    def _streaming(self, behavior: Callable[..., Any], tally: Tally) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            begun = self._begin(context)
            started = self._clock()
            span = context.time_remaining()
            # A stream whose client left (cancelled it, or its deadline passed) mostly ends as if
            # it were done: a Watch's iterator stops once the call is over, and SignStream returns
            # at its request iterator's error. Such an end is counted as the client saw it.
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the client went away; grpc closes the stream
                self._record(tally, context, started, None, None, _left(context, span, closed=True))
                raise
            except BaseException as exc:
                self._record(tally, context, started, None, exc)
                raise
            else:
                self._record(tally, context, started, None, None, _left(context, span))
            finally:
                self._end(context, begun)

        return call


STREAM_DEADLINE_SLACK = (0.25, 0.05)
"""A stream its client left counts as DEADLINE_EXCEEDED when it had at most 250 ms plus 5 % of its
deadline's span left by the gateway's clock. The client's deadline passes first: gRPC rounds the
timeout it sends up (to 10 ms for 1 to 10 s, 100 ms for 10 to 100 s: at most 1 %), and the gateway's
copy runs from when its gRPC core read the call's headers, which a busy host does later (a client
whose deadline passes cancels a 2 s stream ~10 ms early for the gateway on an idle loopback, over
100 ms early on a loaded one). A client that cancels in that last stretch is counted as its deadline."""


def _left(context: grpc.ServicerContext, span: float | None, *, closed: bool = False) -> grpc.StatusCode | None:
    """How the client left a stream that ended without a status of its servicer's: DEADLINE_EXCEEDED
    or CANCELLED; None when the client did not leave (the servicer ended it, an OK). ``span``: the
    time the deadline gave at the call's start; ``closed``: grpc closed the stream."""
    if context.code() is not None:
        return None
    if past_deadline(context):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if not closed and context.is_active():
        return None
    remaining = context.time_remaining()
    fixed, share = STREAM_DEADLINE_SLACK
    # Without a deadline grpc's time remaining is infinite (or None), and the client cancelled.
    if remaining is not None and span is not None and math.isfinite(span) and remaining <= fixed + share * span:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


_CODES = {code.value[0]: code for code in grpc.StatusCode}


# -- the /metrics endpoint ---------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # a scrape every 15 s is not news


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """``GET /metrics`` over plain HTTP on its own port; bound at construction, served after ``start``."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = split_listen(listen)
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._httpd = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


# -- TLS certificates -------------------------------------------------------------------------


class TlsCollector(Collector):
    """``hsmgw_tls_certificate_expiry_timestamp_seconds``: the not-after time of every certificate
    the gateway serves or trusts, read from the credentials on scrape (so a reload shows at once)."""

    def __init__(self, material: Callable[[], TlsMaterial]) -> None:
        self._material = material

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "hsmgw_tls_certificate_expiry_timestamp_seconds",
            "When a TLS certificate in use expires (Unix time): cert is server (the leaf served), intermediate "
            "(served with it) or client_ca (a certificate of server.tls.client_ca_file).",
            labels=["cert", "subject", "fingerprint"])
        material = self._material()
        certs = [("server" if number == 0 else "intermediate", cert) for number, cert in enumerate(material.chain)]
        certs += [("client_ca", ca) for ca in material.client_cas]
        seen = set()
        for kind, cert in certs:
            # A chain file may hold a certificate twice (client CAs are each loaded once); two samples
            # with the same labels are not a valid exposition.
            if (kind, cert.fingerprint) not in seen:
                seen.add((kind, cert.fingerprint))
                expiry.add_metric([kind, cert.subject, cert.fingerprint[:16]], cert.not_after.timestamp())
        yield expiry


# -- one object for the gateway ------------------------------------------------------------------


class GatewayMetrics:
    """The registry, the interceptor and the router collector of one gateway."""

    def __init__(self, router: Router, *, version: str = "", home_region: str = "") -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.interceptor = ObservabilityInterceptor(self.requests)
        self.registry.register(RouterCollector(router))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        info = Gauge("hsmgw_build_info", "Always 1; labels say which gateway this is.", ["version", "home_region"],
                     registry=self.registry)
        info.labels(version, home_region).set(1)
        self._lock = threading.Lock()
        self._worst: dict[str, int] = {}
        self._reconcile: tuple[Gauge, Gauge] | None = None

    def publish_reconciles(self) -> tuple[Gauge, Gauge]:
        """Add the reconcile gauges to the registry (only the process that runs reconciles has them).

        Until a reconcile has finished, the findings are absent and the last run's time is 0.
        """
        with self._lock:
            if self._reconcile is None:
                self._reconcile = (
                    Gauge("hsmgw_reconcile_findings", "What the last reconcile found and left, by kind.", ["kind"],
                          registry=self.registry),
                    Gauge("hsmgw_reconcile_last_run_timestamp_seconds",
                          "When the last reconcile finished (Unix time); 0: none has since the process started.",
                          registry=self.registry),
                )
            return self._reconcile

    def reconciled(self, report: ReconcileReport) -> None:
        """Publish a reconcile's findings: a report-only pass's, or the start-up one's, less what it fixed."""
        findings, finished = self.publish_reconciles()
        dropped, removed, rolled_back = set(report.dropped), set(report.removed), set(report.rolled_back)
        for kind, found in (
            ("missing", [f for f in report.missing if f not in dropped]),
            ("orphan", [f for f in report.orphans if f not in removed]),
            ("foreign", report.foreign),
            ("unknown", report.unknown),
            ("duplicate", report.duplicates),
            ("stale_intent", [k for k in report.stale_intents if k not in rolled_back]),
            ("unreachable", report.unreachable),
            ("other_fleet", report.other_fleet),
            ("fleet_unread", report.fleet_unread),
        ):
            findings.labels(kind).set(len(found))
        finished.set_to_current_time()

    def publish_tls(self, material: Callable[[], TlsMaterial]) -> None:
        """Add the TLS certificate series, read from ``material()`` on scrape (a gateway with TLS only)."""
        self.registry.register(TlsCollector(material))

    def circuit_changed(self, cluster: str, state: CircuitState, ckr: str = "") -> None:
        """Call on every circuit change: counts it and remembers the worst state until the next sample.

        A circuit can open and close again between two samples (a probe success closes it
        at once); the CloudWatch sampler reports the worst state of the interval. ``ckr``: the
        PKCS #11 error that opened it, counted in ``hsmgw_pkcs11_errors_total`` (the calls that
        fail while it stays open never reach the HSM, and name no CKR).
        """
        self.requests.circuit_changes.labels(cluster, state.value).inc()
        if ckr:
            self.requests.pkcs11_errors.labels(ckr, cluster).inc()
        with self._lock:
            self._worst[cluster] = max(self._worst.get(cluster, 0), CIRCUIT_VALUES[state])

    def take_worst_circuits(self) -> dict[str, int]:
        """The worst circuit state per cluster since the last call (clusters that changed only)."""
        with self._lock:
            worst, self._worst = self._worst, {}
        return worst


__all__ = [
    "CIRCUIT_VALUES",
    "ClusterSnapshot",
    "Failure",
    "GatewayMetrics",
    "LATENCY_BUCKETS",
    "MetricsServer",
    "ObservabilityInterceptor",
    "RequestMetrics",
    "RouterCollector",
    "STATUS_DETAILS_KEY",
    "STREAM_DEADLINE_SLACK",
    "TlsCollector",
    "ckr_name",
    "cluster_snapshots",
    "describe_failure",
    "split_listen",
    "under_replicated_keys",
]
