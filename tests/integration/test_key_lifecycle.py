"""Key lifecycle: idempotent creation, crash recovery, listing, destruction."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pkcs11 import ObjectClass

from hsmgw.v1 import crypto_pb2 as pb
from router.errors import ClusterDown, FailedPrecondition, KeyBeingCreated, KeyNotFound, Unavailable
from router.model import (
    KeyAlgorithm,
    KeySpec,
    KeyState,
    KeyStorage,
    KeyUsage,
    Operation,
    Placement,
    ReplicationPolicy,
)
from router.reconcile import ReconcileReport, reconcile
from tests.support import copy_left, placement, rpc_error, unique


class Crash(BaseException):
    """Stands for the process dying: nothing in the router catches it."""


def _spec(key_id: str, request_id: str | None = None) -> KeySpec:
    return KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                   request_id=request_id or f"req-{key_id}")


def _crash_after_hsm(point: str) -> None:
    if point == "created-on-hsm":
        raise Crash(point)


def test_same_request_twice_makes_one_key(crypto, tokens) -> None:
    key_id = unique("idem")
    request = pb.GenerateKeyRequest(request_id=f"r-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    first = crypto.GenerateKey(request, timeout=30)
    second = crypto.GenerateKey(request, timeout=30)
    assert first == second
    assert sorted(o.object_class for o in tokens.objects(first.primary_cluster, key_id)) == [
        ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY]

    changed = pb.GenerateKeyRequest(request_id=f"r-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P384)
    assert rpc_error(crypto.GenerateKey, changed, timeout=30).code() == grpc.StatusCode.FAILED_PRECONDITION
    again = pb.GenerateKeyRequest(request_id=f"other-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    assert rpc_error(crypto.GenerateKey, again, timeout=30).code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(tokens.objects(first.primary_cluster, key_id)) == 2


def test_a_retry_that_writes_out_the_default_copies_is_the_same_request(crypto) -> None:
    """Copies left to the gateway's policy and the same count written out ask for the same key,
    as a usage or storage written out does; another count is another request."""

    def request(key_id: str, copies: int | None = None) -> pb.GenerateKeyRequest:
        asked = pb.GenerateKeyRequest(request_id=f"r-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
        if copies is not None:
            asked.replication.copies = copies
        return asked

    left = unique("copies")
    made = crypto.GenerateKey(request(left), timeout=30)
    default = 1 + len(made.replicas)
    assert default > 1  # the fleet replicates: the count is not the proto's zero
    assert crypto.GenerateKey(request(left, default), timeout=30) == made
    written = unique("copies")
    made = crypto.GenerateKey(request(written, default), timeout=30)
    assert crypto.GenerateKey(request(written), timeout=30) == made
    for key_id in (left, written):
        error = rpc_error(crypto.GenerateKey, request(key_id, 1), timeout=30)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "different key or parameters" in error.details()


def test_a_retried_generate_key_of_a_key_since_destroyed_is_refused_not_answered_ok(crypto) -> None:
    """The same request again, after the key it made was destroyed: OK with a DESTROYED key read
    as made to a retrying application, which then failed on its first use."""
    key_id = unique("retried-destroyed")
    request = pb.GenerateKeyRequest(request_id=f"r-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    crypto.GenerateKey(request, timeout=30)
    crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=30)
    err = rpc_error(crypto.GenerateKey, request, timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == (f"key {key_id!r} was made by this request_id and has since been destroyed; key ids "
                             "are never reused")


def test_crash_between_hsm_and_store_is_rolled_back_at_next_start(make_router, tokens) -> None:
    key_id = unique("crash")
    router = make_router(fault=_crash_after_hsm)
    with pytest.raises(Crash):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    intent = router.store.get(key_id)
    assert intent is not None and intent.state is KeyState.CREATING
    assert len(tokens.objects(intent.primary, key_id)) == 2  # objects exist, the store knows them as an intent
    with pytest.raises(KeyBeingCreated):
        router.sign(key_id, pytest.importorskip("router.model").Operation.ECDSA_SHA256, b"x" * 32, None,
                    time.monotonic() + 5)

    # "Restart" later than the grace period: the reconciler removes the half-made key.
    restarted = make_router(wall_clock=lambda: time.time() + 120)
    report = reconcile(restarted, fix=True)
    assert key_id in report.stale_intents
    assert tokens.objects(intent.primary, key_id) == []
    assert restarted.store.get(key_id) is None
    assert key_id not in {k for _, k in reconcile(restarted, fix=False).orphans}


def test_crash_then_client_retry_completes_the_same_key(make_router, tokens, caplog) -> None:
    key_id = unique("retry")
    router = make_router(fault=_crash_after_hsm)
    with pytest.raises(Crash):
        router.generate_key(_spec(key_id), time.monotonic() + 30)

    # Within the grace period another attempt may still be running: retry later.
    fresh = make_router()
    with pytest.raises(KeyBeingCreated, match="retry shortly"):
        fresh.generate_key(_spec(key_id), time.monotonic() + 30)

    later = make_router(wall_clock=lambda: time.time() + 120)
    with caplog.at_level(logging.WARNING, logger="router.router"):
        key = later.generate_key(_spec(key_id), time.monotonic() + 30)
    assert key.state is KeyState.ENABLED
    # The operator sees that a crashed creation was finished, and which request it was.
    assert [r.getMessage() for r in caplog.records if key_id in r.getMessage()] == [
        f"key {key_id}: finishing a creation left unfinished 120 s ago (request req-{key_id}); "
        "its objects are made again"]
    assert len(tokens.objects(key.primary, key_id)) == 2  # one key pair, not two
    report = reconcile(later, fix=False)
    assert key_id not in report.stale_intents
    assert key_id not in {k for _, k in report.orphans + report.missing}


def test_a_second_attempt_during_a_take_over_is_told_to_retry(make_router, tokens) -> None:
    """While one attempt finishes a crashed creation, another attempt of the same request
    (a client that gave up and retried, another gateway) and a reconcile leave it alone:
    two attempts making the key's objects at once could leave two of each on a token."""
    key_id = unique("takeover")
    with pytest.raises(Crash):
        make_router(fault=_crash_after_hsm).generate_key(_spec(key_id), time.monotonic() + 30)
    later = time.time() + 120
    other = make_router(wall_clock=lambda: later)
    seen: dict[str, object] = {}

    def meanwhile(point: str) -> None:
        if point != "created-on-hsm":
            return
        with pytest.raises(Unavailable, match="is being created; retry shortly"):
            other.generate_key(_spec(key_id), time.monotonic() + 30)
        seen["report"] = reconcile(other, fix=True)

    taker = make_router(wall_clock=lambda: later, fault=meanwhile)
    key = taker.generate_key(_spec(key_id), time.monotonic() + 30)
    assert key.state is KeyState.ENABLED
    report = seen["report"]
    assert isinstance(report, ReconcileReport) and key_id not in report.stale_intents
    for cluster in key.clusters:
        assert len(tokens.objects(cluster, key_id)) == 2, cluster  # one key pair on each
    assert other.generate_key(_spec(key_id), time.monotonic() + 30).version == key.version


def test_an_attempt_that_fails_after_a_retry_took_it_over_destroys_nothing(make_router, tokens, caplog) -> None:
    """The first attempt's HSM call hangs past ``creation_grace`` and then fails. Meanwhile
    the client's retry (another gateway) took the creation over, made the key and had it
    acknowledged. The first attempt's roll-back must leave that key alone."""
    key_id = unique("late-fail")
    later = time.time() + 120
    retry = make_router(wall_clock=lambda: later)
    first = make_router()
    acknowledged: list[Placement] = []
    generate = first.backends  # each cluster's own generate, wrapped below

    def hangs_then_fails(name: str):  # type: ignore[no-untyped-def]
        real = generate[name].generate

        def call(key: Placement, deadline: float, **kwargs: Any) -> None:
            real(key, deadline, **kwargs)  # the HSM made the objects, but the call does not come back...
            acknowledged.append(retry.generate_key(_spec(key_id), time.monotonic() + 30))
            raise ClusterDown("the device failed", cluster=name)  # ...until it fails, late

        return call

    for name in first.backends:
        first.backends[name].generate = hangs_then_fails(name)  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="router.router"), pytest.raises(Unavailable):
        first.generate_key(_spec(key_id), time.monotonic() + 30)
    assert acknowledged and acknowledged[0].state is KeyState.ENABLED
    key = retry.store.get(key_id)
    assert key is not None and key.version == acknowledged[0].version
    for cluster in key.clusters:
        assert len(tokens.objects(cluster, key_id)) == 2, cluster
    signature, _ = retry.sign(key_id, Operation.ECDSA_SHA256, b"\x08" * 32, None, time.monotonic() + 5)
    public = serialization.load_der_public_key(retry.public_key(key_id, time.monotonic() + 5)[1])
    public.verify(signature, b"\x08" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert f"rollback of {key_id}: the creation was taken over or settled meanwhile; nothing destroyed" in caplog.text


def test_reconcile_never_destroys_a_creation_that_finished_after_its_scan(make_router, tokens) -> None:
    """Reconcile reads the store, then rolls back what was stale. A creation finished in
    between (taken over, or just slow) must keep its objects: an acknowledged key without
    its material is a lost key."""
    key_id = unique("late")
    with pytest.raises(Crash):
        make_router(fault=_crash_after_hsm).generate_key(_spec(key_id), time.monotonic() + 30)
    later = time.time() + 120
    reconciler = make_router(wall_clock=lambda: later)
    snapshot = list(reconciler.store.scan())  # what reconcile reads...
    finished = make_router(wall_clock=lambda: later).generate_key(_spec(key_id), time.monotonic() + 30)
    assert finished.state is KeyState.ENABLED  # ...before the client's retry finished the key

    real_scan = reconciler.store.scan
    reconciler.store.scan = lambda: iter(snapshot)  # type: ignore[method-assign]
    try:
        report = reconcile(reconciler, fix=True)
    finally:
        reconciler.store.scan = real_scan  # type: ignore[method-assign]
    assert key_id in report.stale_intents  # it was stale when read...
    assert reconciler.store.get(key_id).state is KeyState.ENABLED  # ...and is left as it is now
    for cluster in finished.clusters:
        assert len(tokens.objects(cluster, key_id)) == 2, cluster
    signature, _ = reconciler.sign(key_id, Operation.ECDSA_SHA256, b"\x05" * 32, None, time.monotonic() + 10)
    assert signature


def _stray_copy(router, key: Placement) -> str:  # type: ignore[no-untyped-def]
    """Objects of ``key`` on a cluster its record does not name (as a move's crash leaves them)."""
    stray = next(name for name in ("use1-a", "use1-b", "usw2-a") if name not in key.clusters)
    copy_left(router, key, stray)
    return stray


def test_orphan_objects_are_found_and_removed(make_router, tokens) -> None:
    router = make_router()
    key = router.generate_key(_spec(unique("orphan")), time.monotonic() + 30)
    stray = _stray_copy(router, key)
    report = reconcile(router, fix=False)
    assert (stray, key.key_id) in report.orphans  # other tests' keys share the fleet: theirs may show too
    assert not [k for _, k in report.unknown if k == key.key_id]
    assert len(tokens.objects(stray, key.key_id)) == 2  # report only: nothing removed
    steps: list[None] = []
    reconcile(router, fix=True, progress=lambda: steps.append(None))
    assert tokens.objects(stray, key.key_id) == []
    # Each cluster listed, each record read and the orphan removed told a worker's supervisor the
    # start moves on (gateway.workers.start_progress).
    assert len(steps) >= len(router.backends) + 2, len(steps)
    for cluster in key.clusters:  # the key's own copies stay
        assert len(tokens.objects(cluster, key.key_id)) == 2


def test_objects_no_record_names_are_never_destroyed(make_router, tokens, tmp_path, caplog) -> None:
    """The gateway's keys always have a record, so objects without one are another application's,
    or the store is the wrong one: a typo in [store] url gives an empty store, and a fix that took
    the tokens' keys for orphans would destroy every key of the fleet."""
    from router.placement.sqlite import SqliteStore

    router = make_router()
    key = router.generate_key(_spec(unique("unknown")), time.monotonic() + 30)
    foreign = unique("foreign")
    router.backends["use1-b"].generate(placement(foreign, KeyAlgorithm.AES_256), time.monotonic() + 30)
    wrong = make_router(store=SqliteStore(tmp_path / "placments.db"))  # an empty store
    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        report = reconcile(wrong, fix=True)
    assert report.orphans == [] and report.stale_intents == [] and report.missing == []
    assert {(c, key.key_id) for c in key.clusters} | {("use1-b", foreign)} <= set(report.unknown)
    for cluster in key.clusters:
        assert len(tokens.objects(cluster, key.key_id)) == 2
    assert len(tokens.objects("use1-b", foreign)) == 1
    assert any("have no record in the placement store" in r.getMessage() and "[store] url" in r.getMessage()
               for r in caplog.records)
    # The right store still serves the key, and still leaves the foreign object alone.
    signature, _ = router.sign(key.key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
    assert signature
    assert ("use1-b", foreign) in reconcile(router, fix=True).unknown
    assert len(tokens.objects("use1-b", foreign)) == 1


def test_a_cluster_that_cannot_be_searched_before_a_creation_refuses_it_and_keeps_what_it_holds(
    make_router, tokens
) -> None:
    """The look for objects no record names failed a moment (a busy HSM): the creation is
    refused, nothing made, rather than made there after all, which clears what is under the
    key id first. Asked again once the cluster answers, the creation finds those objects."""
    from router.errors import Throttled

    router = make_router()
    key_id = unique("unsearched")
    for backend in router.backends.values():  # another application's key of that id, everywhere
        backend.generate(placement(key_id, KeyAlgorithm.AES_256), time.monotonic() + 30)
        real, calls = backend.key_objects, []

        def busy_once(*args: Any, _real: Any = real, _name: str = backend.spec.name, _calls: list[int] = calls,
                      **kwargs: Any) -> Any:
            _calls.append(1)
            if len(_calls) == 1:
                raise Throttled(f"cluster {_name} is busy", cluster=_name)
            return _real(*args, **kwargs)

        backend.key_objects = busy_once  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match=rf"^cluster \S+ could not be searched for objects under key id "
                                          rf"'{key_id}' \(cluster \S+ is busy\); nothing was made: retry$"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert router.store.get(key_id) is None
    assert all(len(tokens.objects(name, key_id)) == 1 for name in router.backends)
    with pytest.raises(FailedPrecondition, match="already holds objects under key id"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert all(len(tokens.objects(name, key_id)) == 1 for name in router.backends)


def test_a_store_that_fails_a_creation_is_logged_with_its_own_error(make_router, tmp_path, caplog, monkeypatch) -> None:
    """A placement store that can be read but not written (here a SQLite file made immutable):
    the caller hears UNAVAILABLE, and the log says what the store said (not the roll-back that
    failed after it), once a minute at most."""
    import shutil
    import subprocess

    import router.router as router_module
    from router.placement.sqlite import SqliteStore

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: root ignores file modes, so nothing here can make a file unwritable")
    monkeypatch.setattr(router_module, "_store_log", {"at": float("-inf"), "since": 0})
    router = make_router(store=SqliteStore(tmp_path / "placements.db"))
    router.generate_key(_spec(unique("writable")), time.monotonic() + 30)
    files = [str(path) for path in tmp_path.glob("placements.db*")]
    if subprocess.run(["chattr", "+i", *files], capture_output=True).returncode != 0:
        pytest.skip("the store's files cannot be made immutable here")
    try:
        with caplog.at_level(logging.WARNING, logger="router.router"):
            for _ in range(3):
                with pytest.raises(Unavailable, match="keys cannot be created now"):
                    router.generate_key(_spec(unique("read-only")), time.monotonic() + 30)
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("placement store failed a request")]
    assert len(lines) == 1, lines
    # The store's own error (its file cannot be written), not the failed roll-back that followed it.
    assert "keys cannot be created now" in lines[0] and "cannot rollback" not in lines[0], lines[0]
    assert "disk I/O error" in lines[0] or "readonly database" in lines[0], lines[0]


def test_reconcile_destroys_nothing_while_it_cannot_read_the_store(make_router, tokens) -> None:
    """An object whose record the store cannot answer for, and a stale intent it cannot claim:
    both keep their objects (they may be a key's), and the next reconcile, with the store
    back, removes them."""
    from router.placement.store import StoreError

    stale_id = unique("blind-stale")
    router = make_router()
    key = router.generate_key(_spec(unique("blind")), time.monotonic() + 30)
    key_id, stray = key.key_id, _stray_copy(router, key)
    with pytest.raises(Crash):
        make_router(fault=_crash_after_hsm).generate_key(_spec(stale_id), time.monotonic() + 30)
    intent = router.store.get(stale_id)
    assert intent is not None and intent.state is KeyState.CREATING
    later = time.time() + 120
    reconciler = make_router(wall_clock=lambda: later)

    def unreadable(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise StoreError("the placement store is unreachable")

    reconciler.store.get = unreadable  # type: ignore[method-assign]
    reconciler.store.update = unreadable  # type: ignore[method-assign]
    report = reconcile(reconciler, fix=True)
    assert stale_id in report.stale_intents and (stray, key_id) not in report.orphans
    assert len(tokens.objects(stray, key_id)) == 2
    for cluster in intent.clusters:
        assert len(tokens.objects(cluster, stale_id)) == 2, cluster

    report = reconcile(make_router(wall_clock=lambda: later), fix=True)
    assert (stray, key_id) in report.orphans and stale_id in report.stale_intents
    assert tokens.objects(stray, key_id) == []
    assert all(tokens.objects(cluster, stale_id) == [] for cluster in intent.clusters)


def test_list_keys_pages_by_prefix(crypto) -> None:
    prefix = unique("list")
    ids = sorted(f"{prefix}/k{i:02d}" for i in range(7))
    for key_id in ids:
        crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                 algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
    seen, token = [], ""
    while True:
        page = crypto.ListKeys(pb.ListKeysRequest(prefix=prefix + "/", page_size=3, page_token=token), timeout=10)
        assert len(page.keys) <= 3
        seen += [k.key_id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    assert all(k.startswith(prefix) for k in seen)


def test_a_page_token_serves_only_the_prefix_it_came_with(crypto) -> None:
    """A later page of one listing is not a later page of another: with another prefix (even one
    that contains the first, such as every key) it would skip the keys that sort before it."""
    prefix = unique("pages") + "/"
    for i in range(3):
        crypto.GenerateKey(pb.GenerateKeyRequest(request_id=f"{prefix}k{i}", key_id=f"{prefix}k{i}",
                                                 algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
    first = crypto.ListKeys(pb.ListKeysRequest(prefix=prefix, page_size=1), timeout=10)
    assert [k.key_id for k in first.keys] == [f"{prefix}k0"] and first.next_page_token
    for other in ("", prefix[:-1], prefix + "k"):
        err = rpc_error(crypto.ListKeys, pb.ListKeysRequest(prefix=other, page_token=first.next_page_token),
                        timeout=10)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details(), other
    # Nor is a bare key id one, whatever the prefix.
    err = rpc_error(crypto.ListKeys, pb.ListKeysRequest(prefix=prefix, page_token=f"{prefix}k0"), timeout=10)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.details()
    rest = crypto.ListKeys(pb.ListKeysRequest(prefix=prefix, page_token=first.next_page_token), timeout=10)
    assert [k.key_id for k in rest.keys] == [f"{prefix}k1", f"{prefix}k2"] and not rest.next_page_token


def test_destroy_removes_objects_and_id_is_never_reused(crypto, tokens) -> None:
    key_id = unique("destroy")
    key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                   algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    signed = crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"d" * 32),
                         timeout=10)
    assert signed.signature
    destroyed = crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=30)
    assert destroyed.state == pb.KEY_STATE_DESTROYED
    for cluster in ("use1-a", "use1-b", "usw2-a"):
        assert tokens.objects(cluster, key_id) == []
    assert crypto.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=10).state == pb.KEY_STATE_DESTROYED
    err = rpc_error(crypto.Sign, pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"d" * 32),
                    timeout=10)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    reuse = rpc_error(crypto.GenerateKey, pb.GenerateKeyRequest(request_id=unique("again"), key_id=key_id,
                                                                algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    assert reuse.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "never reused" in reuse.details()
    # Destroying again is harmless and says the same.
    assert crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=30).state == pb.KEY_STATE_DESTROYED
    assert key.primary_cluster in ("use1-a", "use1-b")


def test_the_gateways_repairer_removes_a_destroyed_keys_copy_that_no_record_names(crypto, tokens) -> None:
    """DestroyKey answers once the clusters its record names are done; the copy a killed repair
    left elsewhere goes on the repairer's next pass (replication.repair_interval, 10 s)."""
    from pkcs11 import Attribute

    from router.pkcs11._keys import public_key_attributes, public_template

    key_id = unique("destroy-stray")
    key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                   algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    other = next(c for c in ("use1-a", "use1-b", "usw2-a") if c not in (key.primary_cluster, *key.replicas))
    der = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).der
    stray = public_key_attributes(der)
    stray.update(public_template(KeyUsage.SIGN_VERIFY, token=True))
    stray.update({Attribute.ID: key_id.encode(), Attribute.LABEL: key_id})
    tokens.session(other).create_object(stray)

    assert crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=30).state == pb.KEY_STATE_DESTROYED
    end = time.monotonic() + 60
    while tokens.objects(other, key_id):
        assert time.monotonic() < end, f"the copy on {other} is still there"
        time.sleep(0.5)


def test_destroying_one_key_from_several_callers_at_once_succeeds_for_each(make_router, tokens) -> None:
    """Every caller asked for the same end; none is told to retry because another came first."""
    import threading

    routers = [make_router() for _ in range(4)]  # four gateways, one store
    key = routers[0].generate_key(_spec(unique("destroy-race")), time.monotonic() + 30)
    start = threading.Barrier(len(routers))
    answers: list[object] = []

    def destroy(router) -> None:  # type: ignore[no-untyped-def]
        start.wait()
        try:
            answers.append(router.destroy_key(key.key_id, time.monotonic() + 30).state)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion
            answers.append(exc)

    threads = [threading.Thread(target=destroy, args=(r,), daemon=True) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == [KeyState.DESTROYED] * len(routers)
    for cluster in key.clusters:
        assert tokens.objects(cluster, key.key_id) == []


def test_a_placement_on_a_cluster_that_cannot_take_the_key_is_not_followed(make_router, caplog) -> None:
    router = make_router()
    followed, refused = unique("placed"), unique("placed-drained")
    router.pin(followed, "use1-b")
    router.pin(refused, "use1-b")
    assert router.generate_key(_spec(followed), time.monotonic() + 30).primary == "use1-b"
    router.apply_switches({"use1-b"}, set())
    with caplog.at_level(logging.WARNING, logger="router.router"):
        assert router.generate_key(_spec(refused), time.monotonic() + 30).primary == "use1-a"
    assert (f"key {refused} was placed on use1-b, which cannot take it now (full, drained, failed over or down); "
            "placing it as usual") in caplog.text
    with pytest.raises(FailedPrecondition, match="already exists; move it instead"):
        router.pin(followed, "use1-a")


def test_a_key_is_made_where_it_was_placed_even_if_its_placement_cannot_be_cleared(
        make_router, caplog, monkeypatch) -> None:
    """The store fails just as the used placement would be cleared: the key is made and
    acknowledged all the same (it is durable), the placement stays, and the log says so."""
    import router.router as router_module
    from router.placement.store import StoreError

    router = make_router()
    key_id = unique("placed-store-down")
    router.pin(key_id, "use1-b")

    def down(*_args, **_kwargs):
        raise StoreError("the placement store is unreachable")

    monkeypatch.setattr(router_module, "edit_admin_record", down)
    with caplog.at_level(logging.WARNING, logger="router.router"):
        made = router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert made.primary == "use1-b"
    assert router.placement(key_id).primary == "use1-b"
    assert f"key {key_id} is made, but its placement could not be cleared" in caplog.text
    assert router._pin_of(key_id) == "use1-b"


def test_reconcile_reports_missing_material_but_not_external_keys(make_router, tokens) -> None:
    router = make_router()
    gone = router.generate_key(_spec(unique("gone")), time.monotonic() + 30)
    external = router.generate_key(
        KeySpec(key_id=unique("ext-rec"), algorithm=KeyAlgorithm.AES_256, usage=KeyUsage.ENCRYPT_DECRYPT,
                request_id=unique("r"), storage=KeyStorage.EXTERNAL), time.monotonic() + 30)
    for obj in tokens.objects(gone.primary, gone.key_id):
        obj.destroy()
    report = reconcile(router, fix=False)
    assert (gone.primary, gone.key_id) in report.missing
    assert external.key_id not in {k for _, k in report.missing + report.orphans}


def test_a_key_another_process_destroyed_is_answered_as_destroyed_before_the_cache_knows(make_router) -> None:
    """A gateway worker that cached a key before another worker destroyed it finds the key's
    objects gone before its cache catches up with the store. It answers "is destroyed", as the
    destroying worker does, not NOT_FOUND "key material is missing": a caller that takes
    NOT_FOUND for "not made yet" would try to make the key again."""
    far = time.monotonic() + 30
    destroyer, other = make_router(), make_router()
    key = destroyer.generate_key(_spec(unique("gone")), far)
    gone = destroyer.generate_key(_spec(unique("gone")), far)
    for cached in (key, gone):
        other.sign(cached.key_id, Operation.ECDSA_SHA256, bytes(32), None, far)  # cached as ENABLED
    destroyer.destroy_key(key.key_id, far)
    destroyer.destroy_key(gone.key_id, far)
    destroyer.store.delete(gone.key_id, destroyer.store.get(gone.key_id).version)  # a record since removed
    assert other.placement(key.key_id).state is KeyState.ENABLED  # the cache has not caught up

    with pytest.raises(FailedPrecondition, match=f"key '{key.key_id}' is destroyed"):
        other.sign(key.key_id, Operation.ECDSA_SHA256, bytes(32), None, far)
    with pytest.raises(FailedPrecondition, match="is destroyed"):
        other.verify(key.key_id, Operation.ECDSA_SHA256, bytes(32), None, bytes(64), far)
    assert other.placement(key.key_id).state is KeyState.DESTROYED  # and the cache now knows
    with pytest.raises(KeyNotFound, match=f"key '{gone.key_id}' not found"):
        other.sign(gone.key_id, Operation.ECDSA_SHA256, bytes(32), None, far)


def test_a_public_key_is_read_from_a_cluster_once_and_a_destroyed_key_gives_none(
        make_router, tokens, monkeypatch) -> None:
    """After the first GetPublicKey the gateway answers from memory: the public key objects
    can go from every token and the answer stays the key's (its signatures verify). A key
    destroyed since gives none; past PUBLIC_KEYS_KEPT keys, the oldest is read again."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    import router.router as router_module

    monkeypatch.setattr(router_module, "PUBLIC_KEYS_KEPT", 2)
    router = make_router()
    far = time.monotonic() + 30
    first, second, third = (router.generate_key(_spec(unique("pub")), far) for _ in range(3))
    der = router.public_key(first.key_id, far)[1]

    def drop_public_objects(key) -> None:  # type: ignore[no-untyped-def]
        for cluster in key.clusters:
            for obj in tokens.objects(cluster, key.key_id):
                if obj.object_class is ObjectClass.PUBLIC_KEY:
                    obj.destroy()

    drop_public_objects(first)
    assert router.public_key(first.key_id, far)[1] == der
    with pytest.raises(KeyNotFound, match="key material is missing"):  # a gateway that never read it
        make_router().public_key(first.key_id, far)
    signature, _ = router.sign(first.key_id, Operation.ECDSA_SHA256, bytes(32), None, far)
    serialization.load_der_public_key(der).verify(signature, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))

    router.public_key(second.key_id, far)
    router.public_key(third.key_id, far)  # the third kept: the first, the oldest, is read again next time
    with pytest.raises(KeyNotFound, match="key material is missing"):
        router.public_key(first.key_id, far)
    assert router.public_key(third.key_id, far)[1]

    router.destroy_key(third.key_id, far)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        router.public_key(third.key_id, far)


def _rolled_back_at_the_copy(make_router: Any, key_id: str, *, copies: int = 2, then: Any = None,
                             another_host: bool = False) -> tuple[Any, list[Any]]:
    """A router whose creation of ``key_id``, once it has made the key and exported it for its
    copies, is rolled back by another process's sweep, as if an HSM call had hung past
    creation_grace; ``then()`` runs right after (a retry, another request), its result kept in the
    list returned. ``another_host``: the creation's own look at the record, made under this host's
    token lock, does not see the roll-back (a sweeper on another host does not take that lock)."""
    policy = ReplicationPolicy(copies=copies, require_dr_copy=True)
    late = make_router(replication=policy)
    sweeper = make_router(replication=policy, wall_clock=lambda: time.time() + 120)
    done: list[Any] = []

    def rolled_back_meanwhile(point: str) -> None:
        if point == "copy-exported" and not done:  # made on the primary; the copies come next
            intent = sweeper.store.get(key_id)
            assert intent is not None and sweeper.roll_back(intent)  # the sweep took it as abandoned
            done.append(then() if then is not None else None)

    late._fault = rolled_back_meanwhile
    if another_host:
        late._not_ours = lambda intent: (lambda: False)
    return late, done


def test_a_creation_that_outlives_its_roll_back_leaves_no_copy_no_record_names(make_router, tokens) -> None:
    """The creation's HSM calls hung past creation_grace; another process's sweep rolled it back
    and removed the record. The copy it made after that would be named by no record, and
    reconcile never destroys those: the creation removes it itself, and its caller retries."""
    key_id = unique("outlived")
    # As on a host whose token lock the sweeper does not share: its copy is made all the same.
    router, _ = _rolled_back_at_the_copy(make_router, key_id, another_host=True)
    with pytest.raises(KeyBeingCreated):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert router.store.get(key_id) is None
    assert all(tokens.objects(cluster, key_id) == [] for cluster in router.backends), "no copy is left behind"
    made = router.generate_key(_spec(key_id), time.monotonic() + 30)  # the caller's retry
    assert made.state is KeyState.ENABLED and len(made.clusters) == 2


def test_a_failed_creation_whose_record_a_roll_back_removed_leaves_no_copy(make_router, tokens) -> None:
    """As above, but its last copy then fails: its own roll-back finds the record gone, and
    removes what it made since, which no record names."""
    key_id = unique("outlived-failed")
    router, _ = _rolled_back_at_the_copy(make_router, key_id, copies=3, another_host=True)
    imported: list[str] = []
    for name, backend in router.backends.items():
        real = backend.import_wrapped

        def once(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> None:
            if imported:  # the second copy fails
                raise ClusterDown("did not answer", cluster=_name)
            imported.append(_name)
            _real(*args, **kwargs)

        backend.import_wrapped = once  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="cannot copy key"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert imported and router.store.get(key_id) is None
    assert all(tokens.objects(cluster, key_id) == [] for cluster in router.backends), "no copy is left behind"


def test_a_creation_that_outlives_its_roll_back_never_overwrites_the_retrys_copies(make_router, tokens) -> None:
    """The late attempt resumes after the sweep rolled it back and the client's retry made the key
    again: its copy would replace the retry's on a cluster (a creation clears what is there under
    the id first), leaving two different keys under one record. It stops instead, touching nothing,
    and its caller is answered with the retry's key."""
    key_id = unique("outlived-retried")
    retry = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True))
    late, made = _rolled_back_at_the_copy(
        make_router, key_id, then=lambda: retry.generate_key(_spec(key_id), time.monotonic() + 30))
    answered = late.generate_key(_spec(key_id), time.monotonic() + 30)
    assert made and answered == made[0] and answered.state is KeyState.ENABLED
    publics = {cluster: retry.backends[cluster].export_wrapped(answered, time.monotonic() + 5)[1]
               for cluster in answered.clusters}
    assert len(set(publics.values())) == 1, "every copy is the one key"
    assert all(len(tokens.objects(cluster, key_id)) == 2 for cluster in answered.clusters)
    signature, _ = retry.sign(key_id, Operation.ECDSA_SHA256, b"\x09" * 32, None, time.monotonic() + 5)
    public = serialization.load_der_public_key(retry.public_key(key_id, time.monotonic() + 5)[1])
    public.verify(signature, b"\x09" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_creation_that_outlives_its_roll_back_is_not_answered_with_another_requests_key(make_router) -> None:
    """As above, but another request (other parameters) made the id since: the late attempt's
    caller is told the key exists, not answered OK with a key it did not ask for."""
    from router.errors import AlreadyExists

    key_id = unique("outlived-other")
    other = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True))
    late, made = _rolled_back_at_the_copy(make_router, key_id, then=lambda: other.generate_key(
        KeySpec(key_id=key_id, algorithm=KeyAlgorithm.RSA_2048, usage=KeyUsage.SIGN_VERIFY, request_id="another"),
        time.monotonic() + 30))
    with pytest.raises(AlreadyExists, match="another request made it"):
        late.generate_key(_spec(key_id), time.monotonic() + 30)
    assert made and other.store.get(key_id) == made[0] and made[0].algorithm is KeyAlgorithm.RSA_2048


def test_a_creation_whose_record_cannot_be_read_before_a_copy_stops_and_says_so(make_router, tokens) -> None:
    """The store stops answering after the key is made on its primary: whether the copy's cluster
    holds another attempt's key cannot be told, so nothing is cleared there on a guess. The
    creation rolls back what it made and its caller is told to retry (UNAVAILABLE)."""
    from router.placement.store import StoreError

    key_id = unique("unreadable-midway")
    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True))
    reads = router.store.get

    def store_goes_away(point: str) -> None:
        if point == "copy-exported":
            def unreachable(wanted: str) -> Any:
                if wanted == key_id:
                    raise StoreError("the placement store is unreachable")
                return reads(wanted)

            router.store.get = unreachable

    router._fault = store_goes_away
    with pytest.raises(Unavailable, match="was not finished: its record changed, or could not be read, while it "
                                          "was being made; retry with the same request_id"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    del router.store.get
    assert router.store.get(key_id) is None, "rolled back: the record names nothing"
    assert all(tokens.objects(cluster, key_id) == [] for cluster in router.backends), "no copy is left behind"


def test_a_key_destroyed_while_it_is_being_created_is_not_reported_made(make_router, tokens) -> None:
    """A DestroyKey that lands while GenerateKey makes the key's objects wins: the creation
    answers FAILED_PRECONDITION (KEY_CHANGED), not OK with a key that no longer serves."""
    from router.errors import KeyChanged

    key_id = unique("destroyed-midway")
    router = make_router()

    def destroy_meanwhile(point: str) -> None:
        if point == "created-on-hsm":
            router.destroy_key(key_id, time.monotonic() + 10)

    router._fault = destroy_meanwhile
    with pytest.raises(KeyChanged) as caught:
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert caught.value.message == f"key {key_id!r} was destroyed while it was being created; key ids are never reused"
    record = router.store.get(key_id)
    assert record is not None and record.state is KeyState.DESTROYED
    assert all(tokens.objects(cluster, key_id) == [] for cluster in router.backends), "no copy is left behind"


def test_a_destroy_that_loses_a_race_and_then_the_store_is_unavailable_and_destroys_nothing(
    make_router, tokens, monkeypatch
) -> None:
    """The record changed under the DestroyKey (a move), and re-reading it then fails: the caller
    hears that the store cannot be reached, and the key still serves from every copy."""
    from dataclasses import replace

    from router.placement.store import Conflict, StoreError

    router = make_router()
    key = router.generate_key(_spec(unique("destroy-unreadable")), time.monotonic() + 30)
    store = router.store
    moved = replace(key, version=key.version + 1)

    def lose(record: Placement, **_: object) -> Placement:
        raise Conflict(moved)

    def unreachable(key_id: str) -> Placement:
        raise StoreError("connection refused")

    monkeypatch.setattr(store, "update", lose)
    reads: list[str] = []

    def first_read_only(key_id: str) -> Placement:  # the re-read after the conflict does not answer
        reads.append(key_id)
        return key if len(reads) == 1 else unreachable(key_id)

    monkeypatch.setattr(store, "get", first_read_only)
    with pytest.raises(Unavailable, match="placement store is unreachable; keys cannot be destroyed now"):
        router.destroy_key(key.key_id, time.monotonic() + 30)
    monkeypatch.undo()
    assert router.store.get(key.key_id).state is key.state is KeyState.ENABLED
    for cluster in key.clusters:
        assert len(tokens.objects(cluster, key.key_id)) == 2
    signature, _ = router.sign(key.key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)
    _, der = router.public_key(key.key_id, time.monotonic() + 10)
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))
    assert reads == [key.key_id, key.key_id]


def test_a_key_being_created_is_retried_shortly_and_not_found_once_rolled_back(make_router, monkeypatch) -> None:
    """Using a key whose creation is under way is "retry shortly" (UNAVAILABLE, its own reason), not a
    refusal a client must not retry; once the creation is rolled back the key is not found, and a
    store that cannot say is unreachable, not "still being created"."""
    from router.placement.store import StoreError

    router = make_router()
    key_id = unique("being-created")
    intent = Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.CREATING, "use1-a",
                       request_id=key_id, create_time=time.time())
    router.store.create(intent)
    with pytest.raises(KeyBeingCreated, match="being created; retry shortly") as caught:
        router.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 5)
    assert isinstance(caught.value, Unavailable) and caught.value.reason == "KEY_BEING_CREATED"

    def unreachable(key_id: str) -> Placement:
        raise StoreError("connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(router.store, "get", unreachable)
        with pytest.raises(Unavailable, match="placement store is unreachable") as caught:
            router.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 5)
        assert not isinstance(caught.value, KeyBeingCreated)

    router.store.delete(key_id, router.store.get(key_id).version)  # the creation failed and was rolled back
    with pytest.raises(KeyNotFound):
        router.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 5)


def test_a_rollback_that_cannot_reach_a_replica_keeps_the_record_until_reconcile_finishes_it(
    make_router, tokens, monkeypatch
) -> None:
    """Objects no record names are never destroyed, so a rolled-back creation's record goes only
    once its objects have: a replica down during the rollback keeps the intent, and a later
    reconcile removes both."""
    router = make_router()
    key_id = unique("rollback-down")
    intent = Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.CREATING, "use1-a",
                       replicas=("usw2-a",), request_id=key_id, create_time=time.time())
    router.store.create(intent)
    for cluster in intent.clusters:
        router.backends[cluster].generate(intent, time.monotonic() + 30)

    def down(*_args: object, **_kwargs: object) -> int:
        raise ClusterDown("cluster usw2-a is not reachable", cluster="usw2-a")

    with monkeypatch.context() as patched:
        patched.setattr(router.backends["usw2-a"], "destroy", down)
        assert router.roll_back(intent, time.monotonic() + 10) is False
    left = router.store.get(key_id)
    assert left is not None and left.state is KeyState.CREATING
    assert tokens.objects("use1-a", key_id) == [] and len(tokens.objects("usw2-a", key_id)) == 2

    still_down = make_router(wall_clock=lambda: time.time() + 120)
    with monkeypatch.context() as patched:
        patched.setattr(still_down.backends["usw2-a"], "destroy", down)
        report = reconcile(still_down, fix=True)
    assert key_id in report.stale_intents and key_id not in report.rolled_back
    assert "unfinished creations rolled back (" in report.summary() and router.store.get(key_id) is not None

    report = reconcile(make_router(wall_clock=lambda: time.time() + 240), fix=True)
    assert key_id in report.stale_intents and key_id in report.rolled_back
    assert not any(k == key_id for _, k in report.unknown)
    assert tokens.objects("usw2-a", key_id) == []
    assert router.store.get(key_id) is None


def test_a_rollback_whose_destroy_missed_objects_keeps_the_record_until_nothing_is_left(
    make_router, tokens, monkeypatch, caplog
) -> None:
    """A destroy can answer and still have missed objects (a search without the token's login
    lists only public ones). The record is the only thing that names them: it stays until a
    search finds none, and a later reconcile removes both."""
    router = make_router()
    key_id = unique("rollback-missed")
    intent = Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.CREATING, "use1-a",
                       request_id=key_id, create_time=time.time())
    router.store.create(intent)
    router.backends["use1-a"].generate(intent, time.monotonic() + 30)

    def destroys_nothing(*_args: object, **_kwargs: object) -> int:
        return 0

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger="router.router"):
        patched.setattr(router.backends["use1-a"], "destroy", destroys_nothing)
        assert router.roll_back(intent, time.monotonic() + 10) is False
    assert f"rollback of {key_id}: use1-a still holds 1 private key, 1 public key;" in caplog.text
    left = router.store.get(key_id)
    assert left is not None and left.state is KeyState.CREATING, "the record of objects still there was deleted"
    assert len(tokens.objects("use1-a", key_id)) == 2

    report = reconcile(make_router(wall_clock=lambda: time.time() + 120), fix=True)
    assert key_id in report.rolled_back
    assert tokens.objects("use1-a", key_id) == [] and router.store.get(key_id) is None


def test_an_orphan_the_cluster_fails_to_destroy_stays_a_finding_and_is_not_counted_removed(
    make_router, tokens, monkeypatch
) -> None:
    router = make_router()
    key = router.generate_key(_spec(unique("undestroyed")), time.monotonic() + 30)
    stray = _stray_copy(router, key)

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise ClusterDown(f"cluster {stray} is not reachable", cluster=stray)

    monkeypatch.setattr(router.backends[stray], "destroy", refuse)
    report = reconcile(router, fix=True)
    assert (stray, key.key_id) in report.orphans and (stray, key.key_id) not in report.removed
    assert "orphan objects removed (" in report.summary() and len(tokens.objects(stray, key.key_id)) == 2
    monkeypatch.undo()
    report = reconcile(router, fix=True)
    assert (stray, key.key_id) in report.removed and tokens.objects(stray, key.key_id) == []


def test_the_repairer_rolls_back_a_creation_left_unfinished_past_the_grace(make_router, tokens) -> None:
    """A stop or a crash that cut a creation off leaves its key CREATING, and calls on it are told to
    retry shortly: past the grace no attempt runs, so the repairer rolls it back instead of leaving
    "retry shortly" for good."""
    from router.errors import KeyBeingCreated

    key_id = unique("swept")
    with pytest.raises(Crash):
        make_router(fault=_crash_after_hsm).generate_key(_spec(key_id), time.monotonic() + 30)
    intent = make_router().store.get(key_id)
    assert intent is not None and intent.state is KeyState.CREATING

    now = make_router()
    now.sweep_intents(time.monotonic() + 30)
    assert now.store.get(key_id) == intent  # within the grace an attempt may still run: left alone
    with pytest.raises(KeyBeingCreated):
        now.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 5)

    later = make_router(wall_clock=lambda: intent.create_time + later.creation_grace + 1)
    assert later.sweep_intents(time.monotonic() + 30) >= 1  # other tests' leftovers on the shared store too
    assert later.store.get(key_id) is None
    for cluster in intent.clusters:
        assert tokens.objects(cluster, key_id) == []
    with pytest.raises(KeyNotFound):
        later.sign(key_id, Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 5)
    # The request, sent again, makes the key afresh: once.
    key = later.generate_key(_spec(key_id), time.monotonic() + 30)
    assert key.state is KeyState.ENABLED


def test_a_cluster_that_fails_while_a_late_creation_drops_its_copies_keeps_one_reconcile_lists(
    make_router, tokens, caplog
) -> None:
    """The creation outlived its roll-back (which removed the key from its primary), and the cluster it
    copied the key to since does not answer when it drops that copy: the caller is told to retry as
    before, each cluster is asked, a WARNING names the copy left, and reconcile lists it as an object
    no record names. The caller's retry is refused while that copy is there (no record names it, so it
    could be any key's), and makes the key once an operator has removed it."""
    key_id = unique("outlived-down")
    router, _ = _rolled_back_at_the_copy(make_router, key_id, another_host=True)
    asked: list[str] = []
    for name, backend in router.backends.items():
        real = backend.destroy

        def second_down(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> int:
            asked.append(_name)
            if len(asked) == 2:
                raise ClusterDown(f"cluster {_name} did not answer", cluster=_name)
            return int(_real(*args, **kwargs))

        backend.destroy = second_down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="router.router"), pytest.raises(KeyBeingCreated):
        router.generate_key(_spec(key_id), time.monotonic() + 30)

    other, down = asked
    assert router.store.get(key_id) is None
    assert len(tokens.objects(down, key_id)) == 2 and tokens.objects(other, key_id) == []
    assert (f"creation of {key_id} outlived its roll-back; its copy on {down}, which no record names, could not be "
            f"removed (cluster {down} did not answer): reconcile lists it as an object no record names") in caplog.text
    assert (down, key_id) in reconcile(make_router(), fix=False).unknown
    retry = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True))
    with pytest.raises(FailedPrecondition, match=f"cluster {down} already holds objects under key id"):
        retry.generate_key(_spec(key_id), time.monotonic() + 30)  # the same clusters as the first attempt
    assert len(tokens.objects(down, key_id)) == 2 and retry.store.get(key_id) is None
    for obj in tokens.objects(down, key_id):  # the operator removes it
        obj.destroy()
    made = retry.generate_key(_spec(key_id), time.monotonic() + 30)
    assert made.state is KeyState.ENABLED and all(len(tokens.objects(c, key_id)) == 2 for c in made.clusters)
