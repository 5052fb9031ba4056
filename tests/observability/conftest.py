"""Fixtures for observability tests: moto for AWS, a private fleet, faultmod.

CloudWatch runs in ``moto_server``, a separate process on a free loopback port,
as the gateway would reach the real service. CloudHSM discovery needs HSMs in
a cluster, and moto's ``CreateHsm`` is unimplemented: those tests use moto's
server in a thread of the test process (``ThreadedMotoServer``, real HTTP on a
free port) so they can add HSMs to its in-memory backend directly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.fleet import Fleet, FleetError, init_fleet
from tests.faults import BuildError, build_faultmod

# Never let a test reach real AWS or wait for an instance-metadata lookup.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="package", autouse=True)
def fake_aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        yield


class MotoProcess:
    """``moto_server`` in its own process (moto's own entry point)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"moto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **FAKE_AWS_ENV},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer on port {self.port} within {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
