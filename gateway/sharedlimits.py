"""Per-identity limits shared by the worker processes of one ``hsmgw serve --workers N``.

The kernel spreads connections over the workers, so limits kept by each worker alone
would let an identity that uses several connections reach N times its rate, burst and
concurrency. Here the supervisor creates one file (``create``, in its private
directory) and every worker maps it (``SharedLimiter``).

Each identity has a slot, found by a 16-byte BLAKE2b digest of its name: its token
bucket (tokens, and when they were last counted, on the system-wide monotonic clock,
so every worker reads the same time) and one count of calls in flight per worker.

- The bucket, and the check of the summed counts against the concurrency limit, change
  only under a POSIX record lock on the slot. Record locks keep processes apart, not a
  process's own threads, so a thread lock is taken as well.
- A worker writes only its own count, so ending a call takes no file lock.
- A worker that starts zeroes its own counts: calls that a dead worker had in flight no
  longer count.
- A new identity takes a free slot under a lock on the header. When every slot is taken
  (``SLOTS`` identities), the identities left over get limits per worker, as with one
  worker alone, and the gateway logs a warning once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.auth import Limits
from gateway.interceptors import CONCURRENCY_RETRY, ConcurrencyLimited, Limiter, RateLimited

log = logging.getLogger(__name__)

MAGIC = b"HSMGWLIM"
VERSION = 1
SLOTS = 16_384
"""Identities the file has room for."""

_HEADER = struct.Struct("<8sIII")  # magic, version, slots, workers
_HEADER_SIZE = 64
_DIGEST = 16
_BUCKET = struct.Struct("<dd")  # tokens, stamp (0: never charged)
_COUNT = struct.Struct("<q")
_EMPTY = bytes(_DIGEST)
_OVERFLOW_MEMORY = 10_000
_UNLIMITED = Limits()


class SharedLimitsError(RuntimeError):
    """The shared limits file is missing, damaged, or made for fewer workers."""


def _slot_size(workers: int) -> int:
    return _DIGEST + _BUCKET.size + _COUNT.size * workers


def create(path: Path, workers: int, *, slots: int = SLOTS) -> None:
    """A fresh limits file for ``workers`` workers (mode 0600; all counts zero)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _HEADER_SIZE + slots * _slot_size(workers))  # sparse: zeroes
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, slots, workers), 0)
    finally:
        os.close(fd)


class SharedLimiter(Limiter):
    """``Limiter`` for worker ``index``, on the file ``create`` made."""

    def __init__(self, path: Path, index: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)  # its own buckets and counts: identities without a slot
        try:
            self._fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise SharedLimitsError(f"cannot open the shared limits file {path}: {exc.strerror}") from None
        mapped: mmap.mmap | None = None
        try:
            mapped = mmap.mmap(self._fd, 0)
            magic, version, slots, workers = _HEADER.unpack_from(mapped, 0)
            if magic != MAGIC or version != VERSION:
                raise SharedLimitsError(f"{path} is not a limits file of this version")
            if not 0 <= index < workers:
                raise SharedLimitsError(f"{path} is made for {workers} workers; this is worker {index}")
            if len(mapped) < _HEADER_SIZE + slots * _slot_size(workers):
                raise SharedLimitsError(f"{path} is shorter than its header says")
        except (SharedLimitsError, ValueError, struct.error) as exc:
            if mapped is not None:
                mapped.close()
            os.close(self._fd)
            raise SharedLimitsError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
        self._map = mapped
        self._slots, self._workers, self._index = int(slots), int(workers), index
        self._size = _slot_size(workers)
        self._thread_lock = threading.Lock()
        self._found: dict[str, int] = {}
        self._overflow: set[str] = set()  # identities known to have no slot
        self._warned = False
        self._forget_own_counts()

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    # -- the slots ------------------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * self._size

    def _forget_own_counts(self) -> None:
        column = _DIGEST + _BUCKET.size + _COUNT.size * self._index
        for slot in range(self._slots):
            offset = self._offset(slot)
            if self._map[offset:offset + _DIGEST] != _EMPTY:
                _COUNT.pack_into(self._map, offset + column, 0)

    def _slot(self, identity: str) -> int | None:
        """The identity's slot (taking a free one), or None when the file is full."""
        slot = self._found.get(identity)
        if slot is not None or identity in self._overflow:
            return slot
        digest = hashlib.blake2b(identity.encode(), digest_size=_DIGEST).digest()
        if digest == _EMPTY:  # never, in practice; the empty marker must stay unambiguous
            return None
        start = int.from_bytes(digest[:8], "little") % self._slots
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, _HEADER_SIZE, 0)
            try:
                for probe in range(self._slots):
                    slot = (start + probe) % self._slots
                    offset = self._offset(slot)
                    held = self._map[offset:offset + _DIGEST]
                    if held == digest:
                        break
                    if held == _EMPTY:
                        self._map[offset:offset + _DIGEST] = digest
                        break
                else:
                    slot = None
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, _HEADER_SIZE, 0)
        if slot is None:  # slots are never given back: the file stays full
            if len(self._overflow) >= _OVERFLOW_MEMORY:
                self._overflow.clear()
            self._overflow.add(identity)
            if not self._warned:
                self._warned = True
                log.warning("the shared limits file has room for %d identities and is full: limits of the others "
                            "hold per worker process", self._slots)
            return None
        self._found[identity] = slot
        return slot

    def _in_flight_at(self, offset: int) -> int:
        base = offset + _DIGEST + _BUCKET.size
        return sum(_COUNT.unpack_from(self._map, base + _COUNT.size * w)[0] for w in range(self._workers))

    def _set_own(self, offset: int, count: int) -> None:
        """Under the thread lock: this worker's count, which only it writes (its own counts mirrored)."""
        _COUNT.pack_into(self._map, offset + _DIGEST + _BUCKET.size + _COUNT.size * self._index, count)

    def _charge_at(self, offset: int, identity: str, limits: Limits, cost: int, now: float) -> None:
        """Under both locks: take ``cost`` tokens from the slot's bucket, or raise RateLimited."""
        tokens, stamp = _BUCKET.unpack_from(self._map, offset + _DIGEST)
        bucket = limits.bucket
        tokens = bucket if stamp == 0.0 else min(bucket, tokens + max(0.0, now - stamp) * limits.rate)
        need = min(float(cost), bucket)
        if tokens + 1e-9 < need:  # retrying after exactly retry_after must succeed
            _BUCKET.pack_into(self._map, offset + _DIGEST, tokens, now)
            wait = (need - tokens) / limits.rate
            raise RateLimited(
                f"identity {identity!r} is over its rate limit ({limits.rate:g}/s, burst {bucket:g}); "
                f"retry in {wait:.3f}s",
                retry_after=wait,
            )
        _BUCKET.pack_into(self._map, offset + _DIGEST, tokens - cost, now)

    def _locked(self, offset: int) -> _SlotLock:
        return _SlotLock(self._fd, self._thread_lock, offset, self._size)

    # -- Limiter ------------------------------------------------------------------------------

    def enter(self, identity: str, limits: Limits) -> None:
        self.admit(identity, limits, 0)

    def admit(self, identity: str, limits: Limits, cost: int = 1) -> None:
        charge = cost > 0 and limits.rate > 0
        # An identity without limits shares nothing: its calls are counted in this process only.
        slot = self._slot(identity) if charge or limits.concurrency else None
        if slot is None:
            Limiter.enter(self, identity, limits)
            if charge:
                try:
                    Limiter.charge(self, identity, limits, cost)
                except RateLimited:
                    Limiter.leave(self, identity)
                    raise
            return
        offset = self._offset(slot)
        with self._locked(offset):
            own = Limiter.in_flight(self, identity)
            self._set_own(offset, own)  # calls counted while it had no limits
            if limits.concurrency:
                in_flight = self._in_flight_at(offset)
                if in_flight >= limits.concurrency:
                    raise ConcurrencyLimited(
                        f"identity {identity!r} already has {in_flight} calls in flight, its limit",
                        retry_after=CONCURRENCY_RETRY,
                    )
            if charge:
                self._charge_at(offset, identity, limits, cost, self._clock())
            Limiter.enter(self, identity, _UNLIMITED)
            self._set_own(offset, own + 1)

    def leave(self, identity: str) -> None:
        slot = self._found.get(identity)
        if slot is None:
            Limiter.leave(self, identity)
            return
        with self._thread_lock:
            Limiter.leave(self, identity)
            self._set_own(self._offset(slot), Limiter.in_flight(self, identity))

    def charge(self, identity: str, limits: Limits, cost: int = 1) -> None:
        if limits.rate <= 0:
            return
        slot = self._slot(identity)
        if slot is None:
            Limiter.charge(self, identity, limits, cost)
            return
        offset = self._offset(slot)
        with self._locked(offset):
            self._charge_at(offset, identity, limits, cost, self._clock())

    def in_flight(self, identity: str) -> int:
        """Calls in flight for ``identity``: in every worker once it has had limits, else in this one."""
        slot = self._found.get(identity)
        if slot is None:
            return Limiter.in_flight(self, identity)
        offset = self._offset(slot)
        with self._thread_lock:
            self._set_own(offset, Limiter.in_flight(self, identity))
        return self._in_flight_at(offset)


class _SlotLock:
    """The thread lock, then the record lock on one slot's bytes."""

    __slots__ = ("_fd", "_lock", "_offset", "_size")

    def __init__(self, fd: int, lock: threading.Lock, offset: int, size: int) -> None:
        self._fd, self._lock, self._offset, self._size = fd, lock, offset, size

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, self._size, self._offset)
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *_: object) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, self._size, self._offset)
        finally:
            self._lock.release()


__all__ = ["SLOTS", "SharedLimiter", "SharedLimitsError", "create"]
