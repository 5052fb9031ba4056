"""AWS tests run against ``moto_server``: a real HTTP endpoint on a free loopback port,
so botocore's connection handling, timeouts and retries are the real ones."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.fleet import Fleet, init_fleet
from router.placement.dynamodb import DynamoStore
from tests.moto import FAKE_AWS_ENV, REGION, MotoServer, fake_aws_env, free_port

__all__ = ["FAKE_AWS_ENV", "REGION", "MotoServer", "free_port"]


@pytest.fixture(scope="package", autouse=True)
def aws_env() -> Iterator[None]:
    """Fake credentials for this package's tests only, restored afterwards."""
    with fake_aws_env():
        yield


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A ``moto_server`` shared by the session; use a fresh table name per test."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def spare_moto_server(tmp_path: Path) -> Iterator[Callable[[], MotoServer]]:
    """Start private ``moto_server`` processes (for tests that stop them); all stopped after."""
    started: list[MotoServer] = []

    def start() -> MotoServer:
        server = MotoServer(tmp_path).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)  # a paused process ignores SIGTERM until resumed
        server.stop()


@pytest.fixture
def dynamo_fleet(tmp_path: Path, spare_moto_server: Callable[[], MotoServer]) -> tuple[MotoServer, Fleet]:
    """A fleet whose gateways keep their placements in a DynamoDB table on a private ``moto_server``
    (which the test may stop)."""
    moto = spare_moto_server()
    url = moto.store_url("placements")
    DynamoStore("placements", region=REGION, endpoint_url=moto.endpoint).create_table()
    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    text = fleet.config_path.read_text().replace('url = "sqlite:placements.db"', f'url = "{url}"')
    assert url in text
    fleet.config_path.write_text(text)
    return moto, fleet
