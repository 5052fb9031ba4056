"""Replication: every acknowledged key exists on its primary and a DR copy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import ObjectClass

from router.errors import ClusterDown, FailedPrecondition, KeyChanged, Unavailable
from router.health import CircuitState
from router.model import KeyAlgorithm, KeySpec, KeyState, KeyUsage, Operation, Placement, ReplicationPolicy
from router.reconcile import reconcile
from tests.support import copy_left, unique, wait_for

POLICY = ReplicationPolicy(copies=2, require_dr_copy=True)


def _spec(key_id: str, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY) -> KeySpec:
    return KeySpec(key_id=key_id, algorithm=algorithm, usage=usage, request_id=f"r-{key_id}")


def test_every_copy_signs_with_the_same_key(make_router, tokens) -> None:
    router = make_router(replication=POLICY)
    key = router.generate_key(_spec(unique("repl")), time.monotonic() + 30)
    assert key.state is KeyState.ENABLED
    assert key.primary in ("use1-a", "use1-b") and key.replicas == ("usw2-a",)
    public = serialization.load_der_public_key(router.public_key(key.key_id, time.monotonic() + 5)[1])
    digest = hashlib.sha256(b"same key everywhere").digest()
    for cluster in key.clusters:
        assert tokens.classes(cluster, key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
        signature = router.backends[cluster].sign(key, Operation.ECDSA_SHA256, digest, time.monotonic() + 5)
        public.verify(signature, b"same key everywhere", ec.ECDSA(hashes.SHA256()))
        # and the replica's own public key object is the same key
        assert router.backends[cluster].public_key(key, time.monotonic() + 5) == \
            router.backends[key.primary].public_key(key, time.monotonic() + 5)


@pytest.mark.parametrize("algorithm,usage", [
    (KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
    (KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC),
    (KeyAlgorithm.RSA_2048, KeyUsage.ENCRYPT_DECRYPT),
])
def test_symmetric_and_rsa_copies_interoperate(make_router, algorithm, usage) -> None:
    router = make_router(replication=POLICY)
    key = router.generate_key(_spec(unique("repl"), algorithm, usage), time.monotonic() + 60)
    primary, replica = (router.backends[n] for n in key.clusters)
    far = time.monotonic() + 10
    if algorithm is KeyAlgorithm.AES_256:
        ciphertext, iv = primary.encrypt(key, Operation.AES_GCM, b"data", b"aad", far)
        assert replica.decrypt(key, Operation.AES_GCM, ciphertext, iv, b"aad", far) == b"data"
    elif algorithm is KeyAlgorithm.HMAC_SHA256:
        assert primary.mac(key, Operation.HMAC_SHA256, b"m", far) == replica.mac(key, Operation.HMAC_SHA256, b"m", far)
    else:
        ciphertext, _ = primary.encrypt(key, Operation.RSA_OAEP_SHA256, b"secret", b"", far)
        assert replica.decrypt(key, Operation.RSA_OAEP_SHA256, ciphertext, b"", b"", far) == b"secret"


def test_dr_region_unavailable_fails_creation_and_leaves_nothing(make_router, tokens) -> None:
    router = make_router(replication=POLICY)
    router.fail_over_region("us-west-2")  # the DR region cannot take copies now
    key_id = unique("no-dr")
    with pytest.raises(Unavailable, match="DR region"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert router.store.get(key_id) is None
    for cluster in router.backends:
        assert tokens.objects(cluster, key_id) == []


def test_ack_local_then_repair_when_the_dr_region_returns(make_router, tokens) -> None:
    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True))
    router.fail_over_region("us-west-2")
    key = router.generate_key(_spec(unique("ack-local")), time.monotonic() + 30)
    assert key.state is KeyState.UNDER_REPLICATED
    assert tokens.objects("usw2-a", key.key_id) == []
    # Still serving from its local copy.
    assert router.sign(key.key_id, Operation.ECDSA_SHA256, b"d" * 32, None, time.monotonic() + 5)[0]

    router.fail_over_region("us-west-2", False)
    assert router.repair_once(time.monotonic() + 30) >= 1
    repaired = router.get_key(key.key_id)
    assert repaired.state is KeyState.ENABLED
    assert "usw2-a" in repaired.replicas
    assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert router.store.get(key.key_id).state is KeyState.ENABLED


def test_destroy_removes_every_copy(make_router, tokens) -> None:
    router = make_router(replication=POLICY)
    key = router.generate_key(_spec(unique("repl-destroy")), time.monotonic() + 30)
    router.destroy_key(key.key_id, time.monotonic() + 30)
    for cluster in router.backends:
        assert tokens.objects(cluster, key.key_id) == []


def test_a_destroy_a_cluster_misses_is_final_and_finished_later(make_router, tokens) -> None:
    """The DR cluster does not answer during DestroyKey: the key serves no more at once (no
    record left ENABLED over missing material), the caller is told which copy remains, and
    either a second DestroyKey or a reconcile removes it."""
    router = make_router(replication=POLICY)
    for finish in ("destroy again", "reconcile"):
        key = router.generate_key(_spec(unique("destroy-missed")), time.monotonic() + 30)
        real = router.backends["usw2-a"].destroy

        def unreachable(key_id: str, deadline: float, **_: object) -> int:
            raise ClusterDown("did not answer", cluster="usw2-a")

        router.backends["usw2-a"].destroy = unreachable  # type: ignore[method-assign]
        with pytest.raises(Unavailable, match=r"is destroyed and serves no more, but its objects on usw2-a could "
                                              r"not be removed now"):
            router.destroy_key(key.key_id, time.monotonic() + 30)
        router.backends["usw2-a"].destroy = real  # type: ignore[method-assign]
        assert router.store.get(key.key_id).state is KeyState.DESTROYED
        with pytest.raises(FailedPrecondition, match="destroyed"):
            router.sign(key.key_id, Operation.ECDSA_SHA256, b"\x09" * 32, None, time.monotonic() + 5)
        assert tokens.objects(key.primary, key.key_id) == [] and tokens.objects("usw2-a", key.key_id)
        if finish == "destroy again":
            assert router.destroy_key(key.key_id, time.monotonic() + 30).state is KeyState.DESTROYED
        else:
            assert ("usw2-a", key.key_id) in reconcile(router, fix=True).orphans
        assert tokens.objects("usw2-a", key.key_id) == []


def test_a_destroy_through_a_gateway_without_one_of_the_keys_clusters_destroys_nothing(make_router, tokens) -> None:
    """Another gateway's record names a cluster this one does not have: destroying the copies
    it can reach would leave that one behind, for ever out of its reach."""
    router = make_router(replication=POLICY)
    key = router.generate_key(_spec(unique("destroy-elsewhere")), time.monotonic() + 30)
    wider = router.store.update(replace(router.store.get(key.key_id), replicas=(*key.replicas, "euw1-a")))
    with pytest.raises(Unavailable, match="is also on euw1-a, not configured here; destroy it through a gateway"):
        router.destroy_key(key.key_id, time.monotonic() + 30)
    assert router.store.get(key.key_id).state is wider.state is KeyState.ENABLED
    for cluster in key.clusters:
        assert tokens.classes(cluster, key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}


def test_min_copies_holds_every_new_key_to_the_policy(make_router, tokens) -> None:
    """By default an application may ask for fewer copies than the policy (a key with no DR copy,
    or a non-extractable one); with [replication] min_copies it may not, and nothing is made."""
    far = time.monotonic() + 30
    single = unique("single")
    one = replace(_spec(single), copies=1)
    made = make_router(replication=POLICY).generate_key(one, far)
    assert made.clusters == (made.primary,)

    strict = make_router(replication=replace(POLICY, min_copies=2))
    for spec, refused in (
        (replace(_spec(unique("single")), copies=1), "replication.copies = 1 is below this gateway's "
                                                     r"\[replication\] min_copies = 2: each key it makes is placed on "
                                                     "2 clusters or more"),
        (replace(_spec(unique("pinned")), copies=1, extractable=False),
         r"a non-extractable key cannot be copied, and this gateway's \[replication\] min_copies = 2 places each "
         "key it makes on 2 clusters or more: it cannot be made here"),
        (replace(_spec(unique("pinned")), extractable=False), "a non-extractable key cannot be copied"),
    ):
        with pytest.raises(FailedPrecondition, match=refused):
            strict.generate_key(spec, far)
        assert strict.store.get(spec.key_id) is None
        assert all(not tokens.objects(name, spec.key_id) for name in strict.backends)
    kept = strict.generate_key(_spec(unique("kept")), far)
    assert len(kept.clusters) == 2


def test_a_non_extractable_key_is_never_planned_for_a_move_and_a_move_is_refused(make_router) -> None:
    """It cannot leave its cluster: in a rebalance plan it would stop every ApplyRebalance
    at its move, with an internal error."""
    one = ReplicationPolicy(copies=1, require_dr_copy=False)
    router = make_router(replication=one)
    router.apply_switches({"use1-b"}, set())  # every new key goes to use1-a
    from router.placement.ring import PlacementRing

    ring = PlacementRing(["use1-a", "use1-b"])  # the home region's clusters, as the plan sees them
    made = {}
    for extractable in (False, True) * 2:
        key_id = unique("stays" if not extractable else "moves")
        while ring.choose(key_id) != "use1-b":  # keys a rebalance would move, were they movable
            key_id = unique("stays" if not extractable else "moves")
        made[key_id] = extractable
        spec = KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                       request_id=f"r-{key_id}", copies=1, extractable=extractable)
        assert router.generate_key(spec, time.monotonic() + 30).primary == "use1-a"
    router.apply_switches(set(), set())
    planned = {key_id for key_id, _, _ in router.plan_rebalance() if key_id in made}
    assert planned == {key_id for key_id, extractable in made.items() if extractable}
    stays = next(key_id for key_id, extractable in made.items() if not extractable)
    with pytest.raises(FailedPrecondition, match="non-extractable: it never leaves the cluster it was made on"):
        router.move_key(stays, "use1-b", time.monotonic() + 30)


def test_material_lost_on_the_primary_is_served_by_the_replica(crypto, tokens) -> None:
    from hsmgw.v1 import crypto_pb2 as pb

    key_id = unique("lost-primary")
    key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                   algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    for obj in tokens.objects(key.primary_cluster, key_id):
        obj.destroy()
    signed = crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"), timeout=10)
    assert signed.cluster in key.replicas
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).pem
    serialization.load_pem_public_key(pem.encode()).verify(signed.signature, b"m", ec.ECDSA(hashes.SHA256()))


def test_a_reconcile_during_a_move_does_not_take_the_new_copy_for_an_orphan(make_router, tokens) -> None:
    """A key with one copy moves to another cluster while a reconcile (another gateway's
    start-up, an approved `hsmctl reconcile --fix`) lists the tokens: the new copy must
    survive it, or the key is gone once the old copy is removed."""
    key_id = unique("moving")
    first = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = first.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                                       request_id=f"r-{key_id}", copies=1), time.monotonic() + 30)
    assert key.replicas == ()
    target = next(name for name in ("use1-a", "use1-b") if name != key.primary)
    reconciler = make_router()
    found: list[object] = []

    def meanwhile(point: str) -> None:
        if point == "moved-copy-proven":
            found.append(reconcile(reconciler, fix=True))

    mover = make_router(fault=meanwhile)
    moved = mover.move_key(key_id, target, time.monotonic() + 30)
    assert found, "the reconcile ran during the move"
    assert (target, key_id) not in found[0].orphans  # type: ignore[attr-defined]
    assert (moved.primary, moved.replicas) == (target, ())
    assert tokens.classes(target, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert tokens.objects(key.primary, key_id) == []
    public = serialization.load_der_public_key(mover.public_key(key_id, time.monotonic() + 5)[1])
    signature, cluster = mover.sign(key_id, Operation.ECDSA_SHA256, None, b"after the move", time.monotonic() + 5)
    assert cluster == target
    public.verify(signature, b"after the move", ec.ECDSA(hashes.SHA256()))


def _one_copy_key(make_router, key_id: str):  # type: ignore[no-untyped-def]
    """A router, a key with one copy in the home region, and the home cluster it could move to."""
    first = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = first.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                                       request_id=f"r-{key_id}", copies=1), time.monotonic() + 30)
    return first, key, next(name for name in ("use1-a", "use1-b") if name != key.primary)


def test_a_failed_move_leaves_the_record_and_tokens_as_they_were(make_router, tokens) -> None:
    key_id = unique("nomove")
    first, key, target = _one_copy_key(make_router, key_id)

    def copy_fails(point: str) -> None:
        if point == "moved-copy-proven":
            raise Unavailable("the target went away")

    with pytest.raises(Unavailable, match="the target went away"):
        make_router(fault=copy_fails).move_key(key_id, target, time.monotonic() + 30)
    after = first.store.get(key_id)
    assert (after.primary, after.replicas, after.state) == (key.primary, (), KeyState.ENABLED)
    assert tokens.objects(target, key_id) == []
    assert tokens.classes(key.primary, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    report = reconcile(first, fix=False)
    assert key_id not in {k for _, k in report.orphans + report.missing}


def test_a_failed_move_whose_record_another_writer_changed_removes_its_copy_and_its_name(make_router, tokens) -> None:
    """Another writer changed the record while the move failed: the copy still goes (no object
    the record cannot account for), and the move reads the record again to take the target's
    name out of it, so the record names no copy that does not exist."""
    key_id = unique("nomove2")
    first, key, target = _one_copy_key(make_router, key_id)

    def another_writer_then_failure(point: str) -> None:
        if point == "moved-copy-proven":
            first.store.update(first.store.get(key_id))  # a version bump by someone else
            raise Unavailable("the target went away")

    with pytest.raises(Unavailable, match="the target went away"):
        make_router(fault=another_writer_then_failure).move_key(key_id, target, time.monotonic() + 30)
    assert tokens.objects(target, key_id) == []
    after = first.store.get(key_id)
    assert (after.primary, after.replicas, after.state) == (key.primary, (), KeyState.ENABLED)
    signature, cluster = first.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
    assert signature and cluster == key.primary
    report = reconcile(first, fix=False)
    assert key_id not in {k for _, k in report.missing + report.orphans}


def test_a_reconcile_during_a_repair_does_not_destroy_the_copy_being_made(make_router, tokens) -> None:
    """The repairer copies a key short of copies, then names the copy in the record; a
    reconcile in between must not destroy the copy as an orphan (the record would name a
    DR copy that does not exist)."""
    policy = ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True)
    creator = make_router(replication=policy)
    creator.fail_over_region("us-west-2")
    reconciler = make_router(replication=policy)
    found: list[object] = []
    for _ in range(3):  # the shared fleet's gateway repairs keys too, and may come first: then again
        key = creator.generate_key(_spec(unique("repairing")), time.monotonic() + 30)
        assert key.state is KeyState.UNDER_REPLICATED

        def meanwhile(point: str, key: Placement = key) -> None:
            # The repairer repairs every key of the shared store that is short of copies: act
            # at this key's point, its copy made and not yet named.
            if (point == "repair-copied" and not found and tokens.classes("usw2-a", key.key_id)
                    and "usw2-a" not in reconciler.store.get(key.key_id).clusters):
                assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
                found.append(reconcile(reconciler, fix=True))

        repairer = make_router(replication=policy, fault=meanwhile)
        repairer.repair_once(time.monotonic() + 30)
        if found:
            break
    assert found, "the reconcile ran during the repair"
    assert ("usw2-a", key.key_id) not in found[0].orphans  # type: ignore[attr-defined]
    repaired = repairer.store.get(key.key_id)
    assert repaired.state is KeyState.ENABLED and "usw2-a" in repaired.replicas
    assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    signature = repairer.backends["usw2-a"].sign(repaired, Operation.ECDSA_SHA256, b"\x06" * 32, time.monotonic() + 5)
    public = serialization.load_der_public_key(repairer.public_key(key.key_id, time.monotonic() + 5)[1])
    public.verify(signature, b"\x06" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_reconcile_does_not_destroy_a_repair_copy_named_after_its_scan(make_router, tokens) -> None:
    """The repairer names its copy after the reconcile listed the tokens and scanned the
    store: the copy is the record's by the time the reconcile looks again, and stays."""
    policy = ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True)
    creator = make_router(replication=policy)
    creator.fail_over_region("us-west-2")
    key = creator.generate_key(_spec(unique("named-late")), time.monotonic() + 30)
    copied, named = threading.Event(), threading.Event()

    def at(point: str) -> None:
        if point == "repair-copied" and tokens.classes("usw2-a", key.key_id):
            copied.set()
            named.wait(30)

    repairer = make_router(replication=policy, fault=at)
    repair = threading.Thread(target=repairer.repair_once, args=(time.monotonic() + 60,))
    repair.start()
    assert copied.wait(30)
    reconciler = make_router(replication=policy)
    scan = reconciler.store.scan

    def scan_then_the_repair_names_its_copy():  # type: ignore[no-untyped-def]
        yield from scan()
        named.set()
        repair.join(30)

    reconciler.store.scan = scan_then_the_repair_names_its_copy  # type: ignore[method-assign]
    report = reconcile(reconciler, fix=True)
    assert ("usw2-a", key.key_id) not in report.orphans
    after = reconciler.store.get(key.key_id)
    assert after.state is KeyState.ENABLED and "usw2-a" in after.replicas
    assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}


def _moved_leaving_its_old_copy(make_router, tokens, policy: ReplicationPolicy,  # type: ignore[no-untyped-def]
                                prefix: str) -> tuple[Placement, str, str]:
    """A key moved from its cluster to the other home cluster, whose old copy stayed behind
    (the source did not answer the destroy): (the key as made, source, where it is now)."""
    key = make_router(replication=policy).generate_key(_spec(unique(prefix)), time.monotonic() + 30)
    source = key.primary
    other = "use1-b" if source == "use1-a" else "use1-a"
    mover = make_router(replication=policy)

    def unreachable(key_id: str, deadline: float, **_: object) -> int:
        raise ClusterDown("did not answer", cluster=source)

    mover.backends[source].destroy = unreachable  # type: ignore[method-assign]
    assert mover.move_key(key.key_id, other, time.monotonic() + 30).primary == other
    assert tokens.classes(source, key.key_id), "the old copy is left behind"
    return key, source, other


def test_a_reconcile_does_not_destroy_a_leftover_copy_that_a_move_brings_back(make_router, tokens) -> None:
    """A move leaves its old copy behind (the source did not answer); a reconcile lists it as
    an orphan; before the reconcile gets to it, another gateway moves the key back there.
    That copy is then the key's only one, and the reconcile must leave it."""
    one = ReplicationPolicy(copies=1, require_dr_copy=False)
    key, source, other = _moved_leaving_its_old_copy(make_router, tokens, one, "back")
    reconciler = make_router(replication=one)
    scan = reconciler.store.scan
    moved_back: list[Placement] = []

    def scan_then_a_move_back():  # type: ignore[no-untyped-def]
        yield from scan()
        moved_back.append(make_router(replication=one).move_key(key.key_id, source, time.monotonic() + 30))

    reconciler.store.scan = scan_then_a_move_back  # type: ignore[method-assign]
    report = reconcile(reconciler, fix=True)
    assert moved_back and moved_back[0].clusters == (source,)
    assert (source, key.key_id) not in report.orphans
    assert tokens.classes(source, key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    reconciler.reload_key(key.key_id)
    signature, cluster = reconciler.sign(key.key_id, Operation.ECDSA_SHA256, b"\x07" * 32, None, time.monotonic() + 5)
    public = serialization.load_der_public_key(reconciler.public_key(key.key_id, time.monotonic() + 5)[1])
    public.verify(signature, b"\x07" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert cluster == source


def test_a_reconcile_does_not_destroy_a_copy_another_host_makes_after_its_claim(make_router, tokens) -> None:
    """A gateway on another host does not take this host's token lock. Right after the
    reconcile claims an orphan's record, such a gateway moves the key onto the orphan's
    cluster: it reads the claimed record, clears the leftover, makes its copy there,
    switches and drops its old copy. That new copy is the key's only one; the reconcile
    may destroy the objects it listed, never the new one."""
    one = ReplicationPolicy(copies=1, require_dr_copy=False)
    key, source, other = _moved_leaving_its_old_copy(make_router, tokens, one, "host")

    elsewhere = make_router(replication=one)  # the other host: no share in this host's locks
    for backend in elsewhere.backends.values():
        backend._changing = lambda s, deadline: contextlib.nullcontext()  # type: ignore[method-assign]
    reconciler = make_router(replication=one)
    update = reconciler.store.update
    moved: list[Placement] = []

    def claim_then_the_other_host_moves(placement: Placement) -> Placement:
        claimed = update(placement)
        if placement.key_id == key.key_id and not moved:
            moved.append(elsewhere.move_key(key.key_id, source, time.monotonic() + 30))
        return claimed

    reconciler.store.update = claim_then_the_other_host_moves  # type: ignore[method-assign]
    reconcile(reconciler, fix=True)
    assert moved and moved[0].clusters == (source,), "the other host's move ran after the claim"
    assert not tokens.classes(other, key.key_id)
    assert tokens.classes(source, key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    reconciler.reload_key(key.key_id)
    signature, cluster = reconciler.sign(key.key_id, Operation.ECDSA_SHA256, b"\x08" * 32, None, time.monotonic() + 5)
    public = serialization.load_der_public_key(reconciler.public_key(key.key_id, time.monotonic() + 5)[1])
    public.verify(signature, b"\x08" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert cluster == source


class _Killed(BaseException):
    """The process dies here: no except clause of the move's runs."""


def _phantom_copy(make_router, key: Placement, target: str) -> None:  # type: ignore[no-untyped-def]
    """What a move killed after naming its target leaves: the record names ``target``, which
    holds no copy."""

    def killed(point: str) -> None:
        if point == "move-target-named":
            raise _Killed

    with pytest.raises(_Killed):
        make_router(fault=killed).move_key(key.key_id, target, time.monotonic() + 30)
    assert target in make_router().store.get(key.key_id).replicas


def test_reconcile_drops_copies_the_record_names_but_no_token_holds_and_the_repairer_makes_real_ones(
        make_router, tokens) -> None:
    """A phantom name (a killed move's target) and a copy lost on its HSM: the record claims
    three copies of a key that one cluster holds. The repairer trusts the record, so it does
    nothing; reconcile --fix drops both names, and the repairer then copies the key for real."""
    router = make_router(replication=POLICY)
    key = router.generate_key(_spec(unique("phantom")), time.monotonic() + 30)
    home = next(name for name in ("use1-a", "use1-b") if name != key.primary)
    _phantom_copy(make_router, key, home)
    for obj in tokens.objects("usw2-a", key.key_id):  # the DR copy is lost on its HSM
        obj.destroy()
    router.reload_key(key.key_id)
    claimed = router.store.get(key.key_id)
    assert set(claimed.clusters) == {key.primary, "usw2-a", home} and claimed.state is KeyState.ENABLED

    router.repair_once(time.monotonic() + 30)
    assert tokens.objects("usw2-a", key.key_id) == [], "the record said the key had its copies"
    looked = reconcile(router, fix=False)
    assert {("usw2-a", key.key_id), (home, key.key_id)} <= set(looked.missing)
    assert looked.dropped == [] and router.store.get(key.key_id).version == claimed.version

    report = reconcile(router, fix=True)
    assert {("usw2-a", key.key_id), (home, key.key_id)} <= set(report.dropped)
    kept = router.store.get(key.key_id)
    assert (kept.primary, kept.replicas, kept.state) == (key.primary, (), KeyState.UNDER_REPLICATED)
    assert router.placement(key.key_id).clusters == (key.primary,)

    assert router.repair_once(time.monotonic() + 30) >= 1
    repaired = router.store.get(key.key_id)
    assert repaired.state is KeyState.ENABLED and "usw2-a" in repaired.replicas
    public = serialization.load_der_public_key(router.public_key(key.key_id, time.monotonic() + 5)[1])
    for cluster in repaired.clusters:
        # The shared fleet's gateway repairs keys too, and may have replaced this copy with its own
        # just now (a copy sweeps the key's objects first): this process's view of the token catches
        # up within moments. The signature below is the check that the copy works.
        wait_for(lambda cluster=cluster: tokens.classes(cluster, key.key_id) == {ObjectClass.PRIVATE_KEY,
                                                                                ObjectClass.PUBLIC_KEY},
                 timeout=5, what=f"both objects of {key.key_id} on {cluster} (record {repaired})")
        signature = router.backends[cluster].sign(repaired, Operation.ECDSA_SHA256, b"\x07" * 32,
                                                  time.monotonic() + 5)
        public.verify(signature, b"\x07" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert key.key_id not in {k for _, k in reconcile(router, fix=False).missing}
    # The cluster the phantom named takes a move again ("already on cluster" before).
    moved = router.move_key(key.key_id, home, time.monotonic() + 30)
    assert moved.primary == home
    assert tokens.classes(home, key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}


def test_reconcile_never_drops_the_last_names_of_a_key_no_cluster_holds(make_router, tokens, caplog) -> None:
    """Every named cluster lacks the key: the record stays as it is, for an operator, and the
    log says so."""
    first, key, target = _one_copy_key(make_router, unique("gone"))
    _phantom_copy(make_router, key, target)
    for obj in tokens.objects(key.primary, key.key_id):
        obj.destroy()
    before = first.store.get(key.key_id)
    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        report = reconcile(first, fix=True)
    # (its id may not be among the few named: the shared store holds other tests' lost keys)
    assert any(r.levelno == logging.ERROR and "held by none of the clusters their records name" in r.getMessage()
               for r in caplog.records)
    assert {(key.primary, key.key_id), (target, key.key_id)} <= set(report.missing)
    assert key.key_id not in {k for _, k in report.dropped}
    after = first.store.get(key.key_id)
    assert (after.primary, after.replicas, after.version) == (before.primary, before.replicas, before.version)


def test_a_reconcile_that_drops_a_moves_target_before_the_copy_exists_makes_the_move_undo_itself(
        make_router, tokens) -> None:
    """The move has named its target and not yet copied: a reconcile sees a name without a copy
    and drops it. The move's own update then fails on the record's version, so it removes
    its copy and says so; the key stays where it was and signs."""
    first, key, target = _one_copy_key(make_router, unique("racing"))
    reconciler = make_router()
    found: list[object] = []

    def meanwhile(point: str) -> None:
        if point == "move-target-named":
            found.append(reconcile(reconciler, fix=True))

    with pytest.raises(Unavailable, match="changed while moving"):
        make_router(fault=meanwhile).move_key(key.key_id, target, time.monotonic() + 30)
    assert (target, key.key_id) in found[0].dropped  # type: ignore[attr-defined]
    after = first.store.get(key.key_id)
    assert (after.primary, after.replicas) == (key.primary, ())
    assert tokens.objects(target, key.key_id) == []
    assert tokens.classes(key.primary, key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    first.reload_key(key.key_id)
    signature, cluster = first.sign(key.key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
    public = serialization.load_der_public_key(first.public_key(key.key_id, time.monotonic() + 5)[1])
    public.verify(signature, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))
    assert cluster == key.primary


def test_a_move_killed_after_naming_its_target_leaves_a_name_the_next_start_drops(make_router, tokens) -> None:
    first, key, target = _one_copy_key(make_router, unique("killed-move"))
    _phantom_copy(make_router, key, target)
    left = first.store.get(key.key_id)
    assert (left.primary, left.replicas) == (key.primary, (target,)) and tokens.objects(target, key.key_id) == []

    restarted = make_router()
    report = reconcile(restarted, fix=True)  # what every gateway start runs (gateway.app.build_router)
    assert (target, key.key_id) in report.dropped
    after = restarted.store.get(key.key_id)
    assert (after.primary, after.replicas, after.state) == (key.primary, (), KeyState.ENABLED)
    moved = restarted.move_key(key.key_id, target, time.monotonic() + 30)
    assert (moved.primary, moved.replicas) == (target, ())
    signature, cluster = restarted.sign(key.key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
    public = serialization.load_der_public_key(restarted.public_key(key.key_id, time.monotonic() + 5)[1])
    public.verify(signature, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))
    assert cluster == target and tokens.objects(key.primary, key.key_id) == []


def test_reconcile_keeps_a_missing_name_it_cannot_look_at_again_or_write_and_drops_a_bounded_number_a_pass(
        make_router, tokens, monkeypatch, caplog) -> None:
    """A name without a copy stays while its cluster cannot be looked at again (a dead cluster
    must not lose its keys' names on one failed search) or while the store refuses the write;
    reconcile goes on either way. Past MAX_DROPS a pass, the rest wait for the next pass."""
    import router.reconcile as reconcile_module
    from router.errors import Unavailable as ClusterDown
    from router.placement.store import StoreError

    first, a, target = _one_copy_key(make_router, unique("relook"))
    _phantom_copy(make_router, a, target)
    _, b, b_target = _one_copy_key(make_router, unique("relook"))
    _phantom_copy(make_router, b, b_target)
    router = make_router()

    listing = router.backends[target].key_objects

    def dead_on_second_look(deadline: float, *, key_id: str | None = None):  # type: ignore[no-untyped-def]
        if key_id == a.key_id:
            raise ClusterDown(f"cluster {target} is unreachable", cluster=target)
        return listing(deadline, key_id=key_id)

    monkeypatch.setattr(router.backends[target], "key_objects", dead_on_second_look)
    write = router.store.update

    def refused(placement):  # type: ignore[no-untyped-def]
        if placement.key_id == b.key_id:
            raise StoreError("the placement store is unreachable")
        return write(placement)

    monkeypatch.setattr(router.store, "update", refused)
    report = reconcile(router, fix=True)
    assert {(target, a.key_id), (b_target, b.key_id)} <= set(report.missing) & set(report.droppable)
    assert not {a.key_id, b.key_id} & {k for _, k in report.dropped}
    for key, named in ((a, target), (b, b_target)):
        assert router.store.get(key.key_id).replicas == (named,)
    monkeypatch.undo()

    monkeypatch.setattr(reconcile_module, "MAX_DROPS", 1)
    left = {(target, a.key_id), (b_target, b.key_id)}
    for _ in range(100):  # the shared store may hold other tests' names without copies too
        with caplog.at_level(logging.WARNING, logger="router.reconcile"):
            report = reconcile(router, fix=True)
        assert len(report.dropped) <= 1
        if len(report.droppable) > 1:
            assert len(report.dropped) == 1
            assert any("more missing copies to drop" in r.getMessage() for r in caplog.records)
        left -= set(report.dropped)
        caplog.clear()
        if not left:
            break
    assert not left, "each pass drops one, so both go in time"
    for key in (a, b):
        after = router.store.get(key.key_id)
        assert (after.primary, after.replicas) == (key.primary, ())


# -- held keys (placed or moved by an operator) ---------------------------------------------------


def test_a_placement_outlives_a_creation_that_failed_and_the_retry_goes_where_it_says(make_router) -> None:
    """`keys place` is used up by the creation that makes the key, not by one that fails:
    the retry the error asks for still goes to the chosen cluster, and the key is held."""
    from router.placement.ring import PlacementRing
    from router.router import PINS

    router = make_router(replication=POLICY)
    key_id = unique("pinned")
    chosen = next(c for c in ("use1-a", "use1-b") if c != PlacementRing(["use1-a", "use1-b"]).choose(key_id))
    router.pin(key_id, chosen)
    router.fail_over_region("us-west-2")  # no DR copy possible: the creation fails, nothing made
    with pytest.raises(Unavailable, match="nothing was created"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    router.fail_over_region("us-west-2", False)
    key = router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert key.primary == chosen and key.held
    record = router.store.admin_record(PINS)
    assert record is None or key_id not in record[0], "the pin is used up once the key is made"
    destroyed = router.destroy_key(key_id, time.monotonic() + 30)
    assert destroyed.state is KeyState.DESTROYED and not destroyed.held
    assert not router.store.get(key_id).held, "a destroyed key is not listed as held"


def test_a_key_being_created_cannot_be_released(make_router) -> None:
    router = make_router()
    key_id = unique("creating")
    router.store.create(Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.CREATING, "use1-a",
                                  request_id=key_id, held=True, create_time=time.time()))  # not yet stale
    with pytest.raises(FailedPrecondition, match="still being created"):
        router.check_release(key_id)


def test_a_rebalance_leaves_a_key_that_an_operator_moved_while_it_ran(make_router, tmp_path) -> None:
    """The plan is checked once, when the rebalance starts; a move approved meanwhile holds its
    key, and the rebalance leaves that key where the operator put it, and moves the rest."""
    from gateway.admin import AdminServicer, rebalance_params

    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    keys = [router.generate_key(_spec(unique("reb")), time.monotonic() + 30) for _ in range(2)]
    first, second = (k.key_id for k in keys)
    others = {k.key_id: next(c for c in ("use1-a", "use1-b") if c != k.primary) for k in keys}
    moves = [(router.store.get(k.key_id), others[k.key_id]) for k in keys]
    moved_meanwhile: list[str] = []
    move = router.move_key

    def operator_moves_the_second_first(key_id: str, to: str, deadline: float, **kwargs: object) -> Placement:
        if not moved_meanwhile:  # approved while the rebalance moves the first key
            moved_meanwhile.append(move(second, others[second], deadline, hold=True).primary)
        return move(key_id, to, deadline, **kwargs)  # type: ignore[arg-type]

    router.move_key = operator_moves_the_second_first  # type: ignore[method-assign]
    # As if a cluster had been added: the plan's moves are what its approvers were shown.
    change = admin.changes.request("alice", "apply_rebalance",
                                   rebalance_params("plan", router.rebalance_layout(), moves))
    assert change.state == "applied", change.result
    assert change.result == f"moved 1 key, left 1 that changed since the plan ({second})"
    assert router.store.get(first).primary == others[first]
    after = router.store.get(second)
    assert after.primary == others[second] and after.held


def test_a_rebalance_plan_moves_at_most_its_limit_and_the_next_plan_moves_the_rest(
        make_router, tmp_path, monkeypatch) -> None:
    """A change records every move of its plan, and a change is one store item (DynamoDB:
    400 KB): a plan takes the first MAX_PLANNED_MOVES moves; once applied, the next has the rest."""
    import gateway.admin
    from gateway.admin import AdminServicer, rebalance_params

    monkeypatch.setattr(gateway.admin, "MAX_PLANNED_MOVES", 2)
    router = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    keys = [router.generate_key(_spec(unique("reb-limit")), time.monotonic() + 30) for _ in range(3)]
    for key in keys:  # off the place the ring gives it, and not held: rebalance moves it back
        router.move_key(key.key_id, next(c for c in ("use1-a", "use1-b") if c != key.primary), time.monotonic() + 30)

    layout, planned = admin._plan()
    assert len(planned) == 2
    change = admin.changes.request("alice", "apply_rebalance", rebalance_params("plan", layout, planned))
    assert (change.state, change.result) == ("applied", "moved 2 keys")
    _, rest = admin._plan()
    assert [p.key_id for p, _ in rest] == sorted({k.key_id for k in keys} - {p.key_id for p, _ in planned})

    # And by size: long key ids and cluster names must not take the change past a store item.
    (first, target), = rest
    one = len(json.dumps([first.key_id, first.primary, target, first.version])) + 2
    monkeypatch.setattr(gateway.admin, "MAX_PLANNED_MOVES", 100)
    monkeypatch.setattr(gateway.admin, "MAX_PLANNED_BYTES", one - 1)
    assert admin._plan()[1] == []
    monkeypatch.setattr(gateway.admin, "MAX_PLANNED_BYTES", one)
    assert [p.key_id for p, _ in admin._plan()[1]] == [first.key_id]


@pytest.mark.parametrize("limit", ["count", "size"])
def test_a_reconcile_fix_lists_at_most_what_one_change_holds_and_the_next_fix_the_rest(
        make_router, tokens, tmp_path, monkeypatch, limit) -> None:
    """A fix's change records the findings it was asked for, and a change is one store item
    (DynamoDB: 400 KB): a fix lists the first that fit and says how many it left; once it is
    applied, the next fix lists the rest."""
    import gateway.admin
    from gateway.admin import AdminServicer, findings_of
    from hsmgw.v1 import admin_pb2 as apb

    router = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    strays = []
    for _ in range(3):  # each with a copy its record does not name, as a move cut off leaves one
        key = router.generate_key(_spec(unique("fix-limit")), time.monotonic() + 30)
        stray = next(c for c in ("use1-a", "use1-b") if c != key.primary)
        copy_left(router, key, stray)
        strays.append(["orphan", stray, key.key_id])
    strays.sort(key=lambda f: (f[0], f[1], f[2]))
    if limit == "count":
        monkeypatch.setattr(gateway.admin, "MAX_FIX_FINDINGS", 2)
    else:  # long key ids and cluster names must not take the change past a store item either
        two = sum(len(json.dumps(f)) + 2 for f in strays[:2])
        monkeypatch.setattr(gateway.admin, "MAX_PLANNED_BYTES", two)

    first = admin.Reconcile(apb.ReconcileRequest(fix=True), None)
    assert [list(f) for f in findings_of(dict(first.change.params))] == strays[:2]
    assert first.findings_left == 1 and first.change.state == "applied", first
    assert "2 orphan objects removed" in first.change.result
    assert "1 findings it does not list left for a new request" in first.change.result
    second = admin.Reconcile(apb.ReconcileRequest(fix=True), None)
    assert [list(f) for f in findings_of(dict(second.change.params))] == strays[2:]
    assert second.findings_left == 0 and second.change.state == "applied", second
    assert all(tokens.objects(cluster, key_id) == [] for _, cluster, key_id in strays)


def test_a_placement_of_a_key_not_yet_created_can_be_taken_back_and_placements_are_bounded(
        make_router, tmp_path, monkeypatch) -> None:
    """`keys place` of a key that is then never created (a typo, a plan dropped) stayed for good, and
    would place a key of that id made years later: `keys release` takes it back. The placements are
    one store item, so there are at most MAX_PINS of them, each refused past that when asked and
    when approved."""
    import router.router
    from gateway.admin import AdminServicer
    from router.errors import FailedPrecondition, KeyNotFound
    from router.placement.ring import PlacementRing

    monkeypatch.setattr(router.router, "MAX_PINS", 2)
    one = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    admin = AdminServicer(one, audit_path=tmp_path / "audit.log", quorum=1)
    typo, kept, third = unique("placed"), unique("placed"), unique("placed")
    not_chosen = next(c for c in ("use1-a", "use1-b") if c != PlacementRing(["use1-a", "use1-b"]).choose(typo))
    for key_id in (typo, kept):
        change = admin.changes.request("alice", "place_key", {"key_id": key_id, "cluster": not_chosen})
        assert change.state == "applied", change.result
    with pytest.raises(FailedPrecondition, match=r"^2 keys are placed and not yet created, the most the placement "
                                                 r"store keeps: .*\(hsmctl keys placed lists them; hsmctl keys release "
                                                 r"KEY\), then place this one$"):
        one.check_pin(third, "use1-a")
    failed = admin.changes.request("alice", "place_key", {"key_id": third, "cluster": "use1-a"})  # as if approved
    assert failed.state == "failed" and "2 keys are placed and not yet created" in failed.result
    one.pin(kept, "use1-a")  # placing a placed key elsewhere takes no more room

    assert one.check_release(typo) is None
    released = admin.changes.request("alice", "release_key", {"key_id": typo})
    assert (released.state, released.result) == (
        "applied", f"{typo} is no longer placed on {not_chosen}: created from now on, it goes where any new key goes")
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    [unplaced] = [r for r in records if r["action"] == "key_unplaced"]
    assert (unplaced["target"], unplaced["details"]["cluster"]) == (typo, not_chosen)
    assert unplaced["details"]["change_id"] == released.id
    with pytest.raises(KeyNotFound, match=r"not found \(nor placed for its creation\)"):
        one.check_release(typo)
    made = one.generate_key(_spec(typo), time.monotonic() + 30)
    assert made.primary != not_chosen and not made.held, "placed where any new key goes"
    one.check_pin(third, "use1-a")  # room again
    assert one.generate_key(_spec(kept), time.monotonic() + 30).primary == "use1-a"

    # Taken back while the key is being created (its clusters chosen, the tokens searched): it is
    # made where it was placed, but not held there; a release once its record is written says so.
    racing, late = unique("placed"), unique("placed")
    for key_id in (racing, late):
        elsewhere = next(c for c in ("use1-a", "use1-b") if c != PlacementRing(["use1-a", "use1-b"]).choose(key_id))
        assert admin.changes.request("alice", "place_key", {"key_id": key_id, "cluster": elsewhere}).state == "applied"
    search = one._unrecorded_objects
    results = []

    def released_meanwhile(spec, *args, **kwargs):  # type: ignore[no-untyped-def]
        results.append(admin.changes.request("alice", "release_key", {"key_id": spec.key_id}))
        return search(spec, *args, **kwargs)

    monkeypatch.setattr(one, "_unrecorded_objects", released_meanwhile)
    raced = one.generate_key(_spec(racing), time.monotonic() + 30)
    assert raced.primary != PlacementRing(["use1-a", "use1-b"]).choose(racing) and not raced.held
    assert results[0].state == "applied" and "created from now on" in results[0].result
    monkeypatch.setattr(one, "_unrecorded_objects", search)
    # ... or just after its creation record is written (a release that looked before it, and took
    # the placement back after): the creation sees its placement gone.
    written = unique("placed")
    assert admin.changes.request("alice", "place_key", {"key_id": written, "cluster": "use1-b"}).state == "applied"
    check = one._unheld_if_taken_back

    def taken_back_after_the_record(intent, pin):  # type: ignore[no-untyped-def]
        assert one.store.get(intent.key_id).held
        assert one.unpin(intent.key_id) == "use1-b"
        return check(intent, pin)

    monkeypatch.setattr(one, "_unheld_if_taken_back", taken_back_after_the_record)
    made_late = one.generate_key(_spec(written), time.monotonic() + 30)
    assert made_late.primary == "use1-b" and not made_late.held and not one.store.get(written).held
    monkeypatch.setattr(one, "_unheld_if_taken_back", check)
    with_it = unique("placed")  # and one still placed stays held
    assert admin.changes.request("alice", "place_key", {"key_id": with_it, "cluster": "use1-b"}).state == "applied"
    assert one.generate_key(_spec(with_it), time.monotonic() + 30).held
    unpin, creating = one.unpin, []

    def created_meanwhile(key_id: str) -> str:  # the creation read the placement, then the release took it
        creating.append(_creating_intent(one, key_id))
        return unpin(key_id)

    monkeypatch.setattr(one, "unpin", created_meanwhile)
    after = admin.changes.request("alice", "release_key", {"key_id": late})
    (intent,) = creating
    assert intent.held
    assert after.result == (f"{late} is no longer placed on {intent.primary}, but it was being created there "
                            f"meanwhile: it stays on {intent.primary} (hsmctl keys show says whether it is held; if "
                            "so, release it again once it is made)")

    # A placement its key's creation could not clear (the store did not answer) outlives the key's
    # DestroyKey: it still takes room, and a release takes it back.
    from router.placement.store import edit_admin_record
    from router.router import PINS

    monkeypatch.setattr(one, "unpin", unpin)
    one.destroy_key(kept, time.monotonic() + 30)
    edit_admin_record(one.store, PINS, lambda pins: {**(pins or {}), kept: "use1-b"})
    with pytest.raises(FailedPrecondition, match=f"key {kept!r} is destroyed"):
        one.check_pin(kept, "use1-b")
    leftover = admin.changes.request("alice", "release_key", {"key_id": kept})
    assert leftover.result == f"{kept} is destroyed; its placement on use1-b, which its creation left, is taken back"
    assert one._pin_of(kept) is None
    # Of a live key, held or not, as well (a held one is released too).
    for key_id, held in ((written, False), (racing, False)):
        assert one.store.get(key_id).held is held
        edit_admin_record(one.store, PINS, lambda pins, k=key_id: {**(pins or {}), k: "use1-a"})
        result = admin.changes.request("alice", "release_key", {"key_id": key_id}).result
        assert result == (f"{key_id} is on {one.store.get(key_id).primary}; its placement on use1-a, which its "
                          "creation left, is taken back")
        assert one._pin_of(key_id) is None
    held_key = unique("placed")
    edit_admin_record(one.store, PINS, lambda pins: {**(pins or {}), held_key: "use1-a"})
    assert one.generate_key(_spec(held_key), time.monotonic() + 30).held
    edit_admin_record(one.store, PINS, lambda pins: {**(pins or {}), held_key: "use1-a"})  # as if not cleared
    result = admin.changes.request("alice", "release_key", {"key_id": held_key}).result
    assert result == (f"{held_key} released: rebalance may move it; its placement on use1-a, which its creation "
                      "left, is taken back")
    assert not one.store.get(held_key).held and one._pin_of(held_key) is None


def test_status_warns_as_placements_near_their_limit(make_router, tmp_path, monkeypatch) -> None:
    """Past MAX_PINS, keys place is refused: hsmctl status says so from 80 % on."""
    import gateway.admin
    import router.router
    from gateway.admin import AdminServicer
    from hsmgw.v1 import admin_pb2 as apb

    for module in (gateway.admin, router.router):
        monkeypatch.setattr(module, "MAX_PINS", 5)
    one = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    admin = AdminServicer(one, audit_path=tmp_path / "audit.log", quorum=1)
    says = "keys are placed and not yet created; past that keys place is refused"
    for count in range(1, 6):
        one.pin(unique("near-limit"), "use1-a")
        warnings = list(admin.GetStatus(apb.GetStatusRequest(), None).warnings)
        if count < 4:
            assert not [w for w in warnings if says in w], (count, warnings)
        else:
            assert f"{count} of at most 5 {says} (hsmctl keys placed lists them, keys release takes one back)" \
                in warnings, warnings


def test_admin_calls_say_what_they_could_not_read_when_the_store_fails_them(make_router, tmp_path, monkeypatch) -> None:
    """Status with only the change records unreadable shows its warning (it answered UNAVAILABLE);
    a release whose placement is taken back says so when the store then fails its last read;
    keys placed and placing a key are UNAVAILABLE, not a crash, when the placements cannot be read."""
    from gateway.admin import AdminServicer
    from hsmgw.v1 import admin_pb2 as apb
    from router.errors import Unavailable as RouterUnavailable
    from router.placement.store import StoreError

    one = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    admin = AdminServicer(one, audit_path=tmp_path / "audit.log", quorum=1)

    def unreadable(*_args: object, **_kwargs: object) -> None:
        raise RouterUnavailable("placement store is unreachable; admin changes cannot be read or recorded now")

    monkeypatch.setattr(admin.changes, "list", unreadable)
    warnings = list(admin.GetStatus(apb.GetStatusRequest(), None).warnings)
    assert "the placement store is unreachable: pending changes are not shown" in warnings
    monkeypatch.undo()

    key_id = unique("placed")
    one.pin(key_id, "use1-b")
    get = one.store.get

    def fails_after_the_take_back(wanted: str):  # type: ignore[no-untyped-def]
        if one._pin_of(key_id) is None:
            raise StoreError("connection refused")
        return get(wanted)

    monkeypatch.setattr(one.store, "get", fails_after_the_take_back)
    released = admin.changes.request("alice", "release_key", {"key_id": key_id})
    assert (released.state, released.result) == ("applied", f"{key_id} is no longer placed on use1-b")
    monkeypatch.undo()

    def down(_name: str) -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(one.store, "admin_record", down)
    with pytest.raises(RouterUnavailable, match="placements cannot be read now"):
        one.pins()
    with pytest.raises(RouterUnavailable, match="placements cannot be read now"):
        one.check_pin(unique("placed"), "use1-a")


def _creating_intent(router, key_id: str) -> Placement:  # type: ignore[no-untyped-def]
    """The CREATING record a creation of ``key_id`` writes after reading its placement (the key's
    objects not made), as a creation under way leaves it."""
    pin = router._pin_of(key_id)
    primary, replicas, pinned = router._choose_clusters(key_id, 1, pin, needs_room=True)
    intent = Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.CREATING, primary,
                       request_id=f"r-{key_id}", held=pinned, create_time=time.time(), copies=1)
    router.store.create(intent)
    return router.store.get(key_id)


def test_a_planned_move_of_a_record_that_changed_is_refused_before_anything_is_made(make_router, tokens) -> None:
    from router.errors import KeyChanged

    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(_spec(unique("planned")), time.monotonic() + 30)
    other = next(c for c in ("use1-a", "use1-b") if c != key.primary)
    planned = router.store.get(key.key_id)
    with pytest.raises(KeyChanged, match="changed since the move was planned"):
        router.move_key(key.key_id, other, time.monotonic() + 30, version=planned.version - 1)
    assert router.store.get(key.key_id) == planned, "the record is as it was"
    assert tokens.classes(other, key.key_id) == set(), "no copy was made"
    assert router.move_key(key.key_id, other, time.monotonic() + 30, version=planned.version).primary == other
    assert tokens.classes(other, key.key_id), "the same move of the version read does copy it"


def test_a_planned_move_whose_record_changes_just_after_its_check_is_left_as_changed(make_router, tokens) -> None:
    """The record changes between the version check and the move's first write: a planned move
    says the key changed (a rebalance leaves it), not that the move failed (which fails the change)."""
    from router.errors import KeyChanged

    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(_spec(unique("planned-race")), time.monotonic() + 30)
    other = next(c for c in ("use1-a", "use1-b") if c != key.primary)
    planned = router.store.get(key.key_id)
    check = router.check_move

    def changed_just_after(*args: Any, **kwargs: Any) -> Any:
        checked = check(*args, **kwargs)
        router.store.update(router.store.get(key.key_id))  # a repair or a hold, say: a new version
        return checked

    router.check_move = changed_just_after  # type: ignore[method-assign]
    with pytest.raises(KeyChanged, match="changed since the plan"):
        router.move_key(key.key_id, other, time.monotonic() + 30, version=planned.version)
    assert router.store.get(key.key_id).clusters == planned.clusters
    assert tokens.classes(other, key.key_id) == set(), "no copy was made"


def test_a_rebalance_that_cannot_move_a_key_moves_the_others_and_says_so(make_router, tmp_path) -> None:
    from gateway.admin import AdminServicer, rebalance_params
    from router.placement.store import StoreError

    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    keys = [router.generate_key(_spec(unique("reb")), time.monotonic() + 30) for _ in range(3)]
    moves = [(router.store.get(k.key_id), next(c for c in ("use1-a", "use1-b") if c != k.primary)) for k in keys]
    get = router.store.get

    def the_store_fails_for_the_second(key_id: str) -> Placement | None:
        if key_id == keys[1].key_id:
            raise StoreError("the store did not answer")
        return get(key_id)

    router.store.get = the_store_fails_for_the_second  # type: ignore[method-assign]
    change = admin.changes.request("alice", "apply_rebalance",
                                   rebalance_params("plan", router.rebalance_layout(), moves))
    router.store.get = get  # type: ignore[method-assign]
    assert change.state == "failed"
    assert change.result.startswith("moved 2 keys; 1 could not move (the first: " + keys[1].key_id), change.result
    assert [router.store.get(k.key_id).primary for k in keys] == [moves[0][1], keys[1].primary, moves[2][1]]


def test_a_rebalance_keeps_a_key_whose_target_holds_another_keys_objects_under_its_id(
        make_router, tokens, tmp_path) -> None:
    """The ring sends a key to a cluster where another application's key pair has its id: every plan
    would move it there, and every move is refused (FOREIGN_OBJECTS), so "plan again" never finished.
    The rebalance keeps that key where it is, leaves the other key as it was, moves the rest and
    succeeds. The next plan lists the key again (a plan is the same in every process), and its
    rebalance keeps it again and succeeds."""
    from gateway.admin import AdminServicer, rebalance_params

    router = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    keys = [router.generate_key(_spec(unique("reb-foreign")), time.monotonic() + 30) for _ in range(3)]
    ring_choice = {k.key_id: k.primary for k in keys}
    elsewhere = {k.key_id: next(c for c in ("use1-a", "use1-b") if c != k.primary) for k in keys}
    for key in keys:  # off the place the ring gives it, and not held: rebalance moves it back
        router.move_key(key.key_id, elsewhere[key.key_id], time.monotonic() + 30)
    kept = keys[1].key_id
    theirs = _another_applications_key(tokens, ring_choice[kept], kept)
    ours = router.public_key(kept, time.monotonic() + 5)[1]

    layout, planned = admin._plan()
    assert {(p.key_id, target) for p, target in planned} == set(ring_choice.items())
    change = admin.changes.request("alice", "apply_rebalance", rebalance_params("plan", layout, planned))
    assert change.state == "applied", change.result
    assert change.result == (f"moved 2 keys, kept 1 where it is: the target holds objects under the key's id that "
                             f"are not the key's (the first: {kept}, target {ring_choice[kept]}; "
                             "docs/operations.md, objects that are not the key's)")
    assert {k.key_id: router.store.get(k.key_id).primary for k in keys} == {**ring_choice, kept: elsewhere[kept]}
    assert _public_ders(tokens, ring_choice[kept], kept) == [theirs], "the other key is still there, as it was"
    assert tokens.classes(ring_choice[kept], kept) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert _public_ders(tokens, elsewhere[kept], kept) == [ours] != [theirs]
    audited = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert sorted((r["target"], r["details"]["change_id"]) for r in audited if r["action"] == "key_moved") == sorted(
        (k.key_id, change.id) for k in keys if k.key_id != kept)

    layout, planned = admin._plan()
    assert [(p.key_id, target) for p, target in planned] == [(kept, ring_choice[kept])]
    again = admin.changes.request("alice", "apply_rebalance", rebalance_params("plan", layout, planned))
    assert again.state == "applied" and again.result.startswith("moved 0 keys, kept 1 where it is"), again.result
    assert _public_ders(tokens, ring_choice[kept], kept) == [theirs]


def test_a_placement_made_while_the_key_was_being_created_is_cleared_and_logged(make_router, caplog) -> None:
    from router.placement.ring import PlacementRing
    from router.router import PINS

    router = make_router(replication=POLICY)
    key_id = unique("late")
    chosen = PlacementRing(["use1-a", "use1-b"]).choose(key_id)
    other = "use1-b" if chosen == "use1-a" else "use1-a"
    create = router.store.create

    def an_operator_places_it_meanwhile(placement: Placement) -> Placement:
        make_router().pin(key_id, other)
        return create(placement)

    router.store.create = an_operator_places_it_meanwhile  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="router.router"):
        key = router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert key.primary == chosen and not key.held
    assert f"key {key_id} was placed on {other} after its creation had begun; it was made on {chosen}" in caplog.text
    record = router.store.admin_record(PINS)
    assert record is None or key_id not in record[0], "a late placement does not linger for a later key"


def test_admin_checks_answer_unavailable_when_the_store_does_not(make_router) -> None:
    """MoveKey, ReleaseKey and PlaceKey read the record when asked: a store that does not
    answer is UNAVAILABLE (try again), not an internal error."""
    from router.placement.store import StoreError

    router = make_router()

    def down(key_id: str) -> Placement | None:
        raise StoreError("the store did not answer")

    router.store.get = down  # type: ignore[method-assign]
    for check in (lambda: router.check_move("any/key", "use1-a"), lambda: router.check_release("any/key"),
                  lambda: router.check_pin("any/key", "use1-a")):
        with pytest.raises(Unavailable, match="placement store is unreachable"):
            check()


def test_a_release_that_keeps_meeting_other_changes_changes_nothing(make_router) -> None:
    from router.placement.store import Conflict, StoreError

    router = make_router()
    key_id = unique("busy")
    router.store.create(Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.ENABLED, "use1-a",
                                  request_id=key_id, held=True))

    def always_changed(placement: Placement) -> Placement:
        raise Conflict(None)

    def store_down(placement: Placement) -> Placement:
        raise StoreError("the placement store did not answer")

    update = router.store.update
    router.store.update = always_changed  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="kept changing; nothing was changed"):
        router.release_key(key_id)
    router.store.update = store_down  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="store is unreachable; the key was not released"):
        router.release_key(key_id)
    router.store.update = update  # type: ignore[method-assign]
    assert router.store.get(key_id).held
    assert not router.release_key(key_id).held


def test_a_move_the_store_does_not_confirm_keeps_both_copies(make_router, tokens) -> None:
    """The switch to the target is written but not confirmed (the store went away): the write
    may have landed, so neither copy is removed; the key signs with either record."""
    from router.placement.store import StoreError

    key_id = unique("unconfirmed")
    first, key, target = _one_copy_key(make_router, key_id)
    mover = make_router()

    def store_goes_away(point: str) -> None:
        if point == "moved-copy-proven":
            def down(placement: Placement) -> Placement:
                raise StoreError("store down")
            mover.store.update = down  # type: ignore[method-assign]

    mover._fault = store_goes_away
    with pytest.raises(Unavailable, match="is not known: both copies are kept"):
        mover.move_key(key_id, target, time.monotonic() + 30)
    assert tokens.classes(key.primary, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert tokens.classes(target, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    after = first.store.get(key_id)
    assert after.primary == key.primary and target in after.replicas, "the record as the move left it: both named"
    assert first.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)[0]


def test_a_move_whose_switch_landed_but_was_answered_as_a_conflict_is_a_move(make_router, tokens) -> None:
    """A store that retries a write which had landed answers our own write as a conflict (a
    DynamoDB retry without a request token would): undoing then would destroy the only copy
    the record names. The move sees its own record and finishes."""
    from router.placement.store import Conflict

    key_id = unique("landed")
    first, key, target = _one_copy_key(make_router, key_id)
    mover = make_router()
    real_update = mover.store.update

    def lands_then_conflicts(placement: Placement) -> Placement:
        landed = real_update(placement)
        if landed.primary == target:
            raise Conflict(landed)
        return landed

    mover.store.update = lands_then_conflicts  # type: ignore[method-assign]
    moved = mover.move_key(key_id, target, time.monotonic() + 30)
    assert moved.primary == target
    assert tokens.classes(target, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert tokens.objects(key.primary, key_id) == [], "the source copy goes, as in any move"
    assert first.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)[1] == target


def test_a_key_does_not_move_into_a_failed_over_region(make_router, tokens) -> None:
    router = make_router(replication=POLICY)
    key = router.generate_key(_spec(unique("into-failed")), time.monotonic() + 30)
    other = "use1-b" if key.primary == "use1-a" else "use1-a"
    router.apply_switches(set(), {"us-east-1"})
    with pytest.raises(FailedPrecondition, match=f"cluster {other} is in region us-east-1, which is failed over"):
        router.move_key(key.key_id, other, time.monotonic() + 30)
    assert router.store.get(key.key_id).clusters == key.clusters
    assert tokens.objects(other, key.key_id) == []


def test_a_key_does_not_move_onto_a_cluster_whose_circuit_is_open(make_router, tokens) -> None:
    """The target is failing as the gateway sees it: the move is refused before the record names
    it, so no name is left behind for the repairer to fill once the cluster is back."""
    key_id = unique("to-open")
    router, key, target = _one_copy_key(make_router, key_id)
    breaker = router.breakers[target]
    while breaker.state is not CircuitState.OPEN:
        breaker.record_failure()
    with pytest.raises(Unavailable, match=f"cluster {target} is not answering .*was not moved"):
        router.move_key(key_id, target, time.monotonic() + 30)
    after = router.store.get(key_id)
    assert (after.primary, after.replicas, after.version) == (key.primary, (), key.version)
    assert tokens.objects(target, key_id) == []


def test_a_move_whose_first_store_write_fails_changes_nothing_and_its_change_fails_saying_so(
    make_router, tokens, tmp_path
) -> None:
    """The store refuses the write that names the move's target: no copy is made and none
    destroyed, the key signs where it was, and the approved change ends failed, saying the
    key was not moved."""
    from gateway.admin import AdminServicer
    from router.placement.store import StoreError

    key_id = unique("firstwrite")
    first, key, target = _one_copy_key(make_router, key_id)
    before = first.store.get(key_id)
    mover = make_router()
    admin = AdminServicer(mover, audit_path=tmp_path / "audit.log", quorum=2)

    def refused(placement: Placement) -> Placement:
        raise StoreError("placement store error: attempt to write a readonly database")

    mover.store.update = refused  # type: ignore[method-assign]
    change = admin.changes.request("alice", "move_key", {"key_id": key_id, "to": target})
    done = admin.changes.approve("bob", change.id)
    assert (done.state, done.result) == ("failed", f"placement store is unreachable; key {key_id!r} was not moved")
    assert admin.changes.get(change.id).state == "failed", "recorded, and no longer holds the key"
    assert first.store.get(key_id) == before
    assert tokens.objects(target, key_id) == [], "no copy made"
    assert tokens.classes(key.primary, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    for router in (first, mover):
        signature, cluster = router.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
        assert signature and cluster == key.primary


# -- a DestroyKey racing a repair or a creation ------------------------------------------------
# Each test has a store of its own: a repairer repairs every key of its store that is short of
# copies, and the hooks below must meet this test's key, not another test's.


def _routers_on_one_store(make_router, tmp_path, policy: ReplicationPolicy):  # type: ignore[no-untyped-def]
    from router.placement.sqlite import SqliteStore

    def build(**kwargs):  # type: ignore[no-untyped-def]
        return make_router(replication=policy, store=SqliteStore(tmp_path / "races.db"), **kwargs)

    return build


def _left(tokens, key_id: str) -> dict[str, set[ObjectClass]]:  # type: ignore[no-untyped-def]
    return {c: tokens.classes(c, key_id) for c in ("use1-a", "use1-b", "usw2-a") if tokens.classes(c, key_id)}


def test_a_destroy_during_a_repair_leaves_no_copy_of_the_key(make_router, tokens, tmp_path) -> None:
    """DestroyKey comes after the repairer read the record and before its DR copy is made: the
    DESTROYED record does not name the DR cluster, so neither that DestroyKey nor another would
    look there. The repairer's record write fails, and it removes the copy it made."""
    build = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True,
                                                                           ack_local=True))
    creator = build()
    creator.fail_over_region("us-west-2")
    key = creator.generate_key(_spec(unique("destroy-repair")), time.monotonic() + 30)
    assert key.state is KeyState.UNDER_REPLICATED and "usw2-a" not in key.clusters
    destroyer = build()
    destroyed: list[Placement] = []

    def meanwhile(point: str) -> None:
        if point == "copy-exported" and not destroyed:
            destroyed.append(destroyer.destroy_key(key.key_id, time.monotonic() + 30))

    build(fault=meanwhile).repair_once(time.monotonic() + 30)
    assert destroyed and destroyed[0].state is KeyState.DESTROYED and "usw2-a" not in destroyed[0].clusters
    assert destroyer.store.get(key.key_id).state is KeyState.DESTROYED
    assert _left(tokens, key.key_id) == {}


def test_a_destroy_while_a_creation_copies_the_key_leaves_no_copy(make_router, tokens, tmp_path) -> None:
    """DestroyKey passes over the new key's clusters after its primary is made and before its DR
    copy is: the creation learns it lost when it writes the record, and removes that copy."""
    build = _routers_on_one_store(make_router, tmp_path, POLICY)
    destroyer = build()
    key_id = unique("destroy-creation")
    destroyed: list[Placement] = []

    def meanwhile(point: str) -> None:
        if point == "copy-exported" and not destroyed:
            destroyed.append(destroyer.destroy_key(key_id, time.monotonic() + 30))

    with pytest.raises(KeyChanged, match="destroyed while it was being created"):
        build(fault=meanwhile).generate_key(_spec(key_id), time.monotonic() + 30)
    assert destroyed and destroyed[0].state is KeyState.DESTROYED and "usw2-a" in destroyed[0].clusters
    assert _left(tokens, key_id) == {}


def test_a_creation_that_fails_after_a_destroy_leaves_no_copy(make_router, tokens, tmp_path) -> None:
    """As above, but the last copy fails: the roll-back cannot claim the DESTROYED record and
    destroys nothing, and the DR copy made after the DestroyKey's pass must still go."""
    build = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=3, require_dr_copy=True))
    destroyer = build()
    key_id = unique("destroy-failed-creation")
    destroyed: list[Placement] = []

    def meanwhile(point: str) -> None:
        if point == "copy-exported" and not destroyed:
            destroyed.append(destroyer.destroy_key(key_id, time.monotonic() + 30))

    creator = build(fault=meanwhile)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ClusterDown("did not answer")

    for home in ("use1-a", "use1-b"):  # the DR copy is made first; the home replica's fails
        creator.backends[home].import_wrapped = unreachable  # type: ignore[method-assign]
    with pytest.raises(KeyChanged, match="destroyed while it was being created"):
        creator.generate_key(_spec(key_id), time.monotonic() + 30)
    assert destroyed and destroyed[0].clusters[1] == "usw2-a"
    assert creator.store.get(key_id).state is KeyState.DESTROYED
    assert _left(tokens, key_id) == {}


def test_destroy_removes_a_copy_that_no_record_names(make_router, tokens, tmp_path) -> None:
    """A repairer killed between its copy and its record write leaves a copy on a cluster the
    key's record does not name: the destroying process's repairer looks for the key on every
    other cluster, and DestroyKey answers without waiting for that (a cluster whose objects
    are held still by another process, or that hangs, made it wait out its caller's deadline)."""
    build = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True,
                                                                           ack_local=True))
    creator = build()
    creator.fail_over_region("us-west-2")
    key = creator.generate_key(_spec(unique("destroy-stray")), time.monotonic() + 30)

    def killed(point: str) -> None:
        if point == "repair-copied":
            raise _Killed

    with pytest.raises(_Killed):
        build(fault=killed).repair_once(time.monotonic() + 30)
    assert "usw2-a" not in creator.store.get(key.key_id).clusters
    assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    destroyer = build()
    assert destroyer.destroy_key(key.key_id, time.monotonic() + 30).state is KeyState.DESTROYED
    assert _left(tokens, key.key_id) == {"usw2-a": {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}}
    assert destroyer.sweep_destroyed(time.monotonic() - 1) == 0, "a pass out of time looks at nothing"
    assert _left(tokens, key.key_id) == {"usw2-a": {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}}
    assert destroyer.sweep_destroyed(time.monotonic() + 30) == 2, "and leaves it to the next"
    assert _left(tokens, key.key_id) == {}
    assert destroyer.sweep_destroyed(time.monotonic() + 30) == 0, "each cluster is looked at once"


def test_the_periodic_reconcile_removes_a_destroyed_keys_copy_that_its_sweep_never_reached(
        make_router, tokens, tmp_path) -> None:
    """As above, but the process that destroyed the key stopped before its repairer's pass: the
    list of clusters to sweep died with it. The periodic reconcile, which changes nothing else,
    removes the copy; a live key's stray copy stays for `reconcile --fix`."""
    from gateway.metrics import GatewayMetrics
    from gateway.server import report_reconcile

    build = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True,
                                                                           ack_local=True))
    creator = build()
    creator.fail_over_region("us-west-2")

    def killed(point: str) -> None:
        if point == "repair-copied":
            raise _Killed

    doomed = creator.generate_key(_spec(unique("destroy-unswept")), time.monotonic() + 30)
    with pytest.raises(_Killed):  # a copy on usw2-a that no record names
        build(fault=killed).repair_once(time.monotonic() + 30)
    assert build().destroy_key(doomed.key_id, time.monotonic() + 30).state is KeyState.DESTROYED
    # And a live key, fully replicated, with a stray copy on its third cluster (a move's source, say).
    maker = build()
    live = maker.generate_key(_spec(unique("live-stray")), time.monotonic() + 30)
    assert live.state is KeyState.ENABLED
    (stray,) = set(maker.backends) - set(live.clusters)
    copy_left(maker, live, stray)
    assert _left(tokens, doomed.key_id) == {"usw2-a": {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}}

    asked_for_nothing = reconcile(build(), fix=False)  # what `hsmctl reconcile` shows: it changes nothing
    assert {("usw2-a", doomed.key_id), (stray, live.key_id)} <= set(asked_for_nothing.orphans)
    assert "usw2-a" in _left(tokens, doomed.key_id)

    gateway = build()  # another process: its repairer knows of no destroy
    report_reconcile(gateway, GatewayMetrics(gateway))
    assert _left(tokens, doomed.key_id) == {}
    assert set(_left(tokens, live.key_id)) == {*live.clusters, stray}
    again = reconcile(gateway, fix=False, finish_destroys=True)
    assert ("usw2-a", doomed.key_id) not in again.orphans + again.finished
    assert (stray, live.key_id) in again.orphans and again.finished == []


def test_a_repair_that_loses_to_another_repair_keeps_the_copy_the_record_names(make_router, tokens, tmp_path) -> None:
    """Two repairers copy the key to the DR cluster; the second names its copy first. The first
    one's write fails, and the copy there is now the record's: it stays, and signs."""
    build = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True,
                                                                           ack_local=True))
    creator = build()
    creator.fail_over_region("us-west-2")
    key = creator.generate_key(_spec(unique("repair-twice")), time.monotonic() + 30)
    other = build()
    fixed: list[int] = []

    def meanwhile(point: str) -> None:
        if point == "repair-copied" and not fixed:
            fixed.append(other.repair_once(time.monotonic() + 30))

    assert build(fault=meanwhile).repair_once(time.monotonic() + 30) == 0
    assert fixed == [1]
    repaired = other.store.get(key.key_id)
    assert repaired.state is KeyState.ENABLED and "usw2-a" in repaired.clusters
    assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    signature = other.backends["usw2-a"].sign(repaired, Operation.ECDSA_SHA256, b"\x07" * 32, time.monotonic() + 5)
    public = serialization.load_der_public_key(other.public_key(key.key_id, time.monotonic() + 5)[1])
    public.verify(signature, b"\x07" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))


def _another_applications_key(tokens, cluster: str, key_id: str) -> bytes:  # type: ignore[no-untyped-def]
    """An application's own P-256 key pair on ``cluster`` under ``key_id`` (CKA_ID and label), made as
    it would make it, not through the gateway; the DER of its public key."""
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    public, _ = tokens.session(cluster).generate_keypair(
        KeyType.EC, store=True, id=key_id.encode(), label=key_id,
        public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")})
    return bytes(encode_ec_public_key(public))


def _public_ders(tokens, cluster: str, key_id: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    from pkcs11.util.ec import encode_ec_public_key

    return [bytes(encode_ec_public_key(obj)) for obj in tokens.objects(cluster, key_id)
            if obj.object_class is ObjectClass.PUBLIC_KEY]


def test_the_repairer_leaves_another_applications_key_under_the_same_id_alone(make_router, tokens, caplog) -> None:
    """Under ack-local the DR cluster, down, was never searched for objects under the new key's id.
    An application's key pair of that id there is not the key's: the repairer copied over it (its
    copy clears an earlier copy's leftovers first) and the application's key was gone. Now it is
    left as it was, the repairer logs an ERROR and leaves the cluster alone for ten minutes; once an
    operator has taken the objects away, the next look copies the key."""
    ahead = [0.0]
    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True),
                         clock=lambda: time.monotonic() + ahead[0])
    router.fail_over_region("us-west-2")
    key = router.generate_key(_spec(unique("repair-foreign")), time.monotonic() + 30)
    theirs = _another_applications_key(tokens, "usw2-a", key.key_id)
    router.fail_over_region("us-west-2", False)

    with caplog.at_level(logging.ERROR, logger="router.router"):
        assert router.repair_once(time.monotonic() + 30) == 0
    assert (f"key {key.key_id}: not copied to usw2-a: cluster usw2-a holds 2 object(s) under key id "
            f"{key.key_id!r} that are not this key's") in caplog.text
    assert _public_ders(tokens, "usw2-a", key.key_id) == [theirs]
    assert tokens.classes("usw2-a", key.key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert router.store.get(key.key_id).state is KeyState.UNDER_REPLICATED
    assert "usw2-a" not in router.store.get(key.key_id).clusters

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="router.router"):
        assert router.repair_once(time.monotonic() + 30) == 0  # within the ten minutes: not asked again
    assert "not copied to" not in caplog.text

    for obj in tokens.objects("usw2-a", key.key_id):  # the operator moves the application's key away
        obj.destroy()
    ahead[0] = 601.0
    assert router.repair_once(time.monotonic() + 631) == 1
    repaired = router.store.get(key.key_id)
    assert repaired.state is KeyState.ENABLED and "usw2-a" in repaired.replicas
    ours = router.public_key(key.key_id, time.monotonic() + 5)[1]
    assert _public_ders(tokens, "usw2-a", key.key_id) == [ours] != [theirs]


@pytest.mark.parametrize("algorithm,usage", [
    (KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
    (KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY),
    (KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
])
def test_the_repairer_replaces_a_leftover_of_the_keys_own_copy(make_router, tokens, algorithm, usage) -> None:
    """A copy the repairer made and never named (its process killed before the record write) is the
    key's own material: the next repair replaces it, one object of each class, and the copy works."""
    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True))
    router.fail_over_region("us-west-2")
    key = router.generate_key(_spec(unique("repair-leftover"), algorithm, usage), time.monotonic() + 30)
    copy_left(router, key, "usw2-a")  # the leftover
    router.fail_over_region("us-west-2", False)

    assert router.repair_once(time.monotonic() + 30) == 1
    repaired = router.store.get(key.key_id)
    assert repaired.state is KeyState.ENABLED and "usw2-a" in repaired.replicas
    pair = {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    expected = pair if algorithm.is_asymmetric else {ObjectClass.SECRET_KEY}
    assert tokens.classes("usw2-a", key.key_id) == expected
    assert len(tokens.objects("usw2-a", key.key_id)) == len(expected)
    dr, home = router.backends["usw2-a"], router.backends[key.primary]
    if usage is KeyUsage.SIGN_VERIFY:
        op = Operation.ECDSA_SHA256 if algorithm.is_ec else Operation.RSA_PKCS1_SHA256
        public = serialization.load_der_public_key(router.public_key(key.key_id, time.monotonic() + 5)[1])
        signature = dr.sign(repaired, op, b"\x08" * 32, time.monotonic() + 5)
        if algorithm.is_ec:
            public.verify(signature, b"\x08" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))  # type: ignore[call-arg]
        else:
            from cryptography.hazmat.primitives.asymmetric import padding

            public.verify(signature, b"\x08" * 32, padding.PKCS1v15(), Prehashed(hashes.SHA256()))  # type: ignore[call-arg]
    else:
        ciphertext, iv = dr.encrypt(repaired, Operation.AES_GCM, b"leftover", b"aad", time.monotonic() + 5)
        assert home.decrypt(repaired, Operation.AES_GCM, ciphertext, iv, b"aad", time.monotonic() + 5) == b"leftover"


def test_a_move_onto_another_applications_key_under_the_same_id_is_refused_and_destroys_nothing(
    make_router, tokens
) -> None:
    from router.errors import ForeignObjects

    key_id = unique("move-foreign")
    first, key, target = _one_copy_key(make_router, key_id)
    theirs = _another_applications_key(tokens, target, key_id)
    with pytest.raises(ForeignObjects, match=f"cluster {target} holds 2 object\\(s\\) under key id {key_id!r} that "
                                             "are not this key's") as refused:
        first.move_key(key_id, target, time.monotonic() + 30)
    assert refused.value.reason == "FOREIGN_OBJECTS"
    assert _public_ders(tokens, target, key_id) == [theirs]
    after = first.store.get(key_id)
    assert (after.primary, after.replicas, after.state) == (key.primary, (), KeyState.ENABLED)
    assert tokens.classes(key.primary, key_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}


@pytest.mark.parametrize("extractable", [True, False], ids=["other-bytes", "not-wrappable"])
def test_an_applications_secret_key_under_the_same_id_is_not_the_keys(make_router, tokens, caplog,
                                                                      extractable: bool) -> None:
    """An application's AES key under an AES key's id: extractable, the trusted key wraps it to
    other bytes than the key's; not extractable, it cannot be compared at all. Neither is the key's:
    the repairer leaves it as it was."""
    from pkcs11 import Attribute, KeyType

    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True))
    router.fail_over_region("us-west-2")
    key = router.generate_key(_spec(unique("repair-aes"), KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
                              time.monotonic() + 30)
    theirs = tokens.session("usw2-a").generate_key(
        KeyType.AES, 256, store=True, id=key.key_id.encode(), label=key.key_id,
        template={Attribute.EXTRACTABLE: extractable, Attribute.SENSITIVE: not extractable})
    value = bytes(theirs[Attribute.VALUE]) if extractable else b""
    router.fail_over_region("us-west-2", False)
    with caplog.at_level(logging.ERROR, logger="router.router"):
        assert router.repair_once(time.monotonic() + 30) == 0
    assert f"cluster usw2-a holds 1 object(s) under key id {key.key_id!r} that are not this key's" in caplog.text
    (left,) = tokens.objects("usw2-a", key.key_id)
    assert left[Attribute.EXTRACTABLE] is extractable
    if extractable:
        assert bytes(left[Attribute.VALUE]) == value
    assert router.store.get(key.key_id).state is KeyState.UNDER_REPLICATED


def test_reconcile_fix_destroys_a_keys_own_orphan_but_not_another_applications_key_under_its_id(
    make_router, tokens, caplog
) -> None:
    """An orphan of a live key (objects under its id on a cluster its record does not name) is
    destroyed by an approved fix only if it is the key's material: the source a move left is, an
    application's key pair that happens to have that id is not, and stays, with an ERROR. Reconcile
    tells them apart before any fix: the application's key is a ``foreign`` finding, which no fix
    is offered for, and an approved fix of it as an orphan (listed before it was compared) leaves it."""
    theirs_id, ours_id = unique("orphan-foreign"), unique("orphan-own")
    first, theirs_key, target = _one_copy_key(make_router, theirs_id)
    theirs = _another_applications_key(tokens, target, theirs_id)
    _, ours_key, _ = _one_copy_key(make_router, ours_id)
    ours_target = next(name for name in ("use1-a", "use1-b") if name != ours_key.primary)
    copy_left(first, ours_key, ours_target)

    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        found = reconcile(first, fix=False)
    assert (ours_target, ours_id) in found.orphans and (target, theirs_id) not in found.orphans
    (why,) = [why for c, k, why in found.foreign if (c, k) == (target, theirs_id)]
    assert why.startswith(f"cluster {target} holds 2 object(s) under key id {theirs_id!r} that are not this key's")
    assert ("orphan", ours_target, ours_id) in found.fixable
    assert not [f for f in found.fixable if f[2] == theirs_id]
    assert f"reconcile: {why}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        fixed = reconcile(first, fix=True, only=frozenset({("orphan", target, theirs_id),
                                                           ("orphan", ours_target, ours_id)}))
    assert (ours_target, ours_id) in fixed.removed and tokens.objects(ours_target, ours_id) == []
    assert (target, theirs_id) not in fixed.removed and (target, theirs_id) not in fixed.orphans
    (again,) = [why for c, k, why in fixed.foreign if (c, k) == (target, theirs_id)]
    assert again.startswith(f"cluster {target} holds 2 object(s) under key id {theirs_id!r} that are not this key's")
    assert _public_ders(tokens, target, theirs_id) == [theirs]
    assert tokens.classes(target, theirs_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert f"reconcile: {again}" in caplog.text and "could not destroy orphan" not in caplog.text
    assert f"{len(fixed.foreign)} objects under keys' ids that are not the keys' (left alone" in fixed.summary()
    assert tokens.classes(theirs_key.primary, theirs_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
    assert tokens.classes(ours_key.primary, ours_id) == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}


def test_a_report_compares_a_bounded_number_of_orphans_a_pass_and_the_next_pass_others(
    make_router, tokens, tmp_path, monkeypatch
) -> None:
    """Each comparison exports the key: a pass compares MAX_COMPARES orphans, and lists the rest as
    orphans. What it found foreign it remembers, so the next pass compares the others."""
    import router.reconcile

    monkeypatch.setattr(router.reconcile, "MAX_COMPARES", 1)
    router = _routers_on_one_store(make_router, tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))()
    pairs = set()
    for _ in range(2):
        key = router.generate_key(_spec(unique("compare-limit")), time.monotonic() + 30)
        elsewhere = next(c for c in ("use1-a", "use1-b") if c != key.primary)
        _another_applications_key(tokens, elsewhere, key.key_id)
        pairs.add((elsewhere, key.key_id))
    exports = []
    for backend in router.backends.values():
        real = backend.export_wrapped

        def counted(*args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            exports.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(backend, "export_wrapped", counted)

    first = reconcile(router, fix=False)
    assert len(first.foreign) == 1 and len(first.orphans) == 1 and len(exports) == 1
    assert {(c, k) for c, k, _ in first.foreign} | set(first.orphans) == pairs
    second = reconcile(router, fix=False)
    assert {(c, k) for c, k, _ in second.foreign} == pairs and second.orphans == []
    assert len(exports) == 2, "the one found foreign before is not compared again"
    assert sorted(why for _, _, why in second.foreign) == sorted(
        router.known_foreign(c, k) for c, k in pairs)
    gone, kept = sorted(pairs)
    for obj in tokens.objects(*gone):  # the operator removes them: what comes there later is compared afresh
        obj.destroy()
    third = reconcile(router, fix=False)
    assert [(c, k) for c, k, _ in third.foreign] == [kept] and router.known_foreign(*gone) == ""


def test_a_move_that_fails_after_naming_its_target_leaves_what_another_application_put_there(
    make_router, tokens, caplog
) -> None:
    """Another application's key appears on the target after the move's look and the move then fails
    (here before its copy is compared with anything): its undo destroys only the key's own objects
    there, and takes the target's name out of the record."""
    from router.errors import ForeignObjects

    key_id = unique("move-undo-foreign")
    first, key, target = _one_copy_key(make_router, key_id)
    theirs: list[bytes] = []

    def meanwhile(point: str) -> None:
        if point == "move-target-named":
            theirs.append(_another_applications_key(tokens, target, key_id))
            raise Unavailable("the target went away")

    with caplog.at_level(logging.WARNING, logger="router.router"), \
            pytest.raises(Unavailable, match="the target went away"):
        make_router(fault=meanwhile).move_key(key_id, target, time.monotonic() + 30)
    assert _public_ders(tokens, target, key_id) == theirs
    after = first.store.get(key_id)
    assert (after.primary, after.replicas, after.state) == (key.primary, (), KeyState.ENABLED)
    assert f"move of {key_id}: cluster {target} holds 2 object(s) under key id {key_id!r} that are not this key's" \
        in caplog.text
    with pytest.raises(ForeignObjects):  # asked for again: refused before the record names the target
        first.check_move_objects(key_id, target, time.monotonic() + 10)


def test_a_creation_under_ack_local_leaves_a_replica_it_could_not_search_to_the_repairer(
    make_router, tokens, caplog
) -> None:
    """The DR cluster did not answer the search for objects under the new key's id, then answered
    again: the creation makes the key without copying it there (its copy would have cleared what
    the search would have found), and the repairer, which compares what it finds with the key,
    leaves the application's key there alone."""
    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True))
    key_id = unique("unsearched-dr")
    theirs = _another_applications_key(tokens, "usw2-a", key_id)
    dr = router.backends["usw2-a"]
    real = dr.key_objects

    def busy_once(deadline: float, *, key_id: str | None = None) -> dict[str, dict[str, int]]:
        dr.key_objects = real  # type: ignore[method-assign]
        raise ClusterDown("cluster usw2-a did not answer", cluster="usw2-a")

    dr.key_objects = busy_once  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="router.router"):
        key = router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert key.state is KeyState.UNDER_REPLICATED and key.replicas == ()
    assert (f"key {key_id}: not copied to usw2-a, which could not be searched for objects under its id; the "
            "repairer copies it") in caplog.text
    assert _public_ders(tokens, "usw2-a", key_id) == [theirs]
    assert router.repair_once(time.monotonic() + 30) == 0
    assert _public_ders(tokens, "usw2-a", key_id) == [theirs]


def test_a_destroyed_non_extractable_keys_id_elsewhere_is_another_keys(make_router, tokens, caplog) -> None:
    """A non-extractable key is never copied: after its DestroyKey, what is under its id on a cluster
    its record does not name is another application's key. Neither DestroyKey's sweep nor
    reconcile's finishing of destroyed keys touches it; its own objects went."""
    key_id = unique("sealed-destroyed")
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                                      request_id=f"r-{key_id}", copies=1, extractable=False), time.monotonic() + 30)
    elsewhere = next(name for name in ("use1-a", "use1-b") if name != key.primary)
    theirs = _another_applications_key(tokens, elsewhere, key_id)
    assert router.destroy_key(key_id, time.monotonic() + 30).state is KeyState.DESTROYED
    assert router.sweep_destroyed(time.monotonic() + 30) == 0
    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        report = reconcile(router, fix=False, finish_destroys=True)
    assert (elsewhere, key_id) not in report.finished
    assert (elsewhere, key_id) in [(c, k) for c, k, _ in report.foreign]
    assert f"reconcile: cluster {elsewhere} holds 2 object(s) under key id {key_id!r} that are not" in caplog.text
    assert _public_ders(tokens, elsewhere, key_id) == [theirs]
    assert tokens.objects(key.primary, key_id) == []


def _a_key_with_a_stray_copy_and_another_applications_key(make_router, tokens, name: str):  # type: ignore[no-untyped-def]
    """A router; a one-copy P-256 key; the cluster holding a copy of it no record names (as a
    cut-off repair leaves one); the cluster holding another application's key pair under its id;
    and that key's public key DER."""
    key_id = unique(name)
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                                      request_id=f"r-{key_id}", copies=1), time.monotonic() + 30)
    stray, other = (c for c in ("use1-a", "use1-b", "usw2-a") if c != key.primary)
    copy_left(router, key, stray)
    return router, key, stray, other, _another_applications_key(tokens, other, key_id)


def test_destroy_sweeps_the_keys_own_stray_copy_but_not_another_applications_key_under_its_id(
    make_router, tokens, caplog
) -> None:
    """DestroyKey reads the key's material (by digest) before destroying it: its sweep of the
    clusters the record does not name removes a copy a cut-off repair left, and leaves another
    application's key pair under the same id."""
    router, key, stray, other, theirs = _a_key_with_a_stray_copy_and_another_applications_key(
        make_router, tokens, "destroy-sweep")
    key_id = key.key_id
    assert router.destroy_key(key_id, time.monotonic() + 30).state is KeyState.DESTROYED
    with caplog.at_level(logging.WARNING, logger="router.router"):
        assert router.sweep_destroyed(time.monotonic() + 30) == 2
    assert tokens.objects(stray, key_id) == [] and tokens.objects(key.primary, key_id) == []
    assert _public_ders(tokens, other, key_id) == [theirs]
    assert (f"key {key_id} destroyed; on cluster {other}, which its record does not name: cluster {other} holds "
            f"2 object(s) under key id {key_id!r} that are not this key's") in caplog.text


def test_an_orphan_whose_keys_material_cannot_be_read_is_left_and_stays_a_finding(make_router, tokens, caplog) -> None:
    """A fix of a live key's orphan that cannot read the key from any cluster holding it (each
    fails) destroys nothing there: what it would compare with is unknown. It says why, and the
    orphan stays listed for the next reconcile."""
    key_id = unique("orphan-unreadable")
    first, key, target = _one_copy_key(make_router, key_id)
    copy_left(first, key, target)
    fixer = make_router()

    def down(*_args: object, **_kwargs: object) -> tuple[bytes, bytes]:
        raise ClusterDown(f"cluster {key.primary} did not answer", cluster=key.primary)

    fixer.backends[key.primary].export_wrapped = down  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        report = reconcile(fixer, fix=True)
    assert (target, key_id) in report.orphans and (target, key_id) not in report.removed
    assert (f"reconcile: could not destroy orphan {key_id} on {target}: key {key_id!r}'s material could not be "
            f"read from its clusters ({key.primary}: cluster {key.primary} did not answer)") in caplog.text
    assert len(tokens.objects(target, key_id)) == 2


@pytest.mark.parametrize("finished_by", ["reconcile", "DestroyKey again"])
def test_a_destroy_finished_by_another_process_removes_the_keys_stray_copy_but_not_another_applications_key(
    make_router, tokens, caplog, finished_by
) -> None:
    """The process that destroyed a key stopped before its sweep: the clusters it had left to look at
    died with it. The key's record keeps digests of its material (nothing that unwraps it), so another
    process's periodic reconcile, or a DestroyKey asked again through it, removes a copy a cut-off
    repair left and leaves another application's key pair under the same id. Before, both went."""
    router, key, stray, other, theirs = _a_key_with_a_stray_copy_and_another_applications_key(
        make_router, tokens, "destroyed-unswept")
    key_id = key.key_id
    _, public_der = router.public_key(key_id, time.monotonic() + 30)
    destroyed = router.destroy_key(key_id, time.monotonic() + 30)  # and its sweep never runs
    assert len(destroyed.destroyed_material) == 64
    assert destroyed.destroyed_material[32:] == hashlib.sha256(public_der).digest()
    assert _left(tokens, key_id) == {stray: {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY},
                                     other: {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}}

    later = make_router()
    with caplog.at_level(logging.WARNING):
        if finished_by == "reconcile":
            report = reconcile(later, fix=False, finish_destroys=True)
            assert (stray, key_id) in report.finished and (other, key_id) not in report.finished
            assert (other, key_id) in [(c, k) for c, k, _ in report.foreign]
            assert (stray, key_id) not in [(c, k) for c, k, _ in report.foreign]
            assert f"reconcile: cluster {other} holds 2 object(s) under key id {key_id!r} that are not" in caplog.text
        else:
            assert later.destroy_key(key_id, time.monotonic() + 30).state is KeyState.DESTROYED
            assert later.sweep_destroyed(time.monotonic() + 30) == 2
    assert tokens.objects(stray, key_id) == []
    assert _public_ders(tokens, other, key_id) == [theirs]
    assert f"cluster {other} holds 2 object(s) under key id {key_id!r} that are not this key's" in caplog.text


def test_a_sweep_reads_each_clusters_fleet_marker_once_however_many_keys_it_looks_for(
        make_router, tokens, monkeypatch) -> None:
    """Each destroyed key's sweep looks on every cluster its record does not name, after checking
    that cluster's token is this fleet's: one marker search a cluster a pass, not one a key. It
    still removes each key's stray copy."""
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    keys = [router.generate_key(KeySpec(key_id=unique("sweep-many"), algorithm=KeyAlgorithm.EC_P256,
                                        usage=KeyUsage.SIGN_VERIFY, request_id=unique("r-sweep-many"), copies=1),
                                time.monotonic() + 30) for _ in range(3)]
    strays = {}
    for key in keys:
        strays[key.key_id] = next(name for name in ("use1-a", "use1-b", "usw2-a") if name != key.primary)
        copy_left(router, key, strays[key.key_id])
        router.destroy_key(key.key_id, time.monotonic() + 30)
    reads: list[str] = []
    for name, backend in router.backends.items():
        def counted(deadline, _read=backend.fleets, _name=name):  # type: ignore[no-untyped-def]
            reads.append(_name)
            return _read(deadline)

        monkeypatch.setattr(backend, "fleets", counted)
    assert router.sweep_destroyed(time.monotonic() + 30) == 2 * len(keys)
    looked_at = {name for key in keys for name in router.backends if name not in key.clusters}
    assert sorted(reads) == sorted(looked_at)
    assert all(tokens.objects(strays[key.key_id], key.key_id) == [] for key in keys)


def test_a_sweep_asks_again_for_a_fleet_marker_it_could_not_read(make_router, tokens, monkeypatch) -> None:
    """A cluster whose marker could not be read for one key's sweep (a moment's failure) is asked
    again for the next key's in the same pass: only the first key's stray copy waits for the
    periodic reconcile."""
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    keys = [router.generate_key(KeySpec(key_id=unique("sweep-unread"), algorithm=KeyAlgorithm.EC_P256,
                                        usage=KeyUsage.SIGN_VERIFY, request_id=unique("r-sweep-unread"), copies=1),
                                time.monotonic() + 30) for _ in range(3)]
    stray = "usw2-a"
    for key in keys:
        if key.primary == stray:
            router.move_key(key.key_id, "use1-a", time.monotonic() + 30)
        copy_left(router, router.store.get(key.key_id), stray)
        router.destroy_key(key.key_id, time.monotonic() + 30)
    backend = router.backends[stray]
    failed: list[bool] = []

    def once_down(deadline, _read=backend.fleets):  # type: ignore[no-untyped-def]
        if not failed:
            failed.append(True)
            raise ClusterDown(f"cluster {stray} did not answer", cluster=stray)
        return _read(deadline)

    monkeypatch.setattr(backend, "fleets", once_down)
    router.sweep_destroyed(time.monotonic() + 30)
    left = [key.key_id for key in keys if tokens.objects(stray, key.key_id)]
    assert len(left) == 1, left


def test_a_destroy_that_loses_to_another_finishes_with_the_winners_digests(
        make_router, tokens, monkeypatch) -> None:
    """Two DestroyKeys of one key: the one whose record write loses could not read the key's
    material itself (its clusters busy); it sweeps with the digests the winner's record keeps, so
    another application's key under that id stays, and the key's own stray copy goes."""
    router, key, stray, other, theirs = _a_key_with_a_stray_copy_and_another_applications_key(
        make_router, tokens, "destroy-race")
    key_id = key.key_id
    winner = make_router()  # stops before its own sweep

    def read_too_late(placement, deadline):  # type: ignore[no-untyped-def]
        winner.destroy_key(key_id, time.monotonic() + 30)  # comes first
        return None

    monkeypatch.setattr(router, "_material_to_sweep", read_too_late)
    assert router.destroy_key(key_id, time.monotonic() + 30).state is KeyState.DESTROYED
    assert router.sweep_destroyed(time.monotonic() + 30) == 2
    assert tokens.objects(stray, key_id) == []
    assert _public_ders(tokens, other, key_id) == [theirs]


def test_a_destroyed_record_without_digests_is_finished_as_before(make_router, tokens, monkeypatch) -> None:
    """A key whose material could not be read before its destroy (or destroyed by an earlier version)
    has a record without digests: a later reconcile removes the copy a cut-off repair left without
    a comparison, as before digests were kept."""
    key_id = unique("destroyed-undigested")
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                                      request_id=f"r-{key_id}", copies=1), time.monotonic() + 30)
    stray = next(name for name in ("use1-a", "use1-b", "usw2-a") if name != key.primary)
    copy_left(router, key, stray)
    monkeypatch.setattr(router, "_material_to_sweep", lambda placement, deadline: None)
    assert router.destroy_key(key_id, time.monotonic() + 30).destroyed_material == b""
    report = reconcile(make_router(), fix=False, finish_destroys=True)  # the destroying process stopped
    assert (stray, key_id) in report.finished
    assert tokens.objects(stray, key_id) == []


def test_a_destroy_that_a_repair_overtakes_destroys_the_key_as_it_is_now(make_router, tokens, monkeypatch) -> None:
    """A repair names a new copy between DestroyKey's read of the record and its write: the write
    fails on the record's version, and DestroyKey reads the record again and destroys the key on
    every cluster it names now, the new copy's too. It answered "changed meanwhile, try again"."""
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(_spec(unique("destroy-overtaken")), time.monotonic() + 30)
    third = next(name for name in ("use1-a", "use1-b", "usw2-a") if name not in key.clusters)
    repairer = make_router()
    material_to_sweep = router._material_to_sweep
    overtaken: list[bool] = []

    def repair_meanwhile(placement, deadline):  # type: ignore[no-untyped-def]
        if not overtaken:
            overtaken.append(True)
            current = repairer.store.get(key.key_id)
            copy_left(repairer, current, third)
            repairer.store.update(replace(current, replicas=(*current.replicas, third)))
        return material_to_sweep(placement, deadline)

    monkeypatch.setattr(router, "_material_to_sweep", repair_meanwhile)
    destroyed = router.destroy_key(key.key_id, time.monotonic() + 30)
    assert destroyed.state is KeyState.DESTROYED and third in destroyed.clusters
    assert _left(tokens, key.key_id) == {}


def test_a_destroy_whose_record_keeps_changing_gives_up_and_destroys_nothing(make_router, tokens, monkeypatch) -> None:
    """Another writer changes the record between DestroyKey's read and write on each of its tries:
    it answers UNAVAILABLE, the key is as it was (usable, on its clusters), and its material was
    read once, not once a try."""
    router = make_router(replication=ReplicationPolicy(copies=1, require_dr_copy=False))
    key = router.generate_key(_spec(unique("destroy-churn")), time.monotonic() + 30)
    other = make_router()
    material_to_sweep, reads = router._material_to_sweep, []

    def counted(placement, deadline):  # type: ignore[no-untyped-def]
        reads.append(placement.version)
        return material_to_sweep(placement, deadline)

    def changed_meanwhile(placement, deadline):  # type: ignore[no-untyped-def]
        current = other.store.get(key.key_id)
        other.store.update(replace(current, held=not current.held))

    monkeypatch.setattr(router, "_material_to_sweep", counted)
    monkeypatch.setattr(router, "_our_tokens", changed_meanwhile)
    with pytest.raises(Unavailable) as raised:
        router.destroy_key(key.key_id, time.monotonic() + 30)
    assert raised.value.message == (f"key {key.key_id!r} kept changing (a move or a repair); nothing was destroyed, "
                                    "try again")
    assert len(reads) == 1
    assert router.store.get(key.key_id).state is KeyState.ENABLED
    assert _left(tokens, key.key_id) == {name: {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
                                         for name in key.clusters}
