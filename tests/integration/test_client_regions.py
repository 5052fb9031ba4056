"""gateway.client.Client against real gateways whose region misbehaves on the network.

The first "region" is a TCP proxy in front of the session's gateway; the second is that
gateway itself. The proxy can drop everything while keeping its connections open, as a
partitioned region or a firewall that discards packets does.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.client import Client
from hsmgw.v1 import crypto_pb2 as pb
from tests.support import GatewayProcess, unique


class _Proxy:
    """127.0.0.1:<port> → the gateway; ``blackhole()`` forwards nothing and answers no new
    connection, yet closes none."""

    def __init__(self, port: int) -> None:
        self._to = port
        self._black = threading.Event()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self._black.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                near, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._sockets.append(near)
            if self._black.is_set():
                continue  # accepted, never answered
            far = socket.create_connection(("127.0.0.1", self._to))
            self._sockets.append(far)
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self._black.is_set():
                    continue  # swallowed
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def proxy(gateway: GatewayProcess) -> Iterator[_Proxy]:
    made = _Proxy(gateway.port)
    yield made
    made.close()


def test_a_region_that_stops_answering_is_left_for_the_next(proxy, gateway, crypto) -> None:
    key_id = unique("blackhole")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256),
                       timeout=30)
    digest = hashlib.sha256(b"through whichever region answers").digest()
    with Client([proxy.target, gateway.target], timeout=4, attempt_timeout=1.5) as client:
        assert client.sign(key_id, digest).signature and client.endpoint == proxy.target
        proxy.blackhole()
        # Connected, READY, and silent: the call gives the first region attempt_timeout to
        # answer, then asks the second within the caller's deadline.
        assert client.sign(key_id, digest).signature
        assert client.endpoint == gateway.target and client.failovers == 1
        started = time.monotonic()
        assert client.sign(key_id, digest).signature
        assert time.monotonic() - started < 1.0, "the client went back to the silent region"

    # A client that starts during the partition never connects to the first region.
    with Client([proxy.target, gateway.target], timeout=4, connect_timeout=0.5) as fresh:
        assert fresh.sign(key_id, digest).signature
        assert fresh.endpoint == gateway.target and fresh.failovers == 1


def test_an_application_retrying_a_key_creation_gets_its_key(gateway) -> None:
    """The first answer was lost (a timeout, a crash after the call): the application calls again,
    without a request_id of its own, and gets the key the first call made, not ALREADY_EXISTS."""
    key_id = unique("retried")
    with Client([gateway.target], timeout=30) as client:
        made = client.generate_key(key_id, "EC_P256")
    with Client([gateway.target], timeout=30) as client:
        assert client.generate_key(key_id, "EC_P256") == made
