"""Every call of gateway.client.Client against the real gateway, and each one's failover.

Signatures and RSA-OAEP ciphertexts are checked with the ``cryptography`` library against the
key's public key, not with the gateway.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from gateway.client import Client, SignItem
from hsmgw.v1 import crypto_pb2 as pb
from tests.support import GatewayProcess, unique

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class _Down(grpc.GenericRpcHandler):
    """A region whose gateway answers every call UNAVAILABLE, as one that is stopping does."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        self.methods.append(details.method)

        def unavailable(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is stopping")
            raise AssertionError("abort returns no answer")

        return grpc.unary_unary_rpc_method_handler(unavailable)


@pytest.fixture
def down() -> Iterator[tuple[str, _Down]]:
    handler = _Down()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", handler
    server.stop(0).wait()


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[Client]:
    with Client([gateway.target], timeout=60) as made:
        yield made


def _public(client: Client, key_id: str) -> Any:
    return serialization.load_pem_public_key(client.public_key_pem(key_id).encode())


def test_generate_key_options_reach_the_gateway(client) -> None:
    three = client.generate_key(unique("copies"), "ec_p256", copies=3)
    assert len(three.replicas) == 2 and three.primary_cluster not in three.replicas
    alone = client.generate_key(unique("alone"), "EC_P256", copies=1, non_extractable=True)
    assert alone.non_extractable and list(alone.replicas) == []
    external = client.generate_key(unique("external"), "EC_P256", storage="external")
    assert external.storage == pb.KEY_STORAGE_EXTERNAL
    digest = hashlib.sha256(b"wrapped until used").digest()
    signature = client.sign(external.key_id, digest).signature
    _public(client, external.key_id).verify(signature, b"wrapped until used", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ValueError, match="valid names: TOKEN, EXTERNAL"):
        client.generate_key(unique("nowhere"), "EC_P256", storage="disk")
    with pytest.raises(ValueError, match="copies must be 0"):
        client.generate_key(unique("negative"), "EC_P256", copies=-1)


def test_aes_gcm_and_rsa_oaep(client) -> None:
    aes = client.generate_key(unique("aes"), "AES_256", usage="encrypt_decrypt").key_id
    sealed = client.encrypt(aes, b"card 4111", aad=b"order 7")
    assert len(sealed.iv) == 12 and len(sealed.ciphertext) == len(b"card 4111") + 16 and sealed.cluster
    assert client.decrypt(aes, sealed.ciphertext, iv=sealed.iv, aad=b"order 7") == b"card 4111"
    with pytest.raises(grpc.RpcError):  # the aad is authenticated
        client.decrypt(aes, sealed.ciphertext, iv=sealed.iv, aad=b"order 8")

    rsa_key = client.generate_key(unique("oaep"), "RSA_2048", usage="ENCRYPT_DECRYPT").key_id
    # Sealed here with the public key, opened by the HSM: the gateway's OAEP is the standard one.
    assert client.decrypt(rsa_key, _public(client, rsa_key).encrypt(b"pin 1234", OAEP),
                          algorithm="rsa_oaep_sha256") == b"pin 1234"
    sealed = client.encrypt(rsa_key, b"pin 5678", algorithm="RSA_OAEP_SHA256")
    assert len(sealed.ciphertext) == 256 and sealed.iv == b""
    assert client.decrypt(rsa_key, sealed.ciphertext, algorithm="RSA_OAEP_SHA256") == b"pin 5678"


def test_mac_and_verify_mac(client) -> None:
    key_id = client.generate_key(unique("hmac"), "HMAC_SHA256").key_id
    mac = client.mac(key_id, b"amount=10")
    assert len(mac) == 32 and client.mac(key_id, b"amount=10") == mac
    assert client.verify_mac(key_id, b"amount=10", mac)
    assert not client.verify_mac(key_id, b"amount=1000", mac)
    assert not client.verify_mac(key_id, b"amount=10", mac[:16])


def test_batch_sign_answers_each_item_in_order(client) -> None:
    key_id = client.generate_key(unique("batch"), "EC_P256").key_id
    missing = unique("missing")
    messages = [f"invoice {i}".encode() for i in range(4)]
    items = [
        SignItem(key_id, digest=hashlib.sha256(messages[0]).digest(), request_id="r0"),
        SignItem(key_id, message=messages[1], algorithm="ecdsa_sha256", request_id="r1"),
        SignItem(missing, message=messages[2], request_id="r2"),
        SignItem(key_id, message=messages[3], request_id="r3"),
    ]
    results = client.batch_sign(items)
    assert [r.request_id for r in results] == ["r0", "r1", "r2", "r3"]
    assert [r.ok for r in results] == [True, True, False, True]
    failed = results[2]
    assert (failed.code, failed.reason, failed.response) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND", None)
    assert missing in failed.message
    public = _public(client, key_id)
    for result, message in zip(results, messages, strict=True):
        if result.ok:
            assert result.response is not None and result.response.key_id == key_id
            public.verify(result.response.signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(results[0].response.signature, messages[1], ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ValueError, match="exactly one of digest and message"):
        SignItem(key_id, request_id="nothing to sign")


def test_keys_listed_a_page_at_a_time_then_destroyed(client) -> None:
    prefix = unique("listed") + "/"
    made = [client.generate_key(f"{prefix}{i}", "EC_P256").key_id for i in range(5)]
    first = client.list_keys(prefix=prefix, page_size=2)
    assert [k.key_id for k in first.keys] == made[:2] and first.next_page_token
    assert [k.key_id for k in client.iter_keys(prefix=prefix, page_size=2)] == made
    assert client.get_key(made[0]).state == pb.KEY_STATE_ENABLED

    assert client.destroy_key(made[0]).state == pb.KEY_STATE_DESTROYED
    assert client.destroy_key(made[0]).state == pb.KEY_STATE_DESTROYED  # idempotent
    assert client.get_key(made[0]).state == pb.KEY_STATE_DESTROYED
    with pytest.raises(grpc.RpcError):
        client.sign(made[0], bytes(32))


def test_generate_random(client) -> None:
    one, two = client.generate_random(32), client.generate_random(32)
    assert len(one) == len(two) == 32 and one != two


def test_every_call_moves_to_the_next_region_when_the_first_is_down(gateway, client, down) -> None:
    """Each call goes through the same failover: the region answering UNAVAILABLE is asked
    once, and the next one answers."""
    down_target, handler = down
    ec_key = client.generate_key(unique("fo-ec"), "EC_P256").key_id
    aes = client.generate_key(unique("fo-aes"), "AES_256").key_id
    hmac = client.generate_key(unique("fo-hmac"), "HMAC_SHA256").key_id
    doomed = client.generate_key(unique("fo-doomed"), "EC_P256").key_id
    digest = hashlib.sha256(b"m").digest()
    signature = client.sign(ec_key, digest).signature
    sealed = client.encrypt(aes, b"p")
    mac = client.mac(hmac, b"d")
    calls: dict[str, Callable[[Client], object]] = {
        "GetKey": lambda c: c.get_key(ec_key).key_id == ec_key,
        "ListKeys": lambda c: c.list_keys(prefix=ec_key).keys[0].key_id == ec_key,
        "GetPublicKey": lambda c: c.public_key_pem(ec_key).startswith("-----BEGIN PUBLIC KEY-----"),
        "Sign": lambda c: bool(c.sign(ec_key, digest).signature),
        "Verify": lambda c: c.verify(ec_key, signature, digest),
        "Encrypt": lambda c: len(c.encrypt(aes, b"p").iv) == 12,
        "Decrypt": lambda c: c.decrypt(aes, sealed.ciphertext, iv=sealed.iv) == b"p",
        "Mac": lambda c: c.mac(hmac, b"d") == mac,
        "VerifyMac": lambda c: c.verify_mac(hmac, b"d", mac),
        "GenerateRandom": lambda c: len(c.generate_random(8)) == 8,
        "BatchSign": lambda c: c.batch_sign([SignItem(ec_key, digest=digest)])[0].ok,
        "DestroyKey": lambda c: c.destroy_key(doomed).state == pb.KEY_STATE_DESTROYED,
    }
    for method, call in calls.items():
        with Client([down_target, gateway.target], timeout=30) as fresh:
            assert call(fresh) is True, method
            assert fresh.endpoint == gateway.target and fresh.failovers == 1, method
        assert handler.methods[-1] == f"/hsmgw.v1.CryptoService/{method}"
    assert len(handler.methods) == len(calls)
