"""Clusters have key limits; placement respects them and says so when all are full."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.fleet import init_fleet
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2_grpc
from hsmgw.v1 import crypto_pb2 as pb
from tests.support import rpc_error, running


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory):
    return init_fleet(tmp_path_factory.mktemp("small"), listen="127.0.0.1:0", max_keys=3, pool_size=2, copies=1)


def test_tenth_key_fails_when_every_cluster_holds_three(small_fleet) -> None:
    with running(small_fleet.config_path) as gw, grpc.insecure_channel(gw.target) as channel:
        crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        made = []
        for i in range(9):
            key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=f"r{i}", key_id=f"lim/k{i}",
                                                           algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
            made.append(key)
        # Home region first; the DR region takes keys only once the home region is full.
        first_six = {k.primary_cluster for k in made[:6]}
        assert first_six == {"use1-a", "use1-b"}
        assert {k.primary_cluster for k in made[6:]} == {"usw2-a"}

        err = rpc_error(crypto.GenerateKey, pb.GenerateKeyRequest(request_id="r9", key_id="lim/k9",
                                                                  algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "key limit" in err.details()
        reasons = []
        for detail in rpc_status.from_call(err).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append((info.domain, info.reason))
        assert reasons == [("hsmgw", "RESOURCE_EXHAUSTED")]

        # Nothing half-created: no record, no objects counted anywhere.
        assert rpc_error(crypto.GetKey, pb.GetKeyRequest(key_id="lim/k9"), timeout=10).code() == \
            grpc.StatusCode.NOT_FOUND
        listed = crypto.ListKeys(pb.ListKeysRequest(prefix="lim/"), timeout=10).keys
        assert sorted(k.key_id for k in listed) == [f"lim/k{i}" for i in range(9)]
        assert all(k.state == pb.KEY_STATE_ENABLED for k in listed)
        clusters = admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10).clusters
        assert {c.name: (c.keys, c.max_keys) for c in clusters} == {
            "use1-a": (3, 3), "use1-b": (3, 3), "usw2-a": (3, 3)}

        # Destroying a key frees its slot.
        freed = crypto.DestroyKey(pb.DestroyKeyRequest(key_id="lim/k0"), timeout=30)
        again = crypto.GenerateKey(pb.GenerateKeyRequest(request_id="r10", key_id="lim/k10",
                                                         algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
        assert again.primary_cluster == freed.primary_cluster
