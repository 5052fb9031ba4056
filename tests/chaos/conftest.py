"""Chaos tests: a real gateway on SoftHSM through the fault-injecting PKCS #11 module."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.fleet import Fleet, find_module, init_fleet
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.faults import FaultControl, build_faultmod
from tests.support import GatewayProcess, count_copy


@pytest.fixture(scope="session")
def faultmod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_faultmod(tmp_path_factory.mktemp("faultmod-build"))


def faulty_fleet(root: Path, faultmod: Path, *, extra: str = "") -> tuple[Fleet, FaultControl]:
    """A fleet whose gateway config loads SoftHSM through the fault module."""
    fleet = init_fleet(root, listen="127.0.0.1:0", pool_size=4)
    control = FaultControl(root / "faults")
    control.clear()
    text = fleet.config_path.read_text()
    text = text.replace(f'module = "{find_module()}"', f'module = "{faultmod}"')
    text = text.replace(
        f'env = {{ SOFTHSM2_CONF = "{fleet.softhsm_conf}" }}',
        f'env = {{ SOFTHSM2_CONF = "{fleet.softhsm_conf}", FAULTMOD_TARGET = "{find_module()}", '
        f'FAULTMOD_CONTROL = "{root / "faults"}" }}',
    )
    assert "FAULTMOD_CONTROL" in text
    text = text.replace("[server]\n", "[server]\nprobe_interval = 0.25\n")
    text = text.replace("[replication]\n", "[replication]\nrepair_interval = 1.0\ncreation_grace = 3.0\n")
    fleet.config_path.write_text(text + extra)
    return fleet, control


@pytest.fixture
def chaos(tmp_path: Path, faultmod: Path) -> Iterator[tuple[Fleet, FaultControl, GatewayProcess]]:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    gateway = GatewayProcess(fleet.config_path).start()
    try:
        yield fleet, control, gateway
    finally:
        control.clear()
        gateway.stop()


@dataclass
class Outcome:
    start: float
    latency: float
    cluster: str = ""
    error: str = ""
    reason: str = ""
    """The error's ErrorInfo reason."""
    where: str = ""
    """The cluster the error's ErrorInfo names."""
    retry: bool = False
    """The error carries RetryInfo."""


@dataclass
class Load:
    """N client threads signing with replicated keys until stopped."""

    target: str
    keys: list[str]
    clients: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, index: int) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            n = 0
            while not self._stop.is_set():
                key_id = self.keys[(index + n) % len(self.keys)]
                n += 1
                start = time.monotonic()
                try:
                    resp = stub.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                                    digest=b"\x01" * 32), timeout=5)
                    outcome = Outcome(start, time.monotonic() - start, cluster=resp.cluster)
                except grpc.RpcError as exc:
                    outcome = Outcome(start, time.monotonic() - start, error=f"{exc.code().name}: {exc.details()}")
                    status = rpc_status.from_call(exc)
                    for detail in status.details if status is not None else ():
                        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                            info = error_details_pb2.ErrorInfo()
                            detail.Unpack(info)
                            outcome.reason, outcome.where = info.reason, info.metadata.get("cluster", "")
                        outcome.retry |= detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
                with self._lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def errors(self) -> list[str]:
        return [o.error for o in self.snapshot() if o.error]


def make_keys(target: str, prefix: str, n: int) -> list[pb.Key]:
    with grpc.insecure_channel(target) as channel:
        stub = crypto_pb2_grpc.CryptoServiceStub(channel)
        return [stub.GenerateKey(pb.GenerateKeyRequest(request_id=f"{prefix}-{i}", key_id=f"{prefix}/k{i}",
                                                       algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
                for i in range(n)]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


@pytest.fixture
def tokens_for() -> Callable[[Fleet, str, str], int]:
    """Count a key's objects on a fleet's token (``count_copy``)."""
    return count_copy
