"""Retry budget and backoff: retries help with blips, never multiply an outage.

The budget is a token bucket filled by requests: each request adds ``ratio``
tokens (0.5: retries may be half as many as requests), each retry spends one. A
floor of ``min_per_second`` lets a quiet gateway still retry. When the bucket is
empty, the request fails with the error it had instead of retrying.

Why half: an outage must never double the load on the clusters left, and a
minority of calls failing on every cluster must still be absorbed. A request
whose attempts each fail with probability p needs p / (1 - p) extra attempts on
average: 0.43 at 30 % failures, 0.5 at a third. With a fifth (the budget before),
a 30 % failure rate on every cluster left about 15 % of requests failing. A
dead cluster costs little of it (its circuit opens after a few failures), and a
busy one is not retried into at all once its circuit opens.
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
        ratio: float = 0.5,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        """Retries allowed per request (beside the floor)."""
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
            self._tokens = min(self._cap, self._tokens + self.ratio)

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
