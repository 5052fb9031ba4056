"""The WARNING a placement store failure gives, at most once a minute a process, however many
request threads (of however many routers) it fails at once."""

from __future__ import annotations

import logging
import threading

import pytest

import router.router as router_module
from router.errors import Unavailable
from router.placement.store import StoreError


class _HoldFirst(logging.Handler):
    """Holds the thread writing the first line until released; takes any other at once."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.writing = threading.Event()
        self.release = threading.Event()

    def handle(self, record: logging.LogRecord) -> bool:  # without the handler's lock: a second line must not wait
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if len(self.lines) == 1:
            self.writing.set()
            self.release.wait(timeout=30)


def test_two_threads_failing_at_once_give_one_line_and_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "_store_log", {"at": float("-inf"), "since": 0})
    handler = _HoldFirst()
    logger = logging.getLogger("router.router")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        first = threading.Thread(target=router_module._store_down,
                                 args=("keys cannot be created now", StoreError("database is locked")))
        first.start()
        assert handler.writing.wait(timeout=30)
        # While the first thread is still writing its line, another request fails too.
        error = router_module._store_down("keys cannot be listed now", StoreError("database is locked"))
        handler.release.set()
        first.join(timeout=30)
    finally:
        handler.release.set()
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert isinstance(error, Unavailable) and str(error) == "keys cannot be listed now"
    assert handler.lines == ["placement store failed a request (keys cannot be created now): database is locked"]
    assert router_module._store_log["since"] == 1  # named in the next line, a minute on
