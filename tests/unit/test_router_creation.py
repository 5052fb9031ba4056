"""Key creation when the HSM fails unexpectedly: rolled back, reported as retryable."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from router.backend import HsmBackend, KeyMaterial, PoolStats
from router.errors import InternalError, KeyNotFound, RouterError, Unavailable
from router.model import ClusterSpec, KeyAlgorithm, KeySpec, KeyUsage, Placement
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology


class FailingBackend(HsmBackend):
    """A cluster whose key generation fails with an error nobody expected."""

    def __init__(self, name: str, error: type[RouterError] = InternalError) -> None:
        self.spec = ClusterSpec(name, "us-east-1", name)
        self.destroyed: list[str] = []
        self.error = error

    def generate(self, key: Placement, deadline: float, *, unless: Callable[[], bool] | None = None) -> None:
        raise self.error("unexpected PKCS #11 error", cluster=self.spec.name)

    def destroy(self, key_id: str, deadline: float, *, unless: Callable[[], bool] | None = None,
                of: KeyMaterial | None = None) -> int:
        if unless is not None and unless():
            return 0
        self.destroyed.append(key_id)
        return 0

    def key_objects(self, deadline: float, *, key_id: str | None = None) -> dict[str, dict[str, int]]:
        return {}  # its generate never makes anything

    def stats(self) -> PoolStats:
        return PoolStats(size=1, open=1, in_use=0)

    def close(self) -> None:
        return None

    def __getattr__(self, name: str):  # every other operation is unused here
        raise AssertionError(f"unexpected call {name}")


FailingBackend.__abstractmethods__ = frozenset()  # the fake implements what creation uses


@pytest.mark.parametrize("error", [InternalError, KeyNotFound])
def test_unexpected_hsm_error_during_creation_is_rolled_back_and_retryable(tmp_path: Path, error) -> None:
    """KeyNotFound: an object just made that a search then misses is the HSM's failure,
    not the caller's NOT_FOUND (a GenerateKey never answers that)."""
    backend = FailingBackend("use1-a", error)
    store = SqliteStore(tmp_path / "p.db")
    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a",)}), {"use1-a": backend}, store)
    spec = KeySpec(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id="r1")
    with pytest.raises(Unavailable, match="nothing was created"):
        router.generate_key(spec, time.monotonic() + 5)
    assert store.get("k/1") is None, "the intent is rolled back"
    assert backend.destroyed == ["k/1"], "objects the HSM may have made are destroyed"


def test_a_retry_whose_creation_began_on_a_cluster_not_serving_is_refused_at_once(tmp_path: Path) -> None:
    """The first attempt hung (or the cluster died) mid-creation; its circuit is open. A retry
    with the same request_id is told to come back, without a call to that HSM (where an
    attempt would hang with it) and without claiming the unfinished creation."""
    from router.model import KeyState
    from tests.support import stored

    names = {"use1-a": "us-east-1", "use1-b": "us-east-1", "usw2-a": "us-west-2"}
    backends = {name: FailingBackend(name) for name in names}
    store = SqliteStore(tmp_path / "p.db")
    router = Router(Topology("us-east-1", ("us-west-2",), {"us-east-1": ("use1-a", "use1-b"),
                                                            "us-west-2": ("usw2-a",)}), backends, store)
    spec = KeySpec(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id="r1")
    store.create(stored("k/1", request_id="r1", fingerprint=spec.fingerprint(), copies=spec.copies))
    intent = store.get("k/1")
    assert intent is not None and intent.state is KeyState.CREATING  # long past the grace period

    router.breakers["use1-a"].trip()
    with pytest.raises(Unavailable, match=r"creation began on cluster use1-a, which is not serving; retry") as info:
        router.generate_key(spec, time.monotonic() + 5)
    assert info.value.cluster == "use1-a"
    assert store.get("k/1") == intent, "the unfinished creation was claimed or changed"
    assert all(b.destroyed == [] for b in backends.values())

    # Serving again: the retry takes the creation over and makes the key there (this fake fails
    # unexpectedly, so it is rolled back and retryable, as for any creation).
    router.breakers["use1-a"].record_success()
    with pytest.raises(Unavailable, match="nothing was created"):
        router.generate_key(spec, time.monotonic() + 5)
    assert backends["use1-a"].destroyed == ["k/1"]


class CopyingBackend(FailingBackend):
    """A cluster where making and copying keys works."""

    def generate(self, key: Placement, deadline: float, *, unless: Callable[[], bool] | None = None) -> None:
        return None

    def export_wrapped(self, key: Placement, deadline: float) -> tuple[bytes, bytes]:
        return b"wrapped", b"public"

    def import_wrapped(self, key: Placement, wrapped: bytes, public_der: bytes, deadline: float, *,
                       unless: Callable[[], bool] | None = None, own_leftovers: bool = False) -> None:
        return None


def test_a_creation_taken_over_by_a_gateway_without_one_of_its_replicas_is_rolled_back(tmp_path: Path) -> None:
    """Another gateway began the creation with a replica in a region this one's config lacks.
    Taking it over made the key on the primary, then failed with a bare KeyError: no roll-back,
    the record stuck CREATING, the client answered INTERNAL."""
    from router.model import KeyState
    from tests.support import stored

    backends = {name: CopyingBackend(name) for name in ("use1-a", "use1-b")}
    store = SqliteStore(tmp_path / "p.db")
    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a", "use1-b")}), backends, store)
    spec = KeySpec(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id="r1",
                   copies=3)
    store.create(stored("k/1", request_id="r1", fingerprint=spec.fingerprint(), copies=3))  # use1-a, use1-b, usw2-a

    with pytest.raises(Unavailable, match=r"to cluster usw2-a \(cluster usw2-a is not configured on this gateway\); "
                                          "nothing was created") as info:
        router.generate_key(spec, time.monotonic() + 5)
    assert info.value.cluster == "usw2-a"
    assert backends["use1-a"].destroyed == ["k/1"] and backends["use1-b"].destroyed == ["k/1"], "rolled back"
    left = store.get("k/1")
    assert left is not None and left.state is KeyState.CREATING, "usw2-a was not reached: reconcile finishes it"


def test_a_taken_over_creation_that_loses_to_a_destroy_removes_its_copies_past_a_cluster_not_configured_here(
    tmp_path: Path,
) -> None:
    """Another gateway, one with every cluster, destroys the key while this one finishes its
    creation, whose record names a cluster this gateway lacks. The failed creation removes the
    copies it can, on both sides of that cluster, and answers a status (a KeyError answered
    INTERNAL, and left the copies after that cluster)."""
    import dataclasses

    from router.model import KeyState
    from tests.support import stored

    backends = {name: CopyingBackend(name) for name in ("use1-a", "use1-b")}
    store = SqliteStore(tmp_path / "p.db")
    spec = KeySpec(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id="r1",
                   copies=3)
    store.create(stored("k/1", request_id="r1", fingerprint=spec.fingerprint(), copies=3,
                        replicas=("usw2-a", "use1-b")))

    def destroyed_elsewhere(point: str) -> None:
        if point == "copy-exported":
            current = store.get("k/1")
            assert current is not None
            store.update(dataclasses.replace(current, state=KeyState.DESTROYED))

    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a", "use1-b")}), backends, store,
                    fault=destroyed_elsewhere)
    with pytest.raises(Unavailable, match="to cluster usw2-a"):
        router.generate_key(spec, time.monotonic() + 5)
    assert backends["use1-a"].destroyed == ["k/1"] and backends["use1-b"].destroyed == ["k/1"]
    left = store.get("k/1")
    assert left is not None and left.state is KeyState.DESTROYED


# -- who makes a key: a retry takes over at once a creation whose process is gone ---------------


def _reaped_process_owner() -> str:
    """The owner a process of this host wrote on its intent before it was killed (and reaped)."""
    import subprocess
    import sys

    from router._owner import this_process

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    child.kill()
    child.wait()
    mine = this_process().split(":")
    return ":".join((*mine[:3], str(child.pid), start))


class WatchedBackend(CopyingBackend):
    """A cluster where keys are made and copied, noting the owner the key's record names meanwhile."""

    def __init__(self, name: str, store: SqliteStore) -> None:
        super().__init__(name)
        self.store = store
        self.owners: list[str] = []

    def _note(self, key_id: str) -> None:
        record = self.store.get(key_id)
        self.owners.append(record.owner if record is not None else "-")

    def generate(self, key: Placement, deadline: float, *, unless: Callable[[], bool] | None = None) -> None:
        self._note(key.key_id)

    def destroy(self, key_id: str, deadline: float, *, unless: Callable[[], bool] | None = None,
                of: KeyMaterial | None = None) -> int:
        self._note(key_id)
        return super().destroy(key_id, deadline, unless=unless)


def _one_cluster(tmp_path: Path) -> tuple[Router, SqliteStore, WatchedBackend, KeySpec]:
    store = SqliteStore(tmp_path / "p.db")
    backend = WatchedBackend("use1-a", store)
    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a",)}), {"use1-a": backend}, store,
                    creation_grace=3600.0)
    spec = KeySpec(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id="r1")
    return router, store, backend, spec


def _intent(store: SqliteStore, spec: KeySpec, owner: str) -> Placement:
    """An intent written a moment ago (well within creation_grace) by ``owner`` (a process, named
    with the record's version, 1, as a gateway names it; "" for none)."""
    from tests.support import stored

    store.create(stored(spec.key_id, request_id=spec.request_id, fingerprint=spec.fingerprint(), copies=1,
                        replicas=(), create_time=time.time(), owner=f"{owner}@1" if owner else ""))
    intent = store.get(spec.key_id)
    assert intent is not None
    return intent


def test_a_new_key_is_made_under_a_record_naming_this_process_and_made_without_one(tmp_path: Path) -> None:
    from router._owner import this_process

    router, store, backend, spec = _one_cluster(tmp_path)
    made = router.generate_key(spec, time.monotonic() + 5)
    assert backend.owners == [f"{this_process()}@1"] and this_process()
    assert made.owner == "" and store.get("k/1").owner == ""  # type: ignore[union-attr]


def test_a_retry_takes_over_at_once_a_creation_whose_process_is_gone(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The worker making the key was killed: no process makes it any more, and its caller's retry
    need not wait out creation_grace (an hour here) to finish it."""
    from router._owner import this_process
    from router.model import KeyState

    router, store, backend, spec = _one_cluster(tmp_path)
    dead = _reaped_process_owner()
    _intent(store, spec, dead)
    with caplog.at_level("WARNING", logger="router.router"):
        made = router.generate_key(spec, time.monotonic() + 5)
    assert made.state is KeyState.ENABLED and made.request_id == "r1"
    pid = dead.split(":")[3]
    assert f"the process that was making it (pid {pid}) is gone" in caplog.text
    # The claim named this process while it made the key (a retry of the retry then waits for it).
    assert backend.owners == [f"{this_process()}@2"]


def test_an_owner_left_by_a_writer_that_names_none_says_nothing(tmp_path: Path) -> None:
    """An older gateway's claim (a rolling upgrade) bumps the version and keeps the owner column as
    it was: the process named there is gone, but the older gateway is making the key now."""
    from router.errors import KeyBeingCreated

    router, store, backend, spec = _one_cluster(tmp_path)
    intent = _intent(store, spec, _reaped_process_owner())
    claimed = store.update(intent)  # what an older version's take-over writes: the same owner, version 2
    with pytest.raises(KeyBeingCreated, match="is being created; retry shortly"):
        router.generate_key(spec, time.monotonic() + 5)
    assert store.get("k/1") == claimed and backend.owners == []


@pytest.mark.parametrize("whose", ["this process, still making it", "a record from before owners",
                                   "another host", "another container on this host"])
def test_a_retry_within_the_grace_waits_for_a_creation_whose_process_may_be_making_it(
    tmp_path: Path, whose: str
) -> None:
    from router._owner import this_process
    from router.errors import KeyBeingCreated

    router, store, backend, spec = _one_cluster(tmp_path)
    dead = _reaped_process_owner().split(":")
    owner = {
        "this process, still making it": this_process(),
        "a record from before owners": "",
        "another host": ":".join(["00000000-0000-4000-8000-000000000000", *dead[1:]]),
        "another container on this host": ":".join([dead[0], "1" + dead[1], *dead[2:]]),
    }[whose]
    intent = _intent(store, spec, owner)
    with pytest.raises(KeyBeingCreated, match="is being created; retry shortly"):
        router.generate_key(spec, time.monotonic() + 5)
    assert store.get("k/1") == intent, "claimed or changed"
    assert backend.owners == []


def test_a_roll_back_names_this_process_while_it_destroys(tmp_path: Path) -> None:
    """A sweep or reconcile rolling back a dead process's intent owns it meanwhile: a retry
    must not take it over, as gone, and make objects while they are destroyed."""
    from router._owner import this_process

    router, store, backend, spec = _one_cluster(tmp_path)
    intent = _intent(store, spec, _reaped_process_owner())
    assert router.roll_back(intent) is True
    assert backend.owners == [f"{this_process()}@2"]
    assert store.get("k/1") is None
