"""Per-identity limits shared by the worker processes of one ``hsmgw serve --workers N``.

The kernel spreads connections over the workers, so limits kept by each worker alone
would let an identity that uses several connections reach N times its rate, burst and
concurrency. Here the supervisor creates one file (``create``, in its private
directory), keeps it open, removes its name (nothing can delete it from under the
workers then) and passes the descriptor to every worker, which maps it (``SharedLimiter``).

An identity with limits has a slot, found by a 16-byte BLAKE2b digest of its name: its
token bucket (tokens, and when they were last counted, on the system-wide monotonic
clock, so every worker reads the same time), when it was last used, and one count of
calls in flight per worker. An identity without limits shares nothing.

- The bucket, the check of the summed counts against the concurrency limit, and a
  worker's counts change only under a lock on the slot's bytes, held by the worker's own
  open file (``F_OFD_SETLKW``: a process-wide record lock would let the kernel take two
  workers' threads for a deadlock and fail a call). Such a lock keeps open files apart,
  not a process's own threads, so a thread lock is taken as well (one of several, by slot).
  A call's end is the exception: it lowers the worker's own count under the thread lock
  alone (``_publish``, ``ending``) when that count is above 0, since the slot cannot change
  hands while it counts a call.
- A worker writes only its own counts: a copy of its own, kept in step.
- A worker that starts zeroes its own counts, and the supervisor zeroes a dead
  worker's: calls it had in flight no longer count.
- A new identity takes a free slot, or one whose identity has had no call in flight and
  none for ``IDLE`` seconds (its bucket has refilled, as far as any sane limit goes), in
  the first ``PROBES`` slots of its chain, under a lock on the header. A worker that
  finds its identity's slot taken over looks again. When none is free, that identity
  gets limits per worker, as with one worker alone, and the worker logs a warning.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gateway.auth import Limits
from gateway.interceptors import CONCURRENCY_RETRY, ConcurrencyLimited, Limiter, RateLimited

log = logging.getLogger(__name__)

MAGIC = b"HSMGWLIM"
VERSION = 2
SLOTS = 16_384
"""Identities the file holds at once."""
PROBES = 64
"""Slots an identity may take, from the one its digest names."""
IDLE = 600.0
"""Seconds without a call after which an identity's slot may go to another."""

_HEADER = struct.Struct("<8sIII")  # magic, version, slots, workers
_HEADER_SIZE = 64
_DIGEST = 16
_STATE = struct.Struct("<ddd")  # tokens, stamp (0: never charged), last used
_COUNT = struct.Struct("<q")
_COUNTS = _DIGEST + _STATE.size
_EMPTY = bytes(_DIGEST)
_STRIPES = 64
_OVERFLOW_MEMORY = 10_000
_RETRY = 60.0  # seconds before an identity that found no slot looks again
_UNLIMITED = Limits()

_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid (0 for these locks)

T = TypeVar("T")


def _lock(fd: int, start: int, length: int) -> None:
    """Wait for a write lock on the bytes, held by this open file (not by the process: the
    kernel then sees no deadlock between the threads of two workers, and fails none)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))


def _unlock(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))


class SharedLimitsError(RuntimeError):
    """The shared limits file is missing, damaged, or made for fewer workers."""


def _slot_size(workers: int) -> int:
    return _COUNTS + _COUNT.size * workers


def create(path: Path, workers: int, *, slots: int = SLOTS) -> None:
    """A fresh limits file for ``workers`` workers (mode 0600; all counts zero)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _HEADER_SIZE + slots * _slot_size(workers))  # sparse: zeroes
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, slots, workers), 0)
    finally:
        os.close(fd)


class _File:
    """The mapped file (by path, or by a descriptor the supervisor passed): its layout."""

    def __init__(self, source: Path | int) -> None:
        path = f"(descriptor {source})" if isinstance(source, int) else source
        try:
            # An open file of its own (not a duplicate of the descriptor): the locks are the
            # open file's, and must keep this process apart from the others.
            self.fd = os.open(f"/proc/self/fd/{source}" if isinstance(source, int) else source,
                              os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedLimitsError(f"cannot open the shared limits file {path}: {exc.strerror}") from None
        mapped: mmap.mmap | None = None
        try:
            mapped = mmap.mmap(self.fd, 0)
            magic, version, slots, workers = _HEADER.unpack_from(mapped, 0)
            if magic != MAGIC or version != VERSION:
                raise SharedLimitsError(f"{path} is not a limits file of this version")
            if len(mapped) < _HEADER_SIZE + slots * _slot_size(workers):
                raise SharedLimitsError(f"{path} is shorter than its header says")
        except (SharedLimitsError, ValueError, struct.error) as exc:
            if mapped is not None:
                mapped.close()
            os.close(self.fd)
            raise SharedLimitsError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
        self.map = mapped
        self.slots, self.workers = int(slots), int(workers)
        self.size = _slot_size(self.workers)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def offset(self, slot: int) -> int:
        return _HEADER_SIZE + slot * self.size

    def digest_at(self, offset: int) -> bytes:
        return self.map[offset:offset + _DIGEST]

    def zero_counts(self, index: int) -> None:
        """Worker ``index``'s counts, in every slot in use, to 0 (the worker is dead or starting)."""
        if not 0 <= index < self.workers:
            raise SharedLimitsError(f"the shared limits file is made for {self.workers} workers; "
                                    f"there is no worker {index}")
        for slot in range(self.slots):
            offset = self.offset(slot)
            if self.digest_at(offset) != _EMPTY:
                _COUNT.pack_into(self.map, offset + _COUNTS + _COUNT.size * index, 0)


def forget(source: Path | int, index: int) -> None:
    """Worker ``index`` died: the calls it had in flight no longer count (the supervisor)."""
    file = _File(source)
    try:
        file.zero_counts(index)
    finally:
        file.close()


class SharedLimiter(Limiter):
    """``Limiter`` for worker ``index``, on the file ``create`` made.

    The base class keeps this worker's own buckets and counts: its counts are mirrored
    into the file for identities with a slot, and its buckets serve identities without one.
    """

    def __init__(self, source: Path | int, index: int, clock: Callable[[], float] = time.monotonic) -> None:
        """``source``: the file's path, or a descriptor of it (duplicated here)."""
        super().__init__(clock)
        self._file = _File(source)
        if not 0 <= index < self._file.workers:
            self._file.close()
            raise SharedLimitsError(f"the shared limits file is made for {self._file.workers} workers; "
                                    f"this is worker {index}")
        self._index = index
        self._own = _COUNTS + _COUNT.size * index
        self._header_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._found: dict[str, tuple[int, bytes]] = {}  # identity -> (slot, digest)
        self._overflow: dict[str, float] = {}  # identity -> when it last found no slot
        self._warned = False
        self._file.zero_counts(index)

    def close(self) -> None:
        self._file.close()

    # -- the slots ------------------------------------------------------------------------

    def _idle(self, offset: int, now: float) -> bool:
        used = _STATE.unpack_from(self._file.map, offset + _DIGEST)[2]
        counts = self._file.map[offset + _COUNTS:offset + self._file.size]
        return used + IDLE < now and not any(counts)

    def _slot(self, identity: str) -> tuple[int, bytes] | None:
        """The identity's slot and digest (taking a free or idle one), or None if none is to be had."""
        found = self._found.get(identity)
        if found is not None:
            return found
        file, now = self._file, self._clock()
        if self._overflow.get(identity, -_RETRY) + _RETRY > now:
            return None
        digest = hashlib.blake2b(identity.encode(), digest_size=_DIGEST).digest()
        if digest == _EMPTY:  # never, in practice; the empty marker must stay unambiguous
            return None
        home = int.from_bytes(digest[:8], "little") % file.slots
        with self._header_lock:
            _lock(file.fd, 0, _HEADER_SIZE)
            try:
                chosen: int | None = None
                spare: int | None = None
                for probe in range(min(PROBES, file.slots)):
                    slot = (home + probe) % file.slots
                    offset = file.offset(slot)
                    held = file.digest_at(offset)
                    if held == digest:
                        chosen = slot
                        break
                    if held == _EMPTY:  # slots never empty again: the identity is not further on
                        chosen = spare if spare is not None else slot
                        break
                    if spare is None and self._idle(offset, now):
                        spare = slot
                else:
                    chosen = spare
                if chosen is not None and file.digest_at(file.offset(chosen)) != digest:
                    if not self._claim(chosen, digest, now):
                        return None  # its identity came back just now: this call on this worker's own
            finally:
                _unlock(file.fd, 0, _HEADER_SIZE)
        if chosen is None:
            if len(self._overflow) >= _OVERFLOW_MEMORY:
                self._overflow.clear()
            self._overflow[identity] = now  # looked for again after _RETRY seconds
            if not self._warned:
                self._warned = True
                log.warning("no room in the shared limits file for identity %r (%d identities used within %.0f s): "
                            "its limits, and those of others without room, hold per worker process",
                            identity, file.slots, IDLE)
            return None
        self._found[identity] = (chosen, digest)
        return chosen, digest

    def _claim(self, slot: int, digest: bytes, now: float) -> bool:
        """Under the header lock: the slot, with a full bucket, no counts, for ``digest``;
        False if its identity used it since it was seen idle."""
        file = self._file
        offset = file.offset(slot)
        with self._stripes[slot % _STRIPES]:
            _lock(file.fd, offset, file.size)
            try:
                if file.digest_at(offset) != _EMPTY and not self._idle(offset, now):
                    return False
                file.map[offset + _COUNTS:offset + file.size] = bytes(file.size - _COUNTS)
                _STATE.pack_into(file.map, offset + _DIGEST, 0.0, 0.0, now)
                file.map[offset:offset + _DIGEST] = digest
                return True
            finally:
                _unlock(file.fd, offset, file.size)

    def _in_slot(self, identity: str, run: Callable[[int], T]) -> tuple[bool, T | None]:
        """``run(offset)`` under the locks of the identity's slot: (True, its result); (False,
        None) if the identity has no slot."""
        file = self._file
        for _ in range(2):
            found = self._slot(identity)
            if found is None:
                return False, None
            slot, digest = found
            offset = file.offset(slot)
            with self._stripes[slot % _STRIPES]:
                _lock(file.fd, offset, file.size)
                try:
                    if file.digest_at(offset) == digest:
                        return True, run(offset)
                finally:
                    _unlock(file.fd, offset, file.size)
            self._found.pop(identity, None)  # taken over while idle: look again
        return False, None

    def _publish(self, identity: str, *, ending: bool = False) -> None:
        """This worker's count of ``identity``'s calls, into its slot if it has one here (under
        the slot's locks: a slot taken over meanwhile must not get a count that is not its own).

        ``ending``: a call of this worker ends. If this worker's count in the slot is at
        least 1 (only this worker writes it), no worker can take the slot over before this
        write: the file lock is not needed. (A call admitted while the identity had no slot
        here was not counted in it: then the locked way.) The thread lock is needed:
        another thread's admission must not be overwritten by an older count. Another
        worker reads the old count or the new one, as if the call ended a moment later or
        sooner.
        """
        found = self._found.get(identity)
        if found is None:
            return
        slot, digest = found
        file = self._file
        offset = file.offset(slot)
        with self._stripes[slot % _STRIPES]:
            if ending and _COUNT.unpack_from(file.map, offset + self._own)[0] > 0 and file.digest_at(offset) == digest:
                self._set_own(identity, offset)
                return
            _lock(file.fd, offset, file.size)
            try:
                if file.digest_at(offset) == digest:
                    self._set_own(identity, offset)
            finally:
                _unlock(file.fd, offset, file.size)

    def _in_flight_at(self, offset: int) -> int:
        base = offset + _COUNTS
        return sum(_COUNT.unpack_from(self._file.map, base + _COUNT.size * w)[0] for w in range(self._file.workers))

    def _charge_at(self, offset: int, identity: str, limits: Limits, cost: int, now: float) -> None:
        """Under the slot's locks: take ``cost`` tokens from its bucket, or raise RateLimited."""
        tokens, stamp, _ = _STATE.unpack_from(self._file.map, offset + _DIGEST)
        bucket = limits.bucket
        tokens = bucket if stamp == 0.0 else min(bucket, tokens + max(0.0, now - stamp) * limits.rate)
        need = min(float(cost), bucket)
        if tokens + 1e-9 < need:  # retrying after exactly retry_after must succeed
            _STATE.pack_into(self._file.map, offset + _DIGEST, tokens, now, now)
            wait = (need - tokens) / limits.rate
            raise RateLimited(
                f"identity {identity!r} is over its rate limit ({limits.rate:g}/s, burst {bucket:g}); "
                f"retry in {wait:.3f}s",
                retry_after=wait,
            )
        _STATE.pack_into(self._file.map, offset + _DIGEST, tokens - cost, now, now)

    # -- Limiter ------------------------------------------------------------------------------

    def enter(self, identity: str, limits: Limits) -> None:
        self.admit(identity, limits, 0)

    def admit(self, identity: str, limits: Limits, cost: int = 1) -> None:
        charge = cost > 0 and limits.rate > 0
        if charge or limits.concurrency:
            def admit_here(offset: int) -> None:
                self._set_own(identity, offset)
                if limits.concurrency:
                    in_flight = self._in_flight_at(offset)
                    if in_flight >= limits.concurrency:
                        raise ConcurrencyLimited(
                            f"identity {identity!r} already has {in_flight} calls in flight, its limit",
                            retry_after=CONCURRENCY_RETRY,
                        )
                now = self._clock()
                if charge:
                    self._charge_at(offset, identity, limits, cost, now)
                else:
                    tokens, stamp, _ = _STATE.unpack_from(self._file.map, offset + _DIGEST)
                    _STATE.pack_into(self._file.map, offset + _DIGEST, tokens, stamp, now)
                Limiter.enter(self, identity, _UNLIMITED)
                self._set_own(identity, offset)

            if self._in_slot(identity, admit_here)[0]:
                return
        # No limits (nothing to share), or no slot to be had: this worker's own count and bucket.
        Limiter.enter(self, identity, limits)
        if charge:
            try:
                Limiter.charge(self, identity, limits, cost)
            except RateLimited:
                Limiter.leave(self, identity)
                raise
        self._publish(identity)

    def leave(self, identity: str) -> None:
        Limiter.leave(self, identity)
        self._publish(identity, ending=True)

    def charge(self, identity: str, limits: Limits, cost: int = 1) -> None:
        if limits.rate <= 0:
            return
        def charge_here(offset: int) -> None:
            self._set_own(identity, offset)  # a stream opened before the identity had a slot here
            self._charge_at(offset, identity, limits, cost, self._clock())

        if not self._in_slot(identity, charge_here)[0]:
            Limiter.charge(self, identity, limits, cost)

    def sync(self, limits_of: Callable[[str], Limits]) -> None:
        """After a policy reload: calls in flight here for identities that now have limits
        go into their slots, so that the other workers count them."""
        with self._lock:
            busy = [identity for identity, usage in self._usage.items() if usage.in_flight]
        for identity in busy:
            limits = limits_of(identity)
            if limits.rate > 0 or limits.concurrency:
                self._in_slot(identity, functools.partial(self._set_own, identity))

    def _set_own(self, identity: str, offset: int) -> None:
        """Under the slot's locks: this worker's count of the identity's calls, into the slot.

        One 8-byte copy: ``pack_into`` zeroes the field before it writes the value, and a worker
        reading it then (``ending`` writes without the file lock) would take a call in flight
        for none.
        """
        at = offset + self._own
        self._file.map[at:at + _COUNT.size] = _COUNT.pack(Limiter.in_flight(self, identity))

    def in_flight(self, identity: str) -> int:
        """Calls in flight for ``identity``: in every worker once it has had limits, else in this one."""
        if identity not in self._found:
            return Limiter.in_flight(self, identity)
        self._publish(identity)
        found = self._found.get(identity)  # gone if its slot was taken over meanwhile
        if found is None:
            return Limiter.in_flight(self, identity)
        return self._in_flight_at(self._file.offset(found[0]))


__all__ = ["IDLE", "PROBES", "SLOTS", "SharedLimiter", "SharedLimitsError", "create", "forget"]
