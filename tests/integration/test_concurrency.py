"""Threads on pooled sessions must be safe with any module (SoftHSM included).

python-pkcs11 alone initialises SoftHSM without locking, and two threads then
corrupt its heap. The pool initialises the module with OS locking; this test
proves it: 8 threads × 2,000 mixed operations on two clusters in one process.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import tomllib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from router.model import ClusterSpec, KeyAlgorithm, Operation
from router.pkcs11 import Pkcs11Cluster
from router.secret import Secret
from tests.support import placement, unique

THREADS = 8
OPS_PER_THREAD = 2000


@pytest.fixture
def clusters(fleet, tokens):
    pins = tomllib.loads(fleet.secrets_path.read_text())["clusters"]
    backends = {}
    for name in ("use1-a", "use1-b"):
        tokens.session(name)  # the inspector holds the login; the pool shares it
        spec = ClusterSpec(name=name, region="us-east-1", token_label=name, pool_size=4)
        backends[name] = Pkcs11Cluster(tokens.module, spec, Secret(pins[name]["user_pin"]))
    yield backends
    for backend in backends.values():
        backend.close()


def test_eight_threads_mixed_operations_on_two_clusters(clusters, tokens) -> None:
    far = time.monotonic() + 600
    keys = {}
    for name, backend in clusters.items():
        ec_key = placement(unique("stress-ec"), KeyAlgorithm.EC_P256)
        aes_key = placement(unique("stress-aes"), KeyAlgorithm.AES_256)
        backend.generate(ec_key, far)
        backend.generate(aes_key, far)
        public = serialization.load_der_public_key(backend.public_key(ec_key, far))
        keys[name] = (ec_key, aes_key, public)

    errors: list[str] = []
    done = [0] * THREADS
    checked_signatures = [0] * THREADS

    def work(index: int) -> None:
        rng = random.Random(index)
        try:
            for i in range(OPS_PER_THREAD):
                name = rng.choice(list(clusters))
                backend = clusters[name]
                ec_id, aes_id, public = keys[name]
                deadline = time.monotonic() + 30
                kind = i % 4
                if kind == 0:
                    message = os.urandom(24)
                    digest = hashlib.sha256(message).digest()
                    signature = backend.sign(ec_id, Operation.ECDSA_SHA256, digest, deadline)
                    if i % 40 == 0:  # verify a sample independently
                        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
                        checked_signatures[index] += 1
                    if not backend.verify(ec_id, Operation.ECDSA_SHA256, digest, signature, deadline):
                        errors.append(f"thread {index}: own signature did not verify")
                elif kind == 1:
                    plaintext = os.urandom(rng.randint(0, 256))
                    ciphertext, iv = backend.encrypt(aes_id, Operation.AES_GCM, plaintext, b"aad", deadline)
                    if backend.decrypt(aes_id, Operation.AES_GCM, ciphertext, iv, b"aad", deadline) != plaintext:
                        errors.append(f"thread {index}: AES-GCM round trip differs")
                elif kind == 2:
                    if len(backend.random(32, deadline)) != 32:
                        errors.append(f"thread {index}: short random")
                else:
                    backend.public_key(ec_id, deadline)
                done[index] += 1
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(f"thread {index}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert errors == []
    assert sum(done) == THREADS * OPS_PER_THREAD
    assert sum(checked_signatures) >= THREADS * OPS_PER_THREAD // 160
    for name, backend in clusters.items():
        stats = backend.stats()
        assert stats.open == 4 and stats.in_use == 0, f"{name}: {stats}"


def test_a_full_pool_answers_resource_exhausted_at_the_deadline(fleet, tokens) -> None:
    """Every session busy: the caller waits no longer than its deadline, then RESOURCE_EXHAUSTED."""
    from router.errors import ResourceExhausted

    pins = tomllib.loads(fleet.secrets_path.read_text())["clusters"]
    tokens.session("use1-a")
    spec = ClusterSpec(name="use1-a", region="us-east-1", token_label="use1-a", pool_size=1)
    backend = Pkcs11Cluster(tokens.module, spec, Secret(pins["use1-a"]["user_pin"]))
    try:
        with backend.pool.session(time.monotonic() + 5):  # the only session, held by someone else
            start = time.monotonic()
            try:
                backend.random(8, time.monotonic() + 0.2)
                raise AssertionError("a full pool served a request")
            except ResourceExhausted as exc:
                waited = time.monotonic() - start
                assert "busy" in exc.message and exc.cluster == "use1-a"
                assert exc.retry_after is not None
            assert waited < 2.0, "the caller waited past its deadline"
            assert backend.stats().in_use == 1
        assert len(backend.random(8, time.monotonic() + 5)) == 8  # free again, same single session
        assert backend.stats().open == 1 and backend.stats().in_use == 0
    finally:
        backend.close()


def test_a_session_that_cannot_be_reopened_is_a_cluster_fault_and_uses_up_nothing(fleet, tokens) -> None:
    """The HSM refuses a replacement session: the caller sees the cluster down (so the
    dispatcher fails over), and once the HSM is back the pool serves again at full size."""
    import pkcs11.exceptions as p11

    from router.errors import ClusterDown

    pins = tomllib.loads(fleet.secrets_path.read_text())["clusters"]
    tokens.session("use1-a")
    spec = ClusterSpec(name="use1-a", region="us-east-1", token_label="use1-a", pool_size=1)
    backend = Pkcs11Cluster(tokens.module, spec, Secret(pins["use1-a"]["user_pin"]))
    pool = backend.pool
    reopen = pool._new_session

    def refused() -> None:
        raise p11.DeviceRemoved()

    try:
        with pool.session(time.monotonic() + 5) as session:
            session.broken = True  # as after CKR_SESSION_HANDLE_INVALID: closed when handed back
            pool._new_session = refused  # ...and the HSM refuses its replacement
        assert backend.stats().open == 0
        for _ in range(3):
            with pytest.raises(ClusterDown, match="use1-a is not reachable"):
                backend.random(8, time.monotonic() + 5)
        pool._new_session = reopen
        assert len(backend.random(8, time.monotonic() + 0.5)) == 8  # not "all 1 sessions are busy"
        assert backend.stats().open == 1 and backend.stats().in_use == 0
    finally:
        pool._new_session = reopen
        backend.close()
