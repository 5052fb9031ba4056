"""The wrapped-key tier: more keys than the HSM holds, unwrapped on use."""

from __future__ import annotations

import hashlib
import random
import threading
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import Attribute

from hsmgw.v1 import crypto_pb2 as pb
from router.model import KeyAlgorithm, KeySpec, KeyStorage, KeyUsage, Operation
from tests.support import unique

KEYS = 2000
SIGNED = 200
MAX_KEYS = 50
CACHE = 32


def test_two_thousand_external_keys_on_a_fifty_key_cluster(make_router, tokens) -> None:
    router = make_router(spec_changes={"max_keys": MAX_KEYS, "unwrapped_cache": CACHE, "pool_size": 4})
    before = {name: tokens.count(name) for name in router.backends}
    prefix = unique("ext")
    ids = [f"{prefix}/k{i:04d}" for i in range(KEYS)]
    errors: list[str] = []

    def create(chunk: list[str]) -> None:
        try:
            for key_id in chunk:
                spec = KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                               request_id=key_id, storage=KeyStorage.EXTERNAL)
                router.generate_key(spec, time.monotonic() + 60)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=create, args=(ids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    # Every key is in the store, wrapped; none is a token object.
    sample = router.store.get(ids[0])
    assert sample.external and len(sample.wrapped) > 0 and sample.public_der
    assert {name: tokens.count(name) for name in router.backends} == before

    rng = random.Random(7)
    chosen = rng.sample(ids, SIGNED)
    for key_id in chosen:
        message = f"message for {key_id}".encode()
        signature, _cluster = router.sign(key_id, Operation.ECDSA_SHA256, None, message, time.monotonic() + 10)
        _, der = router.public_key(key_id, time.monotonic() + 10)
        public = serialization.load_der_public_key(der)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        digest = hashlib.sha256(message).digest()
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        assert router.verify(key_id, Operation.ECDSA_SHA256, digest, None, signature, time.monotonic() + 10)

    # Token objects did not grow; unwrapped session objects stay within the cache.
    assert {name: tokens.count(name) for name in router.backends} == before
    for name, backend in router.backends.items():
        held = sum(len(s.unwrapped) for s in backend.pool._idle)
        assert held <= CACHE, f"{name} holds {held} unwrapped keys"
    session_objects = list(tokens.session("use1-a").get_objects({Attribute.TOKEN: False}))
    assert len(session_objects) <= 3 * CACHE


def test_external_key_through_grpc(crypto) -> None:
    key_id = unique("ext-grpc")
    key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256,
                                                   storage=pb.KEY_STORAGE_EXTERNAL), timeout=30)
    assert key.storage == pb.KEY_STORAGE_EXTERNAL
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).pem
    signed = crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"), timeout=10)
    serialization.load_pem_public_key(pem.encode()).verify(signed.signature, b"m", ec.ECDSA(hashes.SHA256()))

    aes_id = unique("ext-aes")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=aes_id, key_id=aes_id, algorithm=pb.KEY_ALGORITHM_AES_256,
                                             storage=pb.KEY_STORAGE_EXTERNAL), timeout=30)
    enc = crypto.Encrypt(pb.EncryptRequest(key_id=aes_id, algorithm=pb.ALGORITHM_AES_GCM, plaintext=b"p", aad=b"a"),
                         timeout=10)
    dec = crypto.Decrypt(pb.DecryptRequest(key_id=aes_id, algorithm=pb.ALGORITHM_AES_GCM, ciphertext=enc.ciphertext,
                                           iv=enc.iv, aad=b"a"), timeout=10)
    assert dec.plaintext == b"p"
