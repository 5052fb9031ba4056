"""A corrupt EXTERNAL key record, called again and again, on real tokens behind faultmod.

Every PKCS #11 call the gateway makes is traced (FAULTMOD_TRACE) into its log: the tests count
the C_UnwrapKey calls each gRPC call caused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from gateway.config import load
from gateway.fleet import Fleet
from gateway.status import error_info
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router.placement.sqlite import SqliteStore
from tests.chaos.conftest import faulty_fleet
from tests.faults import FaultControl
from tests.moto import free_port
from tests.support import GatewayProcess, scrape, unique, value, wait_for

DIGEST = bytes(range(32))


@dataclasses.dataclass
class Traced:
    fleet: Fleet
    control: FaultControl
    gateway: GatewayProcess
    crypto: crypto_pb2_grpc.CryptoServiceStub
    store: SqliteStore
    metrics_port: int

    def calls(self, name: str) -> int:
        """PKCS #11 calls ``name`` the gateway made so far."""
        return len(re.findall(rf"^faultmod-trace: {name} ", self.gateway.log(), flags=re.M))

    def sign(self, key_id: str) -> tuple[str, int]:
        """Sign with the key: the answer's reason ("OK" or its ErrorInfo reason) and the unwraps it cost."""
        before = self.calls("C_UnwrapKey")
        try:
            self.crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST),
                             timeout=10)
            reason = "OK"
        except grpc.RpcError as err:
            info = error_info(rpc_status.from_call(err))
            reason = info.reason if info else err.code().name
        return reason, self.calls("C_UnwrapKey") - before

    def corrupt_copy(self, source: str) -> str:
        """A new record with ``source``'s, its wrapped key cut short (as a store writer adds one)."""
        key_id = unique("ext-corrupt")
        record = self.store.get(source)
        assert record is not None
        self.store.create(dataclasses.replace(record, key_id=key_id, request_id=key_id, version=1,
                                              wrapped=record.wrapped[:-8]))
        return key_id


@pytest.fixture
def traced(tmp_path: Path, faultmod: Path) -> Iterator[Traced]:
    port = free_port()
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod, extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    gateway = GatewayProcess(fleet.config_path, env={"FAULTMOD_TRACE": "1"}).start()
    store = SqliteStore(load(fleet.config_path).store_path())
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            yield Traced(fleet, control, gateway, crypto_pb2_grpc.CryptoServiceStub(channel), store, port)
    finally:
        control.clear()
        gateway.stop()
        store.close()


def _external_key(traced: Traced) -> str:
    key_id = unique("ext")
    traced.crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                    algorithm=pb.KEY_ALGORITHM_EC_P256,
                                                    storage=pb.KEY_STORAGE_EXTERNAL), timeout=30)
    return key_id


def test_a_corrupt_record_retried_costs_the_hsms_nothing_and_its_repair_serves(traced: Traced) -> None:
    genuine = _external_key(traced)
    corrupt = traced.corrupt_copy(genuine)

    reason, unwraps = traced.sign(corrupt)
    assert reason == "KEY_RECORD_MISMATCH" and unwraps >= 3 * 3, unwraps  # each cluster: the record's twice, its own
    for _ in range(5):
        assert traced.sign(corrupt) == ("KEY_RECORD_MISMATCH", 0)

    record = traced.store.get(corrupt)
    assert record is not None
    traced.store.update(dataclasses.replace(record, wrapped=traced.store.get(genuine).wrapped))  # restored
    # Served as soon as the gateway reads the new version (its placement refresh), long before 30 s.
    wait_for(lambda: traced.sign(corrupt)[0] == "OK", timeout=10, what="the restored record to serve")


def test_a_cluster_that_fails_its_own_unwrap_check_leaves_no_refusal_behind(traced: Traced) -> None:
    """Every cluster's check of itself fails (its key generation): the call is not the record's
    fault, and once the clusters are sound the next call asks them again."""
    corrupt = traced.corrupt_copy(_external_key(traced))
    traced.control.set("*", "general_error", on="C_GenerateKey")
    reason, unwraps = traced.sign(corrupt)
    assert reason != "KEY_RECORD_MISMATCH" and unwraps > 0, reason
    traced.control.clear()

    def refused_by_the_clusters() -> bool:
        reason, unwraps = traced.sign(corrupt)  # UNAVAILABLE while a circuit the failures opened cools down
        assert reason in ("KEY_RECORD_MISMATCH", "UNAVAILABLE", "CLUSTER_DOWN"), reason
        return reason == "KEY_RECORD_MISMATCH" and unwraps > 0

    wait_for(refused_by_the_clusters, timeout=15, what="the clusters to be asked again and refuse the record")


def test_a_session_whose_check_key_cannot_be_destroyed_is_replaced_and_the_answer_stands(traced: Traced) -> None:
    """The check's own key is wrapped and unwrapped, then its destroy fails: the record is still
    the one at fault, and the session that holds the key is closed (taking it along) and replaced."""
    corrupt = traced.corrupt_copy(_external_key(traced))
    opened = traced.calls("C_OpenSession")
    traced.control.set("*", "device_error", on="C_DestroyObject")
    assert traced.sign(corrupt)[0] == "KEY_RECORD_MISMATCH"
    traced.control.clear()

    def pools_whole() -> bool:
        samples = scrape(traced.metrics_port)
        clusters = ("use1-a", "use1-b", "usw2-a")
        return all(value(samples, "hsmgw_pool_sessions_open", cluster=c) == value(samples, "hsmgw_pool_size", cluster=c)
                   and value(samples, "hsmgw_pool_sessions_in_use", cluster=c) == 0 for c in clusters)

    wait_for(pools_whole, timeout=10, what="every pool to be whole again")
    assert traced.calls("C_OpenSession") - opened == 3, "one session replaced on each cluster"
    assert traced.sign(corrupt) == ("KEY_RECORD_MISMATCH", 0)
