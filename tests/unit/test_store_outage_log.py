"""What a gateway logs while its placement store does not answer: when it stops, once a minute,
and when it answers again (it logged every 2 s in every worker, and never the recovery)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from gateway import server
from router.placement.store import StoreError


def test_a_store_outage_is_logged_when_it_starts_once_a_minute_and_when_it_ends(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(server, "time", SimpleNamespace(monotonic=lambda: now[0]))
    down = [True]

    def refresh() -> None:
        if down[0]:
            raise StoreError("DynamoDB Query failed: unreachable: Read timeout")

    gateway = SimpleNamespace(admin=SimpleNamespace(sync_switches=lambda: None),
                              router=SimpleNamespace(refresh=refresh), _store_down=None)
    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        for _ in range(45):  # 90 s of refreshes, every 2 s
            server.Gateway._refresh(gateway)  # type: ignore[arg-type]
            now[0] += 2.0
        down[0] = False
        server.Gateway._refresh(gateway)  # type: ignore[arg-type]
        server.Gateway._refresh(gateway)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "placement store unreachable; serving known keys from the cache (DynamoDB Query failed: unreachable: "
        "Read timeout)",
        "placement store still unreachable after 60 s; serving known keys from the cache (DynamoDB Query failed: "
        "unreachable: Read timeout)",
        "placement store answers again after 90 s",
    ]
