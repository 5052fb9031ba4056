"""A bounded pool of PKCS #11 sessions on one token.

- One long-lived login session per token per process: closing a python-pkcs11
  session that logged in calls ``C_Logout``, which logs out every session of the
  token, so the login session stays open until the pool closes, last.
- ``size`` request sessions, opened at start (a wrong PIN or a missing token
  fails start-up, not the first request). Each is used by one request at a time.
- Each session caches key objects by key id: ``C_FindObjects`` runs once per
  session and key, never per request. Destroying a key bumps the pool's epoch,
  which empties every session's cache before its next use; destroying an EXTERNAL
  key (no token object goes) drops only that key's unwrapped objects from each.
- An EXTERNAL key is unwrapped from its placement record only after the record is checked
  against itself, and used only once the unwrapped key is checked against the record
  (``_material``): a record a store writer altered is refused, and nothing of it stays.
- Waiting for a session is bounded by the caller's deadline, and for a request's
  quick call (a signature, a probe) also by the cluster's ``call_timeout``; it ends
  early when the calls holding the sessions hang. Then ``SessionsBusy``, and the
  router tries a replica. A broken session is closed and replaced, never returned.
- Each checked-out session carries the time its call is due back. A PKCS #11 call
  cannot be interrupted, so ``hung`` only reports calls past their time; the health
  monitor opens the cluster's circuit while there are any.
- A closed pool stays closed: a call still running when it closed (a stop cut it off)
  gets ``Stopping`` for its next session, and a session it returns is closed. Nothing
  opens a session or logs in again, not even to repair a session the close made stale.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import Key

from router.errors import (
    AmbiguousKey,
    KeyRecordMismatch,
    SessionsBusy,
    Stopping,
    Throttled,
    WrappedKeyRefused,
    WrongKeyUsage,
)
from router.model import ClusterSpec, KeyAlgorithm, KeyUsage, Placement
from router.pkcs11 import _keys, _material, _search
from router.pkcs11._module import Module, TokenObjects
from router.pkcs11._signer import Signer
from router.secret import Secret

log = logging.getLogger(__name__)

WRAPPING_KEY_LABEL = "_hsmgw/replication"
"""CKA_LABEL of the trusted wrapping key every cluster holds (made by the SO)."""
WRAPPING_KEY = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: WRAPPING_KEY_LABEL}
"""The search that finds it."""

CLASS_NAMES = {ObjectClass.PRIVATE_KEY: "private key", ObjectClass.PUBLIC_KEY: "public key",
               ObjectClass.SECRET_KEY: "secret key"}
"""The key object classes the gateway makes, as messages and reconcile findings name them."""


_LOOKUPS = 3
"""Searches for a key object python-pkcs11 keeps making from failed attribute reads that the
module answers when asked again, before the key counts as unreadable (``Throttled``)."""

_WAIT_SLICE = 0.1
"""A wait for a session looks this often whether the calls holding them hang."""

CANARY_ID = "_unwrap_check"
"""Id and label of the session key a session wraps and unwraps to see that it can (ids that
start with ``_`` are the gateway's own: reconcile never takes them for keys)."""

_CHECKED_AGAINST = "hsmgw_checked_against"
"""Where an unwrapped EXTERNAL private key object keeps the public key (DER) it was checked against."""

_INVALIDATIONS_KEPT = 64
"""Latest epoch bumps the pool remembers, with the key each was for: a session that missed
more than these since its last use forgets every key, not only the keys they named."""


class PooledSession:
    """A request session, its key-object cache and its unwrapped-key LRU."""

    __slots__ = ("handle", "keys", "epoch", "broken", "unwrapped", "unwrapped_limit", "since", "due",
                 "objects", "reader", "_wrapping_key", "_spec")

    def __init__(
        self, handle: Any, epoch: int, unwrapped_limit: int, spec: ClusterSpec, objects: TokenObjects,
        reader: Signer | None = None,
    ) -> None:
        self.handle = handle
        self.reader = reader
        """The module's function list, for its own answer to a failed attribute read (``read_attribute``)."""
        self._spec = spec
        self.objects = objects
        """Keeps this token's searches and object changes apart (see ``TokenObjects``)."""
        self.keys: dict[tuple[str, ObjectClass], Any] = {}
        self.epoch = epoch
        self.broken: bool | str = False
        """True, or why (the PKCS #11 error's name), when the session is to be closed and replaced
        as it is handed back."""
        self.unwrapped: collections.OrderedDict[tuple[str, ObjectClass], Any] = collections.OrderedDict()
        self.unwrapped_limit = unwrapped_limit
        self.since = 0.0
        """When its current call began (monotonic): the checkout, or the caller's latest call."""
        self.due = 0.0
        """When its current call should be back by; 0 while in the pool. A caller that makes
        several HSM calls on one checkout moves both on before each."""
        self._wrapping_key: Any = None

    def key(self, placement: Placement, object_class: ObjectClass, capability: str | None) -> Any:
        """The key object, from the cache or found once on the token.

        ``capability`` (``"sign"``, ``"decrypt"``…) must be one the object has:
        python-pkcs11 gives an object only the methods its attributes allow, so
        a token key that does not permit the operation is refused here, as the
        caller's mistake, not left to fail as a bug.
        """
        if placement.external:
            obj = self._external(placement, object_class)
        else:
            cache_key = (placement.key_id, object_class)
            obj = self.keys.get(cache_key)
            if obj is None:
                for _ in range(_LOOKUPS):
                    obj = self._find(placement.key_id, object_class)
                    if not self._misread(obj, capability):
                        break
                    # The module answers the read now: the one that failed was momentary.
                else:
                    raise Throttled(f"could not read all of key {placement.key_id!r}'s attributes")
                self.keys[cache_key] = _primed(obj, self.reader)
        if capability is not None and not hasattr(obj, capability):
            raise WrongKeyUsage(f"key {placement.key_id!r} does not permit {capability} on this cluster")
        return obj

    def _misread(self, obj: Any, capability: str | None) -> bool:
        """Whether python-pkcs11 made ``obj`` from an attribute read that failed; the module's
        own error if it still refuses the read.

        python-pkcs11 reads a found object's class and capabilities, and where that fails with
        CKR_FUNCTION_FAILED (its answer too when it lost the module's own error, see
        ``read_attribute``) it hands back a bare Object, or a key without the methods of
        the attributes it skipped. Read again, the module answers for itself: a device error is
        a cluster that is down, not a busy one. Never cached.
        """
        if not isinstance(obj, Key):
            read_attribute(obj, Attribute.CLASS, self.reader)
            return True
        if capability is None or hasattr(obj, capability):
            return False
        attribute = _CAPABILITIES.get(capability)  # the key's own attribute: does it permit it?
        return attribute is not None and bool(read_attribute(obj, attribute, self.reader))

    def _find(self, key_id: str, object_class: ObjectClass) -> Any:
        return self._only({Attribute.CLASS: object_class, Attribute.ID: key_id.encode()},
                          f"{CLASS_NAMES[object_class]} objects for key {key_id!r}")

    def wrapping_key(self) -> Any:
        if self._wrapping_key is None:
            self._wrapping_key = _primed(self._only(WRAPPING_KEY, f"wrapping keys labelled {WRAPPING_KEY_LABEL!r}"),
                                         self.reader)
        return self._wrapping_key

    def _only(self, template: dict[Attribute, Any], what: str) -> Any:
        """The one object matching ``template`` (``what`` names such objects in messages).

        The search is read to its end before anything else happens (python-pkcs11's
        ``get_key`` stops after the second match): a search left open keeps the
        session's operation lock and its C_FindObjects active, so the next search or
        signature on this session fails with CKR_OPERATION_ACTIVE, or waits.
        """
        with self.objects.searching():
            found = _search.find(self.handle, template)
        if not found:
            raise p11.NoSuchKey(f"no {what}")
        if len(found) > 1:
            held = f"cluster {self._spec.name} holds {len(found)} {what}"
            _report_once(f"{held}: calls fail over to other clusters until the token holds one; list the "
                         "token from a new process before destroying anything (a module can list one object "
                         "twice, and the second listing is the same object)")
            raise AmbiguousKey(f"{held}; the gateway will not guess which is right (docs/operations.md)",
                               cluster=self._spec.name, region=self._spec.region)
        return found[0]

    def _external(self, placement: Placement, object_class: ObjectClass) -> Any:
        """An EXTERNAL key as a session object: unwrapped once, checked against its record
        (``_material``), kept in a bounded LRU. A key that fails the check is destroyed again."""
        cache_key = (placement.key_id, object_class)
        obj = self.unwrapped.get(cache_key)
        if obj is not None:
            self.unwrapped.move_to_end(cache_key)
            return obj
        if object_class is ObjectClass.PUBLIC_KEY:
            self.external_public_key(placement)
            attrs = _keys.public_key_attributes(placement.public_der)
            attrs.update(_keys.public_template(placement.usage, token=False))
            obj = self.handle.create_object(attrs)
        else:
            obj = self._unwrap(placement, object_class)
        self.unwrapped[cache_key] = _primed(obj, self.reader)
        while len(self.unwrapped) > self.unwrapped_limit:
            _, old = self.unwrapped.popitem(last=False)
            _destroy_quietly(old)
        return obj

    def external_public_key(self, placement: Placement) -> bytes:
        """An EXTERNAL key's public key from its record, once its wrapped private key is shown to be
        that key's: a public key a store writer put there never verifies or is handed out."""
        private = self._external(placement, ObjectClass.PRIVATE_KEY)
        if private.__dict__.get(_CHECKED_AGAINST) != placement.public_der:
            # Unwrapped for an earlier version of the record, whose public key was another.
            self._check(private, placement)
        return placement.public_der

    def _unwrap(self, placement: Placement, object_class: ObjectClass) -> Any:
        self._check(None, placement)  # what the record alone contradicts: nothing is unwrapped for it
        wrapping_key = self.wrapping_key()

        def unwrap() -> Any:
            return wrapping_key.unwrap_key(
                object_class,
                _keys.key_type(placement.algorithm),
                placement.wrapped,
                id=placement.key_id.encode(),
                label=placement.key_id,
                mechanism=_keys.WRAP_MECHANISM,
                store=False,
                template=_keys.unwrap_template(placement.algorithm, placement.usage),
            )

        try:
            obj = unwrap()
        except _UNWRAP_REFUSED as first:
            # SoftHSM answers a blob whose integrity check fails CKR_GENERAL_ERROR, and one that
            # unwraps to another kind of key CKR_FUNCTION_FAILED, as it would a fault or a busy
            # device (CloudHSM's throttling answer). A cluster that unwraps a key it wrapped just
            # now, and refuses the record's again, is sound: the record is at fault, and it must
            # not open circuits for every key (each call on it would count). One that does not
            # is busy or failing: its error stands.
            if not self._unwraps_its_own():
                raise first from None
            try:
                obj = unwrap()
            except _UNWRAP_REFUSED as again:
                refused = WrappedKeyRefused(
                    f"key {placement.key_id!r}: cluster {self._spec.name} does not unwrap the wrapped key in "
                    f"its record ({type(again).__name__}); the placement record was altered or is corrupt, or "
                    "this cluster's replication wrapping key is not the one it was wrapped under "
                    "(docs/security.md)", cluster=self._spec.name, region=self._spec.region)
                _report_once(refused.message)
                raise refused from again
        try:
            if placement.algorithm.is_asymmetric:
                self._check(obj, placement)
            return obj
        except BaseException:
            _destroy_quietly(obj)
            raise

    def _unwraps_its_own(self) -> bool:
        """Whether this session wraps a new AES key under the wrapping key and unwraps it again,
        as an EXTERNAL key's is (nothing is left on the token either way: a key whose destroy
        fails goes with the session, which the pool closes and replaces when it comes back)."""
        made: list[Any] = []
        try:
            secret, _ = _keys.generate(self.handle, CANARY_ID, KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT,
                                       token=False, extractable=True)
            made.append(secret)
            wrapped = bytes(self.wrapping_key().wrap_key(secret, mechanism=_keys.WRAP_MECHANISM))
            made.append(self.wrapping_key().unwrap_key(
                ObjectClass.SECRET_KEY, _keys.key_type(KeyAlgorithm.AES_256), wrapped, id=CANARY_ID.encode(),
                label=CANARY_ID, mechanism=_keys.WRAP_MECHANISM, store=False,
                template=_keys.unwrap_template(KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT)))
            return True
        except p11.PKCS11Error:
            return False
        finally:
            for obj in made:
                if not _destroy_quietly(obj):
                    self.broken = True

    def _check(self, obj: Any, placement: Placement) -> None:
        """Check the record, and ``obj`` (its unwrapped private key) against it unless None; an
        operator hears of a mismatch, at ERROR."""
        try:
            public = _material.check_record(placement)
            if obj is not None:
                _material.check_unwrapped(obj, placement, public)
                obj.__dict__[_CHECKED_AGAINST] = placement.public_der
        except KeyRecordMismatch as exc:
            _report_once(f"cluster {self._spec.name}: {exc.message}")
            raise

    def forget(self) -> None:
        """Drop every cached handle and destroy the unwrapped session objects."""
        self.keys.clear()
        while self.unwrapped:
            _destroy_quietly(self.unwrapped.popitem()[1])

    def forget_key(self, key_id: str) -> None:
        """Drop the key's cached handles and destroy its unwrapped session objects."""
        for object_class in CLASS_NAMES:
            self.keys.pop((key_id, object_class), None)
            obj = self.unwrapped.pop((key_id, object_class), None)
            if obj is not None:
                _destroy_quietly(obj)


_CAPABILITIES = {"sign": Attribute.SIGN, "verify": Attribute.VERIFY, "encrypt": Attribute.ENCRYPT,
                 "decrypt": Attribute.DECRYPT}
_FLAGS = frozenset(_CAPABILITIES.values())
"""CK_BBOOL attributes a look-up reads."""


_NUMBERS: dict[Attribute, Callable[[int], Any]] = {Attribute.CLASS: ObjectClass, Attribute.KEY_TYPE: KeyType}
"""CK_ULONG attributes a look-up reads, and the python-pkcs11 type of their value."""


def read_attribute(obj: Any, attribute: Attribute, reader: Signer | None) -> Any:
    """``obj[attribute]``, failing with the module's own error where ``reader`` (the module's
    function list; None if it has none that sees this session) reads it: a look-up's attributes
    (``_NUMBERS``, ``_FLAGS``), in one call each. python-pkcs11 reads in two, and reports
    CKR_FUNCTION_FAILED when the first fails and the second does not, the module's own error
    (CKR_DEVICE_ERROR…) dropped."""
    if reader is not None:
        if attribute in _NUMBERS:
            return _NUMBERS[attribute](reader.read_number(obj, attribute))
        if attribute in _FLAGS:
            return bool(reader.read_number(obj, attribute, 1))
    return obj[attribute]


def _primed(obj: Any, reader: Signer | None = None) -> Any:
    """The key object with its key type read now, where python-pkcs11 looks for it first.

    Every python-pkcs11 operation reads the key's type through a
    ``functools.cached_property``; on Python 3.11 that holds one lock for every key
    object of the process while the first read runs. A read that hangs on one HSM
    would then stall the first use of any key on every other cluster: exactly the
    replicas' keys, when requests fail over. Read here, the type is a plain
    ``C_GetAttributeValue`` that holds nothing but this session.
    """
    obj.__dict__["key_type"] = read_attribute(obj, Attribute.KEY_TYPE, reader)
    return obj


def modulus_of(obj: Any) -> int:
    """An RSA key object's modulus, read from the HSM once per object (the session's key
    cache keeps the object; a read costs ~20 µs, 3 % of a 2048-bit private-key operation)."""
    modulus: int | None = obj.__dict__.get("hsmgw_modulus")
    if modulus is None:
        modulus = obj.__dict__["hsmgw_modulus"] = int.from_bytes(bytes(obj[Attribute.MODULUS]), "big")
    return modulus


_REPORT_EVERY = 60.0
_reported: dict[str, float] = {}


_UNWRAP_REFUSED = (p11.WrappedKeyInvalid, p11.WrappedKeyLenRange, p11.GeneralError, p11.FunctionFailed,
                   p11.KeyTypeInconsistent, p11.AttributeValueInvalid, p11.DomainParamsInvalid)
"""What an unwrap of a wrapped key that is not what its record says can answer."""


def _report_once(message: str) -> None:
    """Log an operator's problem at ERROR, once a minute at most: a hot key would otherwise log per call."""
    now = time.monotonic()
    if now - _reported.get(message, -_REPORT_EVERY) >= _REPORT_EVERY:
        _reported[message] = now
        log.error("%s", message)


def _destroy_quietly(obj: Any) -> bool:
    """Destroy a session object; whether that worked (a failure is logged at DEBUG only)."""
    try:
        obj.destroy()
        return True
    except p11.PKCS11Error:
        log.debug("destroying an unwrapped session object failed", exc_info=True)
        return False


class SessionPool:
    def __init__(
        self,
        module: Module,
        spec: ClusterSpec,
        pin: Secret,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self._module = module
        self._pin = pin
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: collections.deque[PooledSession] = collections.deque()
        # A counting semaphore whose wait and wake-up run in C. threading's Semaphore is
        # a Python Condition; with more threads than sessions (16 on 4), its wake-ups
        # cost 50-100 µs of CPU per RSA call (990 -> 890-940 µs a call, h2load).
        self._slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(spec.pool_size):
            self._slots.put(None)
        self._epoch = 0
        self._invalidated: collections.deque[tuple[int, str | None]] = collections.deque(
            maxlen=_INVALIDATIONS_KEPT)
        """(epoch, key id) of the latest epoch bumps; a key id of None: every key."""
        self._allowance = spec.call_timeout
        self._sessions: set[PooledSession] = set()
        """Every open request session, idle or checked out (``hung`` looks at them)."""
        self._closed = False
        with module.guard():
            self._token = module.token(spec.token_label)
            self._login = self._open_login()
        self._objects = module.objects(spec.token_label) if spec.serialize_object_changes else TokenObjects(None)
        signer = module.signer
        self._reader = signer if signer is not None and signer.sees(self._login) else None
        for _ in range(spec.pool_size):
            self._idle.append(self._new_session())

    # -- public ---------------------------------------------------------

    @property
    def token(self) -> Any:
        return self._token

    @property
    def login(self) -> Any:
        """The long-lived login session (python-pkcs11's; never checked out)."""
        return self._login

    def acquire(self, deadline: float, quick: bool = False) -> PooledSession:
        """Check out a session, waiting no longer than ``deadline``; hand it back with ``release``.

        A ``quick`` call (a request's crypto operation or a probe) also waits no longer
        than ``call_timeout`` and is due back ``call_timeout`` after checkout: sessions
        busy for longer than that are hung, and a replica can still answer within the
        deadline. Any other call is due back ``call_timeout`` after its deadline.

        The request path calls this pair in a ``try``/``finally`` of its own: a generator
        context manager around each HSM call cost ~7 µs of CPU per call here.
        """
        if self._closed:
            raise self.stopping()
        allowance = self._allowance
        try:
            self._slots.get(False)  # a session free: no clock read, no timeout to work out
        except queue.Empty:
            self._wait(min(deadline, self._clock() + allowance) if quick else deadline)
        try:
            session = self._checkout()
        except BaseException:
            self._slots.put(None)
            raise
        session.since = now = self._clock()
        session.due = now + allowance if quick else max(now, deadline) + allowance
        return session

    def release(self, session: PooledSession) -> None:
        session.due = 0.0
        try:
            self._checkin(session)
        finally:
            self._slots.put(None)

    def _wait(self, until: float) -> None:
        """Wait for a slot until ``until``, giving up early once calls on the sessions hang."""
        while True:
            count, oldest = self.hung()
            remaining = until - self._clock()
            if count or remaining <= 0:
                hung = f": {count} call(s) have not returned for {oldest:.1f} s" if count else ""
                raise SessionsBusy(
                    f"all {self.spec.pool_size} sessions of cluster {self.spec.name} are busy{hung}",
                    cluster=self.spec.name,
                    region=self.spec.region,
                    retry_after=0.05,
                )
            try:
                self._slots.get(timeout=min(remaining, _WAIT_SLICE))
                return
            except queue.Empty:
                pass

    def hung(self) -> tuple[int, float]:
        """Calls past their time: how many, and how long the oldest of them has run (seconds)."""
        with self._lock:
            late = self._late()
        return len(late), max(late, default=0.0)

    def _late(self) -> list[float]:
        """How long each call past its time has run (seconds); the caller holds ``_lock``."""
        now = self._clock()
        return [now - s.since for s in self._sessions if s.due and now > s.due]

    @contextlib.contextmanager
    def session(self, deadline: float) -> Iterator[PooledSession]:
        """A session for the block (``acquire`` and ``release``)."""
        session = self.acquire(deadline)
        try:
            yield session
        finally:
            self.release(session)

    def invalidate_keys(self, key_id: str | None = None) -> None:
        """Forget every cached key object (after a key's token objects are destroyed: the
        module may give their handles to new objects), or only ``key_id``'s (an EXTERNAL key
        destroyed: its unwrapped session objects go). Each session does it before its next
        use; one in use now finishes its call first."""
        with self._lock:
            self._epoch += 1
            self._invalidated.append((self._epoch, key_id))

    @property
    def closed(self) -> bool:
        return self._closed

    def stopping(self) -> Stopping:
        """What a call on this pool gets once it is closed."""
        return Stopping(f"the gateway is stopping: cluster {self.spec.name}'s sessions are closed",
                        cluster=self.spec.name, region=self.spec.region)

    def relogin(self) -> None:
        """Log in again after the token forgot our login (CKR_USER_NOT_LOGGED_IN).

        ``Stopping`` once the pool is closed: closing its login session logged out every
        session of the token, and a call the stop cut off must not log in again.
        """
        with self._lock, self._module.guard():
            if self._closed:
                raise self.stopping()
            try:
                self._login.close()
            except p11.PKCS11Error:
                pass
            self._login = self._open_login()
            log.warning("cluster %s: logged in again", self.spec.name)

    def stats(self) -> tuple[int, int, int, int]:
        """(size, open, in use, of those hung)."""
        with self._lock:
            opened = len(self._sessions)
            return self.spec.pool_size, opened, opened - len(self._idle), len(self._late())

    def close(self) -> None:
        """Close the idle sessions, then the login session; refuse sessions from now on.

        Sessions still checked out are closed as their calls hand them back. Closing the
        login session logs out those too: their calls fail, and are not repaired.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close_idle()
        with self._module.guard():
            try:
                self._login.close()
            except p11.PKCS11Error:
                log.debug("cluster %s: closing login session failed", self.spec.name, exc_info=True)

    # -- internals ------------------------------------------------------

    def _open_login(self) -> Any:
        try:
            return self._token.open(rw=True, user_pin=self._pin.reveal())
        except p11.UserAlreadyLoggedIn:
            # Another part of this process holds the token's login; share it.
            return self._token.open(rw=True)

    def _new_session(self) -> PooledSession:
        if self._closed:
            raise self.stopping()
        with self._module.guard():
            handle = self._token.open(rw=True)
        with self._lock:
            if not self._closed:
                per_session = max(1, self.spec.unwrapped_cache // self.spec.pool_size)
                session = PooledSession(handle, self._epoch, per_session, self.spec, self._objects, self._reader)
                self._sessions.add(session)
                return session
        try:  # the pool closed meanwhile: so does this session
            with self._module.guard():
                handle.close()
        except p11.PKCS11Error:
            log.debug("cluster %s: closing a session failed", self.spec.name, exc_info=True)
        raise self.stopping()

    def _close_idle(self) -> None:
        """Close the idle sessions of a closed pool (each is taken from the idle list once)."""
        with self._lock:
            sessions = list(self._idle)
            self._idle.clear()
        with self._module.guard():
            for session in sessions:
                self._close_session(session)

    def _close_session(self, session: PooledSession) -> None:
        with self._lock:
            self._sessions.discard(session)
        try:
            session.handle.close()
        except p11.PKCS11Error:
            log.debug("cluster %s: closing a session failed", self.spec.name, exc_info=True)

    def _checkout(self) -> PooledSession:
        try:
            session = self._idle.pop()
        except IndexError:
            # A broken session was dropped earlier; open its replacement now.
            session = self._new_session()
        if session.epoch != self._epoch:
            self._catch_up(session)
        return session

    def _catch_up(self, session: PooledSession) -> None:
        """Drop what ``invalidate_keys`` invalidated since the session's last use: the keys it
        named, or everything if any bump was for every key or is no longer remembered."""
        with self._lock:
            epoch = self._epoch
            missed = [key_id for bumped, key_id in self._invalidated if bumped > session.epoch]
        named = [key_id for key_id in missed if key_id is not None]
        if len(named) == epoch - session.epoch:
            for key_id in named:
                session.forget_key(key_id)
        else:
            session.forget()
        session.epoch = epoch

    def _checkin(self, session: PooledSession) -> None:
        if session.broken or self._closed:
            with self._module.guard():
                self._close_session(session)
            if not self._closed:
                why = f" ({session.broken})" if isinstance(session.broken, str) else ""
                # Replace it now, so the pool is whole again without waiting for load.
                try:
                    self._idle.append(self._new_session())
                except Stopping:
                    pass
                except p11.PKCS11Error as exc:
                    log.warning("cluster %s: closed a broken session%s; could not open its replacement yet (%s): "
                                "the next call that finds none idle tries again", self.spec.name, why,
                                type(exc).__name__)
                else:
                    if why:
                        log.info("cluster %s: replaced a session the HSM dropped%s", self.spec.name, why)
            return
        self._idle.append(session)
        if self._closed:
            # close() ran between the check above and the append, and may have missed it.
            self._close_idle()
