"""Limits shared by the workers of one gateway: one bucket and one in-flight count per identity."""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path

import pytest

from gateway.auth import Limits
from gateway.interceptors import ConcurrencyLimited, Limiter, RateLimited
from gateway.sharedlimits import IDLE, SharedLimiter, SharedLimitsError, create, forget
from tests.support import FakeClock


@pytest.fixture
def limits_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits"
    create(path, workers=2)
    return path


def test_the_workers_share_one_bucket(limits_file: Path) -> None:
    clock = FakeClock(100.0)
    one, two = SharedLimiter(limits_file, 0, clock), SharedLimiter(limits_file, 1, clock)
    limits = Limits(rate=10, burst=10)
    for _ in range(6):
        one.charge("app", limits)
    for _ in range(4):
        two.charge("app", limits)
    for worker in (one, two):
        with pytest.raises(RateLimited) as info:
            worker.charge("app", limits)
        assert info.value.retry_after == pytest.approx(0.1)
    clock.now += 0.5  # five tokens back, for whichever worker asks
    for _ in range(5):
        two.charge("app", limits)
    with pytest.raises(RateLimited):
        one.charge("app", limits)
    one.charge("other", limits)  # buckets are per identity


def test_a_batch_bigger_than_the_bucket_leaves_a_debt_every_worker_sees(limits_file: Path) -> None:
    clock = FakeClock(100.0)
    one, two = SharedLimiter(limits_file, 0, clock), SharedLimiter(limits_file, 1, clock)
    limits = Limits(rate=10, burst=5)
    one.charge("app", limits, cost=50)
    with pytest.raises(RateLimited) as info:
        two.charge("app", limits)
    assert info.value.retry_after == pytest.approx(4.6)  # 45 tokens of debt + 1, at 10/s
    clock.now += 4.6
    two.charge("app", limits)


def test_calls_in_flight_count_across_the_workers(limits_file: Path) -> None:
    one, two = SharedLimiter(limits_file, 0, FakeClock()), SharedLimiter(limits_file, 1, FakeClock())
    limits = Limits(concurrency=3)
    one.enter("app", limits)
    one.enter("app", limits)
    two.enter("app", limits)
    for worker in (one, two):
        with pytest.raises(ConcurrencyLimited) as info:
            worker.enter("app", limits)
        assert "already has 3 calls in flight" in str(info.value)
    assert one.in_flight("app") == two.in_flight("app") == 3
    one.leave("app")
    two.enter("app", limits)  # the slot one freed
    assert two.in_flight("app") == 3


def test_a_call_ends_without_waiting_for_another_worker_s_lock(limits_file: Path) -> None:
    """Only a worker's own count changes when its call ends, and the slot cannot change hands
    while it counts that call: the end takes no file lock, and never waits behind another
    worker's admission. The other workers see the count go down."""
    import fcntl
    import os
    import threading

    from gateway.sharedlimits import _FLOCK

    one, two = SharedLimiter(limits_file, 0, FakeClock()), SharedLimiter(limits_file, 1, FakeClock())
    limits = Limits(concurrency=1)
    one.enter("app", limits)
    with pytest.raises(ConcurrencyLimited):
        two.enter("app", limits)
    other = os.open(limits_file, os.O_RDWR)  # another worker, holding every slot's lock
    try:
        fcntl.fcntl(other, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        ended = threading.Thread(target=one.leave, args=("app",), daemon=True)
        ended.start()
        ended.join(10)
        assert not ended.is_alive(), "the end of a call waited for another worker's lock"
    finally:
        os.close(other)  # releases the lock
    two.enter("app", limits)  # the call that ended no longer counts
    assert two.in_flight("app") == 1


def test_admit_refused_by_the_rate_counts_nothing_in_flight(limits_file: Path) -> None:
    worker = SharedLimiter(limits_file, 0, FakeClock())
    limits = Limits(rate=1, burst=1, concurrency=5)
    worker.admit("app", limits)
    with pytest.raises(RateLimited):
        worker.admit("app", limits)
    assert worker.in_flight("app") == 1
    local = Limiter(FakeClock())
    local.admit("app", limits)
    with pytest.raises(RateLimited):
        local.admit("app", limits)
    assert local.in_flight("app") == 1


def test_a_restarted_worker_no_longer_counts_the_calls_its_predecessor_had_in_flight(limits_file: Path) -> None:
    limits = Limits(concurrency=4)
    survivor, dead = SharedLimiter(limits_file, 0, FakeClock()), SharedLimiter(limits_file, 1, FakeClock())
    survivor.enter("app", limits)
    for _ in range(3):
        dead.enter("app", limits)  # and then it dies, without leaving
    with pytest.raises(ConcurrencyLimited):
        survivor.enter("app", limits)
    restarted = SharedLimiter(limits_file, 1, FakeClock())
    assert survivor.in_flight("app") == 1
    restarted.enter("app", limits)
    survivor.enter("app", limits)
    restarted.enter("app", limits)
    assert restarted.in_flight("app") == survivor.in_flight("app") == 4
    with pytest.raises(ConcurrencyLimited):
        survivor.enter("app", limits)


def test_identities_beyond_the_file_s_room_are_limited_per_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "small"
    create(path, workers=2, slots=2)
    one, two = SharedLimiter(path, 0, FakeClock()), SharedLimiter(path, 1, FakeClock())
    limits = Limits(rate=1, burst=1)
    one.charge("a", limits)
    one.charge("b", limits)
    with caplog.at_level(logging.WARNING, logger="gateway.sharedlimits"):
        one.charge("c", limits)  # no slot left: this worker's own bucket
        two.charge("c", limits)  # and that one's
    assert "no room in the shared limits file for identity 'c'" in caplog.text
    with pytest.raises(RateLimited):
        two.charge("a", limits)  # the first two still share theirs


def test_a_slot_idle_long_enough_goes_to_a_new_identity(tmp_path: Path) -> None:
    path = tmp_path / "small"
    create(path, workers=2, slots=2)
    clock = FakeClock(1000.0)
    one, two = SharedLimiter(path, 0, clock), SharedLimiter(path, 1, clock)
    limits = Limits(rate=1, burst=1)
    one.charge("a", limits)
    two.enter("b", Limits(concurrency=5))  # b has a call in flight: its slot stays b's
    clock.now += IDLE + 1
    two.charge("c", limits)  # takes a's slot
    with pytest.raises(RateLimited):
        one.charge("c", limits)  # shared with worker one
    one.charge("a", limits)  # a looks again: it has no slot now, so this worker's own bucket
    assert two.in_flight("b") == 1


def test_the_supervisor_forgets_a_dead_worker_s_calls(limits_file: Path) -> None:
    limits = Limits(concurrency=2)
    survivor, dead = SharedLimiter(limits_file, 0, FakeClock()), SharedLimiter(limits_file, 1, FakeClock())
    dead.enter("app", limits)
    dead.enter("app", limits)  # and it dies with both in flight
    with pytest.raises(ConcurrencyLimited):
        survivor.enter("app", limits)
    forget(limits_file, 1)
    survivor.enter("app", limits)
    survivor.enter("app", limits)
    assert survivor.in_flight("app") == 2


def test_calls_that_began_without_limits_count_once_limits_apply(limits_file: Path) -> None:
    """A policy reload gives an identity a concurrency limit while it has calls in flight."""
    one, two = SharedLimiter(limits_file, 0, FakeClock()), SharedLimiter(limits_file, 1, FakeClock())
    two.enter("app", Limits(concurrency=5))  # two knows the identity's slot
    for _ in range(3):
        two.enter("app", Limits())  # the policy says nothing about it now
    with pytest.raises(ConcurrencyLimited):
        one.enter("app", Limits(concurrency=4))  # 4 in flight on two


def test_a_file_that_is_not_for_this_worker_is_refused(tmp_path: Path, limits_file: Path) -> None:
    with pytest.raises(SharedLimitsError, match="made for 2 workers; this is worker 2"):
        SharedLimiter(limits_file, 2)
    with pytest.raises(SharedLimitsError, match="cannot open"):
        SharedLimiter(tmp_path / "missing", 0)
    other = tmp_path / "other"
    other.write_bytes(b"x" * 4096)
    with pytest.raises(SharedLimitsError, match="not a limits file"):
        SharedLimiter(other, 0)
    assert limits_file.stat().st_mode & 0o777 == 0o600


def _take_all(path: str, index: int, attempts: int, start: float) -> int:
    limiter = SharedLimiter(Path(path), index)
    limits = Limits(rate=1e-6, burst=20_000)  # no refill worth counting while this runs
    time.sleep(max(0.0, start - time.time()))
    granted = 0
    for _ in range(attempts):
        try:
            limiter.charge("app", limits)
        except RateLimited:
            continue
        granted += 1
    return granted


def test_processes_racing_for_the_bucket_get_exactly_its_tokens(limits_file: Path) -> None:
    """Two processes, one per CPU, charging at once: no update is lost, none counted twice."""
    start = time.time() + 3.0  # both started and mapped the file by then
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        granted = pool.starmap(_take_all, [(str(limits_file), i, 30_000, start) for i in (0, 1)])
    assert sum(granted) == 20_000
    assert min(granted) > 1_000, f"both processes took part: {granted}"


def test_a_reload_that_gives_an_identity_limits_counts_its_calls_in_flight_everywhere(limits_file: Path) -> None:
    one, two = SharedLimiter(limits_file, 0, FakeClock()), SharedLimiter(limits_file, 1, FakeClock())
    for _ in range(3):
        two.enter("app", Limits())  # no limits yet: counted in two alone
    limited = Limits(concurrency=4)
    two.sync(lambda identity: limited if identity == "app" else Limits())  # the reload
    one.enter("app", limited)
    with pytest.raises(ConcurrencyLimited):
        one.enter("app", limited)
    local = Limiter(FakeClock())
    local.sync(lambda identity: limited)  # nothing to share


def test_a_descriptor_of_a_file_whose_name_is_gone_serves_as_well(tmp_path: Path) -> None:
    """The supervisor keeps the file open, removes its name and passes the descriptor."""
    import os

    path = tmp_path / "limits"
    create(path, workers=2)
    fd = os.open(path, os.O_RDWR)
    path.unlink()
    try:
        one, two = SharedLimiter(fd, 0, FakeClock()), SharedLimiter(fd, 1, FakeClock())
        limits = Limits(concurrency=1)
        one.enter("app", limits)
        with pytest.raises(ConcurrencyLimited):
            two.enter("app", limits)
        forget(fd, 0)
        two.enter("app", limits)
        one.close()
        two.close()
        SharedLimiter(fd, 0).close()  # each limiter closed its own duplicate, not this one
    finally:
        os.close(fd)
    with pytest.raises(SharedLimitsError, match=r"cannot open the shared limits file \(descriptor 987\)"):
        SharedLimiter(987, 0)


def _hammer(source: str, index: int, start: float, seconds: float) -> tuple[int, list[str]]:
    """Threads of one worker admitting and ending calls of several identities at once."""
    import threading

    limiter = SharedLimiter(Path(source), index)
    limits = Limits(concurrency=1_000)
    done, errors = [0], []

    def run(thread: int) -> None:
        identity = f"id-{thread % 4}"
        while time.time() < start + seconds:
            try:
                limiter.admit(identity, limits, 0)
                limiter.leave(identity)
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - what a call would have failed with
                errors.append(repr(exc))

    time.sleep(max(0.0, start - time.time()))
    threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0], errors[:3]


def test_threads_of_two_processes_never_fail_on_the_file_s_locks(limits_file: Path) -> None:
    """Record locks belong to a process: one process's thread waiting for a slot that the other
    holds while the other waits for one this process holds looked like a deadlock to the kernel,
    which failed a call with EDEADLK. The locks now belong to each worker's own open file."""
    start = time.time() + 3.0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_hammer, [(str(limits_file), i, start, 2.0) for i in (0, 1)])
    assert all(done > 1_000 for done, _ in results), results
    assert [errors for _, errors in results] == [[], []]
    final = SharedLimiter(limits_file, 0)
    assert [final.in_flight(f"id-{i}") for i in range(4)] == [0, 0, 0, 0]


def _end_calls_over_and_over(path: str, admitted: object, stop: object) -> None:
    """Worker 0 with one call in flight, publishing that count again and again the way a call
    that ends does (without the file lock)."""
    worker = SharedLimiter(Path(path), 0)
    worker.admit("app", Limits(concurrency=2))
    admitted.set()  # type: ignore[attr-defined]
    while not stop.is_set():  # type: ignore[attr-defined]
        for _ in range(1000):
            worker._publish("app", ending=True)


def test_a_count_rewritten_without_the_file_lock_is_never_read_as_zero(limits_file: Path) -> None:
    """A worker's count in the shared file is written in one store: another worker checking the
    limit never sees a call in flight as none (a count zeroed for a moment, then written, let a
    third call in under a limit of 2)."""
    spawn = multiprocessing.get_context("spawn")
    admitted, stop = spawn.Event(), spawn.Event()
    writer = spawn.Process(target=_end_calls_over_and_over, args=(str(limits_file), admitted, stop))
    writer.start()
    try:
        assert admitted.wait(30), "worker 0 did not admit its call"
        reader = SharedLimiter(limits_file, 1)
        reader.admit("app", Limits(concurrency=2))  # finds the identity's slot
        reader.leave("app")
        counts = [reader.in_flight("app") for _ in range(100_000)]
    finally:
        stop.set()
        writer.join(30)
    assert set(counts) == {1}, f"{counts.count(0)} of {len(counts)} reads saw no call in flight"
