"""grpc.health.v1 when every HSM fails: the gateway is not ready, but alive.

The Deployment's readiness probe asks for hsmgw.v1.CryptoService; its start-up and
liveness probes ask for hsmgw.v1.AdminService. With no cluster able to serve, the pod
must leave its Service (so that clients go to another region) and must not be
restarted (a restart brings no HSM back), and come back once a cluster answers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import ADMIN_SERVICE, CRYPTO_SERVICE, cluster_service_name, region_service_name
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import make_keys
from tests.support import ROOT, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEPLOYMENT = ROOT / "deploy" / "k8s" / "base" / "deployment.yaml"


def _probe_services() -> dict[str, str]:
    """The health service each probe of the Deployment asks for ("" when it names none)."""
    container = next(c for c in yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "hsmgw")
    services = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        services[probe] = command[command.index("--service") + 1] if "--service" in command else ""
    return services


def _run_probe(config: Path, service: str) -> int:
    """deploy/container/healthcheck.py as the probe runs it; its exit status."""
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "container" / "healthcheck.py"), "--config",
                          str(config), "--service", service], capture_output=True, text=True, timeout=60)
    return out.returncode


class _Watch:
    """Every status a grpc.health.v1 Watch of one service hears, in order."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.seen: list[int] = []
        self._stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for reply in self._stream:
                self.seen.append(reply.status)
        except grpc.RpcError:  # cancelled at the end of the test
            pass

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(10)


def _status(channel: grpc.Channel, service: str) -> int:
    return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status)


def _sign(channel: grpc.Channel, key: pb.Key, digest: bytes) -> grpc.StatusCode:
    """A Sign's status code (OK when it signed)."""
    try:
        crypto_pb2_grpc.CryptoServiceStub(channel).Sign(
            pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest), timeout=10)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_no_cluster_serving_makes_the_gateway_unready_but_alive_until_one_is_back(chaos) -> None:
    fleet, control, gateway = chaos
    clusters = ["use1-a", "use1-b", "usw2-a"]
    regions = {"us-east-1", "us-west-2"}
    key = make_keys(gateway.target, "unready", 1)[0]
    config = gateway.config_path.parent / "probe-pinned.toml"
    config.write_text(gateway.config_path.read_text().replace('listen = "127.0.0.1:0"',
                                                              f'listen = "127.0.0.1:{gateway.port}"'))
    probes = _probe_services()
    assert probes["readinessProbe"] == CRYPTO_SERVICE
    with grpc.insecure_channel(gateway.target) as channel:

        def status(service: str) -> int:
            return _status(channel, service)

        def sign() -> grpc.StatusCode:
            return _sign(channel, key, b"\x03" * 32)

        for service in ("", CRYPTO_SERVICE, ADMIN_SERVICE):
            assert status(service) == SERVING, service
        for probe, service in probes.items():
            assert _run_probe(config, service) == 0, probe

        watch = _Watch(channel, "")
        try:
            wait_for(lambda: watch.seen == [SERVING], timeout=10, what="the Watch's first status")
            for cluster in clusters:
                control.set(cluster, "device_error")
            wait_for(lambda: status("") == NOT_SERVING, timeout=30, what='"" NOT_SERVING with every cluster down')
            assert status(CRYPTO_SERVICE) == NOT_SERVING
            assert all(status(cluster_service_name(c)) == NOT_SERVING for c in clusters)
            assert all(status(region_service_name(r)) == NOT_SERVING for r in regions)
            assert status(ADMIN_SERVICE) == SERVING, "operators need AdminService exactly now"
            assert sign() is grpc.StatusCode.UNAVAILABLE
            # The probes as the Deployment runs them: out of the Service, not restarted.
            assert _run_probe(config, probes["readinessProbe"]) == 1
            assert _run_probe(config, probes["livenessProbe"]) == 0
            assert _run_probe(config, probes["startupProbe"]) == 0
            # Calls go on: after each cooldown a circuit goes half-open, lets one call through
            # as its trial, and opens again. A trial is not serving: readiness must not flap.
            trials = gateway.log().count(": circuit half-open")
            wait_for(lambda: sign() is grpc.StatusCode.UNAVAILABLE
                     and gateway.log().count(": circuit half-open") >= trials + 2 * len(clusters),
                     timeout=60, what="more half-open trials")
            assert status("") == NOT_SERVING

            for cluster in clusters:
                control.clear(cluster)
            wait_for(lambda: status("") == SERVING, timeout=30, what='"" SERVING once the clusters answer')
            assert status(CRYPTO_SERVICE) == SERVING
            assert _run_probe(config, probes["readinessProbe"]) == 0
            wait_for(lambda: sign() is grpc.StatusCode.OK, timeout=30, what="Sign served again")
            wait_for(lambda: len(watch.seen) >= 3, timeout=10, what="the Watch to hear SERVING again")
            assert watch.seen == [SERVING, NOT_SERVING, SERVING], watch.seen
        finally:
            watch.close()


def test_throttling_hsms_keep_the_gateway_ready(chaos) -> None:
    """HSMs that only say they are busy are alive: the pods stay in their Service, whose calls get
    RESOURCE_EXHAUSTED with a time to retry in (out of it, a fleet whose HSMs all throttle would
    answer nothing). Once the busy HSMs fail for real, the gateway is not ready: an open
    circuit's failure changes no circuit state, so health is also looked at every 2 s (or at the
    next half-open trial's failure, whichever comes first)."""
    fleet, control, gateway = chaos
    clusters = ["use1-a", "use1-b", "usw2-a"]
    keys = make_keys(gateway.target, "throttled", 6)  # spread over every cluster
    assert {c for k in keys for c in (k.primary_cluster, *k.replicas)} == set(clusters)
    with grpc.insecure_channel(gateway.target) as channel:

        def status(service: str) -> int:
            return _status(channel, service)

        def sign(key: pb.Key = keys[0]) -> grpc.StatusCode:
            return _sign(channel, key, b"\x04" * 32)

        def all_open() -> bool:  # busy answers open circuits only through calls (a probe's says nothing)
            for key in keys:
                sign(key)
            return all(status(cluster_service_name(c)) == NOT_SERVING for c in clusters)

        for cluster in clusters:
            control.set(cluster, "function_failed")
        wait_for(all_open, timeout=60, what="every cluster's circuit opened by busy answers")
        assert sign() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for service in ("", CRYPTO_SERVICE, region_service_name("us-east-1"), region_service_name("us-west-2")):
            assert status(service) == SERVING, service

        for cluster in clusters:
            control.set(cluster, "device_error")
        wait_for(lambda: status(CRYPTO_SERVICE) == NOT_SERVING, timeout=30,
                 what="CryptoService NOT_SERVING once the throttling HSMs fail")
        assert status("") == NOT_SERVING
        assert sign() is grpc.StatusCode.UNAVAILABLE

        control.clear()
        wait_for(lambda: status(CRYPTO_SERVICE) == SERVING, timeout=30, what="SERVING once the clusters answer")
        wait_for(lambda: sign() is grpc.StatusCode.OK, timeout=30, what="Sign served again")
