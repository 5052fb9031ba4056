"""Two gateways share one DynamoDB placement table (moto_server over HTTP)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.support import GatewayProcess


@pytest.fixture
def two_gateways(dynamo_fleet):
    moto, fleet = dynamo_fleet
    a = GatewayProcess(fleet.config_path).start()
    b = GatewayProcess(fleet.config_path).start()
    try:
        yield moto, a, b
    finally:
        a.stop()
        b.stop()


def _stub(target: str) -> crypto_pb2_grpc.CryptoServiceStub:
    return crypto_pb2_grpc.CryptoServiceStub(grpc.insecure_channel(target))


def test_two_gateways_one_table(two_gateways) -> None:
    moto, a, b = two_gateways
    sa, sb = _stub(a.target), _stub(b.target)

    # The same key id from both at once: exactly one wins.
    results: dict[str, object] = {}

    def create(name: str, stub) -> None:
        try:
            results[name] = stub.GenerateKey(pb.GenerateKeyRequest(
                request_id=f"race-{name}", key_id="shared/race", algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
        except grpc.RpcError as exc:
            results[name] = exc.code()

    threads = [threading.Thread(target=create, args=(n, s)) for n, s in (("a", sa), ("b", sb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results.values() if isinstance(r, pb.Key)]
    assert len(winners) == 1, results
    assert grpc.StatusCode.ALREADY_EXISTS in results.values(), results

    # The same request id from both: the same key (idempotent), never two.
    keys = []
    for stub in (sa, sb):
        for _ in range(50):
            try:
                keys.append(stub.GenerateKey(pb.GenerateKeyRequest(
                    request_id="same-request", key_id="shared/same", algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # "being created": retry
                time.sleep(0.2)
    assert len(keys) == 2 and keys[0] == keys[1]

    # A placement written through one gateway is served by the other.
    made = sa.GenerateKey(pb.GenerateKeyRequest(request_id="via-a", key_id="shared/via-a",
                                                algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
    enc = sb.Encrypt(pb.EncryptRequest(key_id=made.key_id, algorithm=pb.ALGORITHM_AES_GCM, plaintext=b"p"), timeout=10)
    assert sa.Decrypt(pb.DecryptRequest(key_id=made.key_id, algorithm=pb.ALGORITHM_AES_GCM,
                                        ciphertext=enc.ciphertext, iv=enc.iv), timeout=10).plaintext == b"p"

    # The store goes away: known keys keep signing, new keys fail with UNAVAILABLE.
    moto.pause()
    try:
        for stub in (sa, sb):
            signed = stub.Sign(pb.SignRequest(key_id="shared/same", algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                              digest=b"\x05" * 32), timeout=10)
            assert signed.signature
        with pytest.raises(grpc.RpcError) as refused:
            sa.GenerateKey(pb.GenerateKeyRequest(request_id="while-down", key_id="shared/while-down",
                                                 algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        moto.resume()

    # It comes back: creations work again.
    again = sa.GenerateKey(pb.GenerateKeyRequest(request_id="after", key_id="shared/after",
                                                 algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    assert again.state == pb.KEY_STATE_ENABLED
    assert sb.GetKey(pb.GetKeyRequest(key_id="shared/after"), timeout=10).primary_cluster == again.primary_cluster
