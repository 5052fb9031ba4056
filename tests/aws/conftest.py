"""AWS tests run against ``moto_server``: a real HTTP endpoint on a free loopback port,
so botocore's connection handling, timeouts and retries are the real ones."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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
