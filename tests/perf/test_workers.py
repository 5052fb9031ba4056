"""`hsmgw serve --workers 2`: two processes on one port, each with its own pools."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.support import GatewayProcess, rpc_error, unique


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _server_ends(pid: int, port: int) -> set[int]:
    """Client ports of the established connections to ``port`` whose server socket ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ends = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                ends.add(int(remote.rsplit(":", 1)[1], 16))
    return ends


def _owner(workers: list[int], port: int, seen: dict[int, set[int]]) -> int:
    """The worker that accepted the newest connection (one whose client port is new)."""
    for _ in range(50):
        for pid in workers:
            new = _server_ends(pid, port) - seen[pid]
            if new:
                seen[pid] |= new
                return pid
        time.sleep(0.02)
    raise AssertionError("no worker holds the new connection")


@pytest.fixture(scope="module")
def two_workers(fleet):
    gateway = GatewayProcess(fleet.config_path, workers=2).start()
    yield gateway
    gateway.stop()


def _a_connection_to_each_worker(gateway: GatewayProcess) -> dict[int, list[grpc.Channel]]:
    """Fresh connections until each worker has one: worker pid -> its connections (close them)."""
    workers = _children(gateway.proc.pid)
    assert len(workers) == 2 and gateway.proc.pid not in workers
    seen = {pid: _server_ends(pid, gateway.port) for pid in workers}
    channels: dict[int, list[grpc.Channel]] = {pid: [] for pid in workers}
    for _ in range(40):
        channel = grpc.insecure_channel(gateway.target, options=[("grpc.use_local_subchannel_pool", 1)])
        crypto_pb2_grpc.CryptoServiceStub(channel).GenerateRandom(pb.GenerateRandomRequest(length=8), timeout=10)
        channels[_owner(workers, gateway.port, seen)].append(channel)
        if all(channels.values()):
            return channels
    for group in channels.values():
        for channel in group:
            channel.close()
    raise AssertionError(f"connections per worker: { {p: len(c) for p, c in channels.items()} }")


def test_two_workers_answer_on_one_port_and_share_keys(two_workers) -> None:
    workers = _children(two_workers.proc.pid)
    channels = _a_connection_to_each_worker(two_workers)
    try:
        a, b = (crypto_pb2_grpc.CryptoServiceStub(channels[pid][0]) for pid in workers)
        key_id = unique("workers")
        a.GenerateKey(pb.GenerateKeyRequest(request_id=unique("req"), key_id=key_id,
                                            algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
        digest = hashlib.sha256(b"made by one worker, used by the other").digest()
        # Worker b never saw the key: its cache misses and it reads the shared placement store.
        signed = b.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest), timeout=30)
        public = serialization.load_der_public_key(a.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id)).der)
        public.verify(signed.signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        batch = b.BatchSign(pb.BatchSignRequest(requests=[
            pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest)] * 40), timeout=30)
        assert [item.code for item in batch.responses] == [0] * 40
    finally:
        for group in channels.values():
            for channel in group:
                channel.close()


LIMITS_POLICY = """\
[roles.reader]
operations = ["GetKey", "GenerateRandom", "Sign"]
prefixes = ["*"]

[identities.dev]
roles = ["reader"]

[identities.metered]
roles = ["reader"]
rate = 5
burst = 5

[identities.capped]
roles = ["reader"]
concurrency = 2
"""


@pytest.fixture(scope="module")
def limited_workers(fleet):
    """Two workers under a policy with per-identity limits (identities by header: plaintext loopback)."""
    policy = fleet.config_path.parent / f"limits-{uuid.uuid4().hex[:8]}.toml"
    policy.write_text(LIMITS_POLICY)
    config = fleet.config_path.parent / f"limited-{uuid.uuid4().hex[:8]}.toml"
    config.write_text(fleet.config_path.read_text() + f'\n[auth]\npolicy_file = "{policy}"\n')
    gateway = GatewayProcess(config, workers=2).start()
    yield gateway
    gateway.stop()


def _as(identity: str) -> tuple[tuple[str, str], ...]:
    return (("x-hsmgw-identity", identity),)


def test_a_rate_limit_holds_for_the_gateway_not_for_each_worker(limited_workers) -> None:
    """Calls of one identity on connections to both workers draw on one bucket (5/s, burst 5)."""
    channels = _a_connection_to_each_worker(limited_workers)
    stubs = [crypto_pb2_grpc.CryptoServiceStub(group[0]) for group in channels.values()]
    admitted = [0, 0]
    refused = 0
    try:
        time.sleep(1.1)  # a full bucket
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            for i, stub in enumerate(stubs):
                try:
                    stub.GetKey(pb.GetKeyRequest(key_id="limits/none"), metadata=_as("metered"), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused += 1
                        assert "over its rate limit (5/s, burst 5)" in exc.details()
                        continue
                    assert exc.code() is grpc.StatusCode.NOT_FOUND, exc
                admitted[i] += 1
        elapsed = time.monotonic() - started
    finally:
        for group in channels.values():
            for channel in group:
                channel.close()
    # Each worker alone would have let through up to 5 + 5/s each: about twice this.
    assert sum(admitted) <= 5 + 5 * elapsed + 1, (admitted, elapsed)
    assert all(admitted), f"both workers served the identity: {admitted}"
    assert refused > 0


def test_a_concurrency_limit_holds_for_the_gateway_not_for_each_worker(limited_workers) -> None:
    """Streams hold a call slot while open: 2 for the identity, whichever worker serves them."""
    channels = _a_connection_to_each_worker(limited_workers)
    stubs = [crypto_pb2_grpc.CryptoServiceStub(group[0]) for group in channels.values()]
    outboxes: list[queue.Queue[pb.SignRequest | None]] = []
    ended: list[grpc.StatusCode] = []
    threads = []

    def drain(stream) -> None:  # type: ignore[no-untyped-def]
        try:
            list(stream)
        except grpc.RpcError as exc:
            ended.append(exc.code())

    try:
        for stub in stubs * 2:  # two streams on each worker's connection
            outbox: queue.Queue[pb.SignRequest | None] = queue.Queue()
            outboxes.append(outbox)
            stream = stub.SignStream(iter(outbox.get, None), metadata=_as("capped"), timeout=30)
            threads.append(threading.Thread(target=drain, args=(stream,)))
            threads[-1].start()
        deadline = time.monotonic() + 10
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a third refusal, if there were one, would be in by now
        assert ended == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, ended
        for stub in stubs:  # and a unary call on either worker finds no slot free either
            err = rpc_error(stub.GetKey, pb.GetKeyRequest(key_id="limits/none"), metadata=_as("capped"), timeout=5)
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "2 calls in flight" in err.details()
        for outbox in outboxes:
            outbox.put(None)
        for thread in threads:
            thread.join(10)
        time.sleep(0.2)  # the closed streams' slots are free again
        for stub in stubs:
            err = rpc_error(stub.GetKey, pb.GetKeyRequest(key_id="limits/none"), metadata=_as("capped"), timeout=5)
            assert err.code() is grpc.StatusCode.NOT_FOUND
    finally:
        for outbox in outboxes:
            outbox.put(None)
        for thread in threads:
            thread.join(10)
        for group in channels.values():
            for channel in group:
                channel.close()


def test_sigterm_to_the_supervisor_stops_every_worker(fleet) -> None:
    gateway = GatewayProcess(fleet.config_path, workers=2).start()
    workers = _children(gateway.proc.pid)
    assert len(workers) == 2
    assert gateway.port_file.exists()
    assert gateway.stop(signal.SIGTERM, timeout=30) == 0
    assert not gateway.port_file.exists(), "a stale port file sends the next reader to a closed port"
    for pid in workers:
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker {pid} still runs after the supervisor stopped")
    log = gateway.log()
    assert log.count("gateway.server: stopped") == 2 or log.count('"stopped"') == 2, log[-2000:]


def _cpus_allowed(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                low, _, high = part.partition("-")
                cpus.update(range(int(low), int(high or low) + 1))
            return cpus
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs a CPU per worker")


@needs_two_cpus
def test_each_worker_runs_on_a_cpu_of_its_own(two_workers) -> None:
    workers = _children(two_workers.proc.pid)
    allowed = [_cpus_allowed(pid) for pid in workers]
    assert all(len(cpus) == 1 for cpus in allowed), allowed
    assert allowed[0] != allowed[1]
    assert set().union(*allowed) <= os.sched_getaffinity(0)
    assert len(_cpus_allowed(two_workers.proc.pid)) > 1, "the supervisor itself is not pinned"


@needs_two_cpus
def test_pin_workers_false_leaves_workers_on_every_cpu(fleet) -> None:
    text = fleet.config_path.read_text()
    assert "[server]\n" in text
    unpinned = fleet.config_path.with_name("unpinned.toml")
    unpinned.write_text(text.replace("[server]\n", "[server]\npin_workers = false\n", 1))
    gateway = GatewayProcess(unpinned, workers=2).start()
    try:
        for pid in _children(gateway.proc.pid):
            assert _cpus_allowed(pid) == os.sched_getaffinity(0)
    finally:
        gateway.stop()
        unpinned.unlink()


def _policies(pid: int) -> dict[int, int]:
    """Each thread of ``pid`` (by task id) and its scheduling policy."""
    policies = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policies[int(task.name)] = os.sched_getscheduler(int(task.name))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return policies


def test_every_thread_of_every_worker_runs_under_sched_batch(two_workers) -> None:
    """``[server] scheduling`` defaults to batch: the serving threads, gRPC core's and the
    pools' included, whether started before the setting took or after."""
    workers = _children(two_workers.proc.pid)
    assert len(workers) == 2
    for pid in workers:
        policies = _policies(pid)
        assert len(policies) > 16, "the fast path's threads at least"
        assert set(policies.values()) == {os.SCHED_BATCH}, policies
    assert os.sched_getscheduler(two_workers.proc.pid) == os.SCHED_OTHER, "the supervisor serves nothing"


def test_scheduling_inherit_leaves_the_policy_the_gateway_was_started_with(fleet) -> None:
    config = fleet.config_path.with_name("inherit.toml")
    config.write_text(fleet.config_path.read_text().replace("[server]\n", '[server]\nscheduling = "inherit"\n', 1))
    gateway = GatewayProcess(config, workers=1).start()
    try:
        policies = _policies(gateway.proc.pid)
        assert len(policies) > 16 and set(policies.values()) == {os.SCHED_OTHER}, policies
    finally:
        gateway.stop()
        config.unlink()


def test_a_gateway_started_under_another_policy_keeps_it(fleet) -> None:
    """Someone chose SCHED_IDLE (chrt -i, as systemd's CPUSchedulingPolicy=idle): batch does not override it."""
    chrt = shutil.which("chrt")
    if chrt is None:
        pytest.skip("chrt (util-linux) is not installed")
    gateway = GatewayProcess(fleet.config_path, workers=1)
    gateway.command_prefix = [chrt, "--idle", "0"]
    gateway.start()
    try:
        policies = _policies(gateway.proc.pid)
        assert len(policies) > 16 and set(policies.values()) == {os.SCHED_IDLE}, policies
    finally:
        gateway.stop()


def test_a_refused_policy_is_a_warning_and_the_gateway_serves_on(monkeypatch, caplog) -> None:
    from gateway import workers

    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(workers.os, "sched_getscheduler", lambda _: os.SCHED_OTHER)
    monkeypatch.setattr(workers.os, "sched_setscheduler", refuse)
    with caplog.at_level("WARNING", logger="gateway.workers"):
        workers.apply_scheduling("batch")
    assert [r.getMessage() for r in caplog.records] == [
        "server.scheduling: cannot run under SCHED_BATCH (Operation not permitted); serving under the inherited policy"]


def test_keys_created_by_two_workers_at_once_under_load_keep_every_object(two_workers, tokens) -> None:
    """Creations in both workers while both sign: every acknowledged key still has one
    private and one public object on each of its clusters, and signs.

    SoftHSM's file store re-reads a token's directory whenever another process changed it,
    and a thread that does so while another thread of the process is making an object
    can list that object twice. Destroying "the other one" then deletes the only file.
    """
    signer = unique("busy")
    with grpc.insecure_channel(two_workers.target) as ch:
        crypto_pb2_grpc.CryptoServiceStub(ch).GenerateKey(
            pb.GenerateKeyRequest(request_id=unique("req"), key_id=signer, algorithm=pb.KEY_ALGORITHM_EC_P256),
            timeout=60)
    digest = hashlib.sha256(b"traffic").digest()
    stop = threading.Event()
    made: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def sign() -> None:
        with grpc.insecure_channel(two_workers.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = crypto_pb2_grpc.CryptoServiceStub(ch)
            while not stop.is_set():
                try:
                    stub.Sign(pb.SignRequest(key_id=signer, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest),
                              timeout=30)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"Sign {signer}: {exc.code().name}: {exc.details()}")
                    return

    def create(count: int) -> None:
        for _ in range(count):
            key_id = unique("both-workers")
            # a fresh connection each time, so both workers create
            with grpc.insecure_channel(two_workers.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                try:
                    crypto_pb2_grpc.CryptoServiceStub(ch).GenerateKey(pb.GenerateKeyRequest(
                        request_id=unique("req"), key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{key_id}: {exc.code().name}: {exc.details()}")
                    continue
            with lock:
                made.append(key_id)

    signers = [threading.Thread(target=sign) for _ in range(4)]
    creators = [threading.Thread(target=create, args=(20,)) for _ in range(6)]
    for t in signers + creators:
        t.start()
    for t in creators:
        t.join(timeout=300)
    stop.set()
    for t in signers:
        t.join(timeout=60)
    assert failures == [], failures[:5]
    lost = []
    with grpc.insecure_channel(two_workers.target) as ch:
        stub = crypto_pb2_grpc.CryptoServiceStub(ch)
        for key_id in made:
            key = stub.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=10)
            for cluster in (key.primary_cluster, *key.replicas):
                found = sorted(obj.object_class.name for obj in tokens.objects(cluster, key_id))
                if found != ["PRIVATE_KEY", "PUBLIC_KEY"]:
                    lost.append(f"{key_id} on {cluster}: {found}")
            signed = stub.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest),
                               timeout=30)
            public = serialization.load_der_public_key(stub.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id)).der)
            public.verify(signed.signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert lost == [], f"{len(lost)} of {len(made)} keys lost objects: {lost[:5]}"


def _handles_sighup(pid: int) -> bool:
    """The process ignores or catches SIGHUP (before that, the interpreter is still starting)."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return bool((int(status["SigIgn"], 16) | int(status["SigCgt"], 16)) & 1 << (signal.SIGHUP - 1))


def test_a_reload_while_workers_start_or_restart_kills_none(fleet) -> None:
    """`systemctl reload` (SIGHUP to the supervisor) at any moment: a worker still starting
    used to die of it, and the gateway with it (exit 255, no port file)."""
    gateway = GatewayProcess(fleet.config_path, workers=2)
    starting = threading.Thread(target=gateway.start)
    starting.start()
    try:
        while gateway.proc is None or not _handles_sighup(gateway.proc.pid):  # the interpreter has started
            time.sleep(0.005)
        while starting.is_alive():  # a reload every 50 ms while the supervisor and its workers start
            os.kill(gateway.proc.pid, signal.SIGHUP)
            time.sleep(0.05)
        assert gateway.port, gateway.log()[-2000:]
        workers = _children(gateway.proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)  # one worker dies, and reloads come while it restarts
        end = time.monotonic() + 8
        while time.monotonic() < end:
            os.kill(gateway.proc.pid, signal.SIGHUP)
            time.sleep(0.05)
            now = _children(gateway.proc.pid)
            if len(now) == 2 and workers[1] not in now and "serving" in gateway.log().split("exited with")[-1]:
                break
        assert gateway.proc.poll() is None, gateway.log()[-2000:]
        with grpc.insecure_channel(gateway.target) as channel:
            assert len(crypto_pb2_grpc.CryptoServiceStub(channel).GenerateRandom(
                pb.GenerateRandomRequest(length=8), timeout=10).data) == 8
        log = gateway.log()
        assert log.count("exited with") == 1, log[-3000:]  # the one killed, no other
    finally:
        starting.join(60)
        gateway.stop()


def test_a_worker_whose_pin_is_refused_is_not_retried_and_the_others_serve_on(tmp_path: Path) -> None:
    """After a crash, the replacement finds the PIN refused (rotated on the HSM, a wrong one
    deployed): it is not started again and again (each try counts towards a lock-out), and
    the worker that serves keeps serving. A reload starts it again."""
    import re

    from gateway.fleet import init_fleet

    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0")
    secrets = fleet.secrets_path
    good = secrets.read_text()
    gateway = GatewayProcess(fleet.config_path, workers=2).start()
    try:
        workers = _children(gateway.proc.pid)
        secrets.write_text(re.sub(r'(\[clusters\.use1-a\]\nuser_pin = )"[^"]*"', r'\1"000000"', good, count=1))
        os.kill(workers[1], signal.SIGKILL)
        given_up = "is not started again until a reload (SIGHUP) or a restart"
        for _ in range(200):
            if given_up in gateway.log():
                break
            time.sleep(0.05)
        time.sleep(1.0)  # would have been two more restarts, and the gateway's end, before
        log = gateway.log()
        assert given_up in log, log[-3000:]
        assert log.count("the user PIN was refused") == 1, log[-3000:]
        assert gateway.proc.poll() is None and _children(gateway.proc.pid) == [workers[0]]
        with grpc.insecure_channel(gateway.target) as channel:
            crypto_pb2_grpc.CryptoServiceStub(channel).GenerateRandom(pb.GenerateRandomRequest(length=8), timeout=10)

        secrets.write_text(good)  # the operator fixes it, and reloads
        os.kill(gateway.proc.pid, signal.SIGHUP)
        for _ in range(200):
            if len(_children(gateway.proc.pid)) == 2 and "reload: starting worker 1 again" in gateway.log():
                break
            time.sleep(0.05)
        assert len(_children(gateway.proc.pid)) == 2, gateway.log()[-3000:]
    finally:
        secrets.write_text(good)
        gateway.stop()


def test_a_worker_that_stops_answering_is_replaced(fleet) -> None:
    """A worker frozen (SIGSTOP, or an interpreter stuck) keeps its listening socket, and the
    kernel goes on handing it connections no one answers; its heartbeat stops, and the
    supervisor kills it and starts another."""
    gateway = GatewayProcess(fleet.config_path, workers=2).start()
    try:
        frozen = _children(gateway.proc.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        for _ in range(300):  # SILENT (10 s), then a restart
            now = _children(gateway.proc.pid)
            if len(now) == 2 and frozen not in now:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"worker {frozen} was not replaced:\n{gateway.log()[-3000:]}")
        assert "has not shown a sign of life for" in gateway.log()
        for _ in range(50):  # the new worker starts; meanwhile the kernel sends no one to it
            if _all_answer(gateway.target):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("connections still go unanswered")
    finally:
        gateway.stop()


def _all_answer(target: str) -> bool:
    """Eight fresh connections (the kernel spreads them over the workers) all answer."""
    for _ in range(8):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                crypto_pb2_grpc.CryptoServiceStub(channel).GenerateRandom(pb.GenerateRandomRequest(length=8), timeout=3)
            except grpc.RpcError:
                return False
    return True


_SUPERVISOR = """
import sys
from gateway.cli._common import setup_logging
from gateway.config import load
from gateway.workers import Supervisor
config, port_file, start_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
setup_logging(fmt="human", stream=sys.stdout)
supervisor = Supervisor(config, load(config), 2, grace=1.0, port_file=port_file, start_timeout=start_timeout,
                        cli_flags=("--log-format", "human"))
sys.exit(supervisor.run())
"""


def test_a_restarted_worker_that_never_serves_is_killed_and_started_again(fleet, tmp_path: Path) -> None:
    """A worker's replacement that hangs before it serves (stopped here; an HSM login that does
    not return does the same) used to be waited for forever, the gateway a worker short and
    silent about it. It gets the first start's limit, then is killed and started again."""
    import sys

    from tests.support import ROOT, wait_for

    start_timeout = 20.0  # the supervisor's (300 s by default), short for a test
    port_file = tmp_path / "port"
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, str(fleet.config_path), str(port_file),
                                 str(start_timeout)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stopped: int | None = None
    try:
        wait_for(port_file.exists, timeout=start_timeout, what="the gateway to serve")
        first = _children(proc.pid)
        assert len(first) == 2
        os.kill(first[1], signal.SIGKILL)

        def replacement() -> tuple[int, list[str]] | None:
            """The new worker, once it runs the gateway (stopped before its exec, it would
            hold up the supervisor's spawn, not the worker's start), and its arguments."""
            for pid in _children(proc.pid):
                if pid not in first:
                    with contextlib.suppress(OSError):
                        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                        if "gateway.cli.hsmgw" in args:
                            return pid, args
            return None

        stopped, args = wait_for(replacement, timeout=30, what="the replacement worker", interval=0.002)
        os.kill(stopped, signal.SIGSTOP)  # within milliseconds of its start: long before it serves
        assert not Path(args[args.index("--port-file") + 1]).exists(), "stopped too late: it serves"

        # Far beyond the limit: only a supervisor that does not watch a starting worker misses it.
        wait_for(lambda: stopped not in _children(proc.pid) and len(_children(proc.pid)) == 2,
                 timeout=start_timeout + 60, what=f"the stopped worker {stopped} to be replaced")
        wait_for(lambda: _all_answer(f"127.0.0.1:{int(port_file.read_text())}"), timeout=60,
                 what="every worker to answer")
        text = log_path.read_text()
        assert text.count(f"worker 1 (pid {stopped}) has shown no progress in its start for") == 1, text[-3000:]
        assert f"worker 1 (pid {stopped}) exited with -9 (2 times in a row)" in text, text[-3000:]
        assert proc.poll() is None
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("starting", "after"), [(0, 0.0), (0, 0.3), (1, 0.0)])
def test_ctrl_c_while_workers_start_stops_the_gateway_cleanly(fleet, tmp_path: Path, starting: int,
                                                              after: float) -> None:
    """Ctrl-C at a terminal sends SIGINT to every process of the group: a worker still starting
    (importing, logging in) used to die of a KeyboardInterrupt traceback. Workers leave SIGINT to
    the supervisor until they serve; the supervisor stops them all, exit 0."""
    import sys

    from tests.support import ROOT, wait_for

    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(fleet.config_path),
             "--port-file", str(tmp_path / "port"), "--grace", "1", "--workers", "2"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HSMGW_LOG_FORMAT": "human"},
        )
    try:
        def worker_starting() -> bool:
            """Worker ``starting`` runs the gateway's code (it has been exec'd), and does not serve yet."""
            for pid in _children(proc.pid):
                with contextlib.suppress(OSError):
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                    if "--worker-index" in args and args[args.index("--worker-index") + 1] == str(starting):
                        return True
            return False

        wait_for(worker_starting, timeout=60, what=f"worker {starting} to start", interval=0.002)
        time.sleep(after)  # at once, or while it imports
    finally:
        code = _ctrl_c(proc)
    text = log_path.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert code == 0, text[-3000:]
    assert "signal SIGINT: stopping" in text, text[-3000:]
    assert "did not stop" not in text, text[-3000:]


def test_ctrl_c_while_one_process_starts_stops_it_cleanly(fleet, tmp_path: Path) -> None:
    """`hsmgw serve --workers 1` has no supervisor to take the terminal's SIGINT while it logs in
    and reconciles: it died of a KeyboardInterrupt traceback. Now one line, exit 0, nothing served.
    The process is held still (SIGSTOP) from the moment it has loaded the PKCS #11 module, so the
    signal lands inside its start, however fast the machine."""
    import sys

    from tests.support import ROOT, wait_for

    log_path, port_file = tmp_path / "gateway.log", tmp_path / "port"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(fleet.config_path),
             "--port-file", str(port_file), "--grace", "1", "--workers", "1", "--listen", "127.0.0.1:0"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HSMGW_LOG_FORMAT": "human"},
        )
    try:
        def module_loaded() -> bool:
            with contextlib.suppress(OSError):
                return "softhsm" in Path(f"/proc/{proc.pid}/maps").read_text()
            return False

        wait_for(module_loaded, timeout=60, what="the PKCS #11 module to load", interval=0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        assert not port_file.exists()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        os.kill(proc.pid, signal.SIGCONT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    text = log_path.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "signal SIGINT while starting: stopped before serving" in text, text[-3000:]
    assert code == 0 and not port_file.exists(), text[-3000:]


def test_ctrl_c_while_every_worker_serves_stops_each_by_itself(fleet, tmp_path: Path) -> None:
    """Ctrl-C once the workers serve: each gets the terminal's SIGINT and, a moment later, the
    supervisor's SIGTERM. A worker used to stop in about three runs in ten only when the supervisor
    killed it, grace + 13 s later: the second signal's handler, run inside the first one's
    ``Event.set``, waited for the lock that set held; or the signal was taken by a thread other than
    the main one, whose wait without a timeout never let the handler run. Several rounds, as it did
    not happen every time."""
    import sys

    from tests.support import ROOT, wait_for

    for attempt in range(4):
        port_file = tmp_path / f"port-{attempt}"
        log_path = tmp_path / f"gateway-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(fleet.config_path),
                 "--port-file", str(port_file), "--grace", "1", "--workers", "3"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "HSMGW_LOG_FORMAT": "human"},
            )
        try:
            wait_for(port_file.exists, timeout=60, what="every worker to serve")
            time.sleep(1)  # the workers' probe, repair and heartbeat threads under way
        finally:
            code = _ctrl_c(proc)
        text = log_path.read_text()
        assert "did not stop" not in text, f"round {attempt}:\n{text[-3000:]}"
        assert text.count("gateway.server: stopped") == 3, f"round {attempt}:\n{text[-3000:]}"
        assert "Traceback" not in text, f"round {attempt}:\n{text[-3000:]}"
        assert code == 0, f"round {attempt}:\n{text[-3000:]}"


class _Lingering:
    """A worker process that outlives its SIGKILL (in an HSM driver's uninterruptible sleep)."""

    pid = 4242

    def __init__(self) -> None:
        self.kills = 0

    def poll(self) -> None:
        return None

    def kill(self) -> None:
        self.kills += 1


def test_a_starting_worker_is_judged_by_its_progress_and_killed_once(fleet, tmp_path: Path, caplog) -> None:
    """Worker 0 runs the start-up reconcile again on each restart: on a large store that took longer
    than ``start_timeout``, and the worker was killed mid-reconcile, again and again. A start that
    moves on is now left to finish; one that shows no progress for ``start_timeout`` is killed, and
    killed and logged once: the supervisor killed and logged every 0.2 s while a process stuck in an
    HSM driver lingered."""
    import logging

    from gateway.config import load
    from gateway.workers import Supervisor, Worker

    supervisor = Supervisor(str(fleet.config_path), load(fleet.config_path), 1, start_timeout=30.0)
    try:
        progress = tmp_path / "worker-0.progress"
        progress.touch()
        proc = _Lingering()
        # Started ten minutes ago, its last step a moment ago (gateway.workers.start_progress).
        worker = Worker(0, proc, tmp_path / "worker-0.port", progress,  # type: ignore[arg-type]
                        started=time.monotonic() - 600)
        supervisor._check_start(worker)
        assert proc.kills == 0, "a start that moves on was killed"

        stalled = time.time() - 60  # no step for twice start_timeout
        os.utime(progress, (stalled, stalled))
        with caplog.at_level(logging.ERROR, logger="gateway.workers"):
            for _ in range(5):  # the supervisor's watch, every 0.2 s, while the process lingers
                supervisor._check_start(worker)
        assert proc.kills == 1
        assert [r.getMessage() for r in caplog.records].count(
            "worker 0 (pid 4242) has shown no progress in its start for 60 s (stopped, or stuck); killing it") == 1, \
            caplog.text
    finally:
        os.close(supervisor.limits_fd)
        shutil.rmtree(supervisor._dir, ignore_errors=True)


def _ctrl_c(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGINT to the process group, as a terminal's Ctrl-C; the exit status, or None if it had
    to be killed after 60 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
