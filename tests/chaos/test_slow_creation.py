"""A key that takes seconds to make, asked for by several clients at once with one request_id
through deploy/grpc-service-config.json: gRPC's own retries, paced by the gateway's pushback,
wait the creation out, and every client gets the one key.

The HSM answers every call a little late (faultmod ``latency``), so an RSA_3072 creation takes
seconds, as it does on a real HSM; SoftHSM alone makes one in well under a second."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import faulty_fleet
from tests.support import ROOT, GatewayProcess

SERVICE_CONFIG = ROOT / "deploy" / "grpc-service-config.json"
CLIENTS = 6
LATENCY_MS = 40
"""Per PKCS #11 call: a replicated RSA_3072 creation, some fifty calls, then takes 2-4 s."""


def test_clients_with_the_service_config_wait_out_a_creation_that_takes_seconds(
    tmp_path: Path, faultmod: Path
) -> None:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    # The chaos fleet's 3 s grace would let a retry take a creation this slow over.
    text = fleet.config_path.read_text().replace("creation_grace = 3.0", "creation_grace = 60.0")
    assert "creation_grace = 60.0" in text
    fleet.config_path.write_text(text)
    gateway = GatewayProcess(fleet.config_path).start()
    options = [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG.read_text())]
    request = pb.GenerateKeyRequest(request_id="slow-rsa-1", key_id="slow/rsa-1", algorithm=pb.KEY_ALGORITHM_RSA_3072)
    start = threading.Barrier(CLIENTS)
    outcomes: dict[int, pb.Key | str] = {}

    def create(index: int) -> None:
        with grpc.insecure_channel(gateway.target, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            start.wait(timeout=30)
            try:
                # No timeout of its own: the service config's applies, as it would in any client.
                outcomes[index] = stub.GenerateKey(request)
            except grpc.RpcError as exc:
                outcomes[index] = f"{exc.code().name}: {exc.details()}"

    try:
        control.set("*", "latency", LATENCY_MS)
        threads = [threading.Thread(target=create, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        control.clear()
        gateway.stop()

    failed = {i: o for i, o in outcomes.items() if isinstance(o, str)}
    assert len(outcomes) == CLIENTS and not failed, failed
    keys = [o for o in outcomes.values() if isinstance(o, pb.Key)]
    assert {(k.key_id, k.primary_cluster, k.create_time.ToNanoseconds()) for k in keys} == {
        (keys[0].key_id, keys[0].primary_cluster, keys[0].create_time.ToNanoseconds())
    }, "every client got the one key"
    assert keys[0].state == pb.KEY_STATE_ENABLED
