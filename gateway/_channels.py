"""Closing a gRPC channel that someone watched without a traceback on stderr.

grpcio runs a thread per watched channel (``Channel.subscribe``, ``channel_ready_future``)
that waits on the channel's state 0.2 s at a time, and ends once no callback is left. A
channel closed while that thread waits makes it die with ``ValueError: Cannot monitor
channel state: Channel closed!``, printed on stderr as an unhandled thread exception.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

POLLER_WAIT = 0.5
"""Seconds ``close_watched`` waits at most for the poller to end (it waits 0.2 s at a time)."""
_NEVER = threading.Event()
"""Waited on between two looks at the poller (not ``time.sleep``, which callers' tests time)."""


def close_watched(channel: grpc.Channel, *callbacks: Callable[[grpc.ChannelConnectivity], Any]) -> None:
    """Unsubscribe ``callbacks``, wait for grpcio's poller of ``channel`` to end, then close it.
    The poller's state is a private field of grpcio's channel: without it, the channel is closed
    at once, as ``close`` would."""
    for callback in callbacks:
        channel.unsubscribe(callback)
    state = getattr(channel, "_connectivity_state", None)
    until = time.monotonic() + POLLER_WAIT
    while getattr(state, "polling", False) and time.monotonic() < until:
        _NEVER.wait(0.01)
    channel.close()
