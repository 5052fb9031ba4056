"""Who is calling, and what they may do: identity, policy, authorization, audit events.

Identity
    With TLS, the client certificate's SAN URI (``spiffe://hsmgw/payments-app``), else
    its subject CN. A development server (plaintext on loopback, no TLS) takes the
    identity from the ``x-hsmgw-identity`` metadata, default ``dev``; any other server
    ignores that header.

Policy (TOML, ``[auth] policy_file``; docs/security.md has an example)
    Roles grant CryptoService operations (RPC names, or ``*``) on key-id prefixes, and
    AdminService methods (``admin = [...]``); identities get roles and optional limits.
    Deny by default: an identity the policy does not name may do nothing but health
    checks and reflection. A signature made by ``BatchSign`` or ``SignStream`` is a
    ``Sign``; each item is checked on its own key.

Errors
    ``PolicyError`` (a ``ConfigError``) for a bad policy file, naming the key path;
    ``PermissionDenied`` for a refused call, whose message names the missing
    permission ("identity 'payments-app' may not Sign keys under 'hr/'").

Audit
    Decisions worth keeping are logged to the ``hsmgw.audit`` logger, one JSON object
    per line (:func:`audit`). Denials always; grants of key creation/destruction and of
    admin calls; policy reloads. Every string in an event is clipped (:func:`clip`), and
    characters that cannot be shown are escaped. An event logged with ``required=True``
    raises :class:`AuditUnwritten` when the audit log did not take it, or
    :class:`AuditUnsynced` when it wrote it but could not sync it: the operation it
    stands for must not run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import stat
import threading
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway._text import shown as shown  # the gateway's one escaping, the CLIs' too
from gateway.audit import AuditSyncError, take_failure
from gateway.config import ConfigError
from hsmgw.v1 import admin_pb2, crypto_pb2

log = logging.getLogger(__name__)
audit_log = logging.getLogger("hsmgw.audit")

DEV_IDENTITY = "dev"
IDENTITY_HEADER = "x-hsmgw-identity"
ALL = "*"

_CRYPTO = crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"]
_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
SIGN_VIA = {"BatchSign": "Sign", "SignStream": "Sign"}
"""RPCs authorized as another operation, per item."""
CRYPTO_OPERATIONS = frozenset(m.name for m in _CRYPTO.methods) - set(SIGN_VIA)
ADMIN_OPERATIONS = frozenset(m.name for m in _ADMIN.methods)
APPROVE = "ApproveChange"
CHANGE_METHODS = frozenset({"PlaceKey", "MoveKey", "ReleaseKey", "ApplyRebalance", "DrainCluster", "FailoverRegion",
                            "DestroyKey", "Reconcile"})
"""The AdminService methods that ask for a change: ``ApproveChange:<method>`` in a role's ``admin``
grants approving the changes that method asks for, and no other (plain ``ApproveChange``: every
change)."""
_AUDIT_TEXT = 200  # longest caller-chosen string copied into an audit event
MAX_IDENTITY = _AUDIT_TEXT
"""Characters in an identity at most: the audit log records each whole, so no two callers
share one identity in it."""
_AUDIT_MESSAGE = 1000  # longest message or error in one: they quote caller strings clipped further
_QUOTED = 100  # longest caller string a message quotes
_COMPOSED = frozenset({"message", "error"})
"""Event fields the gateway writes itself, quoting caller strings clipped to ``_QUOTED``."""


class PolicyError(ConfigError):
    """The policy file is wrong; the message names the file and the key path."""


class PermissionDenied(Exception):
    """The identity lacks a grant; ``message`` says which."""

    def __init__(self, message: str, *, identity: str, operation: str, resource: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.identity = identity
        self.operation = operation
        self.resource = resource


class Unauthenticated(Exception):
    """No usable identity on the connection."""


class AuditUnwritten(Exception):
    """A required audit event is not in the audit log (its write failed; the log says why)."""

    def __init__(self, event: str) -> None:
        super().__init__(f"the audit event {event} could not be written")
        self.event = event


class AuditUnsynced(AuditUnwritten):
    """A required audit event is in the audit log, but could not be synced: a crash may lose it,
    so what it records must not run either. Not a gap in the chain."""

    def __init__(self, event: str) -> None:
        super().__init__(event)
        self.args = (f"the audit event {event} was written but could not be synced",)


# -- audit --------------------------------------------------------------------------


def clip(text: str, limit: int = _AUDIT_TEXT) -> str:
    """A caller's string as events and log lines quote it: escaped (:func:`shown`), and cut to
    ``limit`` characters with an ellipsis."""
    text = shown(text[: limit + 1])  # escaping lengthens: cut first, then again
    return text if len(text) <= limit else text[:limit] + "…"


def _clipped(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return clip(value, limit)
    if isinstance(value, (list, tuple)):
        return [_clipped(item, limit) for item in value]
    if isinstance(value, dict):
        return {str(k): _clipped(v, limit) for k, v in value.items()}
    return value


def audit(event: str, *, required: bool = False, **fields: Any) -> None:
    """One JSON line on the ``hsmgw.audit`` logger (ASCII only; every string clipped to 200
    characters, ``message`` and ``error`` to 1,000, which quote caller strings clipped to 100).

    ``required``: the event must be in the audit log before what it records happens; raises
    :class:`AuditUnwritten` when the attached audit log did not take it (:class:`AuditUnsynced`
    when it wrote it but could not sync it). Without it, a failed write is logged and counted by
    the audit log, and the caller goes on.
    """
    if not audit_log.isEnabledFor(logging.INFO):
        if required:  # nothing would be written, nor could a failure be seen
            raise AuditUnwritten(event)
        return
    record = {"event": event, "time": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    for name, value in fields.items():
        record[name] = _clipped(value, _AUDIT_MESSAGE if name in _COMPOSED else _AUDIT_TEXT)
    take_failure()  # one left by an earlier event of this thread is not this one's
    audit_log.info(json.dumps(record, sort_keys=True, ensure_ascii=True, default=str))
    failure = take_failure()
    if failure is not None and required:
        raise AuditUnsynced(event) if isinstance(failure, AuditSyncError) else AuditUnwritten(event)


# -- the policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-identity limits; 0 means unlimited."""

    rate: float = 0.0
    """Sustained operations per second (a BatchSign costs one per item)."""
    burst: float = 0.0
    """Operations allowed at once: the token bucket's size, which refills at ``rate``; default
    (0): one second's worth of the rate."""
    concurrency: int = 0
    """Calls (and open streams) in flight at once."""

    @property
    def bucket(self) -> float:
        return self.burst or max(self.rate, 1.0)


@dataclass(frozen=True)
class Role:
    name: str
    operations: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    """Key-id prefixes the operations apply to; ``""`` is every key (written ``*``)."""
    admin: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Principal:
    """What one identity may do, resolved from its roles."""

    identity: str
    roles: tuple[str, ...] = ()
    grants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """operation → key-id prefixes it is granted on (``""`` = every key)."""
    admin: frozenset[str] = frozenset()
    limits: Limits = Limits()
    everything: bool = False
    """Development server without a policy: every call is allowed."""

    def prefixes(self, operation: str) -> tuple[str, ...]:
        if self.everything:
            return ("",)
        return self.grants.get(operation, ()) + self.grants.get(ALL, ())

    def may(self, operation: str, key_id: str) -> bool:
        return key_id.startswith(self.prefixes(operation))  # any of them; none granted: False

    def may_list(self, operation: str, prefix: str) -> bool:
        return prefix.startswith(self.prefixes(operation))

    def may_some(self, operation: str) -> bool:
        return bool(self.prefixes(operation))

    def may_admin(self, method: str) -> bool:
        if self.everything or ALL in self.admin or method in self.admin:
            return True
        # Approving only some kinds of change: which kind this call approves is checked once its
        # change is read (``may_approve``).
        return method == APPROVE and any(grant.startswith(APPROVE + ":") for grant in self.admin)

    def may_approve(self, method: str) -> bool:
        """Whether this identity may approve a change that AdminService ``method`` asked for; with
        ``method`` "", whether it may approve every kind of change."""
        return self.everything or not {ALL, APPROVE, f"{APPROVE}:{method}"}.isdisjoint(self.admin)


def _quoted(text: str) -> str:
    """A caller's string as a message quotes it: clipped to 100 characters, in quotes (``repr``
    escapes what cannot be shown)."""
    return repr(text if len(text) <= _QUOTED else text[:_QUOTED] + "…")


def namespace(key_id: str) -> str:
    """``hr/payroll/k1`` → ``hr/payroll/``: what a denial names."""
    cut = key_id.rfind("/")
    return key_id[: cut + 1] if cut >= 0 else key_id


_OTHERS_KEPT = 10_000
"""Identities a policy does not name whose rights are kept made (more start afresh)."""


class Policy:
    """Roles and identities from a policy file; immutable, swapped whole on reload."""

    def __init__(
        self,
        roles: Mapping[str, Role],
        identities: Mapping[str, tuple[tuple[str, ...], Limits]],
        default_limits: Limits = Limits(),
        *,
        source: str = "",
        digest: str = "",
        allow_all: bool = False,
    ) -> None:
        self.roles = dict(roles)
        self.default_limits = default_limits
        self.source = source
        self.digest = digest
        self.allow_all = allow_all
        self._principals = {
            identity: self._resolve(identity, names, limits) for identity, (names, limits) in identities.items()
        }
        # Identities the file does not name all get the same rights; each is made once, not per call.
        self._others: dict[str, Principal] = {}

    @classmethod
    def permissive(cls) -> Policy:
        """The development policy (no ``[auth]``): everything allowed, no limits."""
        return cls({}, {}, source="(development: allow all)", allow_all=True)

    def _resolve(self, identity: str, role_names: tuple[str, ...], limits: Limits) -> Principal:
        grants: dict[str, list[str]] = {}
        admin: set[str] = set()
        for name in role_names:
            role = self.roles[name]
            for op in role.operations:
                grants.setdefault(op, []).extend(role.prefixes)
            admin |= role.admin
        return Principal(
            identity=identity,
            roles=role_names,
            grants={op: tuple(dict.fromkeys(p)) for op, p in grants.items()},
            admin=frozenset(admin),
            limits=limits,
        )

    @property
    def identities(self) -> list[str]:
        return sorted(self._principals)

    def principal(self, identity: str) -> Principal:
        found = self._principals.get(identity) or self._others.get(identity)
        if found is not None:
            return found
        if self.allow_all:
            found = Principal(identity=identity, everything=True)
        else:
            found = Principal(identity=identity, limits=self.default_limits)
        if len(self._others) >= _OTHERS_KEPT:
            self._others = {}
        self._others[identity] = found
        return found

    # -- decisions (raise PermissionDenied) --

    def check_key(self, principal: Principal, operation: str, key_id: str) -> None:
        if not principal.may(operation, key_id):
            raise PermissionDenied(
                f"identity {_quoted(principal.identity)} may not {operation} keys under "
                f"{_quoted(namespace(key_id))}",
                identity=principal.identity,
                operation=operation,
                resource=key_id,
            )

    def check_list(self, principal: Principal, operation: str, prefix: str) -> None:
        if not principal.may_list(operation, prefix):
            granted = ", ".join(repr(p or ALL) for p in principal.prefixes(operation))
            hint = f"; ask for a prefix inside {granted}" if granted else ""
            raise PermissionDenied(
                f"identity {_quoted(principal.identity)} may not {operation} keys under {_quoted(prefix)}{hint}",
                identity=principal.identity,
                operation=operation,
                resource=prefix,
            )

    def check_some(self, principal: Principal, operation: str) -> None:
        if not principal.may_some(operation):
            raise PermissionDenied(
                f"identity {_quoted(principal.identity)} may not {operation} (no role grants it)",
                identity=principal.identity,
                operation=operation,
            )

    def check_every_key(self, principal: Principal, operation: str) -> None:
        if "" not in principal.prefixes(operation):
            raise PermissionDenied(
                f"identity {_quoted(principal.identity)} may not {operation} (it needs {operation} on every key, "
                "'*')",
                identity=principal.identity,
                operation=operation,
            )

    def check_approve(self, principal: Principal, method: str, change_id: str) -> None:
        """PermissionDenied unless ``principal`` may approve change ``change_id``, which AdminService
        ``method`` asked for."""
        if not principal.may_approve(method):
            scoped = sorted(g for g in principal.admin if g.startswith(APPROVE + ":"))
            raise PermissionDenied(
                f"identity {_quoted(principal.identity)} may not approve change {_quoted(change_id)}, which "
                f"{method} asked for (its roles grant {', '.join(scoped) or 'no approval'}; approving it needs "
                f"{APPROVE} or {APPROVE}:{method})",
                identity=principal.identity,
                operation=f"admin:{APPROVE}:{method}",
                resource=change_id,
            )

    def check_admin(self, principal: Principal, method: str) -> None:
        if not principal.may_admin(method):
            raise PermissionDenied(
                f"identity {_quoted(principal.identity)} may not call AdminService.{method} (no admin role grants "
                "it)",
                identity=principal.identity,
                operation=f"admin:{method}",
            )


# -- parsing ----------------------------------------------------------------------------


def _err(source: str, path: str, message: str) -> PolicyError:
    return PolicyError(f"auth.policy_file ({source}): {path}: {message}")


def _key(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else json.dumps(name)


def _strings(value: Any, source: str, path: str) -> list[str]:
    if not isinstance(value, list):
        raise _err(source, path, f"expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _err(source, f"{path}[{i}]", f"expected str, got {type(item).__name__}")
    return value


def _no_unknown(table: Mapping[str, Any], known: Iterable[str], source: str, path: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise _err(source, f"{path}{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")


def _limits(table: Mapping[str, Any], source: str, path: str, base: Limits) -> Limits:
    values: dict[str, Any] = {}
    for key, kind in (("rate", float), ("burst", float), ("concurrency", int)):
        if key not in table:
            values[key] = getattr(base, key)
            continue
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise _err(source, f"{path}{key}", f"expected {'an integer' if kind is int else 'a number'}")
        if not value >= 0 or value == math.inf:  # nan and inf would admit every call
            raise _err(source, f"{path}{key}", "must be a finite number, 0 (unlimited) or more")
        values[key] = kind(value)
    return Limits(**values)


def parse_policy(data: Mapping[str, Any], source: str = "policy", digest: str = "") -> Policy:
    _no_unknown(data, ("roles", "identities", "limits"), source, "")
    limits_table = data.get("limits", {})
    if not isinstance(limits_table, dict):
        raise _err(source, "limits", "expected a table")
    _no_unknown(limits_table, ("rate", "burst", "concurrency"), source, "limits.")
    default_limits = _limits(limits_table, source, "limits.", Limits())

    roles: dict[str, Role] = {}
    raw_roles = data.get("roles", {})
    if not isinstance(raw_roles, dict):
        raise _err(source, "roles", "expected tables [roles.<name>]")
    for name, table in raw_roles.items():
        path = f"roles.{_key(name)}."
        if not isinstance(table, dict):
            raise _err(source, path[:-1], "expected a table")
        _no_unknown(table, ("operations", "prefixes", "admin"), source, path)
        operations = _strings(table.get("operations", []), source, path + "operations")
        for i, op in enumerate(operations):
            if op in SIGN_VIA:
                raise _err(
                    source, f"{path}operations[{i}]", f"{op} is authorized as {SIGN_VIA[op]} on each item; grant Sign"
                )
            if op != ALL and op not in CRYPTO_OPERATIONS:
                known = ", ".join(sorted(CRYPTO_OPERATIONS))
                raise _err(source, f"{path}operations[{i}]", f"unknown operation {op!r} (known: {known}, or '*')")
        prefixes = _strings(table.get("prefixes", []), source, path + "prefixes")
        for i, prefix in enumerate(prefixes):
            if prefix != ALL and not (prefix.endswith("/") and len(prefix) > 1):
                raise _err(
                    source,
                    f"{path}prefixes[{i}]",
                    f"a prefix must end with '/' (or be '*' for every key), got {prefix!r}",
                )
        if operations and not prefixes:
            raise _err(source, path + "prefixes", "missing: operations apply to key-id prefixes ('*' = every key)")
        if prefixes and not operations:
            raise _err(source, path + "operations", "missing: the role names prefixes but grants no operation")
        admin = _strings(table.get("admin", []), source, path + "admin")
        for i, method in enumerate(admin):
            approved = method.removeprefix(APPROVE + ":")
            if approved != method and approved not in CHANGE_METHODS:
                known = ", ".join(sorted(CHANGE_METHODS))
                raise _err(source, f"{path}admin[{i}]", f"{APPROVE}: approves changes that one of {known} asks "
                           f"for, not {approved!r}")
            if approved == method and method != ALL and method not in ADMIN_OPERATIONS:
                known = ", ".join(sorted(ADMIN_OPERATIONS))
                raise _err(
                    source, f"{path}admin[{i}]", f"unknown AdminService method {method!r} (known: {known}, "
                    f"{APPROVE}:<method>, or '*')"
                )
        roles[name] = Role(
            name=name,
            operations=frozenset(operations),
            prefixes=tuple("" if p == ALL else p for p in prefixes),
            admin=frozenset(admin),
        )

    identities: dict[str, tuple[tuple[str, ...], Limits]] = {}
    raw_ids = data.get("identities", {})
    if not isinstance(raw_ids, dict):
        raise _err(source, "identities", "expected tables [identities.\"<identity>\"]")
    for identity, table in raw_ids.items():
        path = f"identities.{_key(identity)}."
        if not identity:
            raise _err(source, "identities", "an identity may not be empty")
        if _recorded_length(identity) > MAX_IDENTITY:
            raise _err(source, path[:-1], f"an identity has at most {MAX_IDENTITY} characters "
                                          f"({_recorded_length(identity)} here), as the audit log writes it: a "
                                          "caller with a longer one is refused")
        if not isinstance(table, dict):
            raise _err(source, path[:-1], "expected a table")
        _no_unknown(table, ("roles", "rate", "burst", "concurrency"), source, path)
        names = _strings(table.get("roles", []), source, path + "roles")
        for i, role in enumerate(names):
            if role not in roles:
                defined = ", ".join(sorted(roles)) or "none"
                raise _err(source, f"{path}roles[{i}]", f"no role {role!r} (defined: {defined})")
        identities[identity] = (tuple(names), _limits(table, source, path, default_limits))
    if not identities:
        # Deny by default leaves no caller anything but health checks, admins included: what a
        # file truncated by a write that is not atomic looks like, never a policy anyone means.
        raise _err(source, "identities", "none defined: every call but health checks would be refused, "
                                         "admin calls included (an empty or cut-short file?)")
    return Policy(roles, identities, default_limits, source=source, digest=digest)


def load_policy(path: Path) -> Policy:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"auth.policy_file: {path} does not exist") from None
    except OSError as exc:
        raise PolicyError(f"auth.policy_file: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"auth.policy_file ({path}): not valid TOML: {exc}") from None
    return parse_policy(data, str(path), hashlib.sha256(raw).hexdigest())


def policy_file_problems(path: Path) -> list[str]:
    """How others than the policy file's owner could change it: a file its group or others may
    write, or a directory its group or others may write without the sticky bit (they may rename
    another file over the policy): the file's own directory and, for a symlink (a Kubernetes
    ConfigMap mount links ``..data/``), the directory of the file it resolves to. Each problem
    says what to run."""
    problems = []
    try:
        mode = path.stat().st_mode
    except OSError:
        return []  # load_policy says what is wrong with it
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = {stat.S_IWGRP: "its group", stat.S_IWOTH: "others"}
        writers = " and ".join(name for bit, name in who.items() if mode & bit)
        problems.append(f"{path} is writable by {writers} (mode {stat.S_IMODE(mode):04o}); run: chmod go-w {path}")
    directory = path.absolute().parent
    problem = _directory_problem(directory, "its directory")
    if problem:
        problems.append(problem)
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return problems
    if target.parent != directory.resolve():
        problem = _directory_problem(target.parent, "its target's directory")
        if problem:
            problems.append(problem)
    return problems


def _directory_problem(directory: Path, which: str) -> str:
    """Who may rename another file over one in ``directory``, and what to run; "" if only its owner.

    With the sticky bit (``/tmp``), only a file's owner or the directory's may rename or remove it."""
    try:
        mode = directory.stat().st_mode
    except OSError:
        return ""
    if mode & stat.S_ISVTX:
        return ""
    if mode & stat.S_IWOTH:
        # One command that leaves no warning behind: o-w alone would leave a 0775 directory.
        who, whoever, bits = "everyone", "anyone", "go-w" if mode & stat.S_IWGRP else "o-w"
    elif mode & stat.S_IWGRP:
        who, whoever, bits = "its group", "any member of its group", "g-w"
    else:
        return ""
    return (f"{which} {directory} is writable by {who}, without the sticky bit (mode {stat.S_IMODE(mode):04o}): "
            f"{whoever} may put another file in its place; run: chmod {bits} {directory}")


def _warn_policy_mode(path: Path) -> None:
    for problem in policy_file_problems(path):
        log.warning("auth.policy_file: %s. Whoever can change the policy decides every call's authorization",
                    problem)


class PolicyStore:
    """The current policy; ``reload()`` swaps in a new one, or keeps the old one if the file is bad.

    A policy file others may change is logged (WARNING) at load and on every reload, not refused:
    see docs/security.md.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.current = load_policy(path) if path is not None else Policy.permissive()
        if path is not None:
            _warn_policy_mode(path)

    def reload(self) -> bool:
        if self.path is None:
            return True
        _warn_policy_mode(self.path)
        with self._lock:
            try:
                policy = load_policy(self.path)
            except PolicyError as exc:
                log.error("policy reload refused, keeping the current policy: %s", exc)
                audit("policy.reload", ok=False, path=str(self.path), error=str(exc))
                return False
            self.current = policy
        log.info(
            "policy reloaded from %s (%d identities, %d roles)", self.path, len(policy.identities), len(policy.roles)
        )
        audit("policy.reload", ok=True, path=str(self.path), sha256=policy.digest)
        return True


# -- identity ----------------------------------------------------------------------------


CERTIFICATE, HEADER, DEFAULT = "certificate", "header", "default"
"""How an identity was established: the client certificate (TLS); the ``x-hsmgw-identity``
header of a development server; ``dev``, a development server's default."""


class Authenticator:
    """Finds the caller's identity on a call's context."""

    def __init__(self, *, tls: bool, dev_header: bool) -> None:
        self.tls = tls
        self.dev_header = dev_header and not tls

    def identity(self, context: Any) -> str:
        return self.authenticate(context)[0]

    def authenticate(self, context: Any) -> tuple[str, str]:
        """The caller's identity and how it was established (``CERTIFICATE``, ``HEADER`` or
        ``DEFAULT``); ``Unauthenticated`` if there is none, or it has a character that
        cannot be shown."""
        if not self.tls:
            if self.dev_header:
                for key, value in context.invocation_metadata() or ():
                    if key == IDENTITY_HEADER and isinstance(value, str) and value:
                        return _showable(value, f"the {IDENTITY_HEADER} header"), HEADER
            return DEV_IDENTITY, DEFAULT
        return identity_from_auth_context(context.auth_context()), CERTIFICATE


def _showable(identity: str, where: str) -> str:
    """``identity`` unless it is longer than ``MAX_IDENTITY`` (clipped in the audit log, it
    could pass there for another) or has a character that cannot be shown: a control character
    (a terminal escape, a line break that forges a log line or a table row), a format
    character (bidi override) or a line or paragraph separator. Space separators (U+00A0,
    U+3000…) are shown as spaces and forge nothing: names that have them are accepted; the
    audit log writes them escaped (``\\xa0``), and the length that counts is the one it writes."""
    if identity.isprintable():  # every call's identity: the rest only says where
        if len(identity) > MAX_IDENTITY:
            raise Unauthenticated(f"{where} is {len(identity)} characters long: an identity has at most "
                                  f"{MAX_IDENTITY}")
        return identity
    for offset, ch in enumerate(identity):
        if not ch.isprintable() and unicodedata.category(ch) != "Zs":
            raise Unauthenticated(f"{where} has a character that cannot be shown (U+{ord(ch):04X} at offset "
                                  f"{offset}): an identity must be printable")
    if _recorded_length(identity) > MAX_IDENTITY:
        raise Unauthenticated(f"{where} is {_recorded_length(identity)} characters long as the audit log writes "
                              f"it (spaces escaped): an identity has at most {MAX_IDENTITY}")
    return identity


def _recorded_length(identity: str) -> int:
    """The length of ``identity`` as the audit log writes it (``shown``: escaped)."""
    return len(identity) if identity.isprintable() else len(shown(identity))


def _decoded(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # replacing the bytes would let two certificates share one identity
        raise Unauthenticated(f"{where} is not valid UTF-8") from None
    return _showable(text, where)


def identity_from_auth_context(auth: Mapping[str, list[bytes]]) -> str:
    """The certificate's URI SAN if it has exactly one, else its subject CN.

    Only a URI SAN (``peer_uri``) makes a URI identity: a DNS or email SAN, or a common
    name, written as ``spiffe://…`` would otherwise pass for that identity. So a common
    name that looks like a URI is refused, and no other SAN is read at all. An identity
    that is not UTF-8, or has a character that cannot be shown, is refused too.
    """
    uris = auth.get("peer_uri", [])
    if len(uris) > 1:
        raise Unauthenticated("the client certificate has several URI SANs; it must have one")
    if uris:
        return _decoded(uris[0], "the client certificate's URI SAN")
    names = auth.get("x509_common_name", [])
    if len(names) == 1 and names[0]:
        if b":" in names[0]:  # a URI identity always has a scheme and its colon
            raise Unauthenticated("the client certificate's common name looks like a URI, and it has no URI SAN: "
                                  "a URI identity must be a URI SAN")
        return _decoded(names[0], "the client certificate's common name")
    raise Unauthenticated("the client certificate has neither a URI SAN nor a single common name")
