"""``[server] fast_path``: on (the default) and off, a client sees the same gateway.

The rest of the suite runs with the fast path on. This starts one gateway with it
off and one with it on, and drives both through the methods the fast path serves:
signatures verified with ``cryptography``, an AES-GCM round trip, a precise error
with its rich status and request id, and a call the fast path leaves to the pool;
and a BatchSign its client cancels stops signing, as its /metrics show.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_status import rpc_status

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.moto import free_port
from tests.support import GatewayProcess, rpc_error, scrape, unique, value, wait_for

ECDSA = pb.ALGORITHM_ECDSA_SHA256


@pytest.fixture(params=[True, False], ids=["fast-path-on", "fast-path-off"])
def gateway_with(request, fleet) -> Iterator[tuple[GatewayProcess, bool]]:
    """A gateway with the fast path on or off, and /metrics on ``gateway.metrics_port``."""
    on = request.param
    text = fleet.config_path.read_text()
    assert "[server]\n" in text and "[metrics]" not in text
    config = fleet.config_path.with_name(f"fast-path-{'on' if on else 'off'}.toml")
    metrics_port = free_port()
    text += f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    config.write_text(text if on else text.replace("[server]\n", "[server]\nfast_path = false\n", 1))
    gateway = GatewayProcess(config).start()
    gateway.metrics_port = metrics_port  # type: ignore[attr-defined]
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


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_batch_whose_client_gives_up_stops_signing(gateway_with, ending) -> None:
    """A client that cancels a big batch, or whose deadline passes, does not leave the HSM
    signing the rest of it; /metrics say how the call ended."""
    gateway, _on = gateway_with
    port = gateway.metrics_port  # type: ignore[attr-defined]
    code = "CANCELLED" if ending == "cancel" else "DEADLINE_EXCEEDED"
    with grpc.insecure_channel(gateway.target) as channel:
        crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
        key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=unique("cancel"), key_id=unique("cancel"),
                                                       algorithm=pb.KEY_ALGORITHM_RSA_3072), timeout=60)
        items = [pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_RSA_PKCS1_SHA256,
                                digest=hashlib.sha256(str(i).encode()).digest()) for i in range(1000)]
        # Seconds of RSA-3072 signing: the client gives up 0.1 s into it.
        batch = crypto.BatchSign.future(pb.BatchSignRequest(requests=items), timeout=120 if ending == "cancel" else 0.3)
        if ending == "cancel":
            wait_for(lambda: value(scrape(port), "hsmgw_requests_in_flight") >= 1, what="the batch to start",
                     interval=0.01)
            time.sleep(0.1)
            assert batch.cancel()
        else:
            assert batch.exception(timeout=30).code() is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: value(scrape(port), "hsmgw_requests_total", rpc="BatchSign"), timeout=60,
                 what="the gateway to finish the batch")
    samples = scrape(port)
    signed = value(samples, "hsmgw_batch_items_total", code="OK")
    left = value(samples, "hsmgw_batch_items_total", code=code)
    assert signed + left == 1000
    assert left >= 500, f"{signed:.0f} of 1000 items were signed after the client gave up"
    assert value(samples, "hsmgw_requests_total", rpc="BatchSign", code=code) == 1
    assert value(samples, "hsmgw_requests_total", rpc="BatchSign", code="OK") == 0
    assert ("cancelled by its client" if ending == "cancel" else "past its deadline") in gateway.log()
