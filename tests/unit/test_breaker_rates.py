"""CircuitBreaker.ops_per_second / error_rate: the last minute of outcomes (CloudWatch and status read them)."""

from __future__ import annotations

from router.health import CircuitBreaker
from tests.support import FakeClock


def test_rates_cover_the_last_minute_only() -> None:
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock, failures_to_open=1000, window=1000, max_failure_rate=1.0)
    assert breaker.ops_per_second() == 0.0 and breaker.error_rate() == 0.0
    for _ in range(3):
        breaker.record_success()
    breaker.record_failure()
    assert breaker.error_rate() == 0.25
    assert breaker.ops_per_second() == 4 / 1  # the breaker has seen one second (at least one counts)

    clock.now += 30
    for _ in range(6):
        breaker.record_success()
    assert breaker.error_rate() == 0.1 and breaker.ops_per_second() == 10 / 30

    clock.now += 45  # the first four are over a minute old now
    assert breaker.error_rate() == 0.0 and breaker.ops_per_second() == 6 / 60
    clock.now += 61
    assert breaker.error_rate() == 0.0 and breaker.ops_per_second() == 0.0


def test_a_busy_minute_is_counted_exactly() -> None:
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock, failures_to_open=10**9, window=10, max_failure_rate=1.0)
    for second in range(120):
        clock.now = 1000.0 + second + 0.5
        for i in range(1000):
            (breaker.record_failure if i % 100 == 0 else breaker.record_success)()
    # Seconds 59..119 are within 60 s of now (1119.5): 61 seconds of 1,000 outcomes.
    assert breaker.ops_per_second() == 61_000 / 60
    assert abs(breaker.error_rate() - 0.01) < 1e-12
