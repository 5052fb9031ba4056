"""Disaster recovery under load: faults at the PKCS #11 boundary, killed processes.

Each test runs 8 concurrent clients signing with replicated keys (primary in
us-east-1, a copy in us-west-2) against a real gateway whose PKCS #11 module
injects the fault. Measured times are printed (run with -s) and written to
``$HSMGW_CHAOS_REPORT`` when set; docs/failover.md records a run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.client import Client
from gateway.fleet import find_module
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2_grpc
from hsmgw.v1 import crypto_pb2 as pb
from router.model import ClusterSpec
from tests.chaos.conftest import Load, faulty_fleet, make_keys, p99
from tests.support import ROOT, GatewayProcess, wait_for

MEASURED: dict[str, float] = {}


def _record(name: str, value: float) -> None:
    MEASURED[name] = round(value, 4)
    print(f"\nMEASURED {name} = {value:.4f}")
    report = os.environ.get("HSMGW_CHAOS_REPORT")
    if report:
        existing = json.loads(Path(report).read_text()) if Path(report).exists() else {}
        existing[name] = round(value, 4)
        Path(report).write_text(json.dumps(existing, indent=2, sort_keys=True))


def _status(target: str) -> admin_pb2.StatusResponse:
    with grpc.insecure_channel(target) as ch:
        return admin_pb2_grpc.AdminServiceStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)


def test_cluster_device_error_moves_traffic_to_replicas_and_back(chaos) -> None:
    fleet, control, gateway = chaos
    keys = make_keys(gateway.target, "dev-err", 6)
    down = keys[0].primary_cluster
    on_down = [k.key_id for k in keys if k.primary_cluster == down]
    with Load(gateway.target, on_down) as load:
        time.sleep(1.0)
        fault_at = time.monotonic()
        control.set(down, "device_error")
        time.sleep(3.0)
        moved = [o for o in load.snapshot() if o.start >= fault_at and o.cluster and o.cluster != down]
        assert moved, "no request was served by a replica"
        _record("cluster_down_first_replica_answer_s", moved[0].start + moved[0].latency - fault_at)
        assert moved[0].start + moved[0].latency - fault_at < 1.0
        recover_at = time.monotonic()
        control.clear(down)
        deadline = time.monotonic() + 15
        back = []
        while time.monotonic() < deadline and not back:
            time.sleep(0.2)
            back = [o for o in load.snapshot() if o.start >= recover_at and o.cluster == down]
        assert back, "traffic did not return to the recovered cluster"
        _record("cluster_recovered_traffic_back_s", back[0].start - recover_at)
    assert load.errors() == []
    assert len(load.snapshot()) > 200


def test_whole_region_down_is_served_from_the_dr_region(chaos) -> None:
    fleet, control, gateway = chaos
    keys = [k.key_id for k in make_keys(gateway.target, "region", 6)]
    with Load(gateway.target, keys) as load:
        time.sleep(1.0)
        fault_at = time.monotonic()
        control.set("use1-a", "device_error")
        control.set("use1-b", "device_error")
        time.sleep(4.0)
    switch = [o for o in load.snapshot() if fault_at <= o.start <= fault_at + 2.0]
    assert load.errors() == []
    assert {o.cluster for o in load.snapshot() if o.start > fault_at + 1.0} == {"usw2-a"}
    latency = p99([o.latency for o in switch])
    _record("region_down_p99_during_switch_s", latency)
    assert latency < 0.25


def test_throttling_on_one_cluster_is_absorbed_by_the_replica(chaos) -> None:
    fleet, control, gateway = chaos
    keys = make_keys(gateway.target, "throttle", 6)
    busy = keys[0].primary_cluster
    ids = [k.key_id for k in keys if k.primary_cluster == busy]
    before = _status(gateway.target)
    with Load(gateway.target, ids) as load:
        time.sleep(0.5)
        control.set(busy, "fail_ratio", "0.5", "function_failed")
        time.sleep(4.0)
        control.clear(busy)
    after = _status(gateway.target)
    requests = len(load.snapshot())
    retries = after.retries - before.retries
    assert load.errors() == []
    _record("throttle_retries_per_request", retries / requests)
    # The budget keeps extra attempts within 20 % of requests (plus its small floor).
    assert retries <= 0.2 * requests + 100, (retries, requests)


def _clusters(target: str) -> dict[str, admin_pb2.ClusterStatus]:
    with grpc.insecure_channel(target) as ch:
        listed = admin_pb2_grpc.AdminServiceStub(ch).ListClusters(admin_pb2.ListClustersRequest(), timeout=10)
    return {c.name: c for c in listed.clusters}


def test_a_hung_cluster_is_failed_over_and_taken_back_when_it_answers(chaos) -> None:
    """The HSM stops answering (no error, its calls just block): the calls inside it are
    lost to their deadline, every other request of its keys is answered by the replica,
    keys elsewhere see nothing, and the cluster serves again once its calls return."""
    fleet, control, gateway = chaos
    keys = make_keys(gateway.target, "hang", 6)
    down = keys[0].primary_cluster
    on_down = [k.key_id for k in keys if k.primary_cluster == down]
    elsewhere = [k.key_id for k in keys if down not in (k.primary_cluster, *k.replicas)]
    assert elsewhere, "every test key has a copy on the hung cluster"
    with grpc.insecure_channel(gateway.target) as ch:
        stub = crypto_pb2_grpc.CryptoServiceStub(ch)
        public = serialization.load_der_public_key(
            stub.GetPublicKey(pb.GetPublicKeyRequest(key_id=on_down[0]), timeout=10).der)
    pool_size = _clusters(gateway.target)[down].pool_size
    with Load(gateway.target, on_down) as load, Load(gateway.target, elsewhere) as others:
        time.sleep(1.0)
        hung_at = time.monotonic()
        control.set(down, "hang")
        time.sleep(ClusterSpec.call_timeout + 1.5)
        during = _clusters(gateway.target)[down]
        table = subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", gateway.target, "clusters"],
                               cwd=ROOT, capture_output=True, text=True, timeout=30)
        with grpc.insecure_channel(gateway.target) as ch:
            resp = crypto_pb2_grpc.CryptoServiceStub(ch).Sign(
                pb.SignRequest(key_id=on_down[0], algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"\x07" * 32),
                timeout=5)
        time.sleep(1.0)
        control.clear(down)
        cleared_at = time.monotonic()
        back: list = []
        end = time.monotonic() + 15
        while time.monotonic() < end and not back:
            time.sleep(0.2)
            back = [o for o in load.snapshot() if o.start >= cleared_at and o.cluster == down]
    assert back, "traffic did not return to the cluster once it answered"

    assert during.calls_hung == pool_size, during
    row = next(line for line in table.stdout.splitlines() if line.startswith(down))
    assert "NOT_SERVING" in row and row.endswith(f"{pool_size} calls hung"), table.stdout + table.stderr
    assert during.health == "NOT_SERVING" and during.circuit == "open", during
    assert resp.cluster != down
    public.verify(resp.signature, b"\x07" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))

    # Lost: only the calls that were inside the HSM when it hung (one per session).
    errors = load.errors()
    assert len(errors) <= pool_size, errors
    assert all(e.startswith("DEADLINE_EXCEEDED") for e in errors), errors
    served = [o for o in load.snapshot() if o.start > hung_at and o.cluster and o.cluster != down]
    assert len(served) > 100, "the replica answered too little while the cluster hung"
    _record("hung_cluster_first_replica_answer_s", min(o.start + o.latency for o in served) - hung_at)
    assert others.errors() == [], "keys with no copy on the hung cluster were disturbed"
    assert {o.cluster for o in others.snapshot()} <= {c for k in keys for c in (k.primary_cluster, *k.replicas)
                                                      if c != down}

    after = _clusters(gateway.target)[down]
    assert after.calls_hung == 0 and after.health == "SERVING", after
    # Logged at the watchdog's first look past the first call's time: the others may be due a moment later.
    logged = re.search(rf"cluster {down}: (\d+) PKCS #11 call\(s\) have not returned", gateway.log())
    assert logged and 1 <= int(logged.group(1)) <= pool_size, gateway.log_digest()
    end = time.monotonic() + 5  # the watchdog's next look
    while "calls have returned" not in gateway.log() and time.monotonic() < end:
        time.sleep(0.1)
    assert f"cluster {down}: its hung PKCS #11 calls have returned" in gateway.log()


def test_a_key_with_no_other_copy_on_a_hung_cluster_is_refused_not_left_to_time_out(chaos) -> None:
    """Nowhere to fail over to: only the calls inside the HSM wait out their deadline. A
    request waiting for one of its sessions is refused once those calls are late
    (RESOURCE_EXHAUSTED, SESSIONS_BUSY, with RetryInfo); once the circuit is open, at once
    (UNAVAILABLE)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    fleet, control, gateway = chaos
    with grpc.insecure_channel(gateway.target) as ch:
        stub = crypto_pb2_grpc.CryptoServiceStub(ch)
        single = stub.GenerateKey(pb.GenerateKeyRequest(request_id="hang-single", key_id="hang/single",
                                                        algorithm=pb.KEY_ALGORITHM_EC_P256,
                                                        replication=pb.ReplicationPolicy(copies=1)), timeout=30)
    assert list(single.replicas) == []
    down = single.primary_cluster
    pool_size = _clusters(gateway.target)[down].pool_size
    request = pb.SignRequest(key_id=single.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"\x05" * 32)

    def details(exc: grpc.RpcError) -> tuple[str, bool]:
        status = rpc_status.from_call(exc)
        assert status is not None, exc
        reasons = []
        retry = False
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reasons.append(info.reason)
            retry |= detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        return reasons[0], retry

    try:
        with Load(gateway.target, [single.key_id]) as load, grpc.insecure_channel(gateway.target) as ch:
            stub = crypto_pb2_grpc.CryptoServiceStub(ch)
            time.sleep(1.0)
            hung_at = time.monotonic()
            control.set(down, "hang")
            time.sleep(0.5)  # every session now holds a call that will not return
            with pytest.raises(grpc.RpcError) as waited:
                stub.Sign(request, timeout=8)
            waited_s = time.monotonic() - hung_at - 0.5
            time.sleep(1.0)  # the watchdog has opened the circuit
            with pytest.raises(grpc.RpcError) as refused:
                stub.Sign(request, timeout=8)
            time.sleep(0.5)
    finally:
        control.clear(down)

    assert waited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, waited.value.details()
    assert details(waited.value) == ("SESSIONS_BUSY", True)
    assert f"all {pool_size} sessions of cluster {down} are busy: " in waited.value.details()
    assert "call(s) have not returned for" in waited.value.details()
    assert waited_s < 8 - 1, "the request waited toward its deadline"
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert details(refused.value)[0] == "UNAVAILABLE" and "no healthy cluster" in refused.value.details()
    timed_out = [e for e in load.errors() if e.startswith("DEADLINE_EXCEEDED")]
    assert len(timed_out) <= pool_size, load.errors()
    assert {e.split(":")[0] for e in load.errors()} <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}


def test_batches_fail_over_from_a_hung_cluster_item_by_item_intact(chaos) -> None:
    """BatchSign while one cluster hangs: a batch with items inside the HSM waits for them,
    and is lost to its deadline if the hang outlasts it; every other batch comes back
    whole, its hung cluster's items signed by the replica, and the cluster takes its
    items back once it answers."""
    fleet, control, gateway = chaos
    keys = make_keys(gateway.target, "batch-hang", 6)
    down = keys[0].primary_cluster
    ids = [k.key_id for k in keys]
    answered: list[tuple[float, list[tuple[int, str, str]]]] = []
    lost: list[str] = []
    stop = threading.Event()

    def client() -> None:
        request = pb.BatchSignRequest(requests=[
            pb.SignRequest(key_id=ids[i % len(ids)], algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"\x02" * 32)
            for i in range(64)])
        with grpc.insecure_channel(gateway.target) as ch:
            stub = crypto_pb2_grpc.CryptoServiceStub(ch)
            while not stop.is_set():
                start = time.monotonic()
                try:
                    resp = stub.BatchSign(request, timeout=5)
                    answered.append((start, [(r.code, item.key_id, r.response.cluster)
                                             for item, r in zip(request.requests, resp.responses, strict=True)]))
                except grpc.RpcError as exc:
                    lost.append(exc.code().name)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.0)
        hung_at = time.monotonic()
        control.set(down, "hang")
        time.sleep(5 + 1.5)  # past the batches' deadline: those inside the HSM are lost, others start
        clearing_at = time.monotonic()
        control.clear(down)
        cleared_at = time.monotonic()
        time.sleep(2.0)
    finally:
        control.clear(down)
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    _record("hung_cluster_batches_lost", len(lost))
    assert len(lost) <= 4 and set(lost) <= {"DEADLINE_EXCEEDED"}, lost
    assert all(code == 0 for _, items in answered for code, _, _ in items), "an item of an answered batch failed"
    primary = {k.key_id: k.primary_cluster for k in keys}
    moved = [cluster for start, items in answered if start > hung_at + ClusterSpec.call_timeout + 0.5
             and start < clearing_at - 0.5 for _, key_id, cluster in items if primary[key_id] == down]
    assert moved and down not in moved, "the hung cluster's items were not signed elsewhere"
    back = [cluster for start, items in answered if start > cleared_at + 1.0
            for _, key_id, cluster in items if primary[key_id] == down]
    assert down in back, "the cluster did not take its items back"


def test_a_gateway_stops_while_its_hsm_hangs(chaos) -> None:
    """SIGTERM while calls hang in an HSM: the gateway stops by itself (it does not wait
    for calls it cannot interrupt, nor for sessions the HSM will not close), exit 0."""
    fleet, control, gateway = chaos
    keys = make_keys(gateway.target, "stop-hung", 2)
    down = keys[0].primary_cluster
    control.set(down, "hang")
    try:
        with Load(gateway.target, [k.key_id for k in keys if k.primary_cluster == down], clients=6):
            end = time.monotonic() + 10
            while _clusters(gateway.target)[down].calls_hung == 0 and time.monotonic() < end:
                time.sleep(0.2)
            assert _clusters(gateway.target)[down].calls_hung > 0
            assert gateway.stop(timeout=40) == 0, "the gateway had to be killed"
    finally:
        control.clear(down)
    text = gateway.log()
    assert "fast-path call(s) still running" in text
    assert f"cluster {down}: sessions not closed after 5 s (the HSM is not answering)" in text
    assert "stopped" in text


def test_all_sessions_invalidated_at_once(chaos) -> None:
    fleet, control, gateway = chaos
    keys = make_keys(gateway.target, "stale", 6)
    with Load(gateway.target, [k.key_id for k in keys]) as load:
        time.sleep(0.5)
        for cluster in ("use1-a", "use1-b", "usw2-a"):
            control.set(cluster, "invalidate_sessions")
        time.sleep(2.0)
    assert load.errors() == []
    with grpc.insecure_channel(gateway.target) as ch:
        clusters = admin_pb2_grpc.AdminServiceStub(ch).ListClusters(admin_pb2.ListClustersRequest(), timeout=10)
    for cluster in clusters.clusters:
        assert cluster.sessions_open == cluster.pool_size, cluster
    stats = control.stats()
    assert sum(s.faults for s in stats.values()) > 0, "the fault never fired"


def test_gateway_killed_during_key_creation_loses_no_acknowledged_key(tmp_path, faultmod, tokens_for) -> None:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    gateway = GatewayProcess(fleet.config_path).start()
    acknowledged: dict[str, pb.Key] = {}
    attempts: dict[str, list[str]] = {}  # what each client saw, for the report of a failure
    lock = threading.Lock()
    requests = [(f"kill-{i}", f"kill/k{i:03d}") for i in range(200)]
    started = time.monotonic()

    def creator(chunk: list[tuple[str, str]]) -> None:
        for request_id, key_id in chunk:
            seen = attempts.setdefault(key_id, [])
            end = time.monotonic() + 60
            while time.monotonic() < end:
                seen.append(f"{time.monotonic() - started:.2f}s call")
                try:
                    with grpc.insecure_channel(gateway.target) as ch:
                        key = crypto_pb2_grpc.CryptoServiceStub(ch).GenerateKey(pb.GenerateKeyRequest(
                            request_id=request_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=10)
                    with lock:
                        acknowledged[key_id] = key
                    break
                except grpc.RpcError as exc:
                    seen.append(f"{time.monotonic() - started:.2f}s {exc.code().name}: {exc.details()}")
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
                    time.sleep(0.2)

    threads = [threading.Thread(target=creator, args=(requests[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    while len(acknowledged) < 60:
        time.sleep(0.05)
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait()
    gateway.start()  # same config, same port file; clients retry with their request ids
    for t in threads:
        t.join(timeout=120)
    try:
        missing = {key_id: attempts.get(key_id) for _, key_id in requests if key_id not in acknowledged}
        assert not missing, f"not acknowledged, with what each client saw: {missing}"
        with grpc.insecure_channel(gateway.target) as ch:
            stub = crypto_pb2_grpc.CryptoServiceStub(ch)
            for key_id in acknowledged:
                current = stub.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=10)
                assert current.state == pb.KEY_STATE_ENABLED
                assert "usw2-a" in current.replicas and len(current.replicas) >= 1
                signed = stub.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"),
                                   timeout=10)
                pem = stub.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).pem
                serialization.load_pem_public_key(pem.encode()).verify(signed.signature, b"m",
                                                                       ec.ECDSA(hashes.SHA256()))
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            time.sleep(3.5)  # past creation_grace: any intent left by the kill is stale now
            report = admin.Reconcile(admin_pb2.ReconcileRequest(), timeout=60)
            leftovers = [f for f in report.findings if f.kind in ("orphan", "stale_intent")]
            if leftovers:
                # Fix them (quorum of two dev admins) and check again.
                change = admin.Reconcile(admin_pb2.ReconcileRequest(fix=True), timeout=60,
                                         metadata=(("x-hsmgw-identity", "alice"),)).change
                admin.ApproveChange(admin_pb2.ApproveChangeRequest(id=change.id), timeout=60,
                                    metadata=(("x-hsmgw-identity", "bob"),))
                report = admin.Reconcile(admin_pb2.ReconcileRequest(), timeout=60)
            assert [f for f in report.findings if f.kind in ("orphan", "stale_intent", "missing", "duplicate")] == []
        # Every acknowledged key is on its clusters' tokens.
        for key_id, key in list(acknowledged.items())[:20]:
            for cluster in (key.primary_cluster, *key.replicas):
                assert tokens_for(fleet, cluster, key_id) == 2
    finally:
        gateway.stop()


def test_client_fails_over_to_the_other_regional_gateway(tmp_path, faultmod) -> None:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    east = GatewayProcess(fleet.config_path).start()
    west_config = fleet.config_path.with_name("west.toml")
    text = fleet.config_path.read_text()
    text = text.replace('home_region = "us-east-1"', 'home_region = "us-west-2"')
    text = text.replace('dr_regions = ["us-west-2"]', 'dr_regions = ["us-east-1"]')
    west_config.write_text(text)
    west = GatewayProcess(west_config).start()
    try:
        keys = [k.key_id for k in make_keys(east.target, "regional", 4)]
        client = Client([east.target, west.target], timeout=5)
        for key_id in keys:
            assert client.sign(key_id, b"\x02" * 32).cluster
        east.proc.send_signal(signal.SIGKILL)
        east.proc.wait()
        killed_at = time.monotonic()
        first = None
        for i in range(1000):
            resp = client.sign(keys[i % len(keys)], b"\x03" * 32)
            assert resp.signature
            if first is None:
                first = time.monotonic() - killed_at
        assert client.endpoint == west.target and client.failovers == 1
        _record("regional_client_failover_first_answer_s", first or 0.0)
    finally:
        east.stop()
        west.stop()


def test_a_key_whose_clusters_fail_at_one_gateway_sends_only_its_own_calls_to_the_next(tmp_path, faultmod) -> None:
    """The near gateway's HSM calls go through the fault module, the far one's do not. A key whose
    every cluster fails at the near gateway is signed by the far one, call by call, but the client
    stays on the near gateway for every other key: it used to move to the far region for 30 s on
    each such call. Once no cluster serves at the near gateway (grpc.health.v1 says so), it moves."""
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    near = GatewayProcess(fleet.config_path).start()
    far_config = fleet.config_path.with_name("far.toml")
    far_config.write_text(fleet.config_path.read_text().replace(f'module = "{faultmod}"',
                                                                f'module = "{find_module()}"'))
    far = GatewayProcess(far_config).start()
    try:
        keys = make_keys(near.target, "scoped", 8)
        cut = {"use1-a", "usw2-a"}
        lost = next(k for k in keys if {k.primary_cluster, *k.replicas} <= cut)
        kept = next(k for k in keys if not {k.primary_cluster, *k.replicas} <= cut)
        for cluster in cut:
            control.set(cluster, "device_error")
        public = serialization.load_der_public_key(_public_der(far.target, lost.key_id))
        with Client([near.target, far.target], timeout=10) as client:
            for i in range(6):
                digest = bytes([i]) * 32
                signed = client.sign(lost.key_id, digest)
                public.verify(signed.signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # type: ignore[call-arg]
                assert client.sign(kept.key_id, digest).cluster == "use1-b"
                assert (client.endpoint, client.failovers) == (near.target, 0)

            control.set("use1-b", "device_error")
            with grpc.insecure_channel(near.target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="hsmgw.v1.CryptoService"),
                                              timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING,
                         timeout=30, what="the near gateway NOT_SERVING")
            time.sleep(1.0)  # past the client's ask interval
            assert client.sign(lost.key_id, b"\x06" * 32).signature
            wait_for(lambda: client.endpoint == far.target, timeout=10, what="the client on the far gateway")
            assert client.failovers == 1
    finally:
        near.stop()
        far.stop()


def _public_der(target: str, key_id: str) -> bytes:
    with grpc.insecure_channel(target) as channel:
        reply = crypto_pb2_grpc.CryptoServiceStub(channel).GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id),
                                                                         timeout=10)
    return bytes(reply.der)


def test_clients_see_no_error_while_a_gateway_shuts_down_gracefully(tmp_path) -> None:
    """A rolling update: SIGTERM to one of two gateways while 16 clients sign through both
    (`gateway.client.Client`). grpc cancels the calls still queued when the server stops
    (CANCELLED, not UNAVAILABLE); the client tries those on the next gateway too."""
    from gateway.fleet import init_fleet

    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    leaving = GatewayProcess(fleet.config_path, workers=2).start()
    staying = GatewayProcess(fleet.config_path).start()
    try:
        key_id = make_keys(leaving.target, "rolling", 1)[0].key_id
        with Client([leaving.target]) as probe:
            public = serialization.load_pem_public_key(probe.public_key_pem(key_id).encode())
        stop = threading.Event()
        errors: list[str] = []
        signed = [0] * 16

        def sign(i: int) -> None:
            with Client([leaving.target, staying.target], timeout=10) as client:
                while not stop.is_set():
                    digest = os.urandom(32)
                    try:
                        signature = client.sign(key_id, digest).signature
                        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
                        signed[i] += 1
                    except Exception as exc:  # noqa: BLE001 - every error is what the test looks for
                        errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=sign, args=(i,), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            before = sum(signed)
            assert leaving.stop(signal.SIGTERM, timeout=30) == 0
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert errors == [], errors[:5]
        assert sum(signed) > before + 50, "signing went on through the other gateway"
    finally:
        leaving.stop()
        staying.stop()


def test_health_service_reports_clusters_and_regions(chaos) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    fleet, control, gateway = chaos
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(gateway.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def check(name: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

        assert check("hsmgw.cluster.use1-a") == serving and check("hsmgw.region.us-east-1") == serving
        control.set("use1-a", "device_error")
        end = time.monotonic() + 5
        while check("hsmgw.cluster.use1-a") != not_serving and time.monotonic() < end:
            time.sleep(0.1)
        assert check("hsmgw.cluster.use1-a") == not_serving
        assert check("hsmgw.region.us-east-1") == serving, "use1-b still serves the region"
        control.set("use1-b", "device_error")
        end = time.monotonic() + 5
        while check("hsmgw.region.us-east-1") != not_serving and time.monotonic() < end:
            time.sleep(0.1)
        assert check("hsmgw.region.us-east-1") == not_serving
        assert check("") == serving, "the gateway itself still serves (from the DR region)"
        control.clear()
        end = time.monotonic() + 10
        while check("hsmgw.region.us-east-1") != serving and time.monotonic() < end:
            time.sleep(0.1)
        assert check("hsmgw.cluster.use1-a") == serving and check("hsmgw.region.us-east-1") == serving
