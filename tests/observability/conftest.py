"""Fixtures for observability tests: moto for AWS, a private fleet, faultmod.

CloudWatch runs in ``moto_server``, a separate process on a free loopback port,
as the gateway would reach the real service. CloudHSM discovery needs HSMs in
a cluster, and moto's ``CreateHsm`` is unimplemented: those tests use moto's
server in a thread of the test process (``ThreadedMotoServer``, real HTTP on a
free port) so they can add HSMs to its in-memory backend directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.fleet import Fleet, FleetError, init_fleet
from tests.faults import BuildError, build_faultmod
from tests.moto import MotoServer, fake_aws_env


@pytest.fixture(scope="package", autouse=True)
def aws_env() -> Iterator[None]:
    with fake_aws_env():
        yield


MotoProcess = MotoServer
"""The moto_server process the CloudWatch tests talk to (shared with tests/aws)."""


@pytest.fixture(scope="package")
def moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoProcess]:
    server = MotoProcess(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def threaded_moto() -> Iterator[str]:
    """moto's server in a thread of this process (its backends are reachable here); the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def boto(service: str, endpoint: str, region: str = "us-east-1") -> Any:
    import boto3

    return boto3.client(service, region_name=region, endpoint_url=endpoint)


@pytest.fixture(scope="package")
def obs_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A fleet of our own: faults injected here touch no other test's keys."""
    try:
        return init_fleet(tmp_path_factory.mktemp("obsfleet"), listen="127.0.0.1:0")
    except FleetError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="package")
def faultmod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_faultmod(tmp_path_factory.mktemp("faultmod"))
    except BuildError as exc:
        pytest.skip(str(exc))
