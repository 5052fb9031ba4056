"""Closing a watched channel leaves no poller thread to die on stderr."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from gateway._channels import close_watched


def test_a_watched_channel_is_closed_once_its_poller_has_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpcio's poller of a watched channel, closed under it, dies with "Channel closed!" on
    stderr (hsmctl's exit, a Client's close). close_watched takes the subscription back and
    closes the channel once the poller has ended, within its 0.2 s wait."""
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    heard: list[grpc.ChannelConnectivity] = []
    for _ in range(10):
        channel = grpc.insecure_channel("127.0.0.1:1")
        channel.subscribe(heard.append, try_to_connect=True)
        time.sleep(0.05)
        started = time.monotonic()
        close_watched(channel, heard.append)
        assert time.monotonic() - started < 0.5
        assert not channel._connectivity_state.polling  # type: ignore[attr-defined]
        with pytest.raises(ValueError):  # closed
            channel.unary_unary("/x/y")(b"", timeout=1)
    time.sleep(0.3)
    assert heard and died == []
