"""A token that holds what it should not: two objects for one key.

A process killed while it writes a token, or an operator's import, can leave a
cluster with two public (or private) key objects under one key id. The gateway
must not guess which is the key's: it says so in its log, serves the key from a
replica whose copy is unambiguous, and its sessions stay usable afterwards (a
search left open on a pooled session would fail or block every later call on it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from gateway import status
from router.errors import AmbiguousKey, Unavailable
from router.model import KeyAlgorithm, KeySpec, KeyState, KeyUsage, Operation, Placement
from router.pkcs11._keys import public_key_attributes, public_key_der, public_template
from router.pkcs11.pool import WRAPPING_KEY_LABEL
from router.reconcile import reconcile
from tests.support import TokenInspector, unique


@pytest.fixture
def key(make_router) -> Iterator[tuple[str, str, str]]:
    """An EC key on two clusters: (key id, primary, replica)."""
    router = make_router()
    key_id = unique("dup")
    made = router.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                                       request_id=f"req-{key_id}", copies=2), time.monotonic() + 60)
    assert made.replicas, "the fleet's policy keeps a second copy"
    yield key_id, made.primary, made.replicas[0]
    router.destroy_key(key_id, time.monotonic() + 60)


def _add_second_public_key(tokens: TokenInspector, cluster: str, key_id: str, der: bytes) -> None:
    attrs = public_key_attributes(der)
    attrs.update(public_template(KeyUsage.SIGN_VERIFY, token=True))
    attrs.update({Attribute.ID: key_id.encode(), Attribute.LABEL: key_id})
    tokens.session(cluster).create_object(attrs)
    assert [o.object_class for o in tokens.objects(cluster, key_id)].count(ObjectClass.PUBLIC_KEY) == 2


def _verify(der: bytes, signature: bytes, message: bytes | None, *, digest: bytes | None = None) -> None:
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    if digest is not None:  # raises if it does not match
        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    else:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_two_public_objects_are_refused_on_that_cluster_and_served_by_the_replica(
    make_router, key, tokens, caplog
) -> None:
    key_id, primary, replica = key
    # Read from the token, not through the router: a lookup the pool cached would hide the second object.
    [public] = [o for o in tokens.objects(primary, key_id) if o.object_class is ObjectClass.PUBLIC_KEY]
    der = public_key_der(public, KeyAlgorithm.EC_P256)
    _add_second_public_key(tokens, primary, key_id, der)
    # Pools of one session each (and nothing cached yet): a poisoned session would be the next call's.
    router = make_router({"pool_size": 1})
    placement = router.placement(key_id)

    backend = router.backends[primary]
    with caplog.at_level(logging.ERROR, logger="router.pkcs11.pool"):
        with pytest.raises(AmbiguousKey) as refused:
            backend.public_key(placement, time.monotonic() + 10)
    assert refused.value.cluster == primary
    assert f"cluster {primary} holds 2 public key objects for key {key_id!r}" in refused.value.message
    # The log tells the operator to look from a new process first: on SoftHSM the second listing
    # can be the same object, and destroying it would destroy the key's only copy there.
    assert any(f"holds 2 public key objects for key {key_id!r}" in r.getMessage()
               and "list the token from a new process before destroying anything" in r.getMessage()
               for r in caplog.records)

    # The one pooled session is not left with a search open: the private key is unambiguous
    # on the same cluster, and signing with it works, call after call.
    for _ in range(3):
        signature = backend.sign(placement, Operation.ECDSA_SHA256, b"\x01" * 32, time.monotonic() + 10)
    assert signature

    # Reconcile names it; its fix leaves both objects for an operator to tell apart.
    assert (primary, key_id, "public key", 2) in reconcile(router, fix=False).duplicates
    assert (primary, key_id, "public key", 2) in reconcile(router, fix=True).duplicates
    assert [o.object_class for o in tokens.objects(primary, key_id)].count(ObjectClass.PUBLIC_KEY) == 2

    # Through the router: the public key comes from the replica, and it is the key's.
    served, again = router.public_key(key_id, time.monotonic() + 10)
    assert again == der
    signature, cluster = router.sign(key_id, Operation.ECDSA_SHA256, None, b"hello", time.monotonic() + 10)
    assert cluster == primary
    _verify(again, signature, b"hello")


def test_a_session_left_with_a_search_open_is_replaced_not_failed(make_router, key) -> None:
    """Defence in depth: whatever leaves an operation open on a pooled session (a library's
    half-read search), the next call on it gets CKR_OPERATION_ACTIVE; the pool closes that
    session, opens another and the call succeeds."""
    key_id, primary, _ = key
    router = make_router({"pool_size": 1})
    backend = router.backends[primary]
    placement = router.placement(key_id)
    with backend.pool.session(time.monotonic() + 10) as session:
        search = session.handle.get_objects({Attribute.ID: key_id.encode()})
        next(search)  # the search stays open on the pool's only session
    before = backend.stats()

    signature = backend.sign(placement, Operation.ECDSA_SHA256, b"\x03" * 32, time.monotonic() + 10)
    _verify(router.public_key(key_id, time.monotonic() + 10)[1], signature, None, digest=b"\x03" * 32)
    after = backend.stats()
    assert (before.size, after.size, after.open) == (1, 1, 1)
    with pytest.raises(p11.SessionHandleInvalid):  # the session it was open on is closed now
        search.close()


def test_a_key_with_two_public_objects_on_every_cluster_is_refused_not_guessed(make_router, key, tokens) -> None:
    key_id, primary, replica = key
    for cluster in (primary, replica):
        [public] = [o for o in tokens.objects(cluster, key_id) if o.object_class is ObjectClass.PUBLIC_KEY]
        _add_second_public_key(tokens, cluster, key_id, public_key_der(public, KeyAlgorithm.EC_P256))
    router = make_router({"pool_size": 1})
    with pytest.raises(AmbiguousKey) as refused:
        router.public_key(key_id, time.monotonic() + 10)
    assert refused.value.cluster in (primary, replica)
    assert status.status_for(refused.value) == (grpc.StatusCode.INTERNAL, status.GENERIC_INTERNAL, "INTERNAL")
    # The private key is unambiguous: signing still works, on the primary's one session.
    assert router.sign(key_id, Operation.ECDSA_SHA256, None, b"m", time.monotonic() + 10)[1] == primary


def test_a_move_to_a_cluster_with_two_wrapping_keys_fails_and_changes_nothing(make_router, key, tokens) -> None:
    """The trusted wrapping key must be one: a second one is refused by name, the move is
    undone, and the key stays where it was."""
    key_id, primary, replica = key
    router = make_router({"pool_size": 1})
    target = next(name for name in router.backends if name not in (primary, replica))
    stray = tokens.session(target).generate_key(KeyType.AES, 256, label=WRAPPING_KEY_LABEL, store=True)
    try:
        before = router.store.get(key_id)
        with pytest.raises(Unavailable, match=f"cluster {target} holds 2 wrapping keys labelled"):
            router.move_key(key_id, target, time.monotonic() + 30)
        after = router.store.get(key_id)
        assert (after.primary, after.replicas) == (before.primary, before.replicas)
        assert tokens.objects(target, key_id) == []
        assert router.sign(key_id, Operation.ECDSA_SHA256, None, b"m", time.monotonic() + 10)[1] == primary
    finally:
        stray.destroy()


def test_a_creation_leaves_only_its_own_objects_of_the_key(make_router, tokens) -> None:
    """Objects an earlier attempt left (crashed, or failed and rolled back) go.

    Only before the key is made: a search after it may list a new object twice on
    SoftHSM (see TokenObjects), and destroying "the other one" would delete the key."""
    router = make_router()
    key_id = unique("retake")
    cluster = "use1-a"
    backend = router.backends[cluster]
    intent = Placement(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                       state=KeyState.CREATING, primary=cluster)
    backend.generate(intent, time.monotonic() + 30)  # the crashed attempt's objects
    first = backend.public_key(intent, time.monotonic() + 10)
    try:
        backend.generate(intent, time.monotonic() + 30)
        classes = sorted(o.object_class for o in tokens.objects(cluster, key_id))
        assert classes == [ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY], classes
        public = backend.public_key(intent, time.monotonic() + 10)
        assert public != first, "the earlier attempt's key is still the one used"
        signature = backend.sign(intent, Operation.ECDSA_SHA256, bytes(32), time.monotonic() + 10)
        _verify(public, signature, None, digest=bytes(32))
    finally:
        backend.destroy(key_id, time.monotonic() + 30)


def test_a_copy_leaves_only_its_own_objects_of_the_key_on_the_target(make_router, tokens) -> None:
    """A public key an earlier, interrupted copy left on the target goes when the key is copied there."""
    router = make_router()
    key_id = unique("recopy")
    source, target = router.backends["use1-a"], router.backends["use1-b"]
    key = Placement(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                    state=KeyState.CREATING, primary="use1-a")
    source.generate(key, time.monotonic() + 30)
    try:
        wrapped, der = source.export_wrapped(key, time.monotonic() + 30)
        stray = public_key_attributes(der)  # an earlier copy's public key, cut off before its private key
        stray.update(public_template(KeyUsage.SIGN_VERIFY, token=True))
        stray.update({Attribute.ID: key_id.encode(), Attribute.LABEL: key_id})
        tokens.session("use1-b").create_object(stray)
        target.import_wrapped(key, wrapped, der, time.monotonic() + 30)
        classes = sorted(o.object_class for o in tokens.objects("use1-b", key_id))
        assert classes == [ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY], classes
        signature = target.sign(key, Operation.ECDSA_SHA256, bytes(32), time.monotonic() + 10)
        _verify(target.public_key(key, time.monotonic() + 10), signature, None, digest=bytes(32))
    finally:
        for backend in (source, target):
            backend.destroy(key_id, time.monotonic() + 30)


def test_creating_and_copying_a_key_keeps_the_hot_keys_handles_and_a_sweep_that_destroys_drops_them(
    make_router, key, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every session forgets its cached key handles only when an object is destroyed: a
    creation or a copy with nothing to sweep (nearly all of them) leaves them, so the hot
    keys are not searched for again after each new key."""
    from router.pkcs11.pool import SessionPool

    router = make_router()
    hot, _, _ = key
    forgets: list[str] = []
    invalidate = SessionPool.invalidate_keys

    def counted(pool: SessionPool) -> None:
        forgets.append(pool.spec.name)
        invalidate(pool)

    monkeypatch.setattr(SessionPool, "invalidate_keys", counted)
    signed, _ = router.sign(hot, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
    new_id = unique("fresh")
    source, target = router.backends["use1-a"], router.backends["use1-b"]
    new = Placement(key_id=new_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                    state=KeyState.CREATING, primary="use1-a")
    try:
        source.generate(new, time.monotonic() + 30)
        wrapped, der = source.export_wrapped(new, time.monotonic() + 30)
        target.import_wrapped(new, wrapped, der, time.monotonic() + 30)
        assert forgets == [], "nothing was destroyed, so no cached handle went"
        source.generate(new, time.monotonic() + 30)  # over the objects just made: they are swept
        assert forgets == ["use1-a"]
        again, _ = router.sign(hot, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
        der_hot = router.public_key(hot, time.monotonic() + 10)[1]
        for signature in (signed, again):
            _verify(der_hot, signature, None, digest=bytes(32))
    finally:
        for backend in (source, target):
            backend.destroy(new_id, time.monotonic() + 30)
    assert forgets[1:] == ["use1-a", "use1-b"], "a destroy that destroyed something forgets"
