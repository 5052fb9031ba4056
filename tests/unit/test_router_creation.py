"""Key creation when the HSM fails unexpectedly: rolled back, reported as retryable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from router.backend import HsmBackend, PoolStats
from router.errors import InternalError, Unavailable
from router.model import ClusterSpec, KeyAlgorithm, KeySpec, KeyUsage, Placement
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology


class FailingBackend(HsmBackend):
    """A cluster whose key generation fails with an error nobody expected."""

    def __init__(self, name: str) -> None:
        self.spec = ClusterSpec(name, "us-east-1", name)
        self.destroyed: list[str] = []

    def generate(self, key: Placement, deadline: float) -> None:
        raise InternalError("unexpected PKCS #11 error", cluster=self.spec.name)

    def destroy(self, key_id: str, deadline: float) -> int:
        self.destroyed.append(key_id)
        return 0

    def stats(self) -> PoolStats:
        return PoolStats(size=1, open=1, in_use=0)

    def close(self) -> None:
        return None

    def __getattr__(self, name: str):  # every other operation is unused here
        raise AssertionError(f"unexpected call {name}")


FailingBackend.__abstractmethods__ = frozenset()  # the fake implements what creation uses


def test_unexpected_hsm_error_during_creation_is_rolled_back_and_retryable(tmp_path: Path) -> None:
    backend = FailingBackend("use1-a")
    store = SqliteStore(tmp_path / "p.db")
    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a",)}), {"use1-a": backend}, store)
    spec = KeySpec(key_id="k/1", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY, request_id="r1")
    with pytest.raises(Unavailable, match="nothing was created"):
        router.generate_key(spec, time.monotonic() + 5)
    assert store.get("k/1") is None, "the intent is rolled back"
    assert backend.destroyed == ["k/1"], "objects the HSM may have made are destroyed"
