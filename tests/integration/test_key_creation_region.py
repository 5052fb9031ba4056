"""``[gateway] creates_keys = false``: a region that serves keys but does not make them.

Two real gateways on the shared fleet and placement store: the session's, which creates
keys, and one that does not (a second region's, sharing a global table).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.client import CREATION_ELSEWHERE, Client, error_reason
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.support import GatewayProcess, rpc_error, unique

CLUSTERS = ("use1-a", "use1-b", "usw2-a")


@pytest.fixture(scope="module")
def refusing(fleet) -> Iterator[GatewayProcess]:
    text = fleet.config_path.read_text()
    assert "[gateway]\n" in text
    config = fleet.config_path.with_name("no-creation.toml")
    config.write_text(text.replace("[gateway]\n", "[gateway]\ncreates_keys = false\n", 1))
    process = GatewayProcess(config).start()
    yield process
    process.stop()
    config.unlink()


@pytest.fixture
def refusing_stub(refusing: GatewayProcess) -> Iterator[crypto_pb2_grpc.CryptoServiceStub]:
    with grpc.insecure_channel(refusing.target) as channel:
        yield crypto_pb2_grpc.CryptoServiceStub(channel)


def _verify(pem: str, signature: bytes, digest: bytes) -> None:
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # raises if it does not verify


def test_it_refuses_a_new_key_before_making_anything(refusing_stub, crypto, tokens) -> None:
    key_id = unique("elsewhere")
    request = pb.GenerateKeyRequest(request_id=f"r-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    err = rpc_error(refusing_stub.GenerateKey, request, timeout=30)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == CREATION_ELSEWHERE
    assert "does not create keys ([gateway] creates_keys = false)" in (err.details() or "")
    assert all(tokens.objects(cluster, key_id) == [] for cluster in CLUSTERS)
    assert rpc_error(crypto.GetKey, pb.GetKeyRequest(key_id=key_id), timeout=10).code() is grpc.StatusCode.NOT_FOUND
    # The creating region then makes it under the same request id, as if nothing had happened.
    made = crypto.GenerateKey(request, timeout=30)
    assert made.key_id == key_id and len(tokens.objects(made.primary_cluster, key_id)) == 2


def test_it_serves_keys_made_elsewhere_and_answers_a_creation_already_made(refusing_stub, crypto) -> None:
    key_id = unique("made-there")
    request = pb.GenerateKeyRequest(request_id=f"r-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    made = crypto.GenerateKey(request, timeout=30)
    assert refusing_stub.GenerateKey(request, timeout=30) == made  # a retry of a creation that succeeded
    again = pb.GenerateKeyRequest(request_id=f"other-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    assert rpc_error(refusing_stub.GenerateKey, again, timeout=30).code() is grpc.StatusCode.ALREADY_EXISTS

    digest = hashlib.sha256(b"served in the other region").digest()
    signed = refusing_stub.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest),
                                timeout=30)
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).pem
    _verify(pem, signed.signature, digest)


def test_the_client_creates_on_its_next_endpoint_and_stays_where_it_was(refusing, gateway, tokens) -> None:
    key_id = unique("via-client")
    with Client([refusing.target, gateway.target], timeout=30) as client:
        key = client.generate_key(key_id, "EC_P256")
        assert key.key_id == key_id and len(tokens.objects(key.primary_cluster, key_id)) == 2
        assert client.endpoint == refusing.target and client.failovers == 0
        digest = hashlib.sha256(b"signed where the client was").digest()
        signed = client.sign(key_id, digest)
        _verify(client.public_key_pem(key_id), signed.signature, digest)
        assert client.endpoint == refusing.target

    lone_id = unique("nowhere")
    with Client([refusing.target], timeout=30) as client:
        err = rpc_error(client.generate_key, lone_id, "EC_P256")
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and error_reason(err) == CREATION_ELSEWHERE
    assert all(tokens.objects(cluster, lone_id) == [] for cluster in CLUSTERS)


def test_it_does_not_finish_a_creation_another_gateway_left_half_way(make_router, tokens) -> None:
    """A creation that crashed between the HSM and the store is an intent (CREATING): the
    gateway that retries it finishes it by making objects, which a non-creating one must not."""
    import time

    from router.errors import KeyCreationElsewhere
    from router.model import KeyAlgorithm, KeySpec, KeyState, KeyUsage

    class Crash(BaseException):
        pass

    def crash(point: str) -> None:
        if point == "created-on-hsm":
            raise Crash(point)

    key_id = unique("half-made")
    spec = KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id=f"r-{key_id}")
    with pytest.raises(Crash):
        make_router(fault=crash).generate_key(spec, time.monotonic() + 30)
    intent = make_router().store.get(key_id)
    assert intent is not None and intent.state is KeyState.CREATING
    before = {cluster: len(tokens.objects(cluster, key_id)) for cluster in CLUSTERS}

    with pytest.raises(KeyCreationElsewhere):
        make_router(creates_keys=False).generate_key(spec, time.monotonic() + 30)
    after = make_router().store.get(key_id)
    assert after is not None and after.state is KeyState.CREATING and after.version == intent.version
    assert {cluster: len(tokens.objects(cluster, key_id)) for cluster in CLUSTERS} == before

    # The creating region's reconciler, after the grace period, removes the half-made key.
    from router.reconcile import reconcile

    later = make_router(wall_clock=lambda: time.time() + 120)
    assert key_id in reconcile(later, fix=True).stale_intents
    assert later.store.get(key_id) is None and all(tokens.objects(c, key_id) == [] for c in CLUSTERS)
