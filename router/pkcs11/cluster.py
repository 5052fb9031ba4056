"""``HsmBackend`` on a pooled PKCS #11 token: one instance per cluster."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Callable, TypeVar

from asn1crypto.algos import DSASignature
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams
from pkcs11.types import Object

from router.backend import MARK_AGAIN, MARK_RETRY, HsmBackend, KeyMaterial, PoolStats
from router.errors import (
    ClusterDown,
    DeadlineExceeded,
    DecryptionFailed,
    ForeignObjects,
    InternalError,
    InvalidArgument,
    KeyChanged,
    KeyNotFound,
    OtherFleet,
    RouterError,
    StaleSession,
    WrongKeyUsage,
)
from router.model import ClusterSpec, KeyAlgorithm, Operation, Placement
from router.pkcs11 import _fleet, _keys, _oaep, _search
from router.pkcs11._errors import LOGGED_OUT, SESSION_GONE, ckr_behind, translate
from router.pkcs11._module import LockTimeout, Module
from router.pkcs11._signer import Signer, sign_with
from router.pkcs11.pool import CLASS_NAMES, WRAPPING_KEY, WRAPPING_KEY_LABEL, PooledSession, SessionPool, modulus_of
from router.secret import Secret

log = logging.getLogger(__name__)

T = TypeVar("T")

_INCOMPARABLE = (
    p11.KeyUnextractable, p11.KeyNotWrappable, p11.KeyTypeInconsistent, p11.KeySizeRange, p11.KeyHandleInvalid,
    p11.AttributeTypeInvalid, p11.AttributeSensitive, p11.MechanismInvalid, p11.MechanismParamInvalid,
    KeyError, ValueError, TypeError,
)
"""Errors that say an object cannot be compared with a key's material (``_of_key``), besides
the codes python-pkcs11 has no class for (``CKR_KEY_FUNCTION_NOT_PERMITTED``: a key without
``CKA_EXTRACTABLE``); any other error of the module is the cluster's and fails the copy as usual."""

GCM_IV_BYTES = 12
GCM_TAG_BITS = 128
_EC_BYTES = {KeyAlgorithm.EC_P256: 32, KeyAlgorithm.EC_P384: 48}


class LoginRefused(RuntimeError):
    """The token refused the PIN: trying it again soon only counts towards a lock-out."""


class Pkcs11Cluster(HsmBackend):
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
        self._serial = module.serial
        self._signer: Signer | None = None
        self._clock = clock
        self._native_oaep = True
        self._marked: set[str] = set()
        """Fleet ids this process has seen on the token's marker, or written there."""
        self._mark_failed: float | None = None
        """When writing the marker last failed (``MARK_RETRY``)."""
        try:
            self._pool = SessionPool(module, spec, pin, clock=clock)
        except p11.PinIncorrect as exc:
            raise LoginRefused(f"cluster {spec.name}: the user PIN was refused by token {spec.token_label!r}") from exc
        except p11.NoSuchToken as exc:
            raise RuntimeError(f"cluster {spec.name}: no token labelled {spec.token_label!r}") from exc
        if module.signer is not None and module.signer.sees(self._pool.login):
            self._signer = module.signer
        elif module.signer is not None:
            log.info("cluster %s: the module's sessions differ by function list; signing through python-pkcs11",
                     spec.name)
        self._check_wrapping_key(module)

    def _check_wrapping_key(self, module: Module) -> None:
        """Warn when the replication wrapping key lets keys be unwrapped in the clear, or without a PIN."""
        if module.unwrap_guard is None or self._signer is None:
            return  # the module's function list does not see these sessions: nothing to read it with
        missing: set[int] = set()
        try:
            with module.guard():
                for key in _search.find(self._pool.login, WRAPPING_KEY):
                    missing |= module.unwrap_guard.missing(key)
        except Exception as exc:  # noqa: BLE001 - a check that only warns never stops a start
            log.warning("cluster %s: could not read the replication wrapping key's unwrap template (%s)",
                        self.spec.name, type(exc).__name__)
            return
        risks = []
        if missing & {int(Attribute.SENSITIVE), int(Attribute.WRAP_WITH_TRUSTED)}:
            risks.append("whoever holds the crypto user's PIN can unwrap a replicated or EXTERNAL key in the clear")
        if int(Attribute.PRIVATE) in missing:
            # The wrapping key is a public object: a session with no login can use it.
            risks.append("a session that never logged in can unwrap an EXTERNAL key from its record in the "
                         "placement store and sign or decrypt with it")
        if risks:
            log.warning("cluster %s: the replication wrapping key %r has no unwrap template that makes unwrapped "
                        "keys private, sensitive and wrappable only with a trusted key: %s. A key ceremony makes it "
                        "with the template; a new key cannot unwrap the EXTERNAL keys stored under this one, so read "
                        "deploy/README.md, section 2, before replacing it", self.spec.name, WRAPPING_KEY_LABEL,
                        "; ".join(risks))

    # -- the one way into the token -------------------------------------

    def _run(
        self,
        deadline: float,
        fn: Callable[[PooledSession], T],
        op: Operation | None = None,
        *,
        decrypting: bool = False,
        quick: bool = False,
    ) -> T:
        """Run ``fn`` on a pooled session; repair stale sessions invisibly.

        A stale session (handle invalid, logged out) is closed and replaced and
        the call tried again, up to once per pooled session plus one: after an
        HSM replacement every session may be stale at once. A crypto operation
        (``op``) is ``quick``: it waits for a session and runs for at most the
        cluster's ``call_timeout`` before the cluster counts as hung (see the pool).
        Once the pool is closed (the gateway stops), any failure ends the call with
        ``Stopping``: nothing is repaired.
        """
        quick = quick or op is not None
        attempts = self.spec.pool_size + 1
        for attempt in range(attempts):
            if self._clock() >= deadline:
                raise DeadlineExceeded("deadline exceeded before the HSM call", cluster=self.spec.name)
            try:
                session = self._pool.acquire(deadline, quick)
            except p11.PKCS11Error as exc:  # no session to replace a broken one: the cluster's fault
                raise translate(exc, cluster=self.spec.name, region=self.spec.region, op=op) from exc
            try:
                if self._serial is None:
                    return fn(session)
                with self._serial:
                    return fn(session)
            except RouterError:
                raise
            except p11.PKCS11Error as exc:
                if self._pool.closed:
                    # The stop closed the pool under this call (its close logged the token's
                    # sessions out): the call ends here, with no repair and no log-in.
                    raise self._pool.stopping() from exc
                err = translate(exc, cluster=self.spec.name, region=self.spec.region, op=op, decrypting=decrypting)
                if isinstance(err, InternalError):
                    log.error("cluster %s: unexpected PKCS #11 error", self.spec.name, exc_info=exc)
                if isinstance(err, KeyNotFound) and self._logged_out(session):
                    # Private objects are invisible to a session without the login (the token
                    # forgot it, or every session was closed, as an HSM replacement does): the
                    # key is not missing, the login is.
                    exc = p11.UserNotLoggedIn()
                    err = StaleSession(f"cluster {self.spec.name} lost its login", cluster=self.spec.name,
                                       region=self.spec.region)
                # A key the placement says is here but the search did not find is
                # searched for once more: SoftHSM's object index can miss an object
                # while another session destroys a neighbour. The session and its
                # cached handles are sound (a stale handle is CKR_OBJECT_HANDLE_INVALID);
                # dropping them would cost every hot key a new search, and during a move
                # every call routed to the target misses until its copy is made.
                missing_once = isinstance(err, KeyNotFound) and attempt == 0
                if isinstance(err, StaleSession):
                    self._repair(session, exc)  # on the last attempt too: never back to the pool stale
                if not (isinstance(err, StaleSession) or missing_once) or attempt == attempts - 1:
                    raise err from exc
            finally:
                self._pool.release(session)
        raise AssertionError("unreachable")  # pragma: no cover

    def _repair(self, session: PooledSession, exc: Exception) -> None:
        """Make ``session`` fit for the call's next attempt, logging what was done once it is:
        a session the HSM no longer knows is replaced as it is handed back (the pool logs how
        that went), a lost login is logged in again (the pool logs it), and key handles the HSM
        no longer knows (a key destroyed on the token) are forgotten, to be looked up again."""
        session.forget()
        if isinstance(exc, SESSION_GONE):
            session.broken = type(exc).__name__
        elif isinstance(exc, LOGGED_OUT):
            try:
                self._pool.relogin()
            except p11.PKCS11Error as failed:  # the token or the PIN is gone: this cluster cannot serve
                raise ClusterDown(f"cluster {self.spec.name} could not log in again ({type(failed).__name__})",
                                  cluster=self.spec.name, region=self.spec.region) from failed
        else:
            log.info("cluster %s: forgot a session's key handles the HSM no longer knows (%s); its keys are "
                     "looked up again", self.spec.name, type(exc).__name__)

    def fault_name(self, error: RouterError) -> str:
        return ckr_behind(error)

    def _logged_out(self, session: PooledSession) -> bool:
        """Whether ``session`` is known to lack the user's login (False when it cannot tell)."""
        return self._signer is not None and self._signer.logged_out(session.handle)

    # -- HsmBackend -----------------------------------------------------

    def generate(self, key: Placement, deadline: float, *, unless: Callable[[], bool] | None = None) -> None:
        def run(s: PooledSession) -> None:
            with self._cleared(s, key.key_id, deadline, unless):
                _keys.generate(s.handle, key.key_id, key.algorithm, key.usage, extractable=key.extractable)

        self._run(deadline, run)

    def generate_external(self, key: Placement, deadline: float) -> tuple[bytes, bytes]:
        def run(s: PooledSession) -> tuple[bytes, bytes]:
            secret, public = _keys.generate(
                s.handle, key.key_id, key.algorithm, key.usage, token=False, extractable=True
            )
            try:
                wrapped = bytes(s.wrapping_key().wrap_key(secret, mechanism=_keys.WRAP_MECHANISM))
                public_der = _keys.public_key_der(public, key.algorithm) if public is not None else b""
            finally:
                secret.destroy()
                if public is not None:
                    public.destroy()
            return wrapped, public_der

        return self._run(deadline, run)

    def export_wrapped(self, key: Placement, deadline: float) -> tuple[bytes, bytes]:
        secret_class = _keys.secret_class(key.algorithm)

        def run(s: PooledSession) -> tuple[bytes, bytes]:
            secret = s.key(key, secret_class, None)
            wrapped = bytes(s.wrapping_key().wrap_key(secret, mechanism=_keys.WRAP_MECHANISM))
            public_der = b""
            if key.algorithm.is_asymmetric:
                public_der = _keys.public_key_der(s.key(key, ObjectClass.PUBLIC_KEY, None), key.algorithm)
            return wrapped, public_der

        return self._run(deadline, run)

    def import_wrapped(self, key: Placement, wrapped: bytes, public_der: bytes, deadline: float, *,
                       unless: Callable[[], bool] | None = None, own_leftovers: bool = False) -> None:
        secret_class = _keys.secret_class(key.algorithm)

        def check(s: PooledSession, found: list[Object]) -> None:
            self._only_of(s, found, KeyMaterial.of(key, wrapped, public_der), "copied or destroyed")

        def run(s: PooledSession) -> None:
            with self._cleared(s, key.key_id, deadline, unless, check if own_leftovers else None):
                secret = s.wrapping_key().unwrap_key(
                    secret_class,
                    _keys.key_type(key.algorithm),
                    wrapped,
                    id=key.key_id.encode(),
                    label=key.key_id,
                    mechanism=_keys.WRAP_MECHANISM,
                    store=True,
                    template=_keys.unwrap_template(key.algorithm, key.usage, token=True, extractable=key.extractable),
                )
                if key.algorithm.is_asymmetric:
                    try:
                        attrs = _keys.public_key_attributes(public_der)
                        attrs.update(_keys.public_template(key.usage, token=True))
                        attrs.update({Attribute.ID: key.key_id.encode(), Attribute.LABEL: key.key_id})
                        s.handle.create_object(attrs)
                    except BaseException:
                        secret.destroy()
                        raise

        self._run(deadline, run)

    def check_foreign(self, material: KeyMaterial, deadline: float) -> None:
        def run(s: PooledSession) -> None:
            with s.objects.searching():
                found = self._objects_of(s, material.key.key_id)  # with the login: every private key seen
            if found:
                self._only_of(s, found, material, "copied or destroyed")

        self._run(deadline, run)

    def probe(self, deadline: float) -> None:
        def run(s: PooledSession) -> None:
            s.handle.generate_random(64)
            if self._logged_out(s):  # a random needs no login; every key call does: repair it now
                raise p11.UserNotLoggedIn()

        self._run(deadline, run, quick=True)

    def destroy(self, key_id: str, deadline: float, *, unless: Callable[[], bool] | None = None,
                of: KeyMaterial | None = None) -> int:
        def run(s: PooledSession) -> int:
            with self._changing(s, deadline):
                if unless is None and of is None:
                    return self._destroy_objects(s, key_id)
                # Listed before ``unless`` looks: what a process on another host (which
                # does not take this host's lock) makes after that look is not among them.
                # Reconcile's look claims the key's record, so such a process read the
                # record after the claim and named this cluster itself; the object it
                # makes here may be the key's only copy.
                found = self._objects_of(s, key_id)
                if found and of is not None:  # before ``unless``, whose look may claim the key's record
                    self._only_of(s, found, of, "destroyed")
                if unless is not None and unless():
                    return 0
                return self._destroy_found(s, found)

        return self._run(deadline, run)

    def _only_of(self, s: PooledSession, found: list[Object], material: KeyMaterial, nothing: str) -> None:
        """``ForeignObjects`` if any of ``found`` is not the key's material (``_of_key``); ``nothing``:
        what was not done to the objects there."""
        key = material.key
        strangers = [obj for obj in found if not self._of_key(s, obj, material)]
        if strangers:
            raise ForeignObjects(
                f"cluster {self.spec.name} holds {len(strangers)} object(s) under key id {key.key_id!r} that are "
                f"not this key's: another application's key, one made with another placement store, or what an "
                f"earlier, failed creation of this id left there. Nothing was {nothing} there; an operator "
                "decides what they are (docs/operations.md, objects that are not the key's)",
                cluster=self.spec.name, region=self.spec.region)

    def _of_key(self, s: PooledSession, obj: Object, material: KeyMaterial) -> bool:
        """Is ``obj`` one of the key's objects, by its material: a public key with the key's
        public key, a private or secret key that the trusted wrapping key wraps to the same bytes
        (AES key wrap with padding, RFC 5649, has no random part); compared by SHA-256. An object
        that cannot be compared (another class, not extractable, another key type) is not the key's."""
        key = material.key
        try:
            if obj.object_class == ObjectClass.PUBLIC_KEY:
                return (bool(material.public_sha256) and key.algorithm.is_asymmetric and hashlib.sha256(
                    _keys.public_key_der(obj, key.algorithm)).digest() == material.public_sha256)
            secret_class = _keys.secret_class(key.algorithm)
            if obj.object_class != secret_class or not material.wrapped_sha256:
                return False
            wrapped = bytes(s.wrapping_key().wrap_key(obj, mechanism=_keys.WRAP_MECHANISM))
            return hashlib.sha256(wrapped).digest() == material.wrapped_sha256
        except _INCOMPARABLE:
            return False
        except p11.PKCS11Error as exc:
            if type(exc) is p11.PKCS11Error:  # a code python-pkcs11 does not name
                return False
            raise

    @contextlib.contextmanager
    def _cleared(self, s: PooledSession, key_id: str, deadline: float,
                 unless: Callable[[], bool] | None = None,
                 check: Callable[[PooledSession, list[Object]], None] | None = None) -> Iterator[int]:
        """The token held still for a change of the key's objects, and every object of the
        key already there (an earlier attempt's leftovers) destroyed first; yields how many were.
        ``unless`` true, asked once the token is held still: ``KeyChanged``, nothing touched (the
        objects there are another attempt's, made since this one's record was read). ``check``
        is given the objects found, before any is destroyed, and raises to leave them all.

        The sweep is also the search ``TokenObjects.changing`` asks for before anything is
        made. Nothing is destroyed by a search after the key is made: on SoftHSM that
        search may list a new object twice, and destroying "the other one" deletes the key.
        """
        with self._changing(s, deadline):
            if unless is not None and unless():
                raise KeyChanged(f"key {key_id!r} changed while it was being made: another attempt took it over "
                                 f"or rolled it back; nothing was changed on cluster {self.spec.name}",
                                 cluster=self.spec.name, region=self.spec.region)
            found = self._objects_of(s, key_id)
            if found and check is not None:
                check(s, found)
            swept = self._destroy_found(s, found)
            if self._pool.closed:  # the stop came during the sweep: make nothing
                raise self._pool.stopping()
            yield swept

    @contextlib.contextmanager
    def _changing(self, s: PooledSession, deadline: float) -> Iterator[None]:
        """The token held still for a change of its objects (see ``TokenObjects``), its locks
        waited for until ``deadline``."""
        try:
            with s.objects.changing(deadline):
                yield
        except LockTimeout as exc:
            raise DeadlineExceeded(
                f"deadline exceeded waiting to change objects on cluster {self.spec.name}: {exc}",
                cluster=self.spec.name, region=self.spec.region,
            ) from None

    def _destroy_objects(self, s: PooledSession, key_id: str) -> int:
        """Destroy the key's token objects; how many were destroyed.

        The search is read to its end before any is destroyed (see PooledSession._only).
        When any is destroyed, every session forgets its cached key handles: a module may
        give a destroyed object's handle to a new object. A sweep that finds nothing, as
        nearly every creation's and copy's does, leaves the hot keys' handles alone. Called
        under the token's locks (``destroy``; ``_cleared`` does the same in two steps).
        """
        return self._destroy_found(s, self._objects_of(s, key_id))

    def _objects_of(self, s: PooledSession, key_id: str) -> list[Object]:
        """Every token object of the key, listed on a session that holds the login."""
        found = _search.find(s.handle, {Attribute.ID: key_id.encode(), Attribute.TOKEN: True})
        self._logged_in(s)
        return found

    def _logged_in(self, s: PooledSession) -> None:
        """Raise ``UserNotLoggedIn`` (``_run`` logs in again and retries) if ``s`` lacks the login.

        Asked after a search whose result decides what is destroyed or that nothing is left:
        without the login a search lists only the public objects, with no error, so a key's
        private key would be left behind (after an HSM replacement closed every session).
        After the search, not before: a login lost during it spoils its result too.
        """
        if self._logged_out(s):
            raise p11.UserNotLoggedIn()

    def _destroy_found(self, s: PooledSession, found: list[Object]) -> int:
        """Destroy objects listed earlier under the token's locks; one that another host
        destroyed meanwhile is not counted."""
        destroyed = 0
        try:
            for obj in found:
                try:
                    obj.destroy()
                except p11.ObjectHandleInvalid:
                    continue
                destroyed += 1
        finally:
            if found:
                self._pool.invalidate_keys()
        return destroyed

    def fleets(self, deadline: float) -> tuple[str, ...] | None:
        def run(s: PooledSession) -> tuple[str, ...] | None:
            with s.objects.searching():
                found = _search.find(s.handle, _fleet.MARKER)
            self._logged_in(s)  # the marker is private: without the login, every token looks unmarked
            return _fleet.listed(found)

        listed = self._run(deadline, run)
        # An id the marker no longer lists (16 kept) is written again with this process's next key.
        self._marked &= set(listed or ())
        return listed

    def mark(self, fleet_id: str, deadline: float, *, also: frozenset[str] = frozenset()) -> None:
        """Raises ``OtherFleet``, and a failure of the cluster (down, no session free, the deadline),
        every time; a refusal of the marker only on the first in ``MARK_RETRY`` seconds: a module
        that does not take the marker (a data object) costs each key written there no search,
        lock or failed write."""
        if fleet_id in self._marked:
            return
        if self._mark_failed is not None and self._clock() - self._mark_failed < MARK_RETRY:
            return

        def run(s: PooledSession) -> None:
            with self._changing(s, deadline):
                found = _search.find(s.handle, _fleet.MARKER)
                self._logged_in(s)
                listed = _fleet.listed(found)
                if listed and fleet_id not in listed and not also.intersection(listed):
                    raise OtherFleet(f"cluster {self.spec.name}'s token holds keys of other fleets",
                                     fleets=listed, cluster=self.spec.name, region=self.spec.region)
                if _fleet.add(s.handle, found, fleet_id):
                    log.info("cluster %s: fleet %s recorded on token %r", self.spec.name, fleet_id,
                             self.spec.token_label)

        try:
            self._run(deadline, run)
        except (OtherFleet, *MARK_AGAIN):
            raise  # the token's answer, or a moment's failure of the cluster: asked again at the next key
        except RouterError:
            self._mark_failed = self._clock()
            raise
        self._mark_failed = None
        self._marked.add(fleet_id)

    def key_objects(self, deadline: float, *, key_id: str | None = None) -> dict[str, dict[str, int]]:
        search: dict[Attribute, bool | bytes] = {Attribute.TOKEN: True}
        if key_id is not None:
            search[Attribute.ID] = key_id.encode()

        def run(s: PooledSession) -> dict[str, dict[str, int]]:
            found: dict[str, dict[str, int]] = {}
            with s.objects.searching():
                listed = _search.find(s.handle, search)  # the search ends before any read
            self._logged_in(s)  # reconcile and roll_back read "no private key" as "nothing left"
            for obj in listed:
                name = CLASS_NAMES.get(obj.object_class)
                if name is None:
                    continue
                try:
                    owner = bytes(obj[Attribute.ID]).decode()
                except UnicodeDecodeError:
                    continue
                counts = found.setdefault(owner, {})
                counts[name] = counts.get(name, 0) + 1
            return found

        return self._run(deadline, run)

    def public_key(self, key: Placement, deadline: float) -> bytes:
        if key.external:
            return self._run(deadline, lambda s: s.external_public_key(key))
        return self._run(
            deadline, lambda s: _keys.public_key_der(s.key(key, ObjectClass.PUBLIC_KEY, None), key.algorithm)
        )

    def sign(self, key: Placement, op: Operation, digest: bytes, deadline: float) -> bytes:
        mechanism, param, data = _keys.signature_mechanism(op, digest)
        signer = self._signer

        def run(s: PooledSession) -> bytes:
            return sign_with(signer, s.key(key, ObjectClass.PRIVATE_KEY, "sign"), mechanism, param, data)

        signature = self._run(deadline, run, op)
        return _ecdsa_raw_to_der(signature) if key.algorithm.is_ec else signature

    def sign_many(
        self, key: Placement, op: Operation, digests: Sequence[bytes], deadline: float
    ) -> list[bytes | RouterError]:
        """One session checkout and one key lookup for the lot (a stale session redoes it all)."""
        prepared = [_keys.signature_mechanism(op, digest) for digest in digests]
        clock = self._clock
        allowance = self.spec.call_timeout
        signer = self._signer

        def run(s: PooledSession) -> list[bytes]:
            private = s.key(key, ObjectClass.PRIVATE_KEY, "sign")
            out = []
            for mechanism, param, data in prepared:
                now = clock()
                if now >= deadline:
                    break
                s.since, s.due = now, now + allowance  # each signature is a call of its own
                out.append(sign_with(signer, private, mechanism, param, data))
            return out

        signed = self._run(deadline, run, op)
        done: list[bytes | RouterError] = (
            [_ecdsa_raw_to_der(sig) for sig in signed] if key.algorithm.is_ec else list(signed)
        )
        late = DeadlineExceeded("deadline exceeded before the HSM call", cluster=self.spec.name)
        return done + [late] * (len(digests) - len(signed))

    def verify(self, key: Placement, op: Operation, digest: bytes, signature: bytes, deadline: float) -> bool:
        if key.algorithm.is_ec:
            raw = _ecdsa_der_to_raw(signature, _EC_BYTES[key.algorithm])
            if raw is None:
                return False
            signature = raw
        mechanism, param, data = _keys.signature_mechanism(op, digest)

        def run(s: PooledSession) -> bool:
            public = s.key(key, ObjectClass.PUBLIC_KEY, "verify")
            try:
                return bool(public.verify(data, signature, mechanism=mechanism, mechanism_param=param))
            except (p11.SignatureInvalid, p11.SignatureLenRange):
                return False

        return self._run(deadline, run, op)

    def encrypt(
        self, key: Placement, op: Operation, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        if op is Operation.AES_GCM:
            iv = os.urandom(GCM_IV_BYTES)
            params = GCMParams(iv, aad or None, GCM_TAG_BITS)

            def run_gcm(s: PooledSession) -> bytes:
                secret = s.key(key, ObjectClass.SECRET_KEY, "encrypt")
                return bytes(secret.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params))

            return self._run(deadline, run_gcm, op), iv

        return self._oaep(deadline, key, plaintext, encrypt=True), b""

    def decrypt(
        self, key: Placement, op: Operation, ciphertext: bytes, iv: bytes, aad: bytes, deadline: float
    ) -> bytes:
        if op is Operation.AES_GCM:
            params = GCMParams(iv, aad or None, GCM_TAG_BITS)

            def run_gcm(s: PooledSession) -> bytes:
                secret = s.key(key, ObjectClass.SECRET_KEY, "decrypt")
                return bytes(secret.decrypt(ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params))

            return self._run(deadline, run_gcm, op, decrypting=True)

        return self._oaep(deadline, key, ciphertext, encrypt=False)

    def _oaep(self, deadline: float, key: Placement, data: bytes, *, encrypt: bool) -> bytes:
        """RSA-OAEP-SHA256: the module's own mechanism, or padding here over raw RSA."""
        if self._native_oaep:
            try:
                return self._run(deadline, lambda s: _oaep_native(s, key, data, encrypt), Operation.RSA_OAEP_SHA256)
            except (InvalidArgument, WrongKeyUsage) as exc:  # CKR_MECHANISM_INVALID is the latter
                if not isinstance(exc.__cause__, _OAEP_UNSUPPORTED):
                    raise
                log.info("cluster %s: no native RSA-OAEP-SHA256; padding in the gateway over raw RSA", self.name)
                self._native_oaep = False
        modulus_bytes = _keys.RSA_BITS[key.algorithm] // 8
        if encrypt:
            encoded = _oaep.encode(data, modulus_bytes)
            return self._run(
                deadline,
                lambda s: bytes(
                    s.key(key, ObjectClass.PUBLIC_KEY, "encrypt").encrypt(encoded, mechanism=Mechanism.RSA_X_509)
                ),
                Operation.RSA_OAEP_SHA256,
            )
        def not_valid() -> DecryptionFailed:
            return DecryptionFailed("decryption failed: the ciphertext is not valid for this key",
                                    cluster=self.name, region=self.spec.region)

        def raw_decrypt(s: PooledSession) -> bytes:
            private = s.key(key, ObjectClass.PRIVATE_KEY, "decrypt")
            # A number not below the modulus is no ciphertext of this key. Raw RSA answers it
            # with CKR_GENERAL_ERROR on SoftHSM, which would count against the cluster's
            # health: a caller could open every circuit with a few such requests.
            if int.from_bytes(data, "big") >= modulus_of(private):
                raise not_valid()
            return bytes(private.decrypt(data, mechanism=Mechanism.RSA_X_509))

        raw = self._run(deadline, raw_decrypt, Operation.RSA_OAEP_SHA256, decrypting=True)
        message = _oaep.decode(raw, modulus_bytes)
        if message is None:
            raise not_valid()
        return message

    def mac(self, key: Placement, op: Operation, data: bytes, deadline: float) -> bytes:
        def run(s: PooledSession) -> bytes:
            secret = s.key(key, ObjectClass.SECRET_KEY, "sign")
            return bytes(secret.sign(data, mechanism=Mechanism.SHA256_HMAC))

        return self._run(deadline, run, op)

    def verify_mac(self, key: Placement, op: Operation, data: bytes, mac: bytes, deadline: float) -> bool:
        def run(s: PooledSession) -> bool:
            secret = s.key(key, ObjectClass.SECRET_KEY, "verify")
            try:
                return bool(secret.verify(data, mac, mechanism=Mechanism.SHA256_HMAC))
            except (p11.SignatureInvalid, p11.SignatureLenRange):
                return False

        return self._run(deadline, run, op)

    def random(self, length: int, deadline: float) -> bytes:
        return self._run(deadline, lambda s: bytes(s.handle.generate_random(length * 8)), quick=True)

    def stats(self) -> PoolStats:
        size, open_, in_use, hung = self._pool.stats()
        return PoolStats(size=size, open=open_, in_use=in_use, hung=hung)

    def hung_calls(self) -> tuple[int, float]:
        return self._pool.hung()

    def forget_key(self, key_id: str) -> None:
        self._pool.invalidate_keys(key_id)

    def close(self) -> None:
        self._pool.close()

    @property
    def pool(self) -> SessionPool:
        return self._pool


_OAEP_UNSUPPORTED = (p11.ArgumentsBad, p11.MechanismParamInvalid, p11.MechanismInvalid)


def _oaep_native(s: PooledSession, key: Placement, data: bytes, encrypt: bool) -> bytes:
    if encrypt:
        public = s.key(key, ObjectClass.PUBLIC_KEY, "encrypt")
        return bytes(public.encrypt(data, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_keys.OAEP_SHA256))
    private = s.key(key, ObjectClass.PRIVATE_KEY, "decrypt")
    return bytes(private.decrypt(data, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_keys.OAEP_SHA256))


def _der_integer(value: bytes) -> bytes:
    value = value.lstrip(b"\0") or b"\0"
    if value[0] & 0x80:
        value = b"\0" + value  # positive: a leading 1 bit would make it negative
    return bytes((0x02, len(value))) + value  # at most 67 bytes (P-521): a one-byte length


def _ecdsa_raw_to_der(raw: bytes) -> bytes:
    """DER ``ECDSA-Sig-Value`` for PKCS #11's r||s (by hand: asn1crypto costs ~19 us per signature)."""
    half = len(raw) // 2
    body = _der_integer(raw[:half]) + _der_integer(raw[half:])
    size = len(body)
    return (bytes((0x30, size)) if size < 0x80 else bytes((0x30, 0x81, size))) + body


def _ecdsa_der_to_raw(der: bytes, size: int) -> bytes | None:
    """r‖s for a DER ECDSA signature, or None if it is not a well-formed one.

    Only the one DER encoding of (r, s) is well-formed: the parser also takes BER (zero-padded
    or long-form lengths and integers, indefinite lengths, members past s), and accepting those
    would give one signature many encodings, each of which verifies (OpenSSL refuses them)."""
    try:
        parsed = DSASignature.load(der, strict=True)
        r, s = int(parsed["r"].native), int(parsed["s"].native)
    except (ValueError, TypeError, KeyError):
        return None
    if not (0 < r < 1 << (8 * size) and 0 < s < 1 << (8 * size)):
        return None
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return raw if _ecdsa_raw_to_der(raw) == der else None
