"""Fleet markers: reconcile destroys only on tokens of its store's fleet.

Key ids are chosen by callers, so a staging fleet and a production fleet name the same keys.
A gateway whose ``[store] url`` names the other fleet's store must not take that store's
destroyed keys, unfinished creations or placements for the keys on its own tokens, nor make
keys on them (which would make them its store's tokens too).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute

from router.errors import OtherFleet
from router.model import KeyAlgorithm, KeySpec, KeyState, KeyUsage, Operation, Placement, ReplicationPolicy
from router.pkcs11 import _fleet
from router.placement.sqlite import SqliteStore
from router.reconcile import reconcile
from router.router import Router
from tests.support import TokenInspector, copy_left, placement, stored, unique

CLUSTERS = ["use1-a", "use1-b", "usw2-a"]


def _spec(key_id: str) -> KeySpec:
    return KeySpec(key_id=key_id, algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                   request_id=f"req-{key_id}")


def _marked(router: Router) -> None:
    """Every token lists the router's fleet, as once it has put a key on each of them."""
    for backend in router.backends.values():
        backend.mark(router.fleet_id, time.monotonic() + 30)


@pytest.fixture(autouse=True)
def _shared_fleet_kept(make_router, tokens: TokenInspector):
    """The shared fleet's id back on every token after each test, which may have pushed it out:
    its gateway and the tests after these make keys there."""
    yield
    fleet_id = make_router().fleet_id
    for cluster in CLUSTERS:
        if fleet_id not in (tokens.fleets(cluster) or ()):
            tokens.mark(cluster, fleet_id)


def _signs(router: Router, key: Placement) -> None:
    """The key signs, and the signature verifies under its public key outside any HSM."""
    message = f"payment for {key.key_id}".encode()
    signature, _ = router.sign(key.key_id, Operation.ECDSA_SHA256, None, message, time.monotonic() + 10)
    _, der = router.public_key(key.key_id, time.monotonic() + 10)
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def _held(tokens: TokenInspector, key: Placement) -> None:
    for cluster in key.clusters:
        assert len(tokens.objects(cluster, key.key_id)) == 2, (cluster, key.key_id)


def test_another_fleets_store_destroys_none_of_this_fleets_keys(make_router, tokens, tmp_path: Path,
                                                                 caplog) -> None:
    ours = make_router()
    _marked(ours)
    signing = ours.generate_key(_spec(unique("payments/signing")), time.monotonic() + 30)
    creating = ours.generate_key(_spec(unique("payments/settle")), time.monotonic() + 30)
    placed = ours.generate_key(_spec(unique("payments/refund")), time.monotonic() + 30)
    _signs(ours, signing)

    # The other fleet's store names the same ids: one destroyed there, one whose creation stopped
    # half-way there long ago, one it placed on a cluster where this fleet's copy is not.
    theirs = SqliteStore(tmp_path / "staging.db")
    long_ago = time.time() - 3600
    theirs.create(stored(signing.key_id, state=KeyState.DESTROYED, primary=signing.primary,
                         replicas=signing.replicas, create_time=long_ago))
    theirs.create(stored(creating.key_id, state=KeyState.CREATING, primary=creating.primary,
                         replicas=creating.replicas, create_time=long_ago))
    elsewhere = next(name for name in CLUSTERS if name not in placed.clusters)
    theirs.create(stored(placed.key_id, state=KeyState.ENABLED, primary=elsewhere, replicas=(), copies=1,
                         create_time=long_ago))
    wrong = make_router(store=theirs, adopt_fleet=False)  # [store] url names the staging table
    assert wrong.fleet_id != ours.fleet_id

    with caplog.at_level(logging.ERROR, logger="router.reconcile"):
        report = reconcile(wrong, fix=True, finish_destroys=True)
    assert sorted(report.other_fleet) == CLUSTERS
    assert report.removed == [] and report.finished == [] and report.rolled_back == []
    assert creating.key_id in report.stale_intents
    assert "3 clusters whose keys were made with another placement store" in report.summary()
    assert "[store] url may name the wrong store" in report.summary()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
              and "another placement store" in r.getMessage()]
    for cluster in CLUSTERS:  # one line per cluster, saying what to look at and what was not done
        said = [m for m in errors if m.startswith(f"reconcile: cluster {cluster}: ")]
        assert len(said) == 1, errors
        assert "[store] url may name the wrong store" in said[0] and "Nothing is destroyed on it" in said[0]

    # The repairer's sweep of unfinished creations leaves them too.
    assert wrong.sweep_intents(time.monotonic() + 30) == 0

    # Nor can it make a key there: marked with its id too, the tokens would be its store's, and its
    # next reconcile would destroy this fleet's keys under the ids its store says are destroyed.
    new_id = unique("staging/new")
    with pytest.raises(OtherFleet, match=rf"^cluster \S+'s token holds keys made with another placement store "
                                         rf"\(fleet {ours.fleet_id}\), not this store's \({wrong.fleet_id}\): "
                                         r"\[store\] url may name the wrong store\. Nothing was made there\."):
        wrong.generate_key(_spec(new_id), time.monotonic() + 30)
    assert theirs.get(new_id) is None and all(tokens.objects(c, new_id) == [] for c in CLUSTERS)
    report = reconcile(wrong, fix=True, finish_destroys=True)
    assert sorted(report.other_fleet) == CLUSTERS and report.removed == [] and report.finished == []
    # Nor destroy there: the key its store says is destroyed, or placed elsewhere, is this fleet's.
    for key_id in (signing.key_id, placed.key_id):
        with pytest.raises(OtherFleet, match=rf"^key '{key_id}' was not destroyed: cluster \S+: its keys were "
                                             "made with another placement store"):
            wrong.destroy_key(key_id, time.monotonic() + 30)
    assert theirs.get(placed.key_id).state is KeyState.ENABLED  # type: ignore[union-attr]

    for key in (signing, creating, placed):
        _held(tokens, key)
        _signs(ours, key)
    assert theirs.get(creating.key_id) is not None  # its intent stays in its store, for its own fleet
    for cluster in CLUSTERS:  # nothing of the other store was written on this fleet's tokens
        assert wrong.fleet_id not in (tokens.fleets(cluster) or ())


def test_the_same_fleets_reconcile_still_removes_strays_and_rolls_back_intents(make_router, tokens) -> None:
    """On tokens that list the store's fleet (among others: a token may serve two fleets), a
    destroyed key's stray copy goes at the periodic reconcile and a stale intent is rolled back."""
    router = make_router()
    _marked(router)
    for cluster in CLUSTERS:  # another fleet that shares the tokens, marked after this one
        tokens.mark(cluster, f"{int(time.time()):032x}")
    gone = router.generate_key(_spec(unique("fleet/gone")), time.monotonic() + 30)
    stray = next(name for name in CLUSTERS if name not in gone.clusters)
    copy_left(router, gone, stray)
    router.destroy_key(gone.key_id, time.monotonic() + 30)  # its process stops before its sweep of strays
    assert len(tokens.objects(stray, gone.key_id)) == 2

    report = reconcile(make_router(), fix=False, finish_destroys=True)  # the next gateway's periodic one
    assert (stray, gone.key_id) in report.finished and report.other_fleet == []
    assert tokens.objects(stray, gone.key_id) == []

    stale_id = unique("fleet/stale")
    intent = stored(stale_id, primary="use1-a", replicas=("usw2-a",), create_time=time.time() - 3600)
    router.store.create(intent)
    for cluster in intent.clusters:
        router.backends[cluster].generate(placement(stale_id, KeyAlgorithm.EC_P256), time.monotonic() + 30)
    report = reconcile(router, fix=True)
    assert stale_id in report.rolled_back
    assert all(tokens.objects(cluster, stale_id) == [] for cluster in intent.clusters)
    assert router.store.get(stale_id) is None


def test_a_token_from_before_markers_is_reconciled_as_before_and_not_marked_by_it(
        make_router, tokens, tmp_path: Path) -> None:
    """A token no gateway has marked yet is reconciled as before markers. Reconcile marks nothing:
    a gateway on the wrong store that only looks (every gateway's start-up reconcile) would
    otherwise claim the token for that store's fleet, and lock this fleet's reconcile out of it."""
    router = make_router()
    _marked(router)
    key = router.generate_key(_spec(unique("fleet/legacy")), time.monotonic() + 30)
    stray = next(name for name in CLUSTERS if name not in key.clusters)
    copy_left(router, key, stray)
    tokens.unmark(stray)
    assert tokens.fleets(stray) is None

    wrong = make_router(store=SqliteStore(tmp_path / "wrong.db"), adopt_fleet=False)
    assert wrong.fleet_id != router.fleet_id
    reconcile(wrong, fix=False)  # a report-only look from another fleet's store
    assert tokens.fleets(stray) is None

    report = reconcile(make_router(), fix=True)  # a new process: it has marked nothing yet
    assert (stray, key.key_id) in report.removed and stray not in report.other_fleet
    assert tokens.objects(stray, key.key_id) == []
    assert tokens.fleets(stray) is None  # marked by the next key made there, not by a reconcile
    _held(tokens, key)


def test_the_marker_is_no_key_object(make_router, tokens) -> None:
    """Listings that count keys never count the marker: not reconcile's, not an operator's."""
    router = make_router()
    _marked(router)
    for cluster in CLUSTERS:
        marker = list(tokens.session(cluster).get_objects(_fleet.MARKER))
        assert len(marker) == 1
        assert router.fleet_id in (tokens.fleets(cluster) or ())
        assert _fleet.LABEL not in router.backends[cluster].key_objects(time.monotonic() + 30)
    assert not [k for _, k in reconcile(router, fix=False).unknown if k == _fleet.LABEL]


def test_a_creation_marks_the_tokens_it_writes_to_once_and_keeps_sixteen_fleets(make_router, tokens,
                                                                               tmp_path: Path) -> None:
    others = [f"{i:032x}" for i in range(1, 17)]
    router = make_router()
    target = CLUSTERS[0]
    for fleet in others:  # sixteen other fleets since this one
        tokens.mark(target, fleet)
    assert tokens.fleets(target) == tuple(others)

    store = SqliteStore(tmp_path / "new-fleet.db")
    # A new store whose operator adopted the fleets that wrote there (as one rebuilt without its id).
    fresh = make_router(store=store, adopt_fleet=False, adopted_fleet_ids=(others[-1], router.fleet_id))
    pinned = unique("fleet/pinned")
    fresh.pin(pinned, target)
    key = fresh.generate_key(_spec(pinned), time.monotonic() + 30)
    assert key.primary == target
    assert tokens.fleets(target) == (*others[1:], fresh.fleet_id)  # the oldest forgotten, the newest last
    for cluster in key.clusters:
        assert fresh.fleet_id in (tokens.fleets(cluster) or ())
    marker = list(tokens.session(target).get_objects(_fleet.MARKER))
    assert len(marker) == 1
    before = bytes(marker[0][Attribute.VALUE])
    again = unique("fleet/again")
    fresh.pin(again, target)
    assert fresh.generate_key(_spec(again), time.monotonic() + 30).primary == target
    # A second key leaves the marker as it was.
    assert [bytes(m[Attribute.VALUE]) for m in tokens.session(target).get_objects(_fleet.MARKER)] == [before]


def test_a_process_marks_again_a_token_whose_marker_lost_its_fleet(make_router, tokens, tmp_path: Path) -> None:
    """A process remembers the tokens it marked. Once a look at a token finds its fleet gone from
    the marker (16 ids kept; others, which adopted it, pushed it out), its next key there marks
    it again."""
    router = make_router()
    _marked(router)  # this process has marked every token: it would not look again
    cluster = CLUSTERS[0]
    others = [f"{i:032x}" for i in range(100, 100 + _fleet.KEPT)]
    for other in others:  # sixteen other stores' gateways make keys on it
        tokens.mark(cluster, other)
    assert router.fleet_id not in (tokens.fleets(cluster) or ())
    assert router.fleet_check(cluster, time.monotonic() + 30)[0] == "other_fleet"
    with pytest.raises(OtherFleet):  # its id gone, the token is another fleet's for all it can tell
        router.backends[cluster].mark(router.fleet_id, time.monotonic() + 30)
    # What its next key there does first, once its operator adopted the fleet that wrote last.
    router.backends[cluster].mark(router.fleet_id, time.monotonic() + 30, also=frozenset(others[-1:]))
    assert router.fleet_id in (tokens.fleets(cluster) or ())
    assert router.fleet_check(cluster, time.monotonic() + 30) == ("", "")


def test_a_store_whose_fleet_id_changed_under_a_process_is_followed(make_router, tokens, tmp_path: Path) -> None:
    """Two regions' first gateways on a new DynamoDB global table may each write a fleet id, and the
    table keeps the last: a process that read the other one at start follows the store's, and
    tokens it marked with the id it had read stay this store's."""
    store = SqliteStore(tmp_path / "regions.db")
    router = make_router(store=store, adopt_fleet=False)
    first = router.fleet_id
    for name in CLUSTERS:  # this process marked every token with the id it read
        tokens.mark(name, first)
    later = "f" * 32
    store._query("UPDATE meta SET value = ? WHERE name = 'fleet_id'", (later,))  # the other region's write won
    theirs, mine = CLUSTERS[0], CLUSTERS[1]
    tokens.unmark(theirs)
    router.backends[theirs].mark(later, time.monotonic() + 30)  # their gateway's

    assert router.fleet_check(theirs, time.monotonic() + 30) == ("", "")
    assert router.fleet_id == later
    assert router.fleet_check(mine, time.monotonic() + 30) == ("", "")  # marked with the id read before
    assert later in (tokens.fleets(mine) or ())  # and now with the store's


def test_a_token_that_refuses_the_marker_is_asked_again_only_after_a_while(make_router, tokens, tmp_path: Path,
                                                                          monkeypatch, caplog) -> None:
    """A module that does not take the marker (a data object) fails its write: logged once, and
    the keys written there meanwhile cost no search, lock or failed write of it."""
    import pkcs11.exceptions

    from router.backend import MARK_RETRY

    tries: list[str] = []

    def refused(session, markers, fleet_id):  # type: ignore[no-untyped-def]
        tries.append(fleet_id)
        raise pkcs11.exceptions.TemplateInconsistent()

    monkeypatch.setattr(_fleet, "add", refused)
    # Behind the real clock: the cluster checks the router's deadlines (time.monotonic) with it.
    now = [time.monotonic() - 2 * MARK_RETRY]
    router = make_router(store=SqliteStore(tmp_path / "refusing.db"))
    backend = router.backends[CLUSTERS[0]]
    monkeypatch.setattr(backend, "_clock", lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="router.router"):
        for _ in range(3):
            router._mark(backend, time.monotonic() + 30)
    assert tries == [router.fleet_id]
    assert caplog.text.count(f"cluster {CLUSTERS[0]}: could not record fleet") == 1
    now[0] += MARK_RETRY
    router._mark(backend, time.monotonic() + 30)
    assert tries == [router.fleet_id] * 2


def test_a_copy_to_another_fleets_token_refuses_the_creation_and_leaves_nothing(make_router, tokens) -> None:
    """The key's DR copy would go to a token only another fleet wrote to: the creation fails
    FAILED_PRECONDITION (asking again will not help), and the key made on its primary is gone."""
    other = "a" * 32
    tokens.unmark("usw2-a")
    tokens.mark("usw2-a", other)
    router = make_router(replication=ReplicationPolicy(copies=2, require_dr_copy=True))
    key_id = unique("fleet/dr-copy")
    router.pin(key_id, "use1-a")
    with pytest.raises(OtherFleet, match=rf"^cluster usw2-a's token holds keys made with another placement store "
                                         rf"\(fleet {other}\), not this store's \({router.fleet_id}\)"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    assert router.store.get(key_id) is None
    assert all(tokens.objects(cluster, key_id) == [] for cluster in CLUSTERS)
    assert tokens.fleets("usw2-a") == (other,)


def test_a_marker_write_the_cluster_failed_a_moment_is_tried_again_at_the_next_key(make_router, tmp_path: Path,
                                                                                  monkeypatch, caplog) -> None:
    """A device error (or no session free, or the deadline) while writing the marker is the
    cluster's moment, not the module refusing the marker: the next key there writes it, with no
    ten-minute pause leaving new keys on an unmarked token."""
    import pkcs11.exceptions

    real, tries = _fleet.add, []

    def down_once(session, markers, fleet_id):  # type: ignore[no-untyped-def]
        tries.append(fleet_id)
        if len(tries) == 1:
            raise pkcs11.exceptions.DeviceError()
        return real(session, markers, fleet_id)

    monkeypatch.setattr(_fleet, "add", down_once)
    router = make_router(store=SqliteStore(tmp_path / "down.db"))
    backend = router.backends[CLUSTERS[0]]
    with caplog.at_level(logging.WARNING, logger="router.router"):
        router._mark(backend, time.monotonic() + 30)
        router._mark(backend, time.monotonic() + 30)
        router._mark(backend, time.monotonic() + 30)  # written: not asked again
    assert tries == [router.fleet_id] * 2
    assert [r.getMessage() for r in caplog.records if "could not record fleet" in r.getMessage()] == [
        f"cluster {CLUSTERS[0]}: could not record fleet {router.fleet_id} on its token (cluster {CLUSTERS[0]} is "
        "not reachable (DeviceError)); tried again at the next key"]


def test_the_sweep_after_a_destroy_leaves_another_fleets_key_of_that_id(make_router, tokens) -> None:
    """DestroyKey's later sweep of clusters its record does not name removes stray copies, but
    not what another fleet's token holds under that id: that is the other fleet's key."""
    router = make_router()
    key = router.generate_key(_spec(unique("fleet/swept")), time.monotonic() + 30)
    stray, theirs = next(name for name in CLUSTERS if name not in key.clusters), "b" * 32
    tokens.unmark(stray)
    tokens.mark(stray, theirs)  # another fleet's token, with its own key under this id
    router.backends[stray].generate(placement(key.key_id, key.algorithm), time.monotonic() + 30)
    router.destroy_key(key.key_id, time.monotonic() + 30)
    assert router.sweep_destroyed(time.monotonic() + 30) == 0
    assert len(tokens.objects(stray, key.key_id)) == 2
    for cluster in key.clusters:
        assert tokens.objects(cluster, key.key_id) == []
    for obj in tokens.objects(stray, key.key_id):  # the other fleet's key, gone with this test
        obj.destroy()


def test_tokens_marked_with_an_id_the_store_replaced_stay_this_fleets_after_a_restart(make_router, tokens,
                                                                                      tmp_path: Path) -> None:
    """Two regions' first gateways on a new global table each wrote a fleet id, and the table kept
    the other's. This process marked its tokens with the one it read; its repairer reads the
    store's id again, follows it and adds it to those tokens, so that once restarted (reading only
    the store's id) it still makes keys on them."""
    store = SqliteStore(tmp_path / "race.db")
    router = make_router(store=store, adopt_fleet=False)
    first = router.fleet_id
    for name in CLUSTERS:  # a new deployment's tokens, marked by this process
        tokens.unmark(name)
        tokens.mark(name, first)
    later = "e" * 32
    store._query("UPDATE meta SET value = ? WHERE name = 'fleet_id'", (later,))  # the other region's write won

    assert router.follow_store_fleet(time.monotonic() + 30)
    assert router.fleet_id == later
    assert all(tokens.fleets(name) == (first, later) for name in CLUSTERS)
    assert not router.follow_store_fleet(time.monotonic() + 30)  # read again a minute later at the soonest

    restarted = make_router(store=SqliteStore(tmp_path / "race.db"), adopt_fleet=False)
    assert restarted.fleet_id == later
    key = restarted.generate_key(_spec(unique("fleet/after-race")), time.monotonic() + 30)
    assert key.state is KeyState.ENABLED
    _signs(restarted, key)


def test_a_store_that_cannot_say_its_fleet_id_when_a_token_is_another_fleets_fails_the_creation_cleanly(
        make_router, tokens, tmp_path: Path) -> None:
    """The token lists another fleet only; the store's fleet id, read again in case another region's
    replaced it, cannot be read: UNAVAILABLE, the creation rolled back, nothing left on any token
    (it was INTERNAL, with the intent left behind)."""
    from router.errors import Unavailable
    from router.placement.store import StoreError

    class Down(SqliteStore):
        down = False

        def existing_fleet_id(self) -> str | None:
            if self.down:
                raise StoreError("connection refused")
            return super().existing_fleet_id()

    store = Down(tmp_path / "down.db")
    router = make_router(store=store)
    for name in CLUSTERS:
        tokens.unmark(name)
        tokens.mark(name, "c" * 32)
    store.down = True
    key_id = unique("fleet/unreadable")
    with pytest.raises(Unavailable, match="^placement store is unreachable; keys cannot be created now$"):
        router.generate_key(_spec(key_id), time.monotonic() + 30)
    store.down = False
    assert store.get(key_id) is None
    assert all(tokens.objects(name, key_id) == [] for name in CLUSTERS)
