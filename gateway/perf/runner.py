"""Running a workload: client processes, a shared start, a progress line, merged results.

Each client process is a fresh interpreter (``spawn``: nothing of the parent's
gRPC or PKCS #11 state is inherited). It opens its driver — connections to the
gateway, or the PKCS #11 module for ``--direct`` — makes one call per slot to
fail fast, reports ready, and waits. The parent then sets one start time for
all; every slot runs its calls in a loop (paced when a rate is asked), records
the latency of each call that starts after the warm-up and ends before the end,
and the processes send their samples back.
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol, TextIO

from gateway.perf.grpc_driver import Call
from gateway.perf.report import Report, Sample
from gateway.perf.workload import Workload

READY_TIMEOUT = 120.0


class Client(Protocol):
    calls: list[Call]

    def close(self) -> None: ...


class Driver(Protocol):
    """Something a client process can open: ``GatewayTarget`` or ``DirectTarget``."""

    def open(self, workload: Workload, process: int) -> Client: ...


class RunError(RuntimeError):
    """A client process could not start; the message says which and why."""


def run(
    workload: Workload,
    driver: Driver,
    *,
    label: str = "",
    progress: TextIO | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Report:
    """Run ``workload`` through ``driver``; ``progress`` gets a live line (use a terminal)."""
    workload.check()
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.Array("q", workload.slots * 2, lock=False)  # per slot: ops, errors (warm-up included)
    start = ctx.Value("d", 0.0, lock=False)
    go = ctx.Event()
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_client_main, args=(driver, workload, i, counters, start, go, results),
                    name=f"loadtest-{i}", daemon=True)
        for i in range(workload.processes)
    ]
    for proc in procs:
        proc.start()
    try:
        _await(results, procs, "ready", READY_TIMEOUT)
        if on_ready is not None:
            on_ready()
        start.value = time.monotonic() + 0.1
        go.set()
        end = start.value + workload.warmup + workload.duration
        if progress is not None:
            _progress(progress, counters, start.value, workload, end)
        samples = _await(results, procs, "sample", workload.warmup + workload.duration + 60.0)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    info = asdict(workload) | {"algorithm": workload.algorithm.value}
    info["key_ids"] = list(workload.key_ids)
    return Report.merge(label or workload.describe(), workload.duration, samples, info)


def _await(results: Any, procs: list[Any], kind: str, timeout: float) -> list[Any]:
    got: dict[int, Any] = {}
    end = time.monotonic() + timeout
    while len(got) < len(procs):
        try:
            what, index, value = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p for i, p in enumerate(procs) if i not in got and not p.is_alive()]
            if dead:
                raise RunError(f"client process {dead[0].name} exited with {dead[0].exitcode}") from None
            if time.monotonic() > end:
                raise RunError(f"client processes were not {kind} within {timeout:g}s") from None
            continue
        if what == "error":
            raise RunError(f"client process {index}: {value}")
        got[index] = value
    return [got[i] for i in sorted(got)]


def _progress(out: TextIO, counters: Any, begin: float, w: Workload, end: float) -> None:
    last_ops, last_t = 0, begin
    while True:
        now = time.monotonic()
        if now >= end:
            break
        time.sleep(min(0.5, max(0.0, end - now)))
        now = time.monotonic()
        ops = sum(counters[i] for i in range(0, len(counters), 2))
        errors = sum(counters[i] for i in range(1, len(counters), 2))
        rate = (ops - last_ops) / max(1e-6, now - last_t)
        last_ops, last_t = ops, now
        phase = "warm-up" if now < begin + w.warmup else "measuring"
        out.write(f"\r{phase:9} {max(0.0, now - begin):5.1f}s/{w.warmup + w.duration:g}s  "
                  f"{ops:>10,} ops  {rate:>9,.0f} ops/s  {errors:,} errors ")
        out.flush()
    out.write("\n")
    out.flush()


# -- in the client process -------------------------------------------------------------------


def _client_main(driver: Driver, w: Workload, index: int, counters: Any, start: Any, go: Any, results: Any) -> None:
    try:
        client = driver.open(w, index)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this process's failure
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, None))
    go.wait()
    begin = start.value + w.warmup
    end = begin + w.duration
    interval = w.slots * w.ops_per_call / w.rate if w.rate else 0.0
    samples = [Sample() for _ in client.calls]
    threads = [
        threading.Thread(target=_slot_loop, name=f"slot-{j}",
                         args=(call, start.value, begin, end, interval, j / max(1, len(client.calls)),
                               counters, 2 * (index * w.in_flight + j), samples[j]))
        for j, call in enumerate(client.calls)
    ]
    for thread in threads:
        thread.start()
    _sleep_until(begin)
    cpu = time.process_time()
    _sleep_until(end)
    cpu = time.process_time() - cpu
    for thread in threads:
        thread.join()
    merged = Sample(cpu=cpu)
    for sample in samples:
        merged.ops += sample.ops
        merged.calls += sample.calls
        merged.errors.update(sample.errors)
        merged.latencies.extend(sample.latencies)
    results.put(("sample", index, merged))
    try:
        client.close()
    except Exception:  # noqa: BLE001 - the results are in; closing is best effort
        pass


def _sleep_until(when: float) -> None:
    while (left := when - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def _slot_loop(call: Call, start: float, begin: float, end: float, interval: float, phase: float,
               counters: Any, at: int, sample: Sample) -> None:
    _sleep_until(start)
    due = start + phase * interval  # slots spread over the interval, not in lock step
    clock = time.monotonic
    latencies = sample.latencies
    while True:
        now = clock()
        if now >= end:
            return
        if interval:
            if due > now:
                time.sleep(due - now)
            elif now - due > 1.0:
                due = now  # far behind (the target is too fast): no catch-up burst
            due += interval
        t0 = clock()
        ok, errors = call()
        t1 = clock()
        counters[at] += ok
        if errors:
            counters[at + 1] += sum(errors.values())
        if t0 >= begin and t1 <= end:
            sample.calls += 1
            sample.ops += ok
            latencies.append(t1 - t0)
            if errors:
                sample.errors.update(errors)


def default_progress() -> TextIO | None:
    """stderr when it is a terminal (a live line), else nothing."""
    return sys.stderr if sys.stderr.isatty() else None
