"""End to end: gRPC → router → the cluster's pool → a real SoftHSM2 token, and back."""

from __future__ import annotations

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pkcs11 import ObjectClass

from hsmgw.v1 import crypto_pb2 as pb
from tests.support import rpc_error, unique

CLUSTERS = ("use1-a", "use1-b", "usw2-a")


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "hsmgw.v1.CryptoService", "hsmgw.cluster.use1-a"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"hsmgw.v1.CryptoService", "hsmgw.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_ec_keys_spread_over_clusters_and_live_only_there(crypto, tokens) -> None:
    prefix = unique("spread")
    keys = []
    # Consistent hashing over the two home clusters: with 8 random ids all would land on
    # one cluster about 1 run in 100; with 16, about 1 in 30,000.
    for i in range(16):
        key = crypto.GenerateKey(
            pb.GenerateKeyRequest(
                request_id=f"{prefix}-{i}", key_id=f"{prefix}/k{i}", algorithm=pb.KEY_ALGORITHM_EC_P256
            ),
            timeout=30,
        )
        assert key.state == pb.KEY_STATE_ENABLED
        assert key.algorithm == pb.KEY_ALGORITHM_EC_P256
        assert key.usage == pb.KEY_USAGE_SIGN_VERIFY
        keys.append(key)
    used = {k.primary_cluster for k in keys}
    assert len(used) >= 2, f"16 keys all landed on {used}"
    assert used <= {"use1-a", "use1-b"}, "new keys belong in the home region"

    for key in keys:
        holders = {key.primary_cluster, *key.replicas}
        assert "usw2-a" in key.replicas, "the default policy keeps a copy in the DR region"
        for cluster in holders:
            assert tokens.classes(cluster, key.key_id) == {ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY}
        for other in set(CLUSTERS) - holders:
            assert tokens.objects(other, key.key_id) == [], f"{key.key_id} also on {other}"

        pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key.key_id), timeout=10).pem
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"

        message = f"pay 10 EUR to {key.key_id}".encode()
        signed = crypto.Sign(
            pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=message), timeout=10
        )
        assert signed.cluster == key.primary_cluster
        public.verify(signed.signature, message, ec.ECDSA(hashes.SHA256()))  # raises if invalid

        digest = hashes.Hash(hashes.SHA256())
        digest.update(message)
        by_digest = crypto.Sign(
            pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest.finalize()),
            timeout=10,
        )
        public.verify(by_digest.signature, message, ec.ECDSA(hashes.SHA256()))

        ok = crypto.Verify(
            pb.VerifyRequest(
                key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=message, signature=signed.signature
            ),
            timeout=10,
        )
        assert ok.valid
        tampered = crypto.Verify(
            pb.VerifyRequest(
                key_id=key.key_id,
                algorithm=pb.ALGORITHM_ECDSA_SHA256,
                message=message + b"!",
                signature=signed.signature,
            ),
            timeout=10,
        )
        assert not tampered.valid


def test_aes_gcm_round_trip_and_wrong_aad(crypto, tokens) -> None:
    key_id = unique("aes")
    key = crypto.GenerateKey(
        pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30
    )
    assert tokens.classes(key.primary_cluster, key_id) == {ObjectClass.SECRET_KEY}
    plaintext = b"card 4111 1111 1111 1111"
    enc = crypto.Encrypt(
        pb.EncryptRequest(key_id=key_id, algorithm=pb.ALGORITHM_AES_GCM, plaintext=plaintext, aad=b"order-7"),
        timeout=10,
    )
    assert len(enc.iv) == 12 and len(enc.ciphertext) == len(plaintext) + 16
    assert plaintext not in enc.ciphertext
    dec = crypto.Decrypt(
        pb.DecryptRequest(
            key_id=key_id, algorithm=pb.ALGORITHM_AES_GCM, ciphertext=enc.ciphertext, iv=enc.iv, aad=b"order-7"
        ),
        timeout=10,
    )
    assert dec.plaintext == plaintext

    err = rpc_error(
        crypto.Decrypt,
        pb.DecryptRequest(
            key_id=key_id, algorithm=pb.ALGORITHM_AES_GCM, ciphertext=enc.ciphertext, iv=enc.iv, aad=b"order-8"
        ),
        timeout=10,
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decryption failed" in err.details()

    # The key never left the HSM: a random AES key cannot open the ciphertext.
    try:
        AESGCM(AESGCM.generate_key(256)).decrypt(enc.iv, enc.ciphertext, b"order-7")
        raise AssertionError("ciphertext opened without the HSM key")
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "InvalidTag"

    # The session that saw the failure still works.
    again = crypto.Decrypt(
        pb.DecryptRequest(
            key_id=key_id, algorithm=pb.ALGORITHM_AES_GCM, ciphertext=enc.ciphertext, iv=enc.iv, aad=b"order-7"
        ),
        timeout=10,
    )
    assert again.plaintext == plaintext


def test_generate_random(crypto) -> None:
    a = crypto.GenerateRandom(pb.GenerateRandomRequest(length=32), timeout=10).data
    b = crypto.GenerateRandom(pb.GenerateRandomRequest(length=32), timeout=10).data
    assert len(a) == 32 and a != b
