"""The gRPC server: crypto and admin services, health, reflection, lifecycle."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.admin import AdminServicer
from gateway.config import GatewayConfig, check_listen
from gateway.servicer import CryptoServicer
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2, crypto_pb2_grpc
from router.router import Router

log = logging.getLogger(__name__)

CRYPTO_SERVICE = crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def cluster_service_name(cluster: str) -> str:
    """The grpc.health.v1 service name that reports one cluster."""
    return f"hsmgw.cluster.{cluster}"


class Gateway:
    """A running gateway: the server, its router, and its health."""

    def __init__(self, config: GatewayConfig, router: Router) -> None:
        self.config = config
        self.router = router
        check_listen(config.server)
        options = [
            ("grpc.max_receive_message_length", config.server.max_message_bytes),
            ("grpc.max_send_message_length", config.server.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.threads, thread_name_prefix="rpc"),
            options=options,
        )
        crypto_pb2_grpc.add_CryptoServiceServicer_to_server(
            CryptoServicer(router, default_deadline=config.server.default_deadline), self.server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(router), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (CRYPTO_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(config.server.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {config.server.listen}")
        self._stopped = threading.Event()

    def start(self) -> None:
        self.server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", CRYPTO_SERVICE, ADMIN_SERVICE):
            self.health.set(name, serving)
        for name in self.router.backends:
            self.health.set(cluster_service_name(name), serving)
        log.info("serving on %s:%d (clusters: %s)", self.config.server.host, self.port, ", ".join(self.router.backends))

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.router.close()
        log.info("stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(gateway: Gateway, *, grace: float = 5.0, port_file: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain for ``grace`` seconds and exit."""
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    gateway.start()
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(gateway.port))
        os.replace(tmp, port_file)
    if gateway.config.server.insecure_plaintext:
        log.warning("serving PLAINTEXT on loopback for development; production needs TLS")
    done.wait()
    gateway.stop(grace)
