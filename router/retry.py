"""Retry budget and backoff: retries help with blips, never multiply an outage.

The budget is a token bucket filled by requests: each request adds ``ratio``
tokens (0.2: retries may be 20 % of requests), each retry spends one. A floor of
``min_per_second`` lets a quiet gateway still retry. When the bucket is empty,
the request fails with the error it had instead of retrying.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._min_per_second = min_per_second
        self._cap = max(1.0, min_per_second * window)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self._cap
        self._last = clock()
        self.retries = 0
        self.refused = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self._min_per_second)
        self._last = now

    def record_request(self) -> None:
        with self._lock:
            self._tokens = min(self._cap, self._tokens + self._ratio)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the budget is spent."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self.retries += 1
                return True
            self.refused += 1
            return False


def backoff(attempt: int, *, base: float = 0.005, cap: float = 0.1, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base · 2^attempt)]."""
    return (rng or random).uniform(0.0, min(cap, base * (2**attempt)))
