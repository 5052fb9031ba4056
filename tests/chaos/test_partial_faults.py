"""Faults that hit every cluster, or some of a key's clusters, in part: what callers see.

A real gateway on SoftHSM through the fault module (3 clusters: use1-a, use1-b in
us-east-1, usw2-a in us-west-2), concurrent clients signing with replicated keys.
The tests count answers by status, never time them.
"""

from __future__ import annotations

import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2_grpc
from hsmgw.v1 import crypto_pb2 as pb
from tests.chaos.conftest import Load, make_keys
from tests.support import destroy_copy, wait_for

REGION = {"use1-a": "us-east-1", "use1-b": "us-east-1", "usw2-a": "us-west-2"}


def _status(target: str) -> admin_pb2.StatusResponse:
    with grpc.insecure_channel(target) as ch:
        return admin_pb2_grpc.AdminServiceStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)


def _circuits(target: str) -> dict[str, str]:
    with grpc.insecure_channel(target) as ch:
        listed = admin_pb2_grpc.AdminServiceStub(ch).ListClusters(admin_pb2.ListClustersRequest(), timeout=10)
    return {c.name: c.circuit for c in listed.clusters}


def _sign_error(target: str, key_id: str) -> tuple[grpc.StatusCode, str, dict[str, str], bool]:
    """Sign, expecting a failure: (code, reason, ErrorInfo metadata, has RetryInfo)."""
    with grpc.insecure_channel(target) as ch:
        try:
            crypto_pb2_grpc.CryptoServiceStub(ch).Sign(
                pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"\x04" * 32), timeout=5)
        except grpc.RpcError as exc:
            status = rpc_status.from_call(exc)
            assert status is not None, exc
            reason, metadata, retry = "", {}, False
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, metadata = info.reason, dict(info.metadata)
                retry |= detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
            return exc.code(), reason, metadata, retry
    raise AssertionError("the sign succeeded")


def test_a_minority_of_calls_failing_on_every_cluster_is_retried_not_refused(chaos) -> None:
    """CKR_DEVICE_ERROR on 30 % of every cluster's calls: each cluster still answers most
    calls, so its circuit stays closed (or, opened by a chance run, a request still goes to
    the cluster most likely to answer) and a failed call is retried on another cluster
    within the retry budget. Callers see few errors, not "no healthy cluster"."""
    fleet, control, gateway = chaos
    keys = [k.key_id for k in make_keys(gateway.target, "minority", 6)]
    before = _status(gateway.target)
    with Load(gateway.target, keys, clients=4) as load:
        time.sleep(0.5)
        fault_at = time.monotonic()
        control.set("*", "fail_ratio", "0.3", "device_error")
        time.sleep(8.0)
        cleared_at = time.monotonic()
        control.clear()
        time.sleep(0.5)
    after = _status(gateway.target)
    during = [o for o in load.snapshot() if o.start >= fault_at and o.start + o.latency <= cleared_at]
    failed = [o for o in during if o.error]
    print(f"\nMEASURED minority_device_errors_ok_share = {1 - len(failed) / max(1, len(during)):.4f} "
          f"({len(during)} signs, {after.retries - before.retries} retries, "
          f"{after.retries_refused - before.retries_refused} refused)")
    assert sum(s.faults for s in control.stats().values()) > 100, "the fault hardly fired"
    assert len(during) > 500, len(during)
    assert len(during) - len(failed) >= 0.9 * len(during), (
        f"{len(failed)} of {len(during)} signs failed: {sorted({o.error for o in failed})[:5]}")
    assert after.retries - before.retries > 0.2 * len(during) / 2, "failed calls were not retried elsewhere"
    assert [o.error for o in failed if "no healthy cluster" in o.error] == []
    # What was left when the budget ran out: a cluster's failure (HSM_BUSY: a key search the fault cut short).
    assert {o.reason for o in failed} <= {"CLUSTER_DOWN", "UNAVAILABLE", "HSM_BUSY"}, {o.reason for o in failed}
    assert [o.error for o in failed if not o.where] == [], "an error that names no cluster"


def test_throttling_on_every_cluster_answers_resource_exhausted_with_retry_info(chaos) -> None:
    """Every HSM answers CKR_FUNCTION_FAILED (busy): alive, but with no capacity. Callers
    are told to come back later (RESOURCE_EXHAUSTED with RetryInfo) for as long as it
    lasts, not UNAVAILABLE once circuits have opened; and the clusters serve as soon as
    the HSMs have capacity again."""
    fleet, control, gateway = chaos
    keys = [k.key_id for k in make_keys(gateway.target, "busy-all", 6)]
    with Load(gateway.target, keys, clients=4) as load:
        time.sleep(0.5)
        fault_at = time.monotonic()
        control.set("*", "function_failed")
        time.sleep(4.0)
        during = _circuits(gateway.target)
        cleared_at = time.monotonic()
        control.clear()
        time.sleep(3.0)
    outcomes = load.snapshot()
    busy = [o for o in outcomes if o.start >= fault_at + 0.1 and o.start + o.latency <= cleared_at]
    assert len(busy) > 50, len(busy)
    assert all(o.error for o in busy), "a sign succeeded while every HSM was busy"
    codes = {o.error.split(":")[0] for o in busy}
    assert codes == {"RESOURCE_EXHAUSTED"}, sorted({o.error for o in busy if "RESOURCE_EXHAUSTED" not in o.error})[:5]
    assert all(o.retry for o in busy), "RESOURCE_EXHAUSTED without RetryInfo"
    assert {o.reason for o in busy} == {"HSM_BUSY"}, {o.reason for o in busy}
    assert all(o.where in REGION for o in busy)
    assert set(during.values()) <= {"closed", "open", "half-open"}
    later = [o for o in outcomes if o.start >= cleared_at + 2.5]
    assert later and not [o for o in later if o.error], "the clusters did not serve again once not busy"


def test_key_out_of_reach_names_the_cluster_that_could_not_answer(chaos) -> None:
    """The key's copy is missing on one of its clusters, and the other fails: the answer is
    KEY_OUT_OF_REACH naming the failing cluster (the one that may hold the key), not the
    one that lacks it, before and after the failing cluster's circuit opens."""
    fleet, control, gateway = chaos
    key = make_keys(gateway.target, "reach", 1)[0]
    holder = key.primary_cluster
    (lacking,) = key.replicas
    assert destroy_copy(fleet, lacking, key.key_id) == 2
    control.set(holder, "device_error")
    seen = [_sign_error(gateway.target, key.key_id) for _ in range(6)]
    wait_for(lambda: _circuits(gateway.target)[holder] == "open", what=f"{holder}'s circuit to open")
    seen.append(_sign_error(gateway.target, key.key_id))
    for code, reason, metadata, retry in seen:
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "KEY_OUT_OF_REACH"), (code, reason, metadata)
        assert metadata.get("cluster") == holder and metadata.get("region") == REGION[holder], metadata
        assert retry


def test_every_cluster_down_names_the_last_cluster_tried(chaos) -> None:
    """Every HSM fails: UNAVAILABLE names a cluster and its region, while the circuits are
    still closed (the last cluster tried) and once they are all open (the last candidate)."""
    fleet, control, gateway = chaos
    key = make_keys(gateway.target, "all-down", 1)[0]
    last = key.replicas[-1]
    control.set("*", "device_error")
    first = _sign_error(gateway.target, key.key_id)
    wait_for(lambda: set(_circuits(gateway.target).values()) == {"open"}, what="every circuit to open")
    # Once every circuit is open: refused at once, naming the last candidate, or (while a
    # cluster's last calls still include successes) failed on the one most likely to answer.
    refused = [_sign_error(gateway.target, key.key_id) for _ in range(30)]
    code, reason, metadata, retry = first
    assert (code, metadata.get("cluster"), metadata.get("region")) == (
        grpc.StatusCode.UNAVAILABLE, last, REGION[last]), (reason, metadata)
    for code, reason, metadata, retry in refused:
        assert code is grpc.StatusCode.UNAVAILABLE, (code, reason, metadata)
        assert metadata.get("cluster") in (key.primary_cluster, *key.replicas), (reason, metadata)
        assert metadata.get("region") == REGION[metadata["cluster"]] and retry, (reason, metadata)
    assert refused[-1][1:3] == ("UNAVAILABLE", {"cluster": last, "region": REGION[last]}), refused[-1]
