"""A key's copy at creation that its target cluster refuses: what the refusal does to that
cluster's circuit, and so to the GenerateKey calls after it.

A busy HSM (throttling) answered: it is alive, and a run of busy answers must not take it out
of placement. A cluster that is down must be: after a run of such failures, new keys are
refused up front instead of each one being made, copied, failed and rolled back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from pkcs11 import exceptions as p11

from gateway import status
from router.errors import ClusterDown, RouterError, Throttled, Unavailable
from router.health import CircuitState
from router.model import ClusterSpec, KeyAlgorithm, KeySpec, KeyState, KeyUsage, Placement, ReplicationPolicy
from router.pkcs11._errors import ckr_behind
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology
from tests.support import FakeClock
from tests.unit.test_router_creation import CopyingBackend


class Cluster(CopyingBackend):
    """A cluster that makes and exports keys, and answers each copy sent to it with the next of
    ``refusals`` (``None``: the copy is made)."""

    def __init__(self, name: str, region: str, refusals: Callable[[], RouterError | None] = lambda: None) -> None:
        super().__init__(name)
        self.spec = ClusterSpec(name, region, name)
        self.refusals = refusals
        self.copies_asked = 0

    def import_wrapped(self, key: Placement, wrapped: bytes, public_der: bytes, deadline: float, *,
                       unless: Callable[[], bool] | None = None, own_leftovers: bool = False) -> None:
        self.copies_asked += 1
        refusal = self.refusals()
        if refusal is not None:
            raise refusal

    def fault_name(self, error: RouterError) -> str:
        return ckr_behind(error)  # as Pkcs11Cluster names the HSM's error behind a failure


def busy() -> RouterError:
    error = Throttled("cluster usw2-a is busy", cluster="usw2-a", region="us-west-2")
    error.__cause__ = p11.FunctionFailed()
    return error


def down() -> RouterError:
    error = ClusterDown("cluster usw2-a is not reachable (DeviceError)", cluster="usw2-a", region="us-west-2")
    error.__cause__ = p11.DeviceError()
    return error


Changes = list[tuple[str, CircuitState, str]]


def _router(tmp_path, refusals: Callable[[], RouterError | None]) -> tuple[Router, Cluster, Changes]:
    """Keys on use1-a with their copy on usw2-a, the only cluster of the DR region (two copies, one
    in a DR region, and none acknowledged short of that)."""
    target = Cluster("usw2-a", "us-west-2", refusals)
    backends = {"use1-a": Cluster("use1-a", "us-east-1"), "usw2-a": target}
    topology = Topology("us-east-1", ("us-west-2",), {"us-east-1": ("use1-a",), "us-west-2": ("usw2-a",)})
    # A clock that stands still: an open circuit stays open (no cooldown passes), so what the test
    # sees of it is the router's doing, not a trial's.
    router = Router(topology, backends, SqliteStore(tmp_path / "p.db"), clock=FakeClock(),
                    replication=ReplicationPolicy(copies=2))
    changes: Changes = []  # what the gateway's listener hears: (cluster, state, cause)
    router.set_health_listener(lambda name, state, cause: changes.append((name, state, cause)))
    return router, target, changes


def _spec(n: int) -> KeySpec:
    return KeySpec(key_id=f"k/{n}", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id=f"r{n}")


def _refused(router: Router, n: int) -> Unavailable:
    with pytest.raises(Unavailable) as caught:
        router.generate_key(_spec(n), time.monotonic() + 5)
    assert status.code_for(caught.value) is grpc.StatusCode.UNAVAILABLE
    assert router.store.get(f"k/{n}") is None, "a refused creation leaves no record"
    return caught.value


def test_a_busy_copy_target_stays_in_placement_however_many_times_in_a_row_it_is_busy(tmp_path) -> None:
    """Ten busy answers in a row, more than three times the run that opens a down cluster's
    circuit (fewer than the 20 calls its failure rate needs): each GenerateKey still asks usw2-a
    for its copy, and the first once usw2-a takes it is made with both copies."""
    answers: list[RouterError | None] = [busy() for _ in range(10)] + [None]
    router, target, changes = _router(tmp_path, lambda: answers.pop(0))
    for n in range(10):
        refused = _refused(router, n)
        assert refused.message == (f"cannot copy key 'k/{n}' to cluster usw2-a (cluster usw2-a is busy); "
                                   "nothing was created")
        assert refused.cluster == "usw2-a"
        assert router.breakers["usw2-a"].state is CircuitState.CLOSED, f"busy answer {n + 1} opened the circuit"
    assert target.copies_asked == 10

    made = router.generate_key(_spec(10), time.monotonic() + 5)
    assert (made.state, made.primary, made.replicas) == (KeyState.ENABLED, "use1-a", ("usw2-a",))
    assert target.copies_asked == 11
    assert changes == []


def test_a_copy_target_that_is_down_three_times_in_a_row_is_taken_out_of_placement(tmp_path) -> None:
    """Three copies that fail with the cluster down open its circuit, which names the HSM's error;
    the next GenerateKey is refused before any key is made, and says why."""
    router, target, changes = _router(tmp_path, down)
    for n in range(3):
        refused = _refused(router, n)
        assert refused.message == (f"cannot copy key 'k/{n}' to cluster usw2-a (cluster usw2-a is not reachable "
                                   "(DeviceError)); nothing was created")
        assert refused.cluster == "usw2-a"
        expected = CircuitState.OPEN if n == 2 else CircuitState.CLOSED
        assert router.breakers["usw2-a"].state is expected, f"after {n + 1} failures"
    assert changes == [("usw2-a", CircuitState.OPEN, "CKR_DEVICE_ERROR")]
    assert not router.breakers["usw2-a"].busy
    assert router.backends["use1-a"].destroyed == ["k/0", "k/1", "k/2"], "each primary's key rolled back"

    refused = _refused(router, 3)
    assert refused.message == ("cannot place 2 copies of 'k/3' with one in a DR region: not enough healthy "
                               "clusters; nothing was created")
    assert target.copies_asked == 3, "a copy was sent to a cluster whose circuit is open"
    assert router.backends["use1-a"].destroyed == ["k/0", "k/1", "k/2"], "a key was made before it was refused"
