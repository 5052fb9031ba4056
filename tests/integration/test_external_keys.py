"""The wrapped-key tier: more keys than the HSM holds, unwrapped on use."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from grpc_status import rpc_status
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from gateway.status import error_info
from hsmgw.v1 import crypto_pb2 as pb
from router._refused import REFUSED_FOR
from router.errors import (
    ClusterDown,
    FailedPrecondition,
    KeyChanged,
    KeyRecordMismatch,
    SessionsBusy,
    Throttled,
    Unavailable,
)
from router.health import CircuitState
from router.model import USAGES, KeyAlgorithm, KeySpec, KeyState, KeyStorage, KeyUsage, Operation, Placement
from router.placement.store import StoreError
from router.router import STORE_RETRY
from tests.support import FakeClock, rpc_error, unique

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


# -- destroying an EXTERNAL key ----------------------------------------------------------------

DIGEST = hashlib.sha256(b"signed after the destroy").digest()


def _external(router: Any, name: str = "ext-destroy") -> Placement:
    key_id = unique(name)
    made: Placement = router.generate_key(
        KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id=key_id,
                storage=KeyStorage.EXTERNAL), time.monotonic() + 30)
    return made


def _sign(router: Any, key_id: str) -> bytes:
    signature: bytes = router.sign(key_id, Operation.ECDSA_SHA256, DIGEST, None, time.monotonic() + 10)[0]
    return signature


def _every_session(backend: Any, *unwrap: Placement) -> list[Any]:
    """Check out each of the cluster's sessions at once (each catches up with what was
    invalidated since its last use), unwrap ``unwrap``'s private keys in each, hand them back."""
    pool = backend.pool
    sessions = [pool.acquire(time.monotonic() + 10) for _ in range(backend.spec.pool_size)]
    try:
        for session in sessions:
            for placement in unwrap:
                session.key(placement, ObjectClass.PRIVATE_KEY, "sign")
        return sessions
    finally:
        for session in sessions:
            pool.release(session)


def test_a_destroyed_external_keys_record_keeps_no_key_material(make_router) -> None:
    """Whoever reads the store and holds a cluster's PIN could unwrap the wrapped key of a
    DESTROYED record and sign with it: the record keeps neither it nor the public key."""
    router = make_router()
    key = _external(router)
    _sign(router, key.key_id)

    destroyed = router.destroy_key(key.key_id, time.monotonic() + 10)

    record = router.store.get(key.key_id)
    assert record is not None and record.state is KeyState.DESTROYED and record.external
    assert (record.wrapped, record.public_der) == (b"", b"")
    assert destroyed == record
    # What reads a record copes with one without material: this process, a new one, a second destroy.
    assert router.get_key(key.key_id).state is KeyState.DESTROYED
    assert [(p.key_id, p.state) for p in router.list_keys(key.key_id, 10, "")[0]] == [
        (key.key_id, KeyState.DESTROYED)]
    for reader in (router, make_router()):
        with pytest.raises(FailedPrecondition, match="destroyed"):
            _sign(reader, key.key_id)
        with pytest.raises(FailedPrecondition, match="destroyed"):
            reader.public_key(key.key_id, time.monotonic() + 10)
    assert router.destroy_key(key.key_id, time.monotonic() + 10).state is KeyState.DESTROYED


def test_destroying_an_external_key_looks_for_no_token_objects_elsewhere(make_router) -> None:
    """An EXTERNAL key is never a token object: neither DestroyKey nor the repairer after it
    searches the clusters its record does not name for a copy (a search each, for nothing)."""
    router = make_router()
    key = _external(router)
    searched: list[str] = []
    for name, backend in router.backends.items():
        if name not in key.clusters:
            backend.destroy = lambda *args, name=name, **kwargs: searched.append(name) or 0  # type: ignore[method-assign]

    assert router.destroy_key(key.key_id, time.monotonic() + 10).state is KeyState.DESTROYED
    assert router.sweep_destroyed(time.monotonic() + 10) == 0
    assert searched == []


def test_an_external_key_is_destroyed_while_every_cluster_is_down(make_router) -> None:
    """Its material is in its record alone: a DestroyKey needs the store, not a cluster (it was
    answered UNAVAILABLE, "objects could not be removed", for objects that never existed)."""
    router = make_router()
    key = _external(router)

    def down(*args: object, **kwargs: object) -> int:
        raise ClusterDown("the cluster does not answer", cluster="use1-a")

    for backend in router.backends.values():
        backend.destroy = down  # type: ignore[method-assign]
    assert router.destroy_key(key.key_id, time.monotonic() + 10).state is KeyState.DESTROYED
    assert router.store.get(key.key_id).state is KeyState.DESTROYED


def test_destroying_again_removes_the_material_an_earlier_version_left_in_the_record(make_router) -> None:
    router = make_router()
    key = _external(router)
    current = router.store.get(key.key_id)
    # What a gateway before this change wrote on DestroyKey: the state, the material kept.
    router.store.update(dataclasses.replace(current, state=KeyState.DESTROYED, held=False))

    assert router.destroy_key(key.key_id, time.monotonic() + 10).state is KeyState.DESTROYED

    record = router.store.get(key.key_id)
    assert record is not None and record.state is KeyState.DESTROYED
    assert (record.wrapped, record.public_der) == (b"", b"")


def test_a_destroy_drops_the_keys_unwrapped_objects_from_every_session(make_router, tokens) -> None:
    """The destroying process's sessions drop the key's unwrapped objects before their next
    call, every one of them, not only the session that ran the destroy; another process's do once
    its refresh reads the record. Other keys' unwrapped objects stay where they are."""
    worker_a, worker_b = (make_router(spec_changes={"pool_size": 3}) for _ in range(2))
    key, kept = _external(worker_b), _external(worker_b, "ext-kept")
    cluster = key.primary
    for worker in (worker_a, worker_b):
        _every_session(worker.backends[cluster], worker.placement(key.key_id), worker.placement(kept.key_id))
    assert len(tokens.objects(cluster, key.key_id)) == 6  # one per session of each worker
    kept_objects = {id(s.unwrapped[(kept.key_id, ObjectClass.PRIVATE_KEY)])
                    for s in _every_session(worker_b.backends[cluster])}

    worker_b.destroy_key(key.key_id, time.monotonic() + 10)

    sessions = _every_session(worker_b.backends[cluster])
    assert all((key.key_id, ObjectClass.PRIVATE_KEY) not in s.unwrapped for s in sessions)
    assert {id(s.unwrapped[(kept.key_id, ObjectClass.PRIVATE_KEY)]) for s in sessions} == kept_objects
    assert len(tokens.objects(cluster, key.key_id)) == 3  # worker A has not read the store since

    worker_a.refresh()
    _every_session(worker_a.backends[cluster])
    assert tokens.objects(cluster, key.key_id) == []
    assert len(tokens.objects(cluster, kept.key_id)) == 6
    _sign(worker_a, kept.key_id)


def test_a_destroy_seen_first_by_a_retried_generate_key_drops_the_keys_unwrapped_objects(make_router, tokens) -> None:
    """Whatever path caches the DESTROYED record first, the sessions drop the key's unwrapped
    objects: a retry of the key's GenerateKey read it and cached it, after which no refresh saw the
    key go from live to destroyed, and the private key stayed unwrapped in the sessions for good."""
    worker_a, worker_b = make_router(), make_router(spec_changes={"pool_size": 2})
    key = _external(worker_a)
    cluster = key.primary
    _every_session(worker_b.backends[cluster], worker_b.placement(key.key_id))
    assert len(tokens.objects(cluster, key.key_id)) == 2

    worker_a.destroy_key(key.key_id, time.monotonic() + 10)
    with pytest.raises(KeyChanged, match="has since been destroyed"):  # the retry is told, not handed it
        worker_b.generate_key(KeySpec(key_id=key.key_id, algorithm=KeyAlgorithm.EC_P256,
                                      usage=KeyUsage.SIGN_VERIFY, request_id=key.key_id,
                                      storage=KeyStorage.EXTERNAL), time.monotonic() + 30)
    assert worker_b.placement(key.key_id).state is KeyState.DESTROYED
    worker_b.refresh()

    sessions = _every_session(worker_b.backends[cluster])
    assert all((key.key_id, ObjectClass.PRIVATE_KEY) not in s.unwrapped for s in sessions)
    assert tokens.objects(cluster, key.key_id) == []


def test_a_sign_that_unwraps_the_key_after_its_destroy_leaves_no_unwrapped_object(make_router, tokens) -> None:
    """A call that read the key live, then lost the race to a DestroyKey in this process, unwraps
    the key after the destroy told the sessions to drop it: its copy is dropped after the call."""
    router = make_router(spec_changes={"pool_size": 2})
    key = _external(router)
    cluster = key.primary
    backend = router.backends[cluster]
    signed: list[bytes] = []
    real_sign = backend.sign

    def destroyed_meanwhile(placement: Placement, *args: Any) -> bytes:
        if not signed:
            router.destroy_key(key.key_id, time.monotonic() + 10)  # before this call takes a session
        signed.append(real_sign(placement, *args))
        return signed[-1]

    backend.sign = destroyed_meanwhile  # type: ignore[method-assign]
    _sign(router, key.key_id)  # it was live when the call began: it is answered
    assert signed and router.placement(key.key_id).state is KeyState.DESTROYED

    sessions = _every_session(backend)
    assert all((key.key_id, ObjectClass.PRIVATE_KEY) not in s.unwrapped for s in sessions)
    assert tokens.objects(cluster, key.key_id) == []


def test_a_session_that_missed_more_destroys_than_its_pool_remembers_forgets_every_key(make_router, tokens) -> None:
    """The pool remembers the latest few keys it was told to forget; a session idle for more
    than that cannot tell which, so it forgets them all rather than keep a destroyed one."""
    from router.pkcs11.pool import _INVALIDATIONS_KEPT

    router = make_router(spec_changes={"pool_size": 1})
    key = _external(router)
    backend = router.backends[key.primary]
    _every_session(backend, router.placement(key.key_id))
    assert len(tokens.objects(key.primary, key.key_id)) == 1

    backend.forget_key(key.key_id)
    for n in range(_INVALIDATIONS_KEPT):
        backend.forget_key(f"{key.key_id}-other-{n}")

    assert _every_session(backend)[0].unwrapped == {}
    assert tokens.objects(key.primary, key.key_id) == []


class _Skewed:
    """A monotonic clock that a test moves on."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


def test_a_process_that_missed_an_external_keys_destroy_stops_using_it_after_external_staleness(
        make_router) -> None:
    clock = _Skewed()
    worker_a = make_router(clock=clock, external_staleness=10.0)
    worker_b = make_router()
    key = _external(worker_b)
    _sign(worker_a, key.key_id)

    worker_b.destroy_key(key.key_id, time.monotonic() + 10)
    clock.skew = 11.0  # worker A's cache has not been brought up to date for longer than that

    with pytest.raises(FailedPrecondition, match="destroyed"):
        worker_a.sign(key.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)
    assert worker_a.placement(key.key_id).state is KeyState.DESTROYED


def test_past_external_staleness_an_unreachable_store_stops_external_keys_and_not_token_keys(make_router) -> None:
    """Only the record says an EXTERNAL key was destroyed: without a store read for longer than
    external_staleness, an EXTERNAL key is refused; a TOKEN key serves from the cache throughout."""
    clock = _Skewed()
    worker = make_router(clock=clock, external_staleness=10.0)
    external = _external(worker)
    token = worker.generate_key(KeySpec(key_id=unique("tok-outage"), algorithm=KeyAlgorithm.EC_P256,
                                        usage=KeyUsage.SIGN_VERIFY, request_id=unique("tok-outage")),
                                time.monotonic() + 30)
    public = serialization.load_der_public_key(external.public_der)

    def unreachable(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreError("the placement store is unreachable")

    worker.store.get = unreachable
    worker.store.change_counter = unreachable
    with pytest.raises(StoreError):
        worker.refresh()
    public.verify(worker.sign(external.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)[0], DIGEST,
                  ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # within the bound: from the cache
    clock.skew = 11.0

    worker.sign(token.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)
    with pytest.raises(Unavailable, match="external_staleness") as refused:
        worker.sign(external.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)
    assert isinstance(refused.value.__cause__, StoreError)  # counted as a store error

    del worker.store.get, worker.store.change_counter  # the store is back
    clock.skew += STORE_RETRY  # read again once a failed read is that old (or by the next refresh)
    public.verify(worker.sign(external.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)[0], DIGEST,
                  ec.ECDSA(utils.Prehashed(hashes.SHA256())))


class _Manual:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def test_an_unreachable_store_is_read_by_one_external_call_at_a_time_and_not_again_for_a_while(
        make_router) -> None:
    """Past external_staleness with the store down, each call on an EXTERNAL key read the store
    and held its request thread for the store's timeout (0.5-2 s with DynamoDB) before it was
    refused: under load, that starved TOKEN keys, which serve through the outage. Now a failed
    read (a call's, or the refresh's) is not tried again for STORE_RETRY, and then by one call at
    a time; the others are refused at once, and it serves again once a read succeeds."""
    clock = _Manual()
    worker = make_router(clock=clock, external_staleness=10.0)
    key = _external(worker)
    reads: list[str] = []
    entered, release = threading.Event(), threading.Event()
    hold = False

    def unreachable(key_id: str) -> Any:
        reads.append(key_id)
        if hold:
            entered.set()
            release.wait(10)
        raise StoreError("the placement store is unreachable")

    def sign() -> None:
        worker.sign(key.key_id, Operation.ECDSA_SHA256, DIGEST, None, time.monotonic() + 10)

    def refused() -> None:
        with pytest.raises(Unavailable, match="external_staleness") as caught:
            sign()
        assert isinstance(caught.value.__cause__, StoreError)  # each counted as a store error

    def counter() -> int:
        raise StoreError("the placement store is unreachable")

    worker.store.get = unreachable
    worker.store.change_counter = counter
    clock.now += 11.0
    for _ in range(5):
        refused()
    assert len(reads) == 1

    clock.now += STORE_RETRY
    with pytest.raises(StoreError):
        worker.refresh()  # the refresh failed just now: no call reads the store either
    refused()
    assert len(reads) == 1

    clock.now += STORE_RETRY
    hold = True
    prober = threading.Thread(target=lambda: pytest.raises(Unavailable, sign))
    prober.start()
    try:
        assert entered.wait(10)
        refused()  # while one call reads the failing store, the others do not wait for it
        assert len(reads) == 2
    finally:
        release.set()
        prober.join()

    del worker.store.get, worker.store.change_counter  # the store is back
    clock.now += STORE_RETRY
    sign()
    sign()
    assert len(reads) == 2


def test_external_keys_read_their_record_only_while_the_cache_is_behind_and_token_keys_never(make_router) -> None:
    """While refreshes succeed, signing reads nothing from the store; with the cache behind,
    an EXTERNAL key's record is read once per external_staleness, not once per call."""
    clock = _Skewed()
    worker = make_router(clock=clock, external_staleness=10.0)
    external = _external(worker)
    token = worker.generate_key(KeySpec(key_id=unique("tok-reads"), algorithm=KeyAlgorithm.EC_P256,
                                        usage=KeyUsage.SIGN_VERIFY, request_id=unique("tok-reads")),
                                time.monotonic() + 30)
    reads: list[str] = []
    read = worker.store.get

    def counted(key_id: str) -> Any:
        reads.append(key_id)
        return read(key_id)

    worker.store.get = counted
    clock.skew = 11.0
    for _ in range(3):
        worker.sign(token.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)
        worker.sign(external.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)
    assert reads == [external.key_id]

    clock.skew = 22.0
    worker.refresh()
    reads.clear()
    for _ in range(3):
        worker.sign(external.key_id, Operation.ECDSA_SHA256, DIGEST, None, clock() + 10)
    assert reads == []


def test_a_destroyed_external_key_through_grpc(crypto) -> None:
    key_id = unique("ext-grpc-destroy")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256,
                                             storage=pb.KEY_STORAGE_EXTERNAL), timeout=30)
    crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST), timeout=10)

    assert crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=30).state == pb.KEY_STATE_DESTROYED

    got = crypto.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=10)
    assert (got.state, got.storage) == (pb.KEY_STATE_DESTROYED, pb.KEY_STORAGE_EXTERNAL)
    listed = crypto.ListKeys(pb.ListKeysRequest(prefix=key_id), timeout=10).keys
    assert [(k.key_id, k.state) for k in listed] == [(key_id, pb.KEY_STATE_DESTROYED)]
    for call, request in ((crypto.GetPublicKey, pb.GetPublicKeyRequest(key_id=key_id)),
                          (crypto.Sign, pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                                       digest=DIGEST))):
        assert rpc_error(call, request, timeout=10).code() == grpc.StatusCode.FAILED_PRECONDITION


# -- a placement record altered in the store ----------------------------------------------------
#
# Whoever can write the store, with no PIN and no key material, can copy another key's wrapped
# key into a record, put a public key of their own in it, or relabel it. A key is checked against
# its record when it is unwrapped: each of these is KEY_RECORD_MISMATCH, and nothing stays unwrapped.

MESSAGE = b"pay 1,000,000 to mallory"
ECDSA_P256 = ec.ECDSA(hashes.SHA256())


def _spki(public: Any) -> bytes:
    der: bytes = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _made(router: Any, algorithm: KeyAlgorithm, name: str = "ext-record") -> Placement:
    key_id = unique(name)
    made: Placement = router.generate_key(
        KeySpec(key_id=key_id, algorithm=algorithm, usage=USAGES[algorithm][0], request_id=key_id,
                storage=KeyStorage.EXTERNAL), time.monotonic() + 60)
    return made


def _altered(router: Any, key: Placement, **fields: Any) -> Placement:
    """What a store writer does to a key no call has used yet: edit its record; the router reads it."""
    router.store.update(dataclasses.replace(router.store.get(key.key_id), **fields))
    router.refresh()
    altered: Placement = router.placement(key.key_id)
    return altered


def _sign_with(router: Any, key: Placement) -> Any:
    op = Operation.ECDSA_SHA384 if key.algorithm is KeyAlgorithm.EC_P384 else (
        Operation.ECDSA_SHA256 if key.algorithm.is_ec else Operation.RSA_PSS_SHA256)
    return lambda: router.sign(key.key_id, op, None, MESSAGE, time.monotonic() + 10)


@dataclasses.dataclass(frozen=True)
class Tampering:
    name: str
    alter: Any
    """(router) -> (the altered key, [the calls on it that must be refused])."""


def _wrapped_ec_key_of_another(router: Any) -> tuple[Placement, list[Any]]:
    a, b = _made(router, KeyAlgorithm.EC_P256), _made(router, KeyAlgorithm.EC_P256)
    b = _altered(router, b, wrapped=a.wrapped)
    signature = _sign(router, a.key_id)
    return b, [_sign_with(router, b), lambda: router.public_key(b.key_id, time.monotonic() + 10),
               lambda: router.verify(b.key_id, Operation.ECDSA_SHA256, DIGEST, None, signature,
                                     time.monotonic() + 10)]


def _wrapped_rsa_key_of_another(router: Any) -> tuple[Placement, list[Any]]:
    a, b = _made(router, KeyAlgorithm.RSA_2048), _made(router, KeyAlgorithm.RSA_2048)
    b = _altered(router, b, wrapped=a.wrapped)
    return b, [_sign_with(router, b), lambda: router.public_key(b.key_id, time.monotonic() + 10)]


def _public_key_of_the_writer(router: Any) -> tuple[Placement, list[Any]]:
    mallory = ec.generate_private_key(ec.SECP256R1())
    b = _altered(router, _made(router, KeyAlgorithm.EC_P256), public_der=_spki(mallory.public_key()))
    forged = mallory.sign(MESSAGE, ECDSA_P256)  # made outside the HSM
    return b, [lambda: router.verify(b.key_id, Operation.ECDSA_SHA256, None, MESSAGE, forged, time.monotonic() + 10),
               lambda: router.public_key(b.key_id, time.monotonic() + 10), _sign_with(router, b)]


def _rsa_public_key_of_the_writer(router: Any) -> tuple[Placement, list[Any]]:
    mallory = rsa.generate_private_key(65537, 2048)
    b = _altered(router, _made(router, KeyAlgorithm.RSA_2048), public_der=_spki(mallory.public_key()))
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    forged = mallory.sign(MESSAGE, pss, hashes.SHA256())
    return b, [lambda: router.verify(b.key_id, Operation.RSA_PSS_SHA256, None, MESSAGE, forged,
                                     time.monotonic() + 10),
               lambda: router.public_key(b.key_id, time.monotonic() + 10)]


def _p384_key_relabelled_p256(router: Any) -> tuple[Placement, list[Any]]:
    b = _altered(router, _made(router, KeyAlgorithm.EC_P384), algorithm=KeyAlgorithm.EC_P256)
    return b, [_sign_with(router, b)]


def _ec_key_wrapped_in_an_hmac_record(router: Any) -> tuple[Placement, list[Any]]:
    a = _made(router, KeyAlgorithm.EC_P256)
    b = _altered(router, _made(router, KeyAlgorithm.HMAC_SHA256), wrapped=a.wrapped)
    return b, [lambda: router.mac(b.key_id, Operation.HMAC_SHA256, MESSAGE, time.monotonic() + 10)]


def _rsa_key_wrapped_in_an_ec_record(router: Any) -> tuple[Placement, list[Any]]:
    a = _made(router, KeyAlgorithm.RSA_2048)
    b = _altered(router, _made(router, KeyAlgorithm.EC_P256), wrapped=a.wrapped)
    return b, [_sign_with(router, b), lambda: router.public_key(b.key_id, time.monotonic() + 10)]


def _ec_key_wrapped_in_an_rsa_record(router: Any) -> tuple[Placement, list[Any]]:
    a = _made(router, KeyAlgorithm.EC_P256)
    b = _altered(router, _made(router, KeyAlgorithm.RSA_2048), wrapped=a.wrapped)
    return b, [_sign_with(router, b), lambda: router.public_key(b.key_id, time.monotonic() + 10)]


def _truncated_wrapped_key(router: Any) -> tuple[Placement, list[Any]]:
    b = _made(router, KeyAlgorithm.EC_P256)
    b = _altered(router, b, wrapped=b.wrapped[:-8])
    return b, [_sign_with(router, b), lambda: router.public_key(b.key_id, time.monotonic() + 10)]


def _flipped_wrapped_key(router: Any) -> tuple[Placement, list[Any]]:
    b = _made(router, KeyAlgorithm.EC_P256)
    b = _altered(router, b, wrapped=b.wrapped[:20] + bytes([b.wrapped[20] ^ 1]) + b.wrapped[21:])
    return b, [_sign_with(router, b), lambda: router.public_key(b.key_id, time.monotonic() + 10)]


TAMPERINGS = [
    Tampering("an RSA key's wrapped key in an EC key's record", _rsa_key_wrapped_in_an_ec_record),
    Tampering("an EC key's wrapped key in an RSA key's record", _ec_key_wrapped_in_an_rsa_record),
    Tampering("a wrapped key cut short", _truncated_wrapped_key),
    Tampering("a wrapped key with one bit flipped", _flipped_wrapped_key),
    Tampering("another EC key's wrapped key", _wrapped_ec_key_of_another),
    Tampering("another RSA key's wrapped key", _wrapped_rsa_key_of_another),
    Tampering("an EC public key of the writer's", _public_key_of_the_writer),
    Tampering("an RSA public key of the writer's", _rsa_public_key_of_the_writer),
    Tampering("a P-384 key relabelled P-256", _p384_key_relabelled_p256),
    Tampering("an EC key's wrapped key in an HMAC key's record", _ec_key_wrapped_in_an_hmac_record),
]


@pytest.mark.parametrize("tampering", TAMPERINGS, ids=[t.name for t in TAMPERINGS])
def test_a_record_altered_in_the_store_is_refused_and_leaves_nothing_unwrapped(
    make_router, tokens, tampering: Tampering
) -> None:
    router = make_router(spec_changes={"pool_size": 2})
    key, calls = tampering.alter(router)

    for call in calls:
        with pytest.raises(KeyRecordMismatch, match="altered or is corrupt"):
            call()
    for _ in range(5):  # as often as an application retries: the clusters' health is not the record's
        with pytest.raises(KeyRecordMismatch):
            calls[0]()
    assert {name: breaker.state for name, breaker in router.breakers.items()} == {
        name: CircuitState.CLOSED for name in router.backends}
    for name, backend in router.backends.items():
        assert tokens.objects(name, key.key_id) == [], name
        assert all(not any(k == key.key_id for k, _ in s.unwrapped) for s in _every_session(backend)), name


class _FailingHsm:
    """A wrapping key on an HSM that fails every call, as SoftHSM does on a half-written token file."""

    def unwrap_key(self, *args: Any, **kwargs: Any) -> Any:
        raise p11.GeneralError()

    def wrap_key(self, *args: Any, **kwargs: Any) -> Any:
        raise p11.GeneralError()

    def __getitem__(self, attribute: Any) -> Any:
        raise p11.GeneralError()


class _BusyHsm:
    """The real wrapping key, on an HSM that answers every unwrap CKR_FUNCTION_FAILED (busy, as
    CloudHSM throttles) and every other call as usual."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def unwrap_key(self, *args: Any, **kwargs: Any) -> Any:
        raise p11.FunctionFailed()

    def wrap_key(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.wrap_key(*args, **kwargs)

    def __getitem__(self, attribute: Any) -> Any:
        return self.real[attribute]


def test_a_busy_hsm_is_not_taken_for_an_altered_record(make_router, caplog) -> None:
    """A cluster too busy to unwrap, while it answers other calls, fails the canary unwrap too:
    the call is RESOURCE_EXHAUSTED (retry later), and no operator is told the store was altered."""
    router = make_router(spec_changes={"pool_size": 1})
    key = _external(router)
    for backend in router.backends.values():
        (session,) = _every_session(backend)
        session.forget()
        session._wrapping_key = _BusyHsm(session.wrapping_key())

    with pytest.raises(Throttled):
        _sign(router, key.key_id)
    assert "altered" not in caplog.text


def test_a_record_no_cluster_asked_unwraps_is_retryable_while_another_cannot_be_asked(make_router, tokens) -> None:
    """The clusters asked refuse the record's wrapped key; one that may unwrap it (its circuit is
    open) was not asked: UNAVAILABLE, which a caller retries, not the record's fault."""
    router = make_router()
    key = _altered(router, _made(router, KeyAlgorithm.EC_P256), wrapped=b"\x00" * 40)
    other = next(name for name in router.breakers if name != key.primary)
    while router.breakers[other].state is not CircuitState.OPEN:
        router.breakers[other].record_failure()

    with pytest.raises(Unavailable, match="another cluster, which may unwrap it, cannot answer now") as refused:
        _sign_with(router, key)()
    assert isinstance(refused.value.__cause__, KeyRecordMismatch)


def test_an_unwrap_on_a_cluster_that_fails_everything_is_the_clusters_fault(make_router, tokens) -> None:
    """Only a cluster that answers a plain read has the refusal put on the record: one that
    fails that too is down, its circuit opens, and the key is served by another cluster."""
    router = make_router(spec_changes={"pool_size": 1})
    key = _external(router)
    public = serialization.load_der_public_key(key.public_der)
    (session,) = _every_session(router.backends[key.primary])
    session._wrapping_key = _FailingHsm()

    for _ in range(3):
        public.verify(_sign(router, key.key_id), DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert router.breakers[key.primary].state is CircuitState.OPEN
    assert {state for name, breaker in router.breakers.items() if name != key.primary
            for state in [breaker.state]} == {CircuitState.CLOSED}


class _BusyOnce:
    """The real wrapping key, on an HSM too busy for the first unwrap asked of it."""

    def __init__(self, real: Any) -> None:
        self.real, self.refused = real, 0

    def unwrap_key(self, *args: Any, **kwargs: Any) -> Any:
        if not self.refused:
            self.refused += 1
            raise p11.FunctionFailed()
        return self.real.unwrap_key(*args, **kwargs)

    def wrap_key(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.wrap_key(*args, **kwargs)

    def __getitem__(self, attribute: Any) -> Any:
        return self.real[attribute]


def test_an_unwrap_refused_once_is_asked_again_before_the_record_is_blamed(make_router) -> None:
    router = make_router(spec_changes={"pool_size": 1})
    key = _external(router)
    (session,) = _every_session(router.backends[key.primary])
    session.forget()
    session._wrapping_key = busy = _BusyOnce(session.wrapping_key())

    signature, served_by = router.sign(key.key_id, Operation.ECDSA_SHA256, DIGEST, None, time.monotonic() + 10)
    serialization.load_der_public_key(key.public_der).verify(signature, DIGEST,
                                                             ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert busy.refused == 1 and served_by == key.primary


def test_a_public_key_written_into_a_record_in_use_is_refused_too(make_router, tokens) -> None:
    """The session that holds the key unwrapped from the untouched record does not take the new
    public key on trust: it checks the key it holds against it before verifying with it."""
    router = make_router(spec_changes={"pool_size": 1})
    key = _made(router, KeyAlgorithm.EC_P256)
    _sign(router, key.key_id)  # the one session holds the private key, checked against the record then
    _, genuine = router.public_key(key.key_id, time.monotonic() + 10)
    mallory = ec.generate_private_key(ec.SECP256R1())
    _altered(router, key, public_der=_spki(mallory.public_key()))

    forged = mallory.sign(MESSAGE, ECDSA_P256)
    with pytest.raises(KeyRecordMismatch):
        router.verify(key.key_id, Operation.ECDSA_SHA256, None, MESSAGE, forged, time.monotonic() + 10)
    with pytest.raises(KeyRecordMismatch):
        router.public_key(key.key_id, time.monotonic() + 10)  # not the one this process handed out before
    backend = router.backends[key.primary]
    (session,) = _every_session(backend)
    assert (key.key_id, ObjectClass.PUBLIC_KEY) not in session.unwrapped
    # The private key it holds is the record's own, untouched: it still signs, under the genuine key.
    signature = _sign(router, key.key_id)
    serialization.load_der_public_key(genuine).verify(signature, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048])
def test_untouched_external_keys_sign_and_verify(make_router, algorithm: KeyAlgorithm) -> None:
    """The checks pass every key the gateway made: a process that only verifies (its sessions
    unwrap the private key first, to check the record's public key) and one that signs."""
    signer, verifier = make_router(), make_router()
    key = _made(signer, algorithm)
    signature = _sign_with(signer, key)()[0]
    _, der = verifier.public_key(key.key_id, time.monotonic() + 10)
    public: Any = serialization.load_der_public_key(der)
    if algorithm.is_ec:
        hashed = hashes.SHA384() if algorithm is KeyAlgorithm.EC_P384 else hashes.SHA256()
        public.verify(signature, MESSAGE, ec.ECDSA(hashed))
        op = Operation.ECDSA_SHA384 if algorithm is KeyAlgorithm.EC_P384 else Operation.ECDSA_SHA256
    else:
        public.verify(signature, MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        op = Operation.RSA_PSS_SHA256
    assert verifier.verify(key.key_id, op, None, MESSAGE, signature, time.monotonic() + 10)
    assert not verifier.verify(key.key_id, op, None, MESSAGE + b".", signature, time.monotonic() + 10)
    assert signer.public_key(key.key_id, time.monotonic() + 10)[1] == der == key.public_der


def test_altered_records_through_grpc(make_router, crypto) -> None:
    """What a caller of the gateway sees: FAILED_PRECONDITION, reason KEY_RECORD_MISMATCH.
    The altered records are new ones (a store writer can add records too), so the gateway
    process reads each first as altered."""
    router = make_router()
    a, b = _made(router, KeyAlgorithm.EC_P256), _made(router, KeyAlgorithm.EC_P256)
    hmac = _made(router, KeyAlgorithm.HMAC_SHA256)
    mallory = ec.generate_private_key(ec.SECP256R1())

    def added(source: Placement, **fields: Any) -> str:
        key_id = unique("ext-added")
        record = router.store.get(source.key_id)
        router.store.create(dataclasses.replace(record, key_id=key_id, request_id=key_id, version=1, **fields))
        return key_id

    copied, swapped, relabelled = (added(b, wrapped=a.wrapped), added(b, public_der=_spki(mallory.public_key())),
                                   added(hmac, wrapped=a.wrapped))
    corrupt = added(b, wrapped=b.wrapped[:-8])  # no cluster unwraps it
    refused = [
        (crypto.Sign, pb.SignRequest(key_id=copied, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=MESSAGE)),
        (crypto.GetPublicKey, pb.GetPublicKeyRequest(key_id=swapped)),
        (crypto.Verify, pb.VerifyRequest(key_id=swapped, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=MESSAGE,
                                         signature=mallory.sign(MESSAGE, ECDSA_P256))),
        (crypto.Mac, pb.MacRequest(key_id=relabelled, algorithm=pb.ALGORITHM_HMAC_SHA256, data=MESSAGE)),
        (crypto.Sign, pb.SignRequest(key_id=corrupt, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=MESSAGE)),
    ]
    for call, request in refused:
        err = rpc_error(call, request, timeout=10)
        info = error_info(rpc_status.from_call(err))
        assert (err.code(), info and info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KEY_RECORD_MISMATCH"), \
            err.details()
        assert "altered or is corrupt" in err.details()


@contextlib.contextmanager
def _no_session_free(router: Any) -> Iterator[None]:
    """Every session of every cluster checked out for the block: a call that needs an HSM finds none."""
    taken = [(backend.pool, backend.pool.acquire(time.monotonic() + 10)) for backend in router.backends.values()
             for _ in range(backend.spec.pool_size)]
    try:
        yield
    finally:
        for pool, session in taken:
            pool.release(session)


def test_a_record_every_cluster_refused_is_refused_again_without_an_hsm_call_until_it_changes(make_router) -> None:
    """A client retrying a corrupt record: the first call asks every cluster, each of which first
    unwraps a key of its own; for REFUSED_FOR seconds after, calls are refused with no HSM call (here
    while no cluster has a session free). The record restored is used at once; past REFUSED_FOR, the
    clusters are asked again."""
    clock = FakeClock(time.monotonic() - 3600)  # moved on below, and still before the calls' deadlines
    router = make_router(spec_changes={"pool_size": 1, "call_timeout": 0.2}, clock=clock)
    key = _made(router, KeyAlgorithm.EC_P256)
    genuine = key.wrapped
    corrupt = _altered(router, key, wrapped=genuine[:20] + bytes([genuine[20] ^ 1]) + genuine[21:])
    sign, public_key = _sign_with(router, corrupt), lambda: router.public_key(key.key_id, time.monotonic() + 10)
    with pytest.raises(KeyRecordMismatch, match="does not unwrap the wrapped key in its record"):
        sign()

    clock.now += REFUSED_FOR - 1
    with _no_session_free(router):
        for call in (sign, public_key):
            with pytest.raises(KeyRecordMismatch, match="no cluster unwrapped the wrapped key in its record when "
                                                        "last asked; the placement record was altered or is corrupt"):
                call()

    _altered(router, key, wrapped=genuine)  # restored from a backup: used at once
    signature, _ = sign()
    public: Any = serialization.load_der_public_key(public_key()[1])
    public.verify(signature, MESSAGE, ECDSA_P256)

    other = _made(router, KeyAlgorithm.EC_P256)
    sign_other = _sign_with(router, _altered(router, other, wrapped=other.wrapped[:-8]))
    with pytest.raises(KeyRecordMismatch, match="does not unwrap the wrapped key in its record"):
        sign_other()
    clock.now += REFUSED_FOR
    with _no_session_free(router), pytest.raises(SessionsBusy):
        sign_other()  # the clusters are asked again: it waits for a session
    with pytest.raises(KeyRecordMismatch, match="does not unwrap the wrapped key in its record"):
        sign_other()
