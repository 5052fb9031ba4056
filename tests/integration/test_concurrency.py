"""Threads on pooled sessions must be safe with any module (SoftHSM included).

python-pkcs11 alone initialises SoftHSM without locking, and two threads then
corrupt its heap. The pool initialises the module with OS locking; this test
proves it: 8 threads × 2,000 mixed operations on two clusters in one process.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import threading
import time
import tomllib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from router.errors import DeadlineExceeded
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


def test_a_session_handed_back_while_the_pool_closes_is_closed_too(fleet, tokens) -> None:
    """A stop closes the pool between a call's "is the pool closed?" check and its hand-back:
    the session it hands back is closed with the rest, not left open in a closed pool."""
    import collections

    from router.errors import Stopping

    backend = _single_session(fleet, tokens)
    pool = backend.pool

    class _ClosingFirst(collections.deque):  # the stop lands just before the append
        def append(self, session) -> None:
            pool.close()
            super().append(session)

    try:
        session = pool.acquire(time.monotonic() + 5)
        pool._idle = _ClosingFirst(pool._idle)
        pool.release(session)
        assert backend.stats().open == 0, "a session was left open in the closed pool"
        assert not pool._idle
        with pytest.raises(Stopping):
            pool.acquire(time.monotonic() + 5)
    finally:
        backend.close()


def _single_session(fleet, tokens, **spec_kw) -> Pkcs11Cluster:
    pins = tomllib.loads(fleet.secrets_path.read_text())["clusters"]
    tokens.session("use1-a")
    spec = ClusterSpec(name="use1-a", region="us-east-1", token_label="use1-a", pool_size=1, **spec_kw)
    return Pkcs11Cluster(tokens.module, spec, Secret(pins["use1-a"]["user_pin"]))


def test_a_quick_call_waits_for_a_session_no_longer_than_call_timeout(fleet, tokens) -> None:
    """A signature that finds every session taken goes to a replica after call_timeout,
    not at its deadline: by then the replica could no longer answer."""
    from router.errors import SessionsBusy

    backend = _single_session(fleet, tokens, call_timeout=0.3)
    try:
        with backend.pool.session(time.monotonic() + 60):  # a key creation's long call, not late
            start = time.monotonic()
            with pytest.raises(SessionsBusy, match="all 1 sessions of cluster use1-a are busy$"):
                backend.random(8, time.monotonic() + 30)
            assert time.monotonic() - start < 10, "the quick call waited toward its deadline"
            assert backend.hung_calls() == (0, 0.0) and backend.stats().hung == 0
        assert len(backend.random(8, time.monotonic() + 30)) == 8
    finally:
        backend.close()


def test_a_call_past_call_timeout_is_reported_hung_and_its_waiters_give_up(fleet, tokens) -> None:
    """A session held past its call's time counts as hung (what the watchdog reads), and a
    caller waiting for it, with all the time in the world, gives up once it is."""
    from router.errors import SessionsBusy

    backend = _single_session(fleet, tokens, call_timeout=0.3)
    pool = backend.pool
    try:
        session = pool.acquire(time.monotonic() + 30, quick=True)  # a signature that will not return
        try:
            assert backend.hung_calls() == (0, 0.0)
            waiter: list[BaseException | None] = []

            def wait() -> None:
                try:
                    pool.release(pool.acquire(time.monotonic() + 60))  # a key creation's wait
                    waiter.append(None)
                except BaseException as exc:  # noqa: BLE001 - the test reads it
                    waiter.append(exc)

            thread = threading.Thread(target=wait)
            thread.start()
            thread.join(timeout=20)
            assert not thread.is_alive(), "the waiter waited on behind a hung call"
            assert isinstance(waiter[0], SessionsBusy), waiter
            assert "1 call(s) have not returned for" in waiter[0].message
            count, oldest = backend.hung_calls()
            assert count == 1 and oldest >= 0.3
            assert backend.stats().hung == 1 and backend.stats().in_use == 1
        finally:
            pool.release(session)
        assert backend.hung_calls() == (0, 0.0) and backend.stats().hung == 0
        assert len(backend.random(8, time.monotonic() + 5)) == 8
    finally:
        backend.close()


def test_a_long_batch_is_not_hung_while_each_signature_returns_in_time(fleet, tokens) -> None:
    """BatchSign signs a group on one checkout; each signature is a call of its own, so a
    batch longer than call_timeout is never reported hung."""
    backend = _single_session(fleet, tokens, call_timeout=0.2)
    key = placement(unique("long-batch"), KeyAlgorithm.RSA_2048)
    try:
        backend.generate(key, time.monotonic() + 60)
        seen: list[tuple[int, float]] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(backend.hung_calls())
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        digests = [hashlib.sha256(str(i).encode()).digest() for i in range(1000)]
        start = time.monotonic()
        try:
            signed = backend.sign_many(key, Operation.RSA_PKCS1_SHA256, digests, time.monotonic() + 120)
        finally:
            done.set()
            watcher.join()
        took = time.monotonic() - start
        assert took > 0.2, f"the batch took {took:.2f} s: too short to show anything"
        assert all(isinstance(sig, bytes) for sig in signed)
        assert len(seen) > 10 and all(count == 0 for count, _ in seen), [s for s in seen if s[0]][:3]
    finally:
        backend.destroy(key.key_id, time.monotonic() + 60)
        backend.close()


def test_a_first_use_stuck_in_one_hsm_does_not_hold_up_first_uses_elsewhere(clusters) -> None:
    """python-pkcs11 reads a key's type on first use through a cached_property, which on
    Python 3.11 holds one lock for every key object of the process. A thread whose read
    hangs in one HSM holds it; here the test holds it, and signatures with keys never
    used before (a replica's, when requests fail over) must still be made."""
    import pkcs11.types

    lock = getattr(pkcs11.types.HasKeyType.__dict__["key_type"], "lock", None)
    if lock is None:
        pytest.skip("this Python's cached_property takes no lock")
    far = time.monotonic() + 60
    backend = clusters["use1-b"]
    keys = [placement(unique("first-use"), alg) for alg in (KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048)]
    for key in keys:
        backend.generate(key, far)
    publics = [serialization.load_der_public_key(backend.public_key(key, far)) for key in keys]
    backend.pool.invalidate_keys()  # every session finds its key objects anew
    results: list[bytes | BaseException] = []

    def sign() -> None:
        try:
            for key in keys:
                op = Operation.ECDSA_SHA256 if key.algorithm is KeyAlgorithm.EC_P256 else Operation.RSA_PKCS1_SHA256
                results.append(backend.sign(key, op, hashlib.sha256(b"first").digest(), time.monotonic() + 10))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            results.append(exc)

    with lock:  # another thread's first read, stuck in a hung HSM
        thread = threading.Thread(target=sign, daemon=True)
        thread.start()
        thread.join(timeout=15)
        stuck = thread.is_alive()
    thread.join(timeout=15)
    assert not stuck, "a first use waited on another key's first use"
    assert len(results) == 2 and all(isinstance(r, bytes) for r in results), results
    ec_public, rsa_public = publics
    ec_public.verify(results[0], b"first", ec.ECDSA(hashes.SHA256()))
    rsa_public.verify(results[1], b"first", padding.PKCS1v15(), hashes.SHA256())
    for key in keys:
        backend.destroy(key.key_id, far)


def test_concurrent_creations_and_copies_on_one_token_all_succeed_and_leave_one_of_each_object(clusters) -> None:
    """Key creations, copies and first uses running at once on the same tokens.

    SoftHSM 2.6 (Debian 12's) races when threads of one process create token objects
    at once: a creation fails with CKR_GENERAL_ERROR or CKR_TEMPLATE_INCONSISTENT, or
    a new object goes missing from a search right after it was made. A user sees a
    GenerateKey fail with NOT_FOUND, or a copy acknowledged that is not there.
    """
    source, target = clusters["use1-a"], clusters["use1-b"]
    threads, per_thread = 8, 12
    failures: list[str] = []
    made: list = []
    lock = threading.Lock()

    def work(index: int) -> None:
        for i in range(per_thread):
            key = placement(unique(f"burst-{index}-{i}"), KeyAlgorithm.EC_P256)
            deadline = time.monotonic() + 60
            try:
                source.generate(key, deadline)
                wrapped, public_der = source.export_wrapped(key, deadline)
                target.import_wrapped(key, wrapped, public_der, deadline)
                digest = hashlib.sha256(key.key_id.encode()).digest()
                signatures = [b.sign(key, Operation.ECDSA_SHA256, digest, deadline) for b in (source, target)]
            except Exception as exc:  # every failure is the finding, with its type
                with lock:
                    failures.append(f"{key.key_id}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                made.append((key, public_der, signatures))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    assert failures == [], f"{len(failures)} of {threads * per_thread} failed: {failures[:5]}"
    assert len(made) == threads * per_thread
    far = time.monotonic() + 60
    for key, public_der, signatures in made:
        public = serialization.load_der_public_key(public_der)
        for signature in signatures:
            public.verify(signature, key.key_id.encode(), ec.ECDSA(hashes.SHA256()))
        for backend in (source, target):
            assert backend.key_objects(far, key_id=key.key_id) == {key.key_id: {"private key": 1, "public key": 1}}, (
                f"{key.key_id} on {backend.spec.name}"
            )


def test_a_creation_waits_for_another_process_changing_the_token_no_longer_than_its_deadline(clusters, tokens) -> None:
    """Another gateway process is changing the token's objects and does not let go: the
    creation gives up at its deadline with DEADLINE_EXCEEDED, having made nothing, and
    goes ahead once the other process is done."""
    backend = clusters["use1-a"]
    path = backend.pool._objects._path
    assert path is not None
    other = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # a second open stands for another process
    fcntl.flock(other, fcntl.LOCK_EX)
    key = placement(unique("held"), KeyAlgorithm.EC_P256)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="waiting to change objects on cluster use1-a"):
            backend.generate(key, started + 0.5)
        assert time.monotonic() - started < 5
        assert tokens.objects("use1-a", key.key_id) == []
    finally:
        os.close(other)
    backend.generate(key, time.monotonic() + 30)
    try:
        made = sorted(o.object_class.name for o in tokens.objects("use1-a", key.key_id))
        assert made == ["PRIVATE_KEY", "PUBLIC_KEY"]
    finally:
        backend.destroy(key.key_id, time.monotonic() + 30)


def test_a_cluster_with_serialize_object_changes_off_does_not_wait_for_the_token_lock(fleet, tokens) -> None:
    """For a module known to be safe: creations neither take nor wait for the token's locks."""
    free = _single_session(fleet, tokens, serialize_object_changes=False)
    path = tokens.module.objects("use1-a")._path  # the lock every cluster on this token shares
    assert path is not None
    other = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    key = placement(unique("free"), KeyAlgorithm.EC_P256)
    try:
        free.generate(key, time.monotonic() + 0.5)  # would give up at its deadline if it waited
    finally:
        os.close(other)
        free.destroy(key.key_id, time.monotonic() + 30)
        free.close()
