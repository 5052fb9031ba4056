"""A stop that outlasts its grace: calls still inside the HSM are cut off, and stay cut off.

The HSM answers every call 500 ms late (faultmod ``latency``), so a GenerateKey takes
far longer than the stop waits for it. Whatever those calls do once the gateway has
said "stopped", they must not log in, open a session or make a key again.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import faulty_fleet, make_keys
from tests.support import GatewayProcess, wait_for

CALLS = 4
GRACE = 1.0
CALLS_WAIT = 5.0  # gateway.server.CALLS_TIMEOUT: how long a stop waits for calls after the grace
CLOSE_WAIT = 5.0  # router.router.CLOSE_TIMEOUT
# What a cut-off call must never do again: log in, open a session, make or copy a key.
FORBIDDEN = re.compile(r"faultmod-trace: (C_Login|C_OpenSession|C_GenerateKey|C_GenerateKeyPair|C_UnwrapKey|"
                       r"C_CreateObject) ")


def test_a_stop_past_its_grace_cuts_calls_off_without_logging_in_again(tmp_path: Path, faultmod: Path) -> None:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    # A creation gives up at its deadline or after creation_grace / 2: both long enough here
    # for every creation to be inside the HSM when the stop gives up waiting for it.
    text = fleet.config_path.read_text()
    text = text.replace("creation_grace = 3.0", "creation_grace = 120.0")
    text = text.replace("probe_interval = 0.25\n", "probe_interval = 0.25\ndefault_deadline = 60.0\n")
    assert "creation_grace = 120.0" in text and "default_deadline = 60.0" in text
    fleet.config_path.write_text(text)
    gateway = GatewayProcess(fleet.config_path, env={"FAULTMOD_TRACE": "1"}, grace=GRACE).start()
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            try:
                stub.GenerateKey(pb.GenerateKeyRequest(request_id=f"cut-{i}", key_id=f"cut/k{i}",
                                                       algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=90)
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = exc.code().name
            with lock:
                outcomes.append(outcome)

    def searches() -> int:
        return len(re.findall(r"faultmod-trace: C_FindObjectsInit ", gateway.log()))

    from gateway.config import load
    from router.model import KeyState
    from router.placement.sqlite import SqliteStore

    store = SqliteStore(load(fleet.config_path).store_path())

    def intents() -> int:
        return sum(p.state is KeyState.CREATING for p in store.list(prefix="cut/"))

    try:
        control.set("*", "latency", 500)
        threads = [threading.Thread(target=create, args=(i,), daemon=True) for i in range(CALLS)]
        for thread in threads:
            thread.start()
        # Every creation inside the HSM: each has its intent recorded (after looking for objects
        # already under its id), then begun a search for what to clear before it makes the key.
        wait_for(lambda: intents() >= CALLS, timeout=30, what="the creations to record their intents")
        recorded = searches()
        wait_for(lambda: searches() >= recorded + CALLS, timeout=20, what="the creations to reach the HSM")
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            # Bounded: the grace, the wait for the calls, the pools' close; the rest is slack for a
            # busy machine (this is no measure of speed).
            code: int | None = gateway.proc.wait(timeout=GRACE + CALLS_WAIT + CLOSE_WAIT + 30)
        except subprocess.TimeoutExpired:  # the log says why: asserted first, below
            gateway.proc.kill()
            gateway.proc.wait()
            code = None
        for thread in threads:
            thread.join(timeout=30)
    finally:
        control.clear()
        gateway.stop()
        store.close()

    log = gateway.log()
    lines = log.splitlines()
    stopped = [i for i, line in enumerate(lines) if line.endswith("gateway.server: stopped")]
    assert stopped, "the gateway never said it stopped"
    before, after = lines[:stopped[0]], lines[stopped[0] + 1:]

    # Nothing logs in, opens a session or makes a key once "stopped" is logged.
    assert not [line for line in after if "logged in again" in line or "repaired stale session" in line], after
    assert not [line for line in after if FORBIDDEN.search(line)], [line for line in after if FORBIDDEN.search(line)]
    assert not [line for line in after if "Traceback" in line or " ERROR " in line], after
    assert not [line for line in after if "created on" in line], after
    # Said before it stopped: how many calls were cut off, and what they leave behind.
    assert any(f"{CALLS} call(s) still running" in line and "cut off" in line for line in before), \
        "\n".join(before[-30:])
    left = [line for line in before if "left CREATING" in line]
    assert left and all(f"cut/k{i}" in left[0] for i in range(CALLS)), left
    # The stop ended by itself (not killed at the bound above), as a stop does.
    assert code == 0, "the gateway had to be killed" if code is None else code
    assert sorted(outcomes) == ["UNAVAILABLE"] * CALLS, outcomes


def test_a_stop_while_every_hsm_hangs_ends_before_the_supervisor_gives_up(tmp_path: Path, faultmod: Path) -> None:
    """Every cluster hangs, each worker's health probes with it. The stop used to wait for
    each hung probe in turn (3 s a cluster), past what the supervisor gives a worker's stop,
    and the workers were killed part-way through it."""
    from gateway.workers import STOP_AFTER_GRACE

    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    clusters = ("use1-a", "use1-b", "usw2-a")
    # A probe's thread was waited for up to probe_timeout (2 s) + probe_interval: at the default
    # interval or above, three of them and the pools' close overran what the supervisor allows.
    text = fleet.config_path.read_text().replace("probe_interval = 0.25\n", "probe_interval = 2.0\n")
    assert "probe_interval = 2.0" in text and all(f'name = "{name}"' in text for name in clusters)
    fleet.config_path.write_text(text)
    gateway = GatewayProcess(fleet.config_path, workers=2, grace=GRACE).start()
    try:
        for name in clusters:
            control.set(name, "hang")

        def probes_hung() -> bool:  # each worker's watchdog saw each cluster's probe stuck
            log = gateway.log()
            return all(len(re.findall(rf"cluster {name}: \d+ PKCS #11 call\(s\) have not returned", log)) >= 2
                       for name in clusters)

        wait_for(probes_hung, timeout=30, what="every worker's probe of every cluster to hang")
        # Far more than the supervisor waits before it kills: the assertions below say which.
        code = _terminate(gateway, GRACE + STOP_AFTER_GRACE + 30)
    finally:
        control.clear()
        gateway.stop()

    log = gateway.log()
    assert "did not stop; killing it" not in log, gateway.log_digest()
    assert log.count("gateway.server: stopped") == 2, gateway.log_digest()
    # The probes were still inside the HSMs when each worker stopped, and were left there.
    assert log.count("health probe of cluster(s) use1-a, use1-b, usw2-a still inside the HSM") == 2, \
        gateway.log_digest()
    assert code == 0, gateway.log_digest()


def test_a_single_process_stop_with_a_call_in_a_hung_hsm_exits_by_itself(tmp_path: Path, faultmod: Path) -> None:
    """One process (``--workers 1``, as the Kubernetes manifests run it), every HSM hung, a
    GenerateKey inside one of them. The stop logged "stopped" in time, then the process never
    exited: the interpreter's exit waited for grpcio's request thread, still in the HSM."""
    from gateway.server import EXIT_WAIT

    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    text = fleet.config_path.read_text()
    text = text.replace("creation_grace = 3.0", "creation_grace = 120.0")
    text = text.replace("probe_interval = 0.25\n", "probe_interval = 0.25\ndefault_deadline = 60.0\n")
    assert "creation_grace = 120.0" in text and "default_deadline = 60.0" in text
    fleet.config_path.write_text(text)
    gateway = GatewayProcess(fleet.config_path, workers=1, grace=GRACE).start()
    outcomes: list[str] = []

    def create() -> None:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            try:
                stub.GenerateKey(pb.GenerateKeyRequest(request_id="hung-1", key_id="hung/k1",
                                                       algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=90)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    def hung_calls() -> int:
        return sum(stats.faults for stats in control.stats().values())

    try:
        control.set("*", "hang")
        caller = threading.Thread(target=create, daemon=True)
        caller.start()
        # A probe of each of the three clusters, and the creation's first call, inside a hung HSM
        # (the log below says whether the creation was among them).
        wait_for(lambda: hung_calls() >= 4, timeout=20, what="the creation to reach a hung HSM")
        # Far above the budget (grace + CALLS_WAIT + CLOSE_WAIT + EXIT_WAIT): no measure of speed.
        code = _terminate(gateway, GRACE + CALLS_WAIT + CLOSE_WAIT + EXIT_WAIT + 30)
    finally:
        control.clear()
        gateway.stop()
        caller.join(timeout=30)

    log = gateway.log()
    assert "1 call(s) still running" in log, gateway.log_digest()
    assert log.count("gateway.server: stopped") == 1, gateway.log_digest()
    assert code is not None, "the gateway had to be killed: " + gateway.log_digest()
    assert "exiting with 1 call(s) left inside an HSM that does not answer" in log, gateway.log_digest()
    assert code == 0, gateway.log_digest()


def _terminate(gateway: GatewayProcess, bound: float) -> int | None:
    """SIGTERM, then the exit status; None if it had to be killed after ``bound`` seconds."""
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    try:
        return gateway.proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        gateway.proc.kill()
        gateway.proc.wait()
        return None


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stop_with_signs_inside_a_hung_hsm_says_how_many_it_leaves(tmp_path: Path, faultmod: Path,
                                                                       workers: int) -> None:
    """Signs (served on the fast path) stuck in C_Sign. The stop said "16 fast-path call(s) still
    running after 0 s" of the other fast path's idle threads, and a single process exited
    without the line that says calls were left inside the HSM (its threads are daemons)."""
    from gateway.server import EXIT_WAIT

    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    gateway = GatewayProcess(fleet.config_path, workers=workers, grace=GRACE).start()
    outcomes: list[str] = []

    def sign(key_id: str) -> None:
        with grpc.insecure_channel(gateway.target) as channel:
            request = pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=bytes(32))
            try:
                crypto_pb2_grpc.CryptoServiceStub(channel).Sign(request, timeout=60)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    try:
        keys = make_keys(gateway.target, "stuck", CALLS)
        control.set("*", "hang", on="C_Sign")
        callers = [threading.Thread(target=sign, args=(key.key_id,), daemon=True) for key in keys]
        for caller in callers:
            caller.start()
        wait_for(lambda: sum(stats.faults for stats in control.stats().values()) >= CALLS, timeout=20,
                 what="every sign to be inside a hung C_Sign")
        code = _terminate(gateway, GRACE + CALLS_WAIT + CLOSE_WAIT + EXIT_WAIT + 30)
    finally:
        control.clear()
        gateway.stop()
        for caller in callers:
            caller.join(timeout=30)

    log = gateway.log()
    assert code == 0, "the gateway had to be killed: " + gateway.log_digest()
    # Each process names the calls it left in the HSM: all of them, no idle thread among them.
    left = [int(n) for n in re.findall(r"exiting with (\d+) call\(s\) left inside an HSM that does not answer", log)]
    assert sum(left) == CALLS, gateway.log_digest()
    running = [int(n) for n in re.findall(r"(\d+) fast-path call\(s\) still running after", log)]
    assert sum(running) == CALLS, gateway.log_digest()
    assert "still running after 0.0 s" not in log, gateway.log_digest()
    assert sorted(outcomes) == ["UNAVAILABLE"] * CALLS, outcomes
