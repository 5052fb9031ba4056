"""deploy/container/healthcheck.py, the probe of the container image and of the
Kubernetes Deployment, against real gateways: plaintext (development) and mutual TLS
with the policy the manifests ship."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.fleet import Fleet, init_fleet
from gateway.server import CRYPTO_SERVICE, cluster_service_name
from gateway.tls import DevCerts, write_dev_certs
from tests.security.helpers import write_config
from tests.support import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "container" / "healthcheck.py"
POLICY = ROOT / "deploy" / "k8s" / "base" / "policy.toml"


def probe(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60, env=env)


def pinned(config: Path, port: int, name: str) -> Path:
    """The gateway's config with the port it actually bound (the fleet's says 0)."""
    text = config.read_text()
    assert 'listen = "127.0.0.1:0"' in text
    path = config.parent / name
    path.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    return path


def test_plaintext_gateway_is_serving(gateway: GatewayProcess, fleet: Fleet) -> None:
    config = pinned(gateway.config_path, gateway.port, "probe-plain.toml")
    for service in ("", CRYPTO_SERVICE, cluster_service_name("use1-a")):
        out = probe(config, "--service", service)
        assert out.returncode == 0, out.stderr
    unknown = probe(config, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


@pytest.fixture(scope="module")
def own_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Gateways started and stopped here get their own tokens and store, away from the shared fleet's."""
    return init_fleet(tmp_path_factory.mktemp("probe-fleet"), listen="127.0.0.1:0")


@pytest.fixture(scope="module")
def probe_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return write_dev_certs(tmp_path_factory.mktemp("probe-certs"), ("hsmgw-probe",))


@pytest.fixture(scope="module")
def tls_gateway(own_fleet: Fleet, probe_certs: DevCerts) -> Iterator[tuple[GatewayProcess, Path]]:
    """A production-like gateway: mutual TLS and the policy of deploy/k8s/base."""
    config = write_config(own_fleet, "probe-tls", tls=probe_certs, policy=POLICY)
    process = GatewayProcess(config).start()
    yield process, pinned(config, process.port, "probe-tls-pinned.toml")
    process.stop()


def test_tls_gateway_is_serving_to_the_probe_identity(tls_gateway, probe_certs: DevCerts) -> None:
    _, config = tls_gateway
    cert, key = probe_certs.client("hsmgw-probe")
    # The probe identity is not in the policy: health checks need authentication only.
    out = probe(config, "--ca", str(probe_certs.ca), "--cert", str(cert), "--key", str(key),
                "--service", CRYPTO_SERVICE)
    assert out.returncode == 0, out.stderr
    # The same through the environment, as the Deployment sets it.
    env = {"HSMGW_PROBE_CA": str(probe_certs.ca), "HSMGW_PROBE_CERT": str(cert), "HSMGW_PROBE_KEY": str(key),
           "PATH": "/usr/bin:/bin"}
    assert probe(config, env=env).returncode == 0


def test_tls_probe_without_a_client_certificate_says_what_is_missing(tls_gateway) -> None:
    _, config = tls_gateway
    out = probe(config, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "--ca, --cert and --key" in out.stderr


def test_tls_probe_with_a_foreign_certificate_fails(tls_gateway, probe_certs: DevCerts, tmp_path: Path) -> None:
    _, config = tls_gateway
    other = write_dev_certs(tmp_path / "other", ("hsmgw-probe",))
    cert, key = other.client("hsmgw-probe")
    out = probe(config, "--ca", str(probe_certs.ca), "--cert", str(cert), "--key", str(key), "--timeout", "2")
    assert out.returncode == 2, out.stderr


def test_stopped_gateway_fails_the_probe(own_fleet: Fleet) -> None:
    process = GatewayProcess(own_fleet.config_path).start()
    config = pinned(own_fleet.config_path, process.port, "probe-stopped.toml")
    assert probe(config).returncode == 0
    assert process.stop() == 0
    out = probe(config, "--timeout", "2")
    assert out.returncode == 2 and "UNAVAILABLE" in out.stderr
