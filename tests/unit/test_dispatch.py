"""Dispatch order, failover, retries and the retry budget, on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
from pkcs11 import exceptions as p11

from gateway.metrics import describe_failure
from router.dispatch import Dispatcher
from router.errors import (
    ClusterDown,
    InvalidArgument,
    KeyNotFound,
    KeyOutOfReach,
    SessionsBusy,
    StaleSession,
    Throttled,
    Unavailable,
    WrappedKeyRefused,
)
from router.health import CircuitBreaker, CircuitState, HealthMonitor
from router.model import ClusterSpec
from router.retry import RetryBudget
from tests.support import FakeClock

REGIONS = {"use1-a": "us-east-1", "use1-b": "us-east-1", "usw2-a": "us-west-2"}


class _Backend(SimpleNamespace):
    def fault_name(self, error: Exception) -> str:
        """A cluster that is down says so with a device error; the others name none."""
        return "CKR_DEVICE_ERROR" if isinstance(error, ClusterDown) else ""


def make(clock: FakeClock, on_change=None, **budget_kw) -> Dispatcher:
    backends = {n: _Backend(name=n, spec=ClusterSpec(n, r, n)) for n, r in REGIONS.items()}
    extra = {} if on_change is None else {"on_change": on_change}
    breakers = {n: CircuitBreaker(n, clock=clock, cooldown=2.0, **extra) for n in REGIONS}
    return Dispatcher(
        backends, home_region="us-east-1", region_order=("us-east-1", "us-west-2"), breakers=breakers,
        budget=RetryBudget(clock=clock, **budget_kw), clock=clock, sleep=clock.sleep,
    )


def script(outcomes: dict[str, list]):
    """fn(backend) that pops the next outcome for that cluster: an exception class or a value."""
    calls: list[str] = []

    def fn(backend):
        calls.append(backend.name)
        outcome = outcomes[backend.name].pop(0) if outcomes[backend.name] else "ok"
        if isinstance(outcome, type) and issubclass(outcome, Exception):
            raise outcome(f"{backend.name} failed", cluster=backend.name)
        return f"{outcome}@{backend.name}"

    return fn, calls


def test_primary_serves_when_healthy() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({n: [] for n in REGIONS})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k") == ("ok@use1-a", "use1-a")
    assert calls == ["use1-a"]


def test_cluster_down_is_retried_once_then_fails_over() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [ClusterDown, ClusterDown], "use1-b": [], "usw2-a": []})
    result, cluster = d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert (result, cluster) == ("ok@usw2-a", "usw2-a")
    assert calls == ["use1-a", "use1-a", "usw2-a"]
    assert d.failovers == 1


def test_a_session_still_stale_after_the_clusters_repairs_fails_over_as_a_cluster_fault() -> None:
    """The cluster already replaced each of its sessions before giving up (StaleSession):
    the replica serves, and the circuit counts the failure."""
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [StaleSession, StaleSession], "use1-b": [], "usw2-a": []})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k") == ("ok@usw2-a", "usw2-a")
    assert calls == ["use1-a", "use1-a", "usw2-a"]
    assert d.failovers == 1 and d.breakers["use1-a"].error_rate() > 0


def test_a_copy_missing_where_another_candidate_could_not_answer_is_unavailable_not_not_found() -> None:
    """During a move the target is named before its copy exists: with the source down (or its
    circuit open), the key is not missing, it is out of reach for now."""
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [ClusterDown, ClusterDown], "use1-b": [], "usw2-a": [KeyNotFound]})
    with pytest.raises(KeyOutOfReach) as caught:
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert isinstance(caught.value, Unavailable) and isinstance(caught.value.__cause__, KeyNotFound)
    # Named: the cluster that could not answer, not the one that lacks the key.
    assert (caught.value.cluster, caught.value.region) == ("use1-a", "us-east-1")

    for _ in range(3):
        d.breakers["use1-a"].record_failure()
    fn, calls = script({"use1-a": [], "use1-b": [], "usw2-a": [KeyNotFound]})
    with pytest.raises(KeyOutOfReach):
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert calls == ["usw2-a"]

    # Every candidate asked, and none has it: that is NOT_FOUND.
    fn, _ = script({"use1-a": [KeyNotFound], "use1-b": [KeyNotFound], "usw2-a": [KeyNotFound]})
    with pytest.raises(KeyNotFound):
        make(clock).run(["use1-b", "usw2-a"], fn, clock() + 5, "k")


def test_a_bug_on_a_half_open_trial_leaves_the_circuit_ready_for_the_next() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    for _ in range(3):
        d.breakers["use1-a"].record_failure()
    clock.now += 2.5
    assert d.breakers["use1-a"].state is CircuitState.HALF_OPEN

    def bug(backend: SimpleNamespace) -> str:
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        d.run(["use1-a"], bug, clock() + 5, "k")
    clock.now += 60
    assert d.breakers["use1-a"].allow(), "the trial was released; without it the circuit waits for good"


def test_replacement_error_clears_on_same_cluster_retry() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [ClusterDown], "use1-b": [], "usw2-a": []})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")[1] == "use1-a"
    assert calls == ["use1-a", "use1-a"]


def test_caller_errors_are_never_retried() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [InvalidArgument], "use1-b": [], "usw2-a": []})
    with pytest.raises(InvalidArgument):
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert calls == ["use1-a"]
    assert d.breakers["use1-a"].state is CircuitState.CLOSED


def test_open_circuit_is_skipped_and_half_open_trial_closes_it() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    for _ in range(3):
        d.breakers["use1-a"].record_failure()
    assert d.breakers["use1-a"].state is CircuitState.OPEN
    fn, calls = script({n: [] for n in REGIONS})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")[1] == "usw2-a"
    assert calls == ["usw2-a"]
    clock.now += 2.5
    assert d.breakers["use1-a"].state is CircuitState.HALF_OPEN
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")[1] == "use1-a"
    assert d.breakers["use1-a"].state is CircuitState.CLOSED


def test_failure_rate_ejects_a_flaky_cluster() -> None:
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("x", clock=clock)
    for i in range(20):
        (breaker.record_failure if i % 2 else breaker.record_success)()
    assert breaker.state is CircuitState.OPEN, "half the calls failing must eject the cluster"


def test_throttled_moves_to_the_next_replica_after_backoff() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [Throttled], "use1-b": [], "usw2-a": []})
    start = clock()
    assert d.run(["use1-a", "use1-b"], fn, clock() + 5, "k")[1] == "use1-b"
    assert calls == ["use1-a", "use1-b"]
    assert clock() - start <= 0.1


def test_busy_sessions_move_to_the_next_replica_without_a_verdict_on_the_cluster() -> None:
    """A pool with no session free (load, or calls that hang) passes the request on at
    once: the wait already happened, and a busy pool says nothing of the HSM's health."""
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [SessionsBusy] * 5, "use1-b": [], "usw2-a": []})
    start = clock()
    for _ in range(5):
        assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")[1] == "usw2-a"
    assert calls == ["use1-a", "usw2-a"] * 5
    assert clock() == start, "no backoff after a wait for a session"
    assert d.breakers["use1-a"].state is CircuitState.CLOSED
    assert d.failovers == 5 and d.budget.retries == 5


def test_busy_sessions_everywhere_answer_resource_exhausted() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    fn, calls = script({"use1-a": [SessionsBusy], "use1-b": [], "usw2-a": [SessionsBusy]})
    with pytest.raises(SessionsBusy, match="usw2-a failed"):
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert calls == ["use1-a", "usw2-a"]


def test_a_busy_cluster_was_not_heard_the_others_refusal_is_not_the_final_word() -> None:
    """The cluster with no session free may hold the copy the others lack, or unwrap the record
    the others refuse: UNAVAILABLE (retry), not NOT_FOUND or KEY_RECORD_MISMATCH (give up)."""
    clock = FakeClock(1000.0)
    fn, _ = script({"use1-a": [SessionsBusy], "use1-b": [], "usw2-a": [KeyNotFound]})
    with pytest.raises(KeyOutOfReach):
        make(clock).run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    fn, _ = script({"use1-a": [SessionsBusy], "use1-b": [], "usw2-a": [WrappedKeyRefused]})
    with pytest.raises(Unavailable, match="another cluster, which may unwrap it, cannot answer now"):
        make(clock).run(["use1-a", "usw2-a"], fn, clock() + 5, "k")


def test_a_half_open_trial_that_finds_no_session_leaves_the_circuit_to_the_next() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    breaker = d.breakers["use1-a"]
    breaker.trip()
    clock.sleep(2.0)
    fn, calls = script({"use1-a": [SessionsBusy], "use1-b": [], "usw2-a": []})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")[1] == "usw2-a"
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow(), "the trial slot was given back"


def test_trip_opens_at_once_and_restarts_an_open_circuits_cooldown() -> None:
    clock = FakeClock(1000.0)
    changes: list[CircuitState] = []
    breaker = CircuitBreaker("x", clock=clock, cooldown=2.0, on_change=lambda name, state, cause: changes.append(state))
    breaker.trip()
    assert breaker.state is CircuitState.OPEN and changes == [CircuitState.OPEN]
    clock.sleep(1.5)
    breaker.trip()  # still hung: the cooldown starts again
    clock.sleep(1.5)
    assert breaker.state is CircuitState.OPEN
    clock.sleep(0.5)
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED


def test_an_opened_circuit_names_the_hsm_error_of_the_failure_that_opened_it() -> None:
    """The HSM error named is the opening failure's own: a circuit a timeout opens names none,
    even on the heels of failures that had one."""
    clock = FakeClock(1000.0)
    changes: list[tuple[str, CircuitState, str]] = []
    d = make(clock, on_change=lambda name, state, cause: changes.append((name, state, cause)))
    fn, _ = script({"use1-a": [ClusterDown] * 3, "use1-b": [], "usw2-a": []})
    for _ in range(2):
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert changes == [("use1-a", CircuitState.OPEN, "CKR_DEVICE_ERROR")]

    breaker = d.breakers["use1-b"]
    breaker.record_failure(cause="CKR_DEVICE_ERROR")
    breaker.record_failure(cause="CKR_DEVICE_ERROR")
    breaker.record_failure()  # a probe past its time opens it
    assert changes[-1] == ("use1-b", CircuitState.OPEN, "")
    clock.sleep(2.0)
    assert breaker.allow()  # the half-open trial
    breaker.record_failure(busy=True, cause="CKR_FUNCTION_FAILED")
    assert changes[-2:] == [("use1-b", CircuitState.HALF_OPEN, ""),
                            ("use1-b", CircuitState.OPEN, "CKR_FUNCTION_FAILED")]


class _Hanging(SimpleNamespace):
    def hung_calls(self) -> tuple[int, float]:
        return self.hung

    def probe(self, deadline: float) -> None:
        self.probes += 1


def test_watchdog_keeps_a_hung_clusters_circuit_open_and_logs_each_hang_once(caplog) -> None:
    clock = FakeClock(1000.0)
    backends = {n: _Hanging(name=n, spec=ClusterSpec(n, r, n), hung=(0, 0.0), probes=0) for n, r in REGIONS.items()}
    breakers = {n: CircuitBreaker(n, clock=clock, cooldown=2.0) for n in REGIONS}
    monitor = HealthMonitor(backends, breakers, interval=0.25)
    backends["use1-a"].hung = (3, 2.4)
    caplog.set_level("WARNING", logger="router.health")
    for _ in range(20):  # 5 s of looks: the cooldown never runs out while calls hang
        monitor.watch_once()
        assert not monitor.probe_once("use1-a"), "a hung cluster is not probed"
        clock.sleep(0.25)
    assert breakers["use1-a"].state is CircuitState.OPEN
    assert backends["use1-a"].probes == 0
    assert breakers["use1-b"].state is CircuitState.CLOSED and breakers["usw2-a"].state is CircuitState.CLOSED
    hung = [r for r in caplog.records if "have not returned" in r.getMessage()]
    assert len(hung) == 1 and hung[0].levelname == "ERROR"
    assert "cluster use1-a: 3 PKCS #11 call(s) have not returned for 2.4 s (call_timeout 2.0 s)" in hung[0].getMessage()

    backends["use1-a"].hung = (0, 0.0)  # the calls came back
    monitor.watch_once()
    assert [r.getMessage() for r in caplog.records if "returned" in r.getMessage()][-1] == (
        "cluster use1-a: its hung PKCS #11 calls have returned")
    assert monitor.probe_once("use1-a") and backends["use1-a"].probes == 1
    assert breakers["use1-a"].state is CircuitState.CLOSED, "the probe's success closes it"


def test_every_candidate_down_is_unavailable_with_the_hsm_error_behind_it() -> None:
    """The failed call is counted with the HSM's error (hsmgw_pkcs11_errors_total), not only
    the circuits it opened."""
    clock = FakeClock(1000.0)
    d = make(clock)

    def down(backend):
        raise ClusterDown(f"{backend.name} failed", cluster=backend.name) from p11.DeviceError()

    with pytest.raises(Unavailable, match="^no cluster could serve k: usw2-a failed$") as caught:
        d.run(["use1-a", "usw2-a"], down, clock() + 5, "k")
    failure = describe_failure(grpc.StatusCode.UNAVAILABLE, None, caught.value)
    assert (failure.error_class, failure.cluster, failure.ckr) == ("Unavailable", "", "CKR_DEVICE_ERROR")


def test_retry_budget_caps_extra_attempts() -> None:
    clock = FakeClock(1000.0)
    d = make(clock, ratio=0.2, min_per_second=0.0, window=10.0)
    d.budget._tokens = 0.0  # start empty: only the 20 % earned by requests may be retries
    outcomes = {n: [] for n in REGIONS}
    outcomes["use1-a"] = [ClusterDown] * 1000
    fn, _ = script(outcomes)
    errors = 0
    for _ in range(100):
        d.breakers["use1-a"] = CircuitBreaker("use1-a", clock=clock, failures_to_open=10**6, window=10**6)
        try:
            d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
        except (ClusterDown, Unavailable):
            errors += 1
    assert d.budget.retries <= 0.2 * 100 + 1
    assert d.budget.refused > 0 and errors > 0


def test_drained_and_failed_over_clusters_go_last() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    assert d.order(["use1-a", "usw2-a", "use1-b"]) == ("use1-a", "use1-b", "usw2-a")
    d.set_drained({"use1-a"})
    assert d.order(["use1-a", "usw2-a", "use1-b"]) == ("use1-b", "usw2-a", "use1-a")
    d.set_drained(set())
    d.set_failed_over({"us-east-1"})
    assert d.order(["use1-a", "usw2-a", "use1-b"]) == ("usw2-a", "use1-a", "use1-b")
    assert not d.usable("use1-a") and d.usable("usw2-a")


def test_orders_stay_right_beyond_the_candidate_lists_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.dispatch

    monkeypatch.setattr(router.dispatch, "_ORDERS_KEPT", 2)
    d = make(FakeClock(1000.0))
    expected = {("usw2-a", "use1-a"): ("use1-a", "usw2-a"), ("use1-b", "usw2-a"): ("use1-b", "usw2-a"),
                ("usw2-a", "use1-b", "use1-a"): ("use1-b", "use1-a", "usw2-a"), ("use1-a", "nowhere"): ("use1-a",)}
    for _ in range(3):  # more lists than are remembered, asked again and again
        for names, order in expected.items():
            assert d.order(list(names)) == order
    d.set_drained({"use1-b"})
    assert d.order(["use1-b", "usw2-a"]) == ("usw2-a", "use1-b")


def test_a_refused_record_is_not_the_final_word_while_the_deadline_or_budget_left_clusters_unasked() -> None:
    """The first cluster refuses an EXTERNAL key's record, and the run stops before the others are
    asked: UNAVAILABLE (retry), not KEY_RECORD_MISMATCH, which the router remembers against the record."""
    clock = FakeClock(1000.0)
    fn, calls = script({"use1-a": [WrappedKeyRefused], "use1-b": [], "usw2-a": []})

    def slow(backend):
        clock.sleep(10)  # the refusal took the whole deadline
        return fn(backend)

    with pytest.raises(Unavailable, match="the deadline passed before the other clusters, which may unwrap it, "
                                          "were asked") as cut_short:
        make(clock).run(["use1-a", "usw2-a"], slow, clock() + 5, "k")
    assert not isinstance(cut_short.value, WrappedKeyRefused) and calls == ["use1-a"]

    d = make(clock, ratio=0.0, min_per_second=0.0)
    d.budget._tokens = 0.0
    fn, calls = script({"use1-a": [WrappedKeyRefused], "use1-b": [], "usw2-a": []})
    with pytest.raises(Unavailable, match="the retry budget is spent: the other clusters, which may unwrap it, "
                                          "were not asked"):
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert calls == ["use1-a"]


# -- when a circuit opens ------------------------------------------------------------


def _feed(breaker: CircuitBreaker, clock: FakeClock, pattern: str, times: int = 1) -> list[CircuitState]:
    """Outcomes one ms apart: "S" success, "F" cluster failure, "B" busy answer; the states seen after each."""
    seen = []
    for _ in range(times):
        for outcome in pattern:
            clock.sleep(0.001)
            if outcome == "S":
                breaker.record_success()
            else:
                breaker.record_failure(busy=outcome == "B")
            seen.append(breaker.state)
    return seen


def test_a_cluster_failing_a_minority_of_calls_keeps_its_circuit_closed() -> None:
    """30 % of calls fail, in runs of up to 6 (as concurrent requests give them): the cluster
    answers most calls, so it keeps serving; its failed calls are for retries elsewhere."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock)
    _feed(breaker, clock, "S" * 1000)
    onset = _feed(breaker, clock, "SFSSFSSSFS", times=10)  # no runs yet: the first run could be a dead cluster's
    pattern = "SSSSFFFSSS" "SFSSSSFSSF" "SSSSSSFFFF" "FFSSSSSSSS"
    assert pattern.count("F") == 0.3 * len(pattern) and "FFFFFF" in pattern
    assert set(onset + _feed(breaker, clock, pattern, times=100)) == {CircuitState.CLOSED}


def test_a_dead_cluster_opens_after_three_failures_busy_or_quiet() -> None:
    clock = FakeClock(1000.0)
    busy = CircuitBreaker("use1-a", clock=clock)
    _feed(busy, clock, "S" * 1000)
    assert _feed(busy, clock, "FFF") == [CircuitState.CLOSED, CircuitState.CLOSED, CircuitState.OPEN]
    quiet = CircuitBreaker("use1-b", clock=clock)
    _feed(quiet, clock, "SS")
    clock.sleep(30)
    assert _feed(quiet, clock, "FFF")[-1] is CircuitState.OPEN


def test_a_cluster_back_from_an_outage_opens_again_after_three_failures() -> None:
    """The probes that failed while the cluster was down say nothing of how often it fails calls
    once it is back: succeeding again, it opens on 3 in a row, as before the outage (not 26)."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock)
    _feed(breaker, clock, "S" * 200)
    assert _feed(breaker, clock, "FFF") == [CircuitState.CLOSED, CircuitState.CLOSED, CircuitState.OPEN]
    for _ in range(60):  # down for a minute: a probe fails every second
        clock.sleep(1.0)
        assert _feed(breaker, clock, "F")[-1] is not CircuitState.CLOSED
    clock.sleep(1.0)
    assert _feed(breaker, clock, "S" * 31) == [CircuitState.CLOSED] * 31, "a probe's success closes it"
    assert _feed(breaker, clock, "FFF") == [CircuitState.CLOSED, CircuitState.CLOSED, CircuitState.OPEN]


def test_a_cluster_failing_a_minority_of_calls_keeps_its_circuit_closed_after_a_chance_run_opened_it() -> None:
    """30 % of calls fail; a run of 12 opens the circuit, and the trial closes it again. The
    cluster still fails 30 % of calls: its short runs do not open the circuit once it is closed."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock, cooldown=2.0)
    pattern = "SSSSFFFSSS" "SFSSSSFSSF" "SSSSSSFFFF" "FFSSSSSSSS"
    _feed(breaker, clock, "S" * 1000)
    _feed(breaker, clock, "SFSSFSSSFS", times=10)
    assert set(_feed(breaker, clock, pattern, times=10)) == {CircuitState.CLOSED}
    assert _feed(breaker, clock, "F" * 12)[-1] is CircuitState.OPEN, "12 in a row is hardly chance at 30 %"
    clock.sleep(2.0)
    assert breaker.allow()  # the half-open trial
    assert _feed(breaker, clock, "S") == [CircuitState.CLOSED]
    assert set(_feed(breaker, clock, pattern, times=100)) == {CircuitState.CLOSED}


def test_a_cluster_failing_some_calls_needs_a_longer_run_then_opens() -> None:
    """10 % of its last calls failed: 3 or 5 in a row could be chance, 8 hardly."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock)
    _feed(breaker, clock, "SSSSSSSSFS", times=30)
    seen = _feed(breaker, clock, "FFFFFFFF")
    assert seen[:5] == [CircuitState.CLOSED] * 5 and seen[-1] is CircuitState.OPEN


def test_a_cluster_failing_most_calls_opens_on_the_rate() -> None:
    """Two of three calls fail, never three in a row: the failure rate opens it."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock)
    _feed(breaker, clock, "S" * 100)
    assert CircuitState.OPEN in _feed(breaker, clock, "FFS", times=40)


def test_a_busy_hsm_is_not_a_dead_one() -> None:
    """Busy answers (throttling) never open a circuit as a run of failures; a cluster busy on
    most calls is skipped once it has answered enough of them, and says it is busy."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock)
    _feed(breaker, clock, "S" * 100)
    seen = _feed(breaker, clock, "B" * 100)
    assert seen[:49] == [CircuitState.CLOSED] * 49, "opened before half its last 100 calls were busy"
    assert seen[-1] is not CircuitState.CLOSED
    assert breaker.busy
    breaker.record_success()
    assert not breaker.busy and breaker.state is CircuitState.CLOSED


def test_a_cluster_that_throttled_then_dies_opens_after_three_failures() -> None:
    """Busy answers count toward the failure rate only: after a spell of throttling that opened
    and closed its circuit, a cluster that then stops answering opens on 3 in a row, not after a
    run long enough for a cluster that fails half its calls (20) or on the rate (20 calls)."""
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock, cooldown=2.0)
    _feed(breaker, clock, "S" * 100)
    assert _feed(breaker, clock, "B" * 60)[-1] is not CircuitState.CLOSED, "busy on half its last 100 calls"
    clock.sleep(2.0)
    assert breaker.allow()  # the half-open trial
    assert _feed(breaker, clock, "S" * 10) == [CircuitState.CLOSED] * 10
    assert _feed(breaker, clock, "FFF") == [CircuitState.CLOSED, CircuitState.CLOSED, CircuitState.OPEN]


# -- every candidate's circuit open: ask the one most likely to answer ----------------------


def _open(d: Dispatcher, clock: FakeClock, name: str, recent: str) -> None:
    """Give ``name`` these last outcomes, then open its circuit."""
    _feed(d.breakers[name], clock, recent)
    d.breakers[name].trip()
    d.breakers[name]._held = False  # opened by its outcomes, as record_failure does, not for hung calls


def test_with_every_circuit_open_a_request_goes_to_the_cluster_most_likely_to_answer() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    _open(d, clock, "use1-a", "SSSFFFSSFS")
    _open(d, clock, "usw2-a", "SSSSSSSFSS")
    fn, calls = script({n: [] for n in REGIONS})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k") == ("ok@usw2-a", "usw2-a")
    assert calls == ["usw2-a"] and d.panics == 1
    assert d.breakers["usw2-a"].state is CircuitState.CLOSED, "its answer closes the circuit"
    assert d.breakers["use1-a"].state is CircuitState.OPEN


def test_the_panic_log_line_says_whether_the_circuit_is_open_or_half_open(caplog) -> None:
    caplog.set_level("WARNING", logger="router.dispatch")
    clock = FakeClock(1000.0)
    fn, _ = script({n: [] for n in REGIONS})
    d = make(clock)
    _open(d, clock, "use1-a", "F" * 10)
    _open(d, clock, "usw2-a", "SSSSSSSFSS")
    d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert caplog.messages[-1] == (
        "every candidate of a request failed or was skipped for its circuit (skipped: use1-a, usw2-a): it goes to "
        "usw2-a, whose circuit is open but which answered 9 of its last 10 calls, instead of being refused (logged "
        "once every 10 s)")

    d = make(clock)
    _feed(d.breakers["usw2-a"], clock, "SSSSSSSFFF")  # a run of 3 opens it
    clock.sleep(2.0)
    assert d.breakers["usw2-a"].allow()  # the half-open trial, under way
    _open(d, clock, "use1-a", "F" * 10)
    d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert d.panics == 1 and caplog.messages[-1] == (
        "every candidate of a request failed or was skipped for its circuit (skipped: use1-a, usw2-a): it goes to "
        "usw2-a, whose circuit is half-open with its trial under way but which answered 7 of its last 10 calls, "
        "instead of being refused (logged once every 10 s)")


def test_with_every_circuit_open_and_none_answering_a_request_is_refused_at_once() -> None:
    """Dead clusters (none of their last calls answered) and hung ones (held open by the
    watchdog) are not asked: UNAVAILABLE naming the last candidate, no HSM call."""
    clock = FakeClock(1000.0)
    d = make(clock)
    _open(d, clock, "use1-a", "F" * 10)
    _feed(d.breakers["usw2-a"], clock, "S" * 10)
    d.breakers["usw2-a"].trip()  # hung calls
    fn, calls = script({n: [] for n in REGIONS})
    with pytest.raises(Unavailable, match="no healthy cluster can serve k") as refused:
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert calls == [] and d.panics == 0
    assert (refused.value.reason, refused.value.cluster, refused.value.region) == ("UNAVAILABLE", "usw2-a", "us-west-2")


def test_a_cluster_whose_calls_hung_is_not_asked_in_a_panic_while_its_trial_is_under_way() -> None:
    """usw2-a's calls hung and came back; after the cooldown its trial call hangs too. Its
    successes from before the hang do not make it the cluster most likely to answer: the
    request goes to use1-a, which answered fewer of its last calls but has none hanging."""
    clock = FakeClock(1000.0)
    d = make(clock)
    _feed(d.breakers["usw2-a"], clock, "S" * 10)
    d.breakers["usw2-a"].trip()  # the watchdog found calls past their time
    clock.sleep(2.0)  # they returned, and the cooldown ran out
    assert d.breakers["usw2-a"].allow(), "the half-open trial"  # it hangs
    _open(d, clock, "use1-a", "SSSFFFSSFS")
    fn, calls = script({n: [] for n in REGIONS})
    assert d.run(["usw2-a", "use1-a"], fn, clock() + 5, "k") == ("ok@use1-a", "use1-a")
    assert calls == ["use1-a"] and d.panics == 1
    assert d.breakers["usw2-a"].state is CircuitState.HALF_OPEN

    d.breakers["usw2-a"].record_success()  # the trial answered: the hang is over
    assert d.breakers["usw2-a"].state is CircuitState.CLOSED and d.breakers["usw2-a"].answered() == 10


def test_a_request_that_failed_where_it_could_goes_to_an_open_cluster_rather_than_fail() -> None:
    """use1-a fails the request twice; usw2-a's circuit opened on a chance run but it answers
    most calls: the request is retried there (from the retry budget) instead of failing."""
    clock = FakeClock(1000.0)
    d = make(clock)
    _open(d, clock, "usw2-a", "SSSSFSSFSS")
    fn, calls = script({"use1-a": [ClusterDown, ClusterDown], "use1-b": [], "usw2-a": []})
    assert d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k") == ("ok@usw2-a", "usw2-a")
    assert calls == ["use1-a", "use1-a", "usw2-a"] and d.budget.retries == 2


def test_every_candidate_busy_is_resource_exhausted_with_a_delay_not_unavailable() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)
    for name in ("use1-a", "usw2-a"):
        _feed(d.breakers[name], clock, "B" * 40)
        assert d.breakers[name].state is CircuitState.OPEN
    fn, calls = script({n: [Throttled] * 5 for n in REGIONS})
    with pytest.raises(Throttled) as refused:
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert refused.value.reason == "HSM_BUSY" and refused.value.cluster in ("use1-a", "usw2-a")
    assert refused.value.retry_after is not None and refused.value.retry_after >= 0.1
    assert refused.value.message == ("every cluster that can serve k is busy (cluster use1-a takes requests again "
                                     "shortly)")


def test_a_busy_candidate_among_down_ones_is_resource_exhausted_and_says_the_others_are_down() -> None:
    """Come back shortly (the busy cluster will take requests), but not "every cluster is busy":
    the other candidates are down."""
    clock = FakeClock(1000.0)
    d = make(clock)
    _feed(d.breakers["use1-a"], clock, "B" * 40)
    _open(d, clock, "use1-b", "F" * 10)
    _open(d, clock, "usw2-a", "F" * 10)
    fn, calls = script({n: [] for n in REGIONS})
    with pytest.raises(Throttled) as refused:
        d.run(["use1-a", "use1-b", "usw2-a"], fn, clock() + 5, "k")
    assert calls == [] and (refused.value.reason, refused.value.cluster) == ("HSM_BUSY", "use1-a")
    assert refused.value.message == ("cluster use1-a, which can serve k, is busy (it takes requests again shortly); "
                                     "clusters use1-b and usw2-a are down or hung")

    _feed(d.breakers["use1-b"], clock, "S" + "B" * 39)  # busy too now; it reopens later than use1-a
    with pytest.raises(Throttled) as refused:
        d.run(["use1-a", "use1-b", "usw2-a"], fn, clock() + 5, "k")
    assert refused.value.message == ("clusters use1-a and use1-b, which can serve k, are busy (cluster use1-a takes "
                                     "requests again shortly); cluster usw2-a is down or hung")


def test_a_copy_missing_where_the_budget_left_another_candidate_unasked_is_out_of_reach() -> None:
    """The first cluster lacks the key and the budget allows no retry: the next, which may hold
    it, was not asked, so the key is out of reach (UNAVAILABLE, naming it), not NOT_FOUND."""
    clock = FakeClock(1000.0)
    d = make(clock, ratio=0.0, min_per_second=0.0)
    d.budget._tokens = 0.0
    fn, calls = script({"use1-a": [KeyNotFound], "use1-b": [], "usw2-a": []})
    with pytest.raises(KeyOutOfReach, match="was not asked") as refused:
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert calls == ["use1-a"]
    assert (refused.value.cluster, refused.value.region) == ("usw2-a", "us-west-2")


def test_an_error_that_names_no_cluster_is_given_the_cluster_it_came_from() -> None:
    clock = FakeClock(1000.0)
    d = make(clock)

    def fn(backend: SimpleNamespace) -> str:
        raise Throttled("could not read the key's attributes")

    with pytest.raises(Throttled) as refused:
        d.run(["use1-a", "usw2-a"], fn, clock() + 5, "k")
    assert (refused.value.cluster, refused.value.region) == ("usw2-a", "us-west-2")
