"""The gateway's report-only reconcile: a replica that lost its copy of a key on its HSM
shows in the log and in /metrics while the gateway serves, and nothing is changed."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from gateway.fleet import init_fleet
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.moto import free_port
from tests.support import GatewayProcess, count_copy, destroy_copy, plant_foreign_key, scrape, value, wait_for


def test_a_lost_replica_copy_is_reported_while_serving_and_nothing_changes(tmp_path: Path) -> None:
    """Then another application's key pair under the key's id on the third cluster: a ``foreign``
    finding (an ERROR naming it), not an orphan, and it stays."""
    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    metrics_port = free_port()
    text = fleet.config_path.read_text().replace("[replication]\n", "[replication]\nreconcile_interval = 1.0\n", 1)
    fleet.config_path.write_text(text + f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    gateway = GatewayProcess(fleet.config_path).start()
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
            key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id="r-1", key_id="audit/k1",
                                                           algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
            wait_for(lambda: "the placement store and every token agree" in gateway.log(), timeout=20,
                     what="a first report-only reconcile")
            clean = scrape(metrics_port)
            first = value(clean, "hsmgw_reconcile_last_run_timestamp_seconds")
            assert value(clean, "hsmgw_reconcile_findings", kind="missing") == 0

            lost = key.replicas[0]
            assert destroy_copy(fleet, lost, key.key_id) == 2  # its private and public key objects
            wait_for(lambda: value(scrape(metrics_port), "hsmgw_reconcile_findings", kind="missing") == 1,
                     timeout=20, what="the lost copy in hsmgw_reconcile_findings")
            later = scrape(metrics_port)
            assert value(later, "hsmgw_reconcile_last_run_timestamp_seconds") > first
            for kind in ("orphan", "foreign", "unknown", "duplicate", "stale_intent", "unreachable"):
                assert value(later, "hsmgw_reconcile_findings", kind=kind) == 0, kind
            assert ("reconcile (report only): 0 unfinished creations, 0 orphan objects, 0 objects no record "
                    "names, 1 missing copies "
                    "(1 a fix would drop from their records), 0 duplicate objects, 0 unreachable clusters"
                    ) in gateway.log()

            time.sleep(2.5)  # more passes: still only reported
            after = crypto.GetKey(pb.GetKeyRequest(key_id=key.key_id), timeout=10)
            assert (after.primary_cluster, list(after.replicas), after.state) == (
                key.primary_cluster, list(key.replicas), pb.KEY_STATE_ENABLED), "a report-only pass changed the key"
            signed = crypto.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                                digest=bytes(32)), timeout=10)
            assert signed.cluster == key.primary_cluster

            [third] = {"use1-a", "use1-b", "usw2-a"} - {key.primary_cluster, *key.replicas}
            plant_foreign_key(fleet, third, key.key_id)
            wait_for(lambda: value(scrape(metrics_port), "hsmgw_reconcile_findings", kind="foreign") == 1,
                     timeout=20, what="another application's key in hsmgw_reconcile_findings")
            assert value(scrape(metrics_port), "hsmgw_reconcile_findings", kind="orphan") == 0
            assert (f"ERROR router.reconcile: reconcile: cluster {third} holds 2 object(s) under key id "
                    f"{key.key_id!r} that are not this key's") in gateway.log()
            assert "1 objects under keys' ids that are not the keys' (left alone" in gateway.log()
            time.sleep(2.5)
            assert count_copy(fleet, third, key.key_id) == 2
    finally:
        gateway.stop()


def test_the_start_up_reconcile_is_published_from_the_start(tmp_path: Path) -> None:
    """The last run's time is on /metrics as soon as the gateway serves, from the reconcile it
    ran at start, not an interval (an hour by default) later: an alert on its age must see a
    gateway whose report-only passes never finish."""
    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    metrics_port = free_port()
    fleet.config_path.write_text(fleet.config_path.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    before = time.time()
    gateway = GatewayProcess(fleet.config_path).start()
    try:
        samples = wait_for(lambda: scrape(metrics_port), timeout=20, what="/metrics")
        assert ("hsmgw_reconcile_last_run_timestamp_seconds", ()) in samples, "not published at start"
        assert before <= value(samples, "hsmgw_reconcile_last_run_timestamp_seconds") <= time.time()
        for kind in ("missing", "orphan", "foreign", "unknown", "duplicate", "stale_intent", "unreachable",
                     "other_fleet", "fleet_unread"):
            assert ("hsmgw_reconcile_findings", (("kind", kind),)) in samples, kind
            assert value(samples, "hsmgw_reconcile_findings", kind=kind) == 0, kind
        assert "reconcile (report only)" not in gateway.log(), "the interval is an hour: no pass has run"
    finally:
        gateway.stop()
