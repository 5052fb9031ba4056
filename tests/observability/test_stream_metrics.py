"""A streaming call its client gives up on is counted as its client saw it end.

A grpc.health.v1 Watch never ends by itself: its deadline ends it, or its client cancels it.
A SignStream ends the same way while it waits for its client's next message. Neither is an OK
anyone received: /metrics counts them as DEADLINE_EXCEEDED and CANCELLED, as it counts a unary
call answered after its deadline.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.fleet import init_fleet
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.moto import free_port
from tests.support import GatewayProcess, Samples, scrape, unique, value, wait_for

SERVICES = {"Watch": "grpc.health.v1.Health", "SignStream": "hsmgw.v1.CryptoService"}


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    fleet = init_fleet(tmp_path_factory.mktemp("fleet") / "f", listen="127.0.0.1:0")
    port = free_port()
    fleet.config_path.write_text(fleet.config_path.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    gateway = GatewayProcess(fleet.config_path).start()
    yield gateway, port
    gateway.stop()


def _open(channel: grpc.Channel, rpc: str, timeout: float | None, done: list[Any]) -> tuple[Any, Any]:
    """The call, answering; and what it answered first. ``done`` gets what ends its requests."""
    if rpc == "Watch":
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                           timeout=timeout)
        return stream, next(stream)
    crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
    key_id = unique("stream")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256),
                       timeout=60)
    outbox: queue.Queue[pb.SignRequest | None] = queue.Queue()
    outbox.put(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"))

    def requests() -> Iterator[pb.SignRequest]:
        while (request := outbox.get()) is not None:  # then waits: the stream stays open
            yield request

    done.append(lambda: outbox.put(None))
    stream = crypto.SignStream(requests(), timeout=timeout)
    return stream, next(stream)


def _counted(before: Samples, port: int, rpc: str) -> Samples:
    labels = {"service": SERVICES[rpc], "rpc": rpc}
    return wait_for(lambda: (now := scrape(port)) and value(now, "hsmgw_requests_total", **labels)
                    > value(before, "hsmgw_requests_total", **labels) and now, what=f"the {rpc} to be counted")


@pytest.mark.parametrize("rpc", ["Watch", "SignStream"])
@pytest.mark.parametrize("ending", ["deadline", "cancel", "cancel-without-deadline"])
def test_a_stream_its_client_gave_up_on_counts_as_the_client_saw_it(observed: tuple[GatewayProcess, int], rpc: str,
                                                                    ending: str) -> None:
    gateway, port = observed
    before = scrape(port)
    done: list[Any] = []
    with grpc.insecure_channel(gateway.target) as channel:
        try:
            timeout = {"deadline": 2.0, "cancel": 60.0, "cancel-without-deadline": None}[ending]
            stream, first = _open(channel, rpc, timeout, done)
            assert first.status == health_pb2.HealthCheckResponse.SERVING if rpc == "Watch" else first.signature
            if ending != "deadline":
                stream.cancel()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
        finally:
            for end in done:
                end()
    code = "DEADLINE_EXCEEDED" if ending == "deadline" else "CANCELLED"
    assert ended.value.code().name == code
    after = _counted(before, port, rpc)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    counted = {"service": SERVICES[rpc], "rpc": rpc}
    assert added("hsmgw_requests_total", **counted, code=code) == 1
    assert added("hsmgw_requests_total", **counted) == 1, "no OK besides"
    assert added("hsmgw_errors_total", reason=code) == 1
