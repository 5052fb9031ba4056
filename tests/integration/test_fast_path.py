"""``[server] fast_path``: on (the default) and off, a client sees the same gateway.

The rest of the suite runs with the fast path on. This starts one gateway with it
off and one with it on, and drives both through the methods the fast path serves:
signatures verified with ``cryptography``, an AES-GCM round trip, a precise error
with its rich status and request id, and a call the fast path leaves to the pool.
(A BatchSign its client gives up on: tests/chaos/test_batch_cancel.py.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_status import rpc_status

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.support import GatewayProcess, rpc_error, unique

ECDSA = pb.ALGORITHM_ECDSA_SHA256


@pytest.fixture(params=[True, False], ids=["fast-path-on", "fast-path-off"])
def gateway_with(request, fleet) -> Iterator[tuple[GatewayProcess, bool]]:
    on = request.param
    text = fleet.config_path.read_text()
    assert "[server]\n" in text
    config = fleet.config_path.with_name(f"fast-path-{'on' if on else 'off'}.toml")
    config.write_text(text if on else text.replace("[server]\n", "[server]\nfast_path = false\n", 1))
    gateway = GatewayProcess(config).start()
    try:
        yield gateway, on
    finally:
        gateway.stop()
        config.unlink()


def test_fast_path_on_and_off_serve_the_same_answers(gateway_with) -> None:
    gateway, on = gateway_with
    with grpc.insecure_channel(gateway.target) as channel:
        crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
        prefix = unique("fast")
        ec_key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=f"{prefix}-ec", key_id=f"{prefix}/ec",
                                                          algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
        pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=ec_key.key_id), timeout=10).pem
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        message = b"pay 10 to 42"
        signed, call = crypto.Sign.with_call(
            pb.SignRequest(key_id=ec_key.key_id, algorithm=ECDSA, message=message),
            timeout=10, metadata=(("x-request-id", f"{prefix}-sign"),))
        public.verify(signed.signature, message, ec.ECDSA(hashes.SHA256()))  # raises if invalid
        assert ("x-request-id", f"{prefix}-sign") in tuple(call.trailing_metadata())
        verified = crypto.Verify(pb.VerifyRequest(key_id=ec_key.key_id, algorithm=ECDSA,
                                                  digest=hashlib.sha256(message).digest(),
                                                  signature=signed.signature), timeout=10)
        assert verified.valid

        aes = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=f"{prefix}-aes", key_id=f"{prefix}/aes",
                                                       algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
        sealed = crypto.Encrypt(pb.EncryptRequest(key_id=aes.key_id, algorithm=pb.ALGORITHM_AES_GCM,
                                                  plaintext=b"card 4111", aad=b"ctx"), timeout=10)
        opened = crypto.Decrypt(pb.DecryptRequest(key_id=aes.key_id, algorithm=pb.ALGORITHM_AES_GCM,
                                                  ciphertext=sealed.ciphertext, iv=sealed.iv, aad=b"ctx"), timeout=10)
        assert opened.plaintext == b"card 4111"

        missing = f"{prefix}/missing"
        err = rpc_error(crypto.Sign, pb.SignRequest(key_id=missing, algorithm=ECDSA,
                                                    digest=b"\x00" * 32),
                        timeout=10, metadata=(("x-request-id", f"{prefix}-missing"),))
        assert err.code() is grpc.StatusCode.NOT_FOUND and missing in err.details()
        assert rpc_status.from_call(err).details, "the rich status (ErrorInfo) is missing"
        assert ("x-request-id", f"{prefix}-missing") in tuple(err.trailing_metadata())

        digest = hashlib.sha256(message).digest()
        batch, call = crypto.BatchSign.with_call(pb.BatchSignRequest(requests=[
            pb.SignRequest(key_id=ec_key.key_id, algorithm=ECDSA, digest=digest),
            pb.SignRequest(key_id=missing, algorithm=ECDSA, digest=digest)]),
            timeout=10, metadata=(("x-request-id", f"{prefix}-batch"),))
        public.verify(batch.responses[0].response.signature, message, ec.ECDSA(hashes.SHA256()))
        assert batch.responses[1].code == grpc.StatusCode.NOT_FOUND.value[0] and missing in batch.responses[1].message
        assert ("x-request-id", f"{prefix}-batch") in tuple(call.trailing_metadata())
        err = rpc_error(crypto.BatchSign, pb.BatchSignRequest(), timeout=10)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "1 to 1000 requests, not 0" in err.details()

    log = gateway.log()
    assert ("unary crypto calls on the fast path" in log) is on, log[-2000:]
