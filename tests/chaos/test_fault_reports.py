"""What an operator reads while HSMs fail: the log stream, the reasons callers get, the CKR metric.

A failure drill showed each of these wrong: tracebacks and gRPC core lines in a JSON log
stream, device errors reported as throttling (``HSM_BUSY``, ``CKR_FUNCTION_FAILED``), a CKR
metric that stayed empty and a ``circuit open`` line with no CKR for a cluster that was down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import faulty_fleet, make_keys
from tests.moto import free_port
from tests.support import ROOT, GatewayProcess, scrape, value, wait_for

DIGEST = bytes(range(32))

# A cluster whose attribute reads fail half the time with CKR_DEVICE_ERROR, each sign with the
# key looked up anew. python-pkcs11 reads an attribute in two calls, and reports
# CKR_FUNCTION_FAILED (the busy answer) when only the first fails: a device error then read as
# throttling. Run in a process of its own, which loads the fault module as the gateway does.
_ATTRIBUTE_READS = """
import json, sys, time
from gateway import config as config_mod
from gateway.app import build_router
from router.errors import RouterError
from router.model import Operation
from tests.faults import FaultControl

args = json.load(sys.stdin)
router = build_router(config_mod.load(args["config"]), reconcile_at_start=False)
control = FaultControl(args["faults"])
placement = router.placement(args["key"])
backend = router.backends[placement.primary]
control.set(placement.primary, "fail_ratio", 0.5, "device_error", on="C_GetAttributeValue")
seen = {}
for _ in range(args["signs"]):
    backend.forget_key(placement.key_id)
    try:
        backend.sign(placement, Operation.ECDSA_SHA256, bytes(32), time.monotonic() + 10)
        outcome = "OK"
    except RouterError as exc:
        outcome = f"{exc.reason} {type(exc.__cause__).__name__}"
    seen[outcome] = seen.get(outcome, 0) + 1
control.clear()
router.close()
print(json.dumps(seen))
"""


def test_a_device_error_on_a_key_lookup_is_not_reported_as_a_busy_hsm(tmp_path: Path, faultmod: Path) -> None:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    gateway = GatewayProcess(fleet.config_path).start()
    try:
        (key,) = make_keys(gateway.target, "lookup", 1)
    finally:
        gateway.stop()
    out = subprocess.run(
        [sys.executable, "-c", _ATTRIBUTE_READS], cwd=ROOT, capture_output=True, text=True, timeout=300,
        input=json.dumps({"config": str(fleet.config_path), "faults": str(control.path), "key": key.key_id,
                          "signs": 200}),
    )
    assert out.returncode == 0, out.stderr
    seen: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    # The fault was met (not every lookup read its attributes in one go), and every failure
    # names it: the cluster is down, not busy.
    assert seen.get("OK", 0) < 200, seen
    assert set(seen) <= {"OK", "CLUSTER_DOWN DeviceError"}, seen


def _json_lines(gateway: GatewayProcess) -> list[dict[str, object]]:
    """The gateway's log, every line a JSON object (a line that is not fails the test, shown)."""
    entries = []
    for line in gateway.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        assert isinstance(entry, dict), f"not a JSON log line: {line!r}"
        entries.append(entry)
    return entries


def test_an_all_cluster_device_error_drill_reads_cleanly(tmp_path: Path, faultmod: Path) -> None:
    """Every HSM answers CKR_DEVICE_ERROR. The log stays JSON lines (python-pkcs11's search
    finalizer printed tracebacks, gRPC core its own lines), callers get UNAVAILABLE, and the
    CKR is there to act on: in each ``circuit open`` line and in hsmgw_pkcs11_errors_total."""
    clusters = ("use1-a", "use1-b", "usw2-a")
    port = free_port()
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod, extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    # A gRPC tracer makes gRPC core log at INFO from its start ("gRPC Tracers: …").
    gateway = GatewayProcess(fleet.config_path, env={"HSMGW_LOG_FORMAT": "json", "GRPC_TRACE": "handshaker"})
    codes: list[str] = []
    try:
        keys = make_keys(gateway.start().target, "drill", 3)
        gateway.stop()
        gateway.start()  # no key looked up yet: each sign below begins with a search
        control.set("*", "device_error")
        with grpc.insecure_channel(gateway.target) as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            for i in range(12):
                request = pb.SignRequest(key_id=keys[i % 3].key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST)
                try:
                    stub.Sign(request, timeout=10)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)

        def opened() -> list[str]:
            return [str(e["message"]) for e in _json_lines(gateway) if str(e["message"]).endswith(
                "circuit open (CKR_DEVICE_ERROR)")]

        wait_for(lambda: len({m.split(":")[0] for m in opened()}) == len(clusters), 15,
                 "every cluster's circuit to open, naming the CKR")
        samples = scrape(port)
    finally:
        control.clear()
        gateway.stop()

    assert set(codes) == {"UNAVAILABLE"}, codes
    entries = _json_lines(gateway)
    assert not [e for e in entries if "Exception ignored" in str(e["message"])], entries
    for cluster in clusters:
        assert value(samples, "hsmgw_pkcs11_errors_total", ckr="CKR_DEVICE_ERROR", cluster=cluster) >= 1, samples
    named = {dict(labels)["ckr"] for (name, labels), _ in samples.items() if name == "hsmgw_pkcs11_errors_total"}
    assert named == {"CKR_DEVICE_ERROR"}, named


def test_grpc_core_logs_at_info_when_the_operator_asks(tmp_path: Path, faultmod: Path) -> None:
    fleet, _ = faulty_fleet(tmp_path / "fleet", faultmod)
    gateway = GatewayProcess(fleet.config_path, env={"GRPC_TRACE": "handshaker", "GRPC_VERBOSITY": "INFO"})
    try:
        gateway.start()
    finally:
        gateway.stop()
    assert "gRPC Tracers: handshaker" in gateway.log(), gateway.log_digest()


def test_session_repairs_are_logged_as_they_happen(tmp_path: Path, faultmod: Path) -> None:
    """"repaired stale session" was logged before anything was repaired: at once followed by
    "could not reopen a session yet", and for a key handle the HSM no longer knew too."""
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    gateway = GatewayProcess(fleet.config_path).start()

    def sign(key_id: str) -> str:
        with grpc.insecure_channel(gateway.target) as channel:
            request = pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST)
            try:
                crypto_pb2_grpc.CryptoServiceStub(channel).Sign(request, timeout=10)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name

    try:
        (key,) = make_keys(gateway.target, "repair", 1)
        assert sign(key.key_id) == "OK"
        # Every session the HSM dropped, and no new one opens: nothing is repaired.
        control.set("*", "invalidate_sessions")
        control.add("*", "device_error", on="C_OpenSession")
        assert sign(key.key_id) == "UNAVAILABLE"
        wait_for(lambda: "could not open its replacement yet (DeviceError)" in gateway.log(), 10,
                 "the failed replacement to be logged")
        unreplaced = gateway.log()
        # Sessions open again: the next broken one is replaced, and said to be.
        control.clear()
        assert sign(key.key_id) == "OK"
        control.set("*", "invalidate_sessions")
        assert sign(key.key_id) == "OK"
        wait_for(lambda: "replaced a session the HSM dropped (SessionHandleInvalid)" in gateway.log(), 10,
                 "the replacement to be logged")
        # A key handle the HSM no longer knows (a key destroyed on the token answers so).
        control.set("*", "error", "0x82", on="C_SignInit")
        assert sign(key.key_id) == "UNAVAILABLE"
    finally:
        control.clear()
        gateway.stop()
    log = gateway.log()
    assert "repaired stale session" not in log, gateway.log_digest()
    assert "closed a broken session (SessionHandleInvalid); could not open its replacement yet (DeviceError)" \
        in unreplaced, gateway.log_digest()
    assert "replaced a session the HSM dropped" not in unreplaced, gateway.log_digest()
    assert "forgot a session's key handles the HSM no longer knows (ObjectHandleInvalid)" in log, gateway.log_digest()
