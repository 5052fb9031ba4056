"""The gRPC server: crypto and admin services, health, reflection, lifecycle."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import thread as pool_threads
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway._signals import Signals
from gateway.admin import AdminServicer
from gateway.audit import AUDIT_LOGGER, AuditHandler
from gateway.auth import Authenticator, PolicyStore
from gateway.config import GatewayConfig, check_security, is_loopback
from gateway.fastpath import FastPath
from gateway.interceptors import Limiter, SecurityInterceptor
from gateway.metrics import GatewayMetrics, MetricsServer
from gateway.servicer import CryptoServicer
from gateway.tls import EXPIRY_CHECK_INTERVAL, ServerCredentials
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2, crypto_pb2_grpc
from router.errors import RouterError, Stopping
from router.health import CircuitState, HealthMonitor
from router.placement.store import StoreError
from router.reconcile import ReconcileReport, reconcile
from router.router import Router

log = logging.getLogger(__name__)

CRYPTO_SERVICE = crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

FAST_METHODS = frozenset(
    f"/{CRYPTO_SERVICE}/{name}"
    for name in ("Sign", "Verify", "Encrypt", "Decrypt", "Mac", "VerifyMac", "GenerateRandom", "GetPublicKey")
)
"""Unary crypto calls served on ``[server] fast_path``: each takes about as long as one HSM
operation. Slower calls (key lifecycle, store reads) and streams stay on grpcio's pool."""
BATCH_METHODS = frozenset({f"/{CRYPTO_SERVICE}/BatchSign"})
"""Also on the fast path, on threads of their own: a batch holds its thread for up to 1,000
HSM operations and must not hold up unary calls (on grpcio's pool it cost ~5 % of its
throughput, in ECDSA batches of 64)."""



STORE_DOWN_LOG_EVERY = 60.0
"""Seconds between log lines while the placement store stays unreachable (the refresh runs every 2 s)."""

_audit_attached: list[int] = []
"""The ``hsmgw.audit`` logger's level before the first of this process's running gateways turned it
on, while any runs (``_attach_audit``): a process that embeds gateways gets its logger back."""
_audit_lock = threading.Lock()


def _attach_audit(handler: AuditHandler) -> None:
    """Send ``hsmgw.audit`` records to ``handler`` and have the logger pass INFO."""
    logger = logging.getLogger(AUDIT_LOGGER)
    with _audit_lock:
        if not any(isinstance(h, AuditHandler) for h in logger.handlers):
            _audit_attached[:] = [logger.level]
        logger.addHandler(handler)
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)


def _detach_audit(handler: AuditHandler) -> None:
    """Undo ``_attach_audit``; the last gateway to stop gives the logger its level back."""
    logger = logging.getLogger(AUDIT_LOGGER)
    with _audit_lock:
        logger.removeHandler(handler)
        if _audit_attached and not any(isinstance(h, AuditHandler) for h in logger.handlers):
            logger.setLevel(_audit_attached.pop())

class _Registered:
    """Stands in for a grpc.Server to collect what a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass  # the same handlers also come as registered methods

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    def add_to(self, server: grpc.Server, service: str, leave_out: frozenset[str]) -> None:
        prefix = f"/{service}/"
        kept = {m.removeprefix(prefix): h for m, h in self.handlers.items() if m not in leave_out}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, kept),))
        server.add_registered_method_handlers(service, kept)


# Resist abusive HTTP/2 pings: a client may ping at most every 30 s, and only while a
# call is open; two strikes and the server closes the connection (GOAWAY).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


def cluster_service_name(cluster: str) -> str:
    """The grpc.health.v1 service name that reports one cluster."""
    return f"hsmgw.cluster.{cluster}"


def region_service_name(region: str) -> str:
    """The grpc.health.v1 service name that reports one region (serving while any cluster is)."""
    return f"hsmgw.region.{region}"


CALLS_TIMEOUT = 5.0
"""Seconds a stop waits, after its grace, for calls still running (the fast paths' and grpcio's
alike) before it closes the clusters' sessions under them."""
EXIT_WAIT = 1.0
"""Seconds a stopped gateway process waits for the threads its exit would wait for (grpcio's
request threads, the batch helpers) before it exits without them (``serve``): one still inside
an HSM that does not answer would hold the exit for as long as the HSM hangs."""


class Gateway:
    """A running gateway: the server, its router, and its health."""

    def __init__(
        self, config: GatewayConfig, router: Router, *, reuse_port: bool = False, reconciles: bool = True,
        first_reconcile: ReconcileReport | None = None, limiter: Limiter | None = None,
    ) -> None:
        """``reuse_port``: share the listening port with sibling worker processes (SO_REUSEPORT).
        ``reconciles``: run the report-only reconciles (one process of the gateway does) and
        publish their metrics. ``first_reconcile``: the report of the reconcile this process
        ran at start, published as its first. ``limiter``: the per-identity limits (the
        workers of one gateway share theirs)."""
        self.draining = threading.Event()
        self._health_lock = threading.RLock()
        self._published: dict[str, bool] = {}
        """grpc.health.v1 service name → whether it was last set SERVING (``_publish_health``)."""
        self.config = config
        self.router = router
        check_security(config)
        tls = config.server.tls
        self.tls = ServerCredentials(tls) if tls is not None else None
        self.policies = PolicyStore(config.auth.policy_file)
        self.security = SecurityInterceptor(
            Authenticator(tls=tls is not None, dev_header=tls is None and is_loopback(config.server.host)),
            self.policies,
            limiter or Limiter(),
        )
        self.metrics = GatewayMetrics(router, version=_version(), home_region=config.home_region)
        if self.tls is not None:
            credentials = self.tls
            self.metrics.publish_tls(lambda: credentials.material)
        if reconciles:
            # From the start, not from the first report-only pass (an interval away, again after
            # every restart): an alert on the last run's time must see passes that never finish.
            self.metrics.publish_reconciles()
            if first_reconcile is not None:
                self.metrics.reconciled(first_reconcile)
        options = [
            ("grpc.max_receive_message_length", config.server.max_message_bytes),
            ("grpc.max_send_message_length", config.server.max_message_bytes),
            # Off unless this is one of `hsmgw serve --workers N`: a second gateway started by
            # mistake on the same port must fail, not silently take half the connections.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *KEEPALIVE_OPTIONS,
        ]
        # Observability first (outermost): refused calls are counted and logged with their request id.
        interceptors = [self.metrics.interceptor, self.security]
        self._rpc_pool = futures.ThreadPoolExecutor(max_workers=config.server.threads, thread_name_prefix="rpc")
        self.server = grpc.server(
            self._rpc_pool,
            options=options,
            interceptors=interceptors,
        )
        self.crypto = CryptoServicer(router, default_deadline=config.server.default_deadline, draining=self.draining)
        crypto = _Registered()
        crypto_pb2_grpc.add_CryptoServiceServicer_to_server(self.crypto, crypto)
        self.fast_paths: list[FastPath] = []
        for methods in (FAST_METHODS, BATCH_METHODS) if config.server.fast_path else ():
            # A batch stops signing once its client has gone: its calls are watched for a cancel.
            served = FastPath.attach(self.server, {m: h for m, h in crypto.handlers.items() if m in methods},
                                     interceptors, threads=config.server.threads,
                                     watch_cancel=methods is BATCH_METHODS)
            if served is None:  # this grpcio cannot: every method stays on its pool
                break
            self.fast_paths.append(served)
        crypto.add_to(self.server, CRYPTO_SERVICE, frozenset().union(*(fast.methods for fast in self.fast_paths)))
        self.admin = AdminServicer(
            router,
            audit_path=config.base_dir / config.admin.audit_log,
            quorum=config.admin.quorum,
            change_ttl=config.admin.change_ttl,
            on_audit_failure=lambda event: self.metrics.requests.audit_write_failures.labels(event).inc(),
            on_audit_unsynced=lambda event: self.metrics.requests.audit_sync_failures.labels(event).inc(),
            policies=self.policies,
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, self.server)
        # Authorization decisions and key lifecycle events (the ``hsmgw.audit``
        # logger) go into the same hash-chained audit log as admin changes.
        self._audit_handler = AuditHandler(self.admin.audit)
        _attach_audit(self._audit_handler)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (CRYPTO_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        if self.tls is not None:
            self.port = self.server.add_secure_port(config.server.listen, self.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(config.server.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.server.listen}")
        self._stopped = threading.Event()
        self._store_down: list[float] | None = None
        """[since, next log] while the placement store does not answer the refresh."""
        self._next_repair: float  # set by start(), before the repairer thread runs
        self.monitor = HealthMonitor(router.backends, router.breakers, interval=config.server.probe_interval)
        self._repairer = threading.Thread(target=self._repair_loop, name="repairer", daemon=True)
        self._reconciler: threading.Thread | None = None
        self._tls_watch: threading.Thread | None = None
        if self.tls is not None:
            self._tls_watch = threading.Thread(target=self._tls_watch_loop, name="tls-expiry", daemon=True)
        if reconciles and config.replication.reconcile_interval:
            self._reconciler = threading.Thread(target=self._reconcile_loop, name="reconciler", daemon=True)
        router.set_health_listener(self._on_cluster_health)
        self.metrics_server: MetricsServer | None = None
        if config.metrics.listen:
            try:
                self.metrics_server = MetricsServer(config.metrics.listen, self.metrics.registry)
            except OSError as exc:
                reason = exc.strerror or exc
                raise OSError(f"metrics.listen: cannot listen on {config.metrics.listen}: {reason}") from exc
        self.cloudwatch = _CloudWatch(self) if config.cloudwatch.enabled else None

    def _on_cluster_health(self, cluster: str, state: CircuitState, cause: str) -> None:
        self.metrics.circuit_changed(cluster, state, cause)
        self._publish_health()

    def _publish_health(self) -> None:
        """Set every cluster's, region's and the gateway's grpc.health.v1 status from the circuits.

        Only a closed circuit serves: a half-open one lets a single trial through and fails
        every other call, and while a cluster is down its circuit cycles open → half-open →
        open every cooldown, which must not flap the readiness of the pod. The gateway
        (``""`` and CryptoService) and a region serve while any of their clusters does, or
        throttles (its circuit opened by busy answers: the HSM is alive, and calls get
        RESOURCE_EXHAUSTED with a time to retry in, or an answer; out of its Service, every
        gateway of a fleet whose HSMs all throttle would refuse every call, the answers the
        HSMs still give too). With none, every crypto call fails UNAVAILABLE, and a NOT_SERVING
        readiness takes the pod out of its Service so that clients go to another region's
        gateways. The probes go on regardless, so the pod is back as soon as a cluster answers
        again. Also called every 2 s by the repairer's loop: a throttling cluster found down
        changes no circuit state, only its ``busy``.
        AdminService is left alone: operators need it exactly then. During a stop the
        health servicer keeps every status NOT_SERVING and ignores these.
        """
        def status(serving: bool) -> int:
            code: int = (
                health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            return code

        # Serialised: two clusters changing at once must not leave a stale status.
        with self._health_lock:
            breakers = self.router.breakers
            closed = {name for name, breaker in breakers.items() if breaker.state is CircuitState.CLOSED}
            alive = closed | {name for name, breaker in breakers.items() if breaker.busy}
            wanted = {cluster_service_name(name): name in closed for name in breakers}
            for region, members in self.router.topology.regions.items():
                wanted[region_service_name(region)] = any(name in alive for name in members)
            for name in ("", CRYPTO_SERVICE):
                wanted[name] = bool(alive)
            for name, serving in wanted.items():
                if self._published.get(name) is not serving:  # a Watch stream hears of changes only
                    self._published[name] = serving
                    self.health.set(name, status(serving))

    def _repair_loop(self) -> None:
        interval = self.config.replication.repair_interval
        while not self._stopped.wait(min(interval, 2.0)):
            self._refresh()
            try:
                self._publish_health()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("publishing the health statuses failed")
            if time.monotonic() < self._next_repair:
                continue
            self._next_repair = time.monotonic() + interval
            try:
                self.router.follow_store_fleet(time.monotonic() + interval)
                self.router.sweep_destroyed(time.monotonic() + interval)
                self.router.sweep_intents(time.monotonic() + interval)
                fixed = self.router.repair_once(time.monotonic() + interval)
                if fixed:
                    log.info("repairer: %d keys brought up to their replication policy", fixed)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("repairer pass failed")

    def _refresh(self) -> None:
        """Read the operator switches and the placements that changed (every 2 s). A store that
        does not answer is logged when it stops, once a minute while it stays down, and when it
        answers again: not on every pass of every worker."""
        now = time.monotonic()
        try:
            self.admin.sync_switches()
            self.router.refresh()
        except StoreError as exc:
            if self._store_down is None:
                self._store_down = [now, now + STORE_DOWN_LOG_EVERY]
                log.warning("placement store unreachable; serving known keys from the cache (%s)", exc)
            elif now >= self._store_down[1]:
                self._store_down[1] = now + STORE_DOWN_LOG_EVERY
                log.warning("placement store still unreachable after %.0f s; serving known keys from the cache (%s)",
                            now - self._store_down[0], exc)
            return
        except Exception:  # noqa: BLE001 - the loop must survive anything
            log.exception("reading operator switches or placements failed")
            return
        if self._store_down is not None:
            log.warning("placement store answers again after %.0f s", now - self._store_down[0])
            self._store_down = None

    def _tls_watch_loop(self) -> None:
        # A certificate that expires while the gateway runs fails every client's handshake, and
        # nothing of that reaches the gateway otherwise (load_material checks at load and reload).
        assert self.tls is not None
        while not self._stopped.wait(EXPIRY_CHECK_INTERVAL):
            try:
                self.tls.check_expiry()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("checking the TLS certificates' expiry failed")

    def _reconcile_loop(self) -> None:
        while not self._stopped.wait(self.config.replication.reconcile_interval):
            report_reconcile(self.router, self.metrics)

    def start(self) -> None:
        self.server.start()
        for fast in self.fast_paths:
            fast.start()
        if self.fast_paths:
            log.info("unary crypto calls on the fast path (%d threads, and as many for BatchSign)",
                     self.config.server.threads)
        self.health.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._publish_health()  # from the circuits as they are: the start-up reconcile may have opened some
        self.admin.changes.carry_over(self.config.base_dir / self.config.admin.state_file)
        try:
            self.admin.sync_switches()
        except StoreError as exc:  # applied by the repair loop once the store answers
            log.warning("placement store unreachable; operator switches not read yet (%s)", exc)
        try:  # a change this gateway (or another) ran when it was killed ends as interrupted
            self.admin.changes.settle()
        except RouterError as exc:  # the next read of the changes does it
            log.warning("admin changes not looked at yet: %s", exc.message)
        self._next_repair = time.monotonic() + self.config.replication.repair_interval
        self.monitor.start()
        self._repairer.start()
        if self._reconciler is not None:
            self._reconciler.start()
        if self._tls_watch is not None:
            self._tls_watch.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", self.metrics_server.host, self.metrics_server.port)
        if self.cloudwatch is not None:
            self.cloudwatch.start()
        log.info("serving on %s:%d (clusters: %s)", self.config.server.host, self.port, ", ".join(self.router.backends))

    def reload(self) -> None:
        """SIGHUP: re-read the policy and the TLS files; a bad file keeps the current one."""
        log.info("reloading the policy and TLS files")
        if self.policies.reload():
            self.security.limiter.sync(lambda identity: self.policies.current.principal(identity).limits)
        if self.tls is not None:
            self.tls.reload()

    def stop(self, grace: float = 5.0) -> None:
        """Drain for ``grace`` seconds, wait up to ``CALLS_TIMEOUT`` more for the calls still
        running, then close the clusters' sessions (up to ``router.router.CLOSE_TIMEOUT``).
        Nothing else waits: a stop takes at most about ``grace + CALLS_TIMEOUT + CLOSE_TIMEOUT``
        seconds, however many HSMs hang, and ``serve`` exits ``EXIT_WAIT`` later at most, without
        the calls still inside the HSM (``gateway.workers.STOP_AFTER_GRACE`` counts on it)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Health first (load balancers stop sending), then refuse new calls with
        # UNAVAILABLE while the ones in flight finish, then close the listener.
        self.health.enter_graceful_shutdown()
        self.draining.set()
        pause = min(0.5, grace / 4)  # part of the grace
        time.sleep(pause)
        self.server.stop(grace - pause).wait()
        # grpcio's stop returns at the end of the grace having cancelled the calls, not
        # ended them: their handlers (and the fast paths') may still be inside the router,
        # in an HSM that is slow or does not answer. They get CALLS_TIMEOUT more, together.
        began = time.monotonic()
        end = began + CALLS_TIMEOUT
        for fast in self.fast_paths:  # all at once: their idle threads end now, not after another's wait
            fast.shut()
        for fast in self.fast_paths:
            fast.wait(end, since=began)
        running = self._calls_running(end)
        self.crypto.close()
        if self.cloudwatch is not None:
            self.cloudwatch.stop(end)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        # Within the calls' deadline too: a probe in a hung HSM never returns, and is left
        # to the process's exit with the calls cut off.
        probing = self.monitor.stop(end)
        for thread in (self._repairer, self._reconciler, self._tls_watch):  # a pass under way ends at its next key
            if thread is not None and thread.ident is not None:
                thread.join(max(0.0, end - time.monotonic()))
        if probing:
            log.warning("health probe of cluster(s) %s still inside the HSM: left to the process's exit",
                        ", ".join(probing))
        if running:
            log.warning("%d call(s) still running %.0f s after the grace: cut off. Each fails at its next HSM "
                        "call (UNAVAILABLE, to a client that is gone); no cluster opens a session or logs in again",
                        running, CALLS_TIMEOUT)
        _detach_audit(self._audit_handler)
        self.router.close()
        # Its idle threads end now; one still in a call ends when the call does (``serve``).
        self._rpc_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    def _calls_running(self, until: float) -> int:
        """Wait until no call is being served, or ``until`` (monotonic); how many still are."""
        active = self.metrics.requests.calls.active
        while active and time.monotonic() < until:
            time.sleep(0.05)
        return len(active)

    def calls_in_flight(self) -> int:
        """How many calls are being served."""
        return len(self.metrics.requests.calls.active)

    def wait(self) -> None:
        self.server.wait_for_termination()


def report_reconcile(router: Router, metrics: GatewayMetrics) -> None:
    """Compare the store with every token, and report what differs. It changes nothing but
    what a DestroyKey asked for and could not reach: a destroyed key's objects go.

    A pass that cannot finish publishes nothing: ``hsmgw_reconcile_last_run_timestamp_seconds``
    stops moving, which is what an alert on it watches.
    """
    try:
        report = reconcile(router, fix=False, finish_destroys=True)
    except Stopping:  # the gateway stops: the pass is not finished, and says nothing
        return
    except StoreError as exc:
        log.warning("reconcile (report only): the placement store is unreachable (%s); the next pass tries again",
                    exc)
        return
    except Exception:  # noqa: BLE001 - the loop must survive anything
        log.exception("reconcile (report only) failed")
        return
    metrics.reconciled(report)
    if report.clean and not report.finished:
        log.info("reconcile (report only): the placement store and every token agree")
    else:
        log.warning("reconcile (report only): %s; `hsmctl reconcile` lists them (docs/operations.md)",
                    report.summary())


class _CloudWatch:
    """The CloudWatch publisher of a gateway (``[cloudwatch] enabled``)."""

    def __init__(self, gateway: Gateway) -> None:
        from gateway.cloudwatch import GatewaySampler, Publisher, make_client

        config = gateway.config
        settings = config.cloudwatch
        self.region = settings.region or config.home_region
        client = make_client("cloudwatch", self.region, settings.endpoint_url or None)
        self.publisher = Publisher(client, settings.namespace, registry=gateway.metrics.registry)
        credentials = gateway.tls
        self.sampler = GatewaySampler(gateway.router, gateway.metrics, region=config.home_region,
                                      tls=None if credentials is None else lambda: credentials.material)
        self.interval = settings.interval
        self.namespace = settings.namespace

    def start(self) -> None:
        self.publisher.start(self.sampler, self.interval)
        log.info("publishing metrics to CloudWatch (%s, namespace %s) every %gs",
                 self.region, self.namespace, self.interval)

    def stop(self, until: float) -> None:
        """Publish one last sample (the shutdown shows in the graphs), until ``until`` (monotonic) at most."""
        self.publisher.stop(self.sampler, timeout=max(0.0, until - time.monotonic()))


def _beat(port_file: str, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT):
        try:
            os.utime(port_file)
        except OSError:  # removed: the worker is stopping
            return


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hsmgw")
    except PackageNotFoundError:
        return "unknown"


HEARTBEAT = 1.0
"""Seconds between the touches of a worker's port file that tell its supervisor it is alive."""


def _until_stopped(gateway: Gateway, signals: Signals) -> int:
    """Serve until SIGTERM or SIGINT (which it returns), reloading on SIGHUP."""
    while True:
        for signum in signals.wait(60.0):
            if signum != signal.SIGHUP:
                return signum
            # On a thread: the main thread goes on watching for a stop while the files are read.
            threading.Thread(target=gateway.reload, name="reload", daemon=True).start()


def serve(gateway: Gateway, *, grace: float = 5.0, port_file: str | None = None, heartbeat: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then drain for ``grace`` seconds and exit.

    ``heartbeat`` (a worker of ``hsmgw serve --workers N``): touch the port file every
    ``HEARTBEAT`` seconds, so the supervisor notices a worker that is stopped or stuck.
    """
    done = threading.Event()
    signals = Signals()
    signals.catch(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    gateway.start()
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(gateway.port))
        os.replace(tmp, port_file)
        if heartbeat:
            threading.Thread(target=_beat, args=(port_file, done), name="heartbeat", daemon=True).start()
    if gateway.config.server.insecure_plaintext:
        log.warning("serving PLAINTEXT on loopback for development; production needs TLS")
    if gateway.config.auth.policy_file is None:
        log.warning("no [auth] policy_file: every caller may do everything (development only)")
    if gateway.config.admin.quorum < 2:
        log.warning("[admin] quorum = %d: one admin alone drains, fails over, moves and destroys keys, for every "
                    "gateway on this placement store; production wants 2 or more", gateway.config.admin.quorum)
    stop = _until_stopped(gateway, signals)
    log.info("signal %s: shutting down", signal.Signals(stop).name)
    done.set()
    if port_file:  # stopping: a stale port file would send the next reader to a closed port
        Path(port_file).unlink(missing_ok=True)
    gateway.stop(grace)
    _exit_unless_done(gateway)


def _holding_threads() -> list[threading.Thread]:
    """The threads the interpreter's exit would wait for: every non-daemon one but this, and every
    thread of a ``ThreadPoolExecutor``, daemon or not (grpcio's request threads are daemons, started
    from its daemon thread): ``concurrent.futures`` joins those at exit, through a registry of its own."""
    pools: Iterable[threading.Thread] = getattr(pool_threads, "_threads_queues", {}).keys()
    found = {t for t in threading.enumerate() if not t.daemon} | {t for t in list(pools) if t.is_alive()}
    return [t for t in found if t is not threading.current_thread()]


def _exit_unless_done(gateway: Gateway) -> None:
    """After a stop: exit at once (status 0) if a call is still being served, or a thread the exit
    would wait for is still running, ``EXIT_WAIT`` seconds on, as one inside an HSM that does not
    answer would hold the exit as long as the HSM hangs (the fast paths' threads are daemons, which
    the exit does not wait for, but the module's finalization may: it is not left to). Nothing is
    lost: the stop has cut those calls off and given up their sessions; the audit log is written
    line by line and synced. Returns when every call and every such thread has ended."""
    end = time.monotonic() + EXIT_WAIT
    while (_holding_threads() or gateway.calls_in_flight()) and time.monotonic() < end:
        time.sleep(0.05)
    holding = _holding_threads()
    calls = gateway.calls_in_flight()
    if not holding and not calls:
        return
    threads = len(holding) + sum(fast.serving() for fast in gateway.fast_paths)
    log.warning("exiting with %d call(s) left inside an HSM that does not answer (%d thread(s)); their sessions "
                "are given up", calls, threads)
    logging.shutdown()
    os._exit(0)
