"""Error paths of the router and a cluster, with fakes: what a client sees, and what is
left behind (sessions, circuits), when a cluster, its login or the store fails."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import Object, PrivateKey, PublicKey, SecretKey

from gateway import status
from router.backend import HsmBackend, PoolStats
from router.errors import ClusterDown, KeyNotFound, StaleSession, Stopping, Throttled, WrongKeyUsage
from router.model import ClusterSpec, KeyAlgorithm, KeyState, KeyUsage, Operation, Placement
from router.pkcs11._module import TokenObjects
from router.pkcs11.cluster import Pkcs11Cluster
from router.pkcs11.pool import _LOOKUPS, PooledSession
from router.placement.sqlite import SqliteStore
from router.placement.store import StoreError
from router.router import Router, Topology
from tests.support import stored

# -- a cluster's own retries ------------------------------------------------------------------


class _Session:
    def __init__(self, number: int) -> None:
        self.number, self.broken = number, False  # or why it broke, as PooledSession keeps it
        self.handle = self

    def forget(self) -> None:
        pass


class _Pool:
    closed = False

    def __init__(self, relogin_fails: bool = False) -> None:
        self.opened = 0
        self.released: list[tuple[int, bool | str]] = []
        self.relogin_fails = relogin_fails
        self.relogins = 0

    def acquire(self, deadline: float, quick: bool = False) -> _Session:
        self.opened += 1
        return _Session(self.opened)

    def release(self, session: _Session) -> None:
        self.released.append((session.number, session.broken))

    def relogin(self) -> None:
        self.relogins += 1
        if self.relogin_fails:
            raise p11.TokenNotPresent()

    def stopping(self) -> Stopping:
        return Stopping("the gateway is stopping", cluster="use1-a")


def _cluster(pool: _Pool, pool_size: int = 2) -> Pkcs11Cluster:
    cluster = object.__new__(Pkcs11Cluster)
    cluster.spec = ClusterSpec("use1-a", "us-east-1", "use1-a", pool_size=pool_size)
    cluster._pool, cluster._serial, cluster._clock, cluster._signer = pool, None, time.monotonic, None
    return cluster


def test_a_session_stale_on_the_last_attempt_is_not_put_back_as_it_was() -> None:
    pool = _Pool()

    def gone(session: Any) -> None:
        raise p11.SessionHandleInvalid()

    with pytest.raises(StaleSession):
        _cluster(pool)._run(time.monotonic() + 5, gone)
    # Each is closed as it is handed back, and the pool's log says why it was replaced.
    assert pool.released == [(n, "SessionHandleInvalid") for n in (1, 2, 3)], "every session that went stale is closed"


def test_a_login_that_cannot_be_made_again_is_the_clusters_fault() -> None:
    def logged_out(session: Any) -> None:
        raise p11.UserNotLoggedIn()

    with pytest.raises(ClusterDown) as caught:
        _cluster(_Pool(relogin_fails=True))._run(time.monotonic() + 5, logged_out)
    assert caught.value.message == "cluster use1-a could not log in again (TokenNotPresent)"
    assert status.code_for(caught.value) is grpc.StatusCode.UNAVAILABLE


def test_a_call_whose_pool_the_stop_closed_ends_without_repair_or_log_in() -> None:
    """Closing the pool logged its sessions out: the call must not log in again."""
    pool = _Pool()

    def logged_out(session: Any) -> None:
        pool.closed = True
        raise p11.UserNotLoggedIn()

    with pytest.raises(Stopping) as caught:
        _cluster(pool)._run(time.monotonic() + 5, logged_out)
    assert pool.relogins == 0 and pool.released == [(1, False)]
    assert status.code_for(caught.value) is grpc.StatusCode.UNAVAILABLE


# -- the store during a re-read ------------------------------------------------------------------


class _Missing(HsmBackend):
    def __init__(self, name: str) -> None:
        self.spec = ClusterSpec(name, "us-east-1", name)

    def sign(self, key: Placement, op: Operation, digest: bytes, deadline: float) -> bytes:
        raise KeyNotFound("key material is missing on the cluster", cluster=self.spec.name)

    def sign_many(self, key: Placement, op: Operation, digests: Any, deadline: float) -> list[Any]:
        if key.key_id == "k/ok":
            return [b"sig"] * len(digests)
        raise KeyNotFound("key material is missing on the cluster", cluster=self.spec.name)

    def stats(self) -> PoolStats:
        return PoolStats(size=1, open=1, in_use=0)

    def close(self) -> None:
        pass


_Missing.__abstractmethods__ = frozenset()


def _router(tmp_path: Path, *keys: str) -> tuple[Router, SqliteStore]:
    store = SqliteStore(tmp_path / "p.db")
    for key in keys:
        store.create(stored(key, request_id=f"r-{key}", replicas=()))
        store.update(dataclasses.replace(store.get(key), state=KeyState.ENABLED))
    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a",)}), {"use1-a": _Missing("use1-a")}, store)
    for key in keys:
        router.placement(key)  # cached

    def down(key_id: str) -> None:
        raise StoreError("database is locked")

    store.get = down  # type: ignore[method-assign]
    return router, store


def test_a_copy_not_found_while_the_store_is_down_is_unavailable_not_internal(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, "k/1")
    with pytest.raises(Exception) as caught:
        router.sign("k/1", Operation.ECDSA_SHA256, b"\0" * 32, None, time.monotonic() + 5)
    code, message, _ = status.status_for(caught.value)
    assert code is grpc.StatusCode.UNAVAILABLE, message
    assert "placement store cannot be read" in message


def test_a_batch_keeps_the_signatures_of_its_other_keys_while_the_store_is_down(tmp_path: Path) -> None:
    router, _ = _router(tmp_path, "k/ok", "k/1")
    out = router.sign_many([("k/ok", Operation.ECDSA_SHA256, b"\0" * 32, None),
                            ("k/1", Operation.ECDSA_SHA256, b"\0" * 32, None)], time.monotonic() + 5)
    assert out[0] == (b"sig", "use1-a")
    assert status.code_for(out[1]) is grpc.StatusCode.UNAVAILABLE


# -- a key object read in part -------------------------------------------------------------------


class _NoSignMethod(PrivateKey, Object):
    """What python-pkcs11 makes when the bulk attribute read failed and CKA_SIGN was skipped:
    a private key without the sign method, though the key permits signing."""

    sign_attribute: Any = True

    def __init__(self) -> None:
        pass

    def __getitem__(self, attribute: Attribute) -> Any:
        if attribute is Attribute.SIGN:
            if isinstance(self.sign_attribute, Exception):
                raise self.sign_attribute
            return self.sign_attribute
        return KeyType.EC


class _Handle:
    def __init__(self, obj: Any) -> None:
        self.obj, self.searches = obj, 0

    def get_objects(self, template: Any) -> Any:
        self.searches += 1
        return iter([self.obj])


@pytest.fixture
def fake_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Searches on a ``_Handle`` (the pool's own search needs a python-pkcs11 session)."""
    from router.pkcs11 import _search

    monkeypatch.setattr(_search, "find", lambda handle, template: list(handle.get_objects(template)))


@pytest.mark.parametrize("sign_attribute, error", [(True, Throttled), (p11.FunctionFailed(), p11.FunctionFailed)],
                         ids=["says-yes", "unreadable"])
def test_a_key_object_read_in_part_is_found_again_and_not_kept(sign_attribute: Any, error: type[Exception],
                                                               fake_searches: None) -> None:
    """A key whose attribute says it signs is searched for again, then refused as busy; one whose
    attribute cannot be read fails with the module's own error (which ``_run`` maps by its CKR)."""
    obj = _NoSignMethod()
    obj.sign_attribute = sign_attribute
    handle = _Handle(obj)
    session = PooledSession(handle, 0, 4, ClusterSpec("use1-a", "us-east-1", "use1-a"), TokenObjects(None))
    placement = Placement(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                          state=KeyState.ENABLED, primary="use1-a")
    for _ in range(2):
        with pytest.raises(error):
            session.key(placement, ObjectClass.PRIVATE_KEY, "sign")
    assert handle.searches == (2 * _LOOKUPS if error is Throttled else 2) and not session.keys, "never cached"


def test_a_key_that_does_not_permit_signing_is_still_the_callers_mistake(fake_searches: None) -> None:
    obj = _NoSignMethod()
    obj.sign_attribute = False
    session = PooledSession(_Handle(obj), 0, 4, ClusterSpec("use1-a", "us-east-1", "use1-a"), TokenObjects(None))
    placement = Placement(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                          state=KeyState.ENABLED, primary="use1-a")
    with pytest.raises(WrongKeyUsage):
        session.key(placement, ObjectClass.PRIVATE_KEY, "sign")


# -- the health probe and CloudHSM discovery -------------------------------------------------------


def test_a_probe_that_fails_on_a_bug_counts_against_the_cluster_and_probing_goes_on(caplog) -> None:
    import threading

    from router.health import CircuitBreaker, CircuitState, HealthMonitor

    probes = threading.Semaphore(0)

    class Buggy:
        def probe(self, deadline: float) -> None:
            probes.release()
            raise TypeError("a bug")

    breaker = CircuitBreaker("use1-a")
    monitor = HealthMonitor({"use1-a": Buggy()}, {"use1-a": breaker}, interval=0.01)  # type: ignore[dict-item]
    thread = threading.Thread(target=monitor._loop, args=("use1-a",), daemon=True)
    thread.start()
    try:
        for _ in range(3):  # the loop outlives the first bug
            assert probes.acquire(timeout=5)
    finally:
        monitor._stop.set()
        thread.join(5)
    assert breaker.state is CircuitState.OPEN, "three failures in a row"
    assert "probe of cluster use1-a failed unexpectedly" in caplog.text


@pytest.mark.parametrize(("code", "unavailable"), [
    ("AccessDeniedException", True), ("ThrottlingException", True), ("CloudHsmInternalFailureException", True),
    ("CloudHsmInvalidRequestException", False), ("CloudHsmResourceNotFoundException", False),
])
def test_discovery_tells_an_api_that_cannot_answer_from_a_cluster_id_that_is_wrong(code: str,
                                                                                  unavailable: bool) -> None:
    """`hsmgw alarms check` exits 2 for the first (nothing was checked), 1 for the second."""
    import boto3
    from botocore.stub import Stubber

    from gateway.discover import DiscoveryError, DiscoveryUnavailable, discover

    client = boto3.client("cloudhsmv2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_client_error("describe_clusters", service_error_code=code)
        with pytest.raises(DiscoveryError) as caught:
            discover("cluster-1234abcd", "us-east-1", client=client)
    assert isinstance(caught.value, DiscoveryUnavailable) is unavailable
    assert str(caught.value).startswith("describing cluster cluster-1234abcd in us-east-1 failed:")


def _read_in_part(base: type, attribute: Attribute, answer: Any) -> Any:
    """A key object python-pkcs11 made from a failed bulk read: of ``base`` (a ``Key`` class), but
    without its operation's method; its own ``attribute`` answers ``answer`` (a value, or an
    exception it raises)."""

    class ReadInPart(base):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            self.answer = answer

        def __getitem__(self, asked: Attribute) -> Any:
            if asked is not attribute:
                return KeyType.AES
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    return ReadInPart()


@pytest.mark.parametrize(("object_class", "base", "capability", "attribute"), [
    (ObjectClass.PUBLIC_KEY, PublicKey, "verify", Attribute.VERIFY),
    (ObjectClass.SECRET_KEY, SecretKey, "encrypt", Attribute.ENCRYPT),
    (ObjectClass.PRIVATE_KEY, PrivateKey, "decrypt", Attribute.DECRYPT),
], ids=["verify", "encrypt", "decrypt"])
@pytest.mark.parametrize("answer", [True, p11.DeviceError()], ids=["says-yes", "unreadable"])
def test_a_key_read_in_part_for_any_operation_is_not_the_callers_mistake(
    object_class: ObjectClass, base: type, capability: str, attribute: Attribute, answer: Any, fake_searches: None
) -> None:
    """Not FAILED_PRECONDITION, as a key that does not permit the operation would be, and the
    half-read object is not kept: a key whose attribute says yes is searched for again, then
    RESOURCE_EXHAUSTED (another replica, or a retry, may serve it); one whose attribute the HSM
    refuses fails with the HSM's error (a device error: the cluster is down, not busy)."""
    handle = _Handle(_read_in_part(base, attribute, answer))
    session = PooledSession(handle, 0, 4, ClusterSpec("use1-a", "us-east-1", "use1-a"), TokenObjects(None))
    placement = Placement(key_id="k/1", algorithm=KeyAlgorithm.AES_256, usage=KeyUsage.ENCRYPT_DECRYPT,
                          state=KeyState.ENABLED, primary="use1-a")
    for _ in range(2):
        if isinstance(answer, Exception):
            with pytest.raises(p11.DeviceError):
                session.key(placement, object_class, capability)
            continue
        with pytest.raises(Throttled) as caught:
            session.key(placement, object_class, capability)
        code, message, _ = status.status_for(caught.value)
        assert (code, message) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "could not read all of key 'k/1''s attributes")
    searches = 2 if isinstance(answer, Exception) else 2 * _LOOKUPS
    assert handle.searches == searches and not session.keys, "never cached"

    handle.obj.answer = False  # read in full: the key does not permit it, the caller's mistake
    with pytest.raises(WrongKeyUsage, match=f"key 'k/1' does not permit {capability} on this cluster"):
        session.key(placement, object_class, capability)
