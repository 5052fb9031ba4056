"""A worker killed (SIGKILL) while it creates keys: the retries of those GenerateKey requests
finish them at once, each with one key, instead of waiting out creation_grace.

The HSM answers every call 500 ms late (faultmod ``latency``), so the creations are still
making their objects when their worker dies. creation_grace is 120 s and each retry has 20 s:
a retry that succeeds took the creation over because its process was gone, not because the
grace had passed.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import grpc

from gateway.client import Client
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import faulty_fleet
from tests.support import GatewayProcess, wait_for

CALLS = 4
GRACE = 120.0
RETRY_DEADLINE = 20.0
"""Each retry's whole time, the client's waits on KEY_BEING_CREATED included: a sixth of the grace."""
CLUSTERS = ("use1-a", "use1-b", "usw2-a")


def test_retries_finish_at_once_the_creations_of_a_worker_killed_while_making_them(
    tmp_path: Path, faultmod: Path, tokens_for
) -> None:
    from gateway.config import load
    from router.model import KeyState
    from router.placement.sqlite import SqliteStore

    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    text = fleet.config_path.read_text().replace("creation_grace = 3.0", f"creation_grace = {GRACE}")
    text = text.replace("probe_interval = 0.25\n", "probe_interval = 0.25\ndefault_deadline = 60.0\n")
    assert f"creation_grace = {GRACE}" in text and "default_deadline = 60.0" in text
    fleet.config_path.write_text(text)
    gateway = GatewayProcess(fleet.config_path, env={"FAULTMOD_TRACE": "1"}, workers=2).start()
    store = SqliteStore(load(fleet.config_path).store_path())
    requests = [(f"dead-{i}", f"dead/k{i}") for i in range(CALLS)]
    first: dict[str, str] = {}
    lock = threading.Lock()

    def create(request_id: str, key_id: str) -> None:
        with grpc.insecure_channel(gateway.target) as channel:
            try:
                crypto_pb2_grpc.CryptoServiceStub(channel).GenerateKey(
                    pb.GenerateKeyRequest(request_id=request_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256),
                    timeout=90)
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = exc.code().name
        with lock:
            first[key_id] = outcome

    def intents() -> list:  # type: ignore[type-arg]
        return [p for p in store.list(prefix="dead/") if p.state is KeyState.CREATING]

    def traced(call: str) -> int:
        return len(re.findall(rf"faultmod-trace: {call} ", gateway.log()))

    try:
        control.set("*", "latency", 500)
        threads = [threading.Thread(target=create, args=request, daemon=True) for request in requests]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(intents()) == CALLS, timeout=30, what="every creation to record its intent")
        # A key pair is being made: the killed attempts leave objects behind for the retries to clear.
        made = traced("C_GenerateKeyPair")
        wait_for(lambda: traced("C_GenerateKeyPair") > made, timeout=30, what="a creation to make a key pair")

        cut_off = intents()
        assert all(p.owner for p in cut_off), "an intent names no process making it"
        owners = {int(p.owner.split(":")[3]) for p in cut_off}
        assert gateway.proc is not None
        workers = [int(pid) for pid in Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children")
                   .read_text().split()]
        assert owners and owners <= set(workers), (owners, workers)
        for pid in owners:
            os.kill(pid, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(first.get(key_id, "") for _, key_id in requests if key_id in {p.key_id for p in cut_off}) \
            == ["UNAVAILABLE"] * len(cut_off), first
        control.clear()
        # The supervisor starts each killed worker again; the log then has one "serving" line more each.
        wait_for(lambda: gateway.log().count("exited with") == len(owners)
                 and gateway.log().count("(clusters: ") == len(workers) + len(owners),
                 timeout=60, what="the killed workers to serve again")
        assert [p.key_id for p in intents()] == [p.key_id for p in cut_off], "the intents are still there"

        answers: dict[str, pb.Key | str] = {}

        def retry(request_id: str, key_id: str) -> None:
            client = Client([gateway.target], timeout=RETRY_DEADLINE)
            try:
                answers[key_id] = client.generate_key(key_id, "EC_P256", request_id=request_id)
            except grpc.RpcError as exc:
                answers[key_id] = f"{exc.code().name}: {exc.details()}"
            finally:
                client.close()

        retries = [threading.Thread(target=retry, args=request) for request in requests]
        for thread in retries:
            thread.start()
        for thread in retries:
            thread.join(timeout=RETRY_DEADLINE + 30)

        failed = {key_id: answer for key_id, answer in answers.items() if isinstance(answer, str)}
        assert len(answers) == CALLS and not failed, f"{failed}\n{gateway.log_digest()}"
        log = gateway.log()
        for intent in cut_off:
            assert re.search(rf"key {re.escape(intent.key_id)}: the process that was making it "
                             rf"\(pid {intent.owner.split(':')[3]}\) is gone", log), gateway.log_digest()
        for _, key_id in requests:
            key = answers[key_id]
            assert isinstance(key, pb.Key) and key.state == pb.KEY_STATE_ENABLED, key
            holders = {key.primary_cluster, *key.replicas}
            assert len(holders) == 2, key
            # One key pair where the record says, nothing anywhere else: the killed attempt's
            # half-made objects were cleared before the retry made the key.
            assert {name: tokens_for(fleet, name, key_id) for name in CLUSTERS} == \
                {name: 2 if name in holders else 0 for name in CLUSTERS}, key_id
            record = store.get(key_id)
            assert record is not None and record.state is KeyState.ENABLED and record.owner == ""
    finally:
        control.clear()
        gateway.stop()
        store.close()
