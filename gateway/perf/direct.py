"""The baseline: the same workload straight against the PKCS #11 module, no gateway.

This is the one place outside ``router`` that calls PKCS #11, and only to measure
what the module does on this machine by itself. Each client process loads the
module (``router.pkcs11.load_module``: OS locking, so threads are safe), logs in
once per token, and gives each call in flight its own session with the key
objects found once. Each operation is one python-pkcs11 call with the mechanism
the gateway itself would use (or, with ``gateway_binding``, a signature made the
way the gateway makes it); the batch and stream modes do not apply (every
operation is one call).

``module`` points the same code at another module — ``p11-kit-client.so`` talking
to a ``p11-kit server`` that exports the fleet's token (the peer-forwarder
comparison). That one is initialised by python-pkcs11 itself: p11-kit-client does
not accept our pre-initialisation (python-pkcs11 then reports
CKR_CRYPTOKI_NOT_INITIALIZED), and it locks internally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.perf.grpc_driver import Call, digest_for
from gateway.perf.workload import Workload

_PAYLOAD = bytes(range(256))


@dataclass(frozen=True)
class DirectTarget:
    """Which fleet to load (picklable: it crosses into client processes)."""

    config_path: str
    module: str = ""
    """Another PKCS #11 module to use instead of the configured one (p11-kit-client.so)."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment for the module (P11_KIT_SERVER_ADDRESS)."""
    gateway_binding: bool = False
    """Sign as the gateway does (``router.pkcs11._signer``, where the mechanism has no
    parameter) instead of with python-pkcs11's ``Key.sign``."""

    def open(self, workload: Workload, process: int) -> _DirectClient:
        return _DirectClient(self, workload)


class _DirectClient:
    def __init__(self, target: DirectTarget, workload: Workload) -> None:
        import pkcs11

        from gateway.config import load, load_pins
        from router.pkcs11 import load_module
        from router.placement.factory import make_store

        config = load(target.config_path)
        pins = load_pins(config)
        os.environ.update(config.pkcs11.env)
        os.environ.update(dict(target.env))
        module = None if target.module else load_module(config.pkcs11.module)
        lib = module.lib if module is not None else pkcs11.lib(target.module)
        store = make_store(config.store.url, config.base_dir)
        try:
            placements = [store.get(key_id) for key_id in workload.key_ids]
        finally:
            store.close()
        labels = {spec.name: spec.token_label for spec in config.clusters}
        self._signer = module.signer if module is not None and target.gateway_binding else None
        self._logins: dict[str, Any] = {}
        self._tokens: dict[str, Any] = {}
        keys: list[tuple[str, str]] = []
        for key_id, placement in zip(workload.key_ids, placements, strict=True):
            if placement is None:
                raise RuntimeError(f"key {key_id!r} is not in the placement store")
            cluster = placement.primary
            if cluster not in self._tokens:
                token = _token(lib, labels[cluster], module=module)
                self._tokens[cluster] = token
                self._logins[cluster] = _login(token, pins[cluster].reveal())
            keys.append((key_id, cluster))
        self.sessions: list[Any] = []
        self.calls: list[Call] = [self._slot(workload, keys, j) for j in range(workload.in_flight)]

    def _slot(self, w: Workload, keys: list[tuple[str, str]], number: int) -> Call:
        from pkcs11 import Mechanism, ObjectClass
        from pkcs11.mechanisms import GCMParams

        from router.model import Operation
        from router.pkcs11._keys import OAEP_SHA256, signature_mechanism  # the gateway's own mechanisms
        from router.pkcs11._signer import Signer, sign_with

        payload = (_PAYLOAD * (w.payload // 256 + 1))[: w.payload]
        sessions = {cluster: self._tokens[cluster].open(rw=True) for _, cluster in keys}
        self.sessions += sessions.values()
        ops: list[Callable[[], bool]] = []
        for key_id, cluster in keys:
            session = sessions[cluster]

            def find(cls: Any, session: Any = session, key_id: str = key_id) -> Any:
                return session.get_key(object_class=cls, id=key_id.encode())

            # Each operation binds its key objects as defaults: one closure per key, not the loop's last.
            if w.op in ("sign", "verify"):
                mechanism, param, data = signature_mechanism(w.algorithm, digest_for(w.algorithm, payload))
                private = find(ObjectClass.PRIVATE_KEY)
                if w.op == "sign" and self._signer is not None:
                    def sign_lean(k: Any = private, d: bytes = data, m: Mechanism = mechanism, p: Any = param,
                                  signer: Signer = self._signer) -> bool:
                        return bool(sign_with(signer, k, m, p, d))

                    ops.append(sign_lean)
                elif w.op == "sign":  # row 1: python-pkcs11 itself, nothing in between
                    def sign(k: Any = private, d: bytes = data, m: Mechanism = mechanism, p: Any = param) -> bool:
                        return bool(k.sign(d, mechanism=m, mechanism_param=p))

                    ops.append(sign)
                else:
                    signature = private.sign(data, mechanism=mechanism, mechanism_param=param)
                    public = find(ObjectClass.PUBLIC_KEY)

                    def verify(
                        k: Any = public, d: bytes = data, s: bytes = signature, m: Mechanism = mechanism, p: Any = param
                    ) -> bool:
                        return bool(k.verify(d, s, mechanism=m, mechanism_param=p))

                    ops.append(verify)
            elif w.algorithm is Operation.AES_GCM:
                secret = find(ObjectClass.SECRET_KEY)
                if w.op == "encrypt":
                    def gcm_encrypt(k: Any = secret) -> bool:
                        return bool(k.encrypt(
                            payload, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(os.urandom(12), None, 128)))

                    ops.append(gcm_encrypt)
                else:
                    iv = os.urandom(12)
                    sealed = secret.encrypt(payload, mechanism=Mechanism.AES_GCM,
                                            mechanism_param=GCMParams(iv, None, 128))

                    def gcm_decrypt(k: Any = secret, c: bytes = sealed, iv: bytes = iv) -> bool:
                        plain: bytes = k.decrypt(
                            c, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, None, 128))
                        return plain == payload

                    ops.append(gcm_decrypt)
            elif w.algorithm is Operation.RSA_OAEP_SHA256:
                public = find(ObjectClass.PUBLIC_KEY)
                if w.op == "encrypt":
                    def oaep_encrypt(k: Any = public) -> bool:
                        return bool(k.encrypt(payload, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256))

                    ops.append(oaep_encrypt)
                else:
                    private = find(ObjectClass.PRIVATE_KEY)
                    sealed = public.encrypt(payload, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256)

                    def oaep_decrypt(k: Any = private, c: bytes = sealed) -> bool:
                        plain: bytes = k.decrypt(c, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256)
                        return plain == payload

                    ops.append(oaep_decrypt)
            else:
                secret = find(ObjectClass.SECRET_KEY)

                def hmac(k: Any = secret) -> bool:
                    return bool(k.sign(payload, mechanism=Mechanism.SHA256_HMAC))

                ops.append(hmac)

        from pkcs11 import exceptions as p11

        counter = [number]

        def call() -> tuple[int, dict[str, int] | None]:
            counter[0] += 1
            try:
                ok = ops[counter[0] % len(ops)]()
            except p11.PKCS11Error as exc:
                return 0, {type(exc).__name__: 1}
            return (1, None) if ok else (0, {"WRONG_RESULT": 1})

        return call

    def close(self) -> None:
        for session in self.sessions:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - closing at exit; the module may be gone
                pass
        # The login sessions stay open until the process ends: closing one logs out the token.


def _patiently(call: Callable[[], Any], *transient: type[Exception]) -> Any:
    """``call()``, asked again for up to five seconds while it fails with ``transient``."""
    import time

    for attempt in range(50):
        try:
            return call()
        except transient:
            if attempt == 49:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")  # pragma: no cover


def _token(lib: Any, label: str, *, module: Any = None) -> Any:
    """The token labelled ``label``.

    A token can briefly look absent: SoftHSM while another process rewrites its files
    (python-pkcs11's ``get_token`` then gives up on every slot), p11-kit-client while
    other clients connect. With the configured ``module`` the slots are walked the way
    the gateway walks them (a failing slot is skipped); either way it is asked again.
    """
    from pkcs11 import exceptions as p11

    def find() -> Any:
        return module.token(label) if module is not None else lib.get_token(token_label=label)

    return _patiently(find, p11.NoSuchToken, p11.GeneralError)


def _login(token: Any, pin: str) -> Any:
    """A logged-in session (a token being rewritten may answer CKR_GENERAL_ERROR for a moment)."""
    from pkcs11 import exceptions as p11

    def login() -> Any:
        try:
            return token.open(rw=True, user_pin=pin)
        except p11.UserAlreadyLoggedIn:
            return token.open(rw=True)

    return _patiently(login, p11.GeneralError)
