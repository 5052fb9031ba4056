"""Signals whose handlers only note them; the main thread acts on them.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread
is: inside ``Event.set``, a logging handler, ``Thread.start``. One that takes a lock can wait
forever for the lock the code it interrupted holds (a SIGTERM arriving while the SIGINT
handler is inside ``Event.set`` did). And the kernel may deliver the signal to any thread: the
Python handler then waits until the main thread runs bytecode again, which a wait without a
timeout never lets it do. So the handlers here only append the signal's number to a deque (no
lock), and the main thread looks at it at least every ``TICK`` seconds.
"""

from __future__ import annotations

import signal
import time
from collections import deque

TICK = 0.2
"""Seconds at most between two looks of the main thread at the signals received."""


class Signals:
    """The signals received since the last ``take``, in order."""

    def __init__(self) -> None:
        self._received: deque[int] = deque()

    def catch(self, *signums: int) -> None:
        """Install the noting handler for ``signums`` (from the main thread)."""
        for signum in signums:
            signal.signal(signum, self._note)

    def _note(self, signum: int, _frame: object) -> None:
        self._received.append(signum)  # deque.append takes no lock a handler could wait for

    def take(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        taken = []
        while self._received:
            taken.append(self._received.popleft())
        return taken

    def wait(self, timeout: float) -> list[int]:
        """``take``, after waiting up to ``timeout`` seconds for a signal (the main thread only)."""
        end = time.monotonic() + timeout
        while not self._received:
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(TICK, left))
        return self.take()
