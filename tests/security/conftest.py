"""Fixtures for the security tests: their own fleet, dev certificates, a policy, an mTLS gateway."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from gateway.fleet import Fleet, init_fleet
from gateway.tls import DevCerts, write_dev_certs
from tests.security.helpers import CLIENTS, POLICY, Client, tls_channel, write_config
from tests.support import GatewayProcess


@pytest.fixture(scope="session")
def sec_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A fleet of its own: refused requests are counted against it, and wrong PINs tried on it."""
    return init_fleet(tmp_path_factory.mktemp("secfleet"), listen="127.0.0.1:0")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return write_dev_certs(tmp_path_factory.mktemp("certs"), CLIENTS)


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A second CA issuing the same client names: its certificates must not get in."""
    return write_dev_certs(tmp_path_factory.mktemp("other-ca"), ("root", "payments-app"))


@pytest.fixture(scope="session")
def policy_file(sec_fleet: Fleet) -> Path:
    path = sec_fleet.state_dir / "policy.toml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="session")
def tls_gateway(sec_fleet: Fleet, certs: DevCerts, policy_file: Path) -> Iterator[GatewayProcess]:
    """A production-mode gateway: mTLS and the test policy."""
    config = write_config(sec_fleet, "tls", tls=certs, policy=policy_file)
    process = GatewayProcess(config).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def connect(tls_gateway: GatewayProcess, certs: DevCerts) -> Iterator[Callable[[str], Client]]:
    """``connect(name)``: stubs on an mTLS channel with client ``name``'s certificate (cached)."""
    clients: dict[str, Client] = {}

    def get(name: str) -> Client:
        if name not in clients:
            channel = tls_channel(tls_gateway.target, certs, name)
            grpc.channel_ready_future(channel).result(timeout=10)
            clients[name] = Client.of(channel)
        return clients[name]

    yield get
    for client in clients.values():
        client.channel.close()


@pytest.fixture
def own_certs(certs: DevCerts, tmp_path: Path) -> DevCerts:
    """A copy of the session certificates that the test may rotate."""
    shutil.copytree(certs.out, tmp_path / "certs")
    return write_dev_certs(tmp_path / "certs", CLIENTS)


@pytest.fixture
def gateway(sec_fleet: Fleet, own_certs: DevCerts, tmp_path: Path) -> Iterator[GatewayProcess]:
    """A production-mode gateway of the test's own, serving ``own_certs`` with the test policy in a
    file of its own (``tmp_path / "policy.toml"``): the test may rotate either and send SIGHUP.
    Here it stands for the plaintext ``gateway`` of tests/conftest.py."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    process = GatewayProcess(write_config(sec_fleet, f"own-{tmp_path.name}", tls=own_certs, policy=policy))
    process.start()
    yield process
    process.stop()
