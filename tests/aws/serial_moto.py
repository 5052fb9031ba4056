"""``moto_server`` (moto's own entry point and options) answering one request at a time.

moto's in-memory backends are not thread-safe, and ``moto_server`` serves each
connection on its own thread. Measured with 8 threads racing to create one key:
in about half of 200 rounds two conditional transactions both passed, or a
cancelled transaction restored its table snapshot over a concurrent commit, or
moto answered HTTP 500. Real DynamoDB checks a condition and writes an item
atomically; handling one request at a time makes the mock behave so too.
"""

from __future__ import annotations

import threading
from typing import Any

from moto import server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication

_lock = threading.Lock()
_dispatch = DomainDispatcherApplication.__call__


def _serialised(self: DomainDispatcherApplication, environ: dict[str, Any], start_response: Any) -> Any:
    with _lock:
        # moto builds the whole response body inside the call, so the backend's
        # state is only touched while the lock is held.
        return _dispatch(self, environ, start_response)


if __name__ == "__main__":
    DomainDispatcherApplication.__call__ = _serialised  # type: ignore[method-assign]
    server.main()
