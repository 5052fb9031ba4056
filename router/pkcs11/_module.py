"""Loading a PKCS #11 module so that threads are safe with any module.

python-pkcs11 calls ``C_Initialize(NULL)``, which tells a module that the
application will not use threads; SoftHSM then turns its own locking off and
corrupts its heap when two threads use two sessions. So we initialise the
module ourselves first, through ctypes, with ``CKF_OS_LOCKING_OK`` (what
p11-kit-proxy does), and hand python-pkcs11 a library object that skips its own
``C_Initialize``. A module that answers ``CKR_CANT_LOCK`` is initialised the
plain way and every call into it is serialised by one lock per module.

A module is loaded once per process (``load_module`` caches by path). Worker
processes must load it after ``fork``, never inherit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import pkcs11
from pkcs11 import _pkcs11

from router.pkcs11._guard import UnwrapGuard
from router.pkcs11._signer import Signer

log = logging.getLogger(__name__)

CKR_OK = 0x0
CKR_CANT_LOCK = 0xA
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKF_OS_LOCKING_OK = 0x2


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _PreinitializedLib(_pkcs11.lib):
    """A python-pkcs11 library whose module we already initialised."""

    def initialize(self) -> None:
        # C_Initialize was called with CKF_OS_LOCKING_OK in _initialize_with_locking.
        return None



@dataclass
class Module:
    """A loaded PKCS #11 module and how calls into it must be guarded."""

    path: str
    lib: Any
    os_locking: bool
    signer: Signer | None = None
    """Signs with parameterless mechanisms without python-pkcs11's overhead (``_signer``)."""
    unwrap_guard: UnwrapGuard | None = None
    """Writes and reads the wrapping key's unwrap template (``_guard``); None where the module's
    function list does not see python-pkcs11's sessions."""
    _serial: threading.RLock | None = field(default=None, repr=False)
    """Re-entrant: a call made under it (finding a token while a pool is built) takes it again."""
    _tokens: dict[str, Any] = field(default_factory=dict, repr=False)
    _tokens_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _objects: dict[str, TokenObjects] = field(default_factory=dict, repr=False)

    def guard(self) -> ContextManager[object]:
        """Hold this around every call into the module."""
        return self._serial if self._serial is not None else contextlib.nullcontext()

    @property
    def serial(self) -> threading.RLock | None:
        """What ``guard`` holds: the lock of a module that cannot lock for itself, else None.

        For the request path, which skips the no-op context manager when it is None.
        """
        return self._serial

    def objects(self, label: str) -> TokenObjects:
        """How searches and changes of token ``label``'s objects are kept apart (one per token)."""
        token = self.token(label)
        with self._tokens_lock:
            found = self._objects.get(label)
            if found is None:
                identity = f"{self.path}\0{label}\0{getattr(token, 'serial', b'')!r}"
                found = self._objects[label] = TokenObjects(hashlib.sha256(identity.encode()).hexdigest()[:32])
            return found

    def token(self, label: str) -> Any:
        """The token labelled ``label``, found once and remembered.

        Slots are walked one by one, skipping any that fails: python-pkcs11's
        ``get_token`` gives up on every token when one of them answers
        CKR_DEVICE_ERROR, which would let one dead cluster hide the live ones.
        """
        with self._tokens_lock:
            token = self._tokens.get(label)
            if token is not None:
                return token
            with self.guard():
                for slot in self.lib.get_slots(token_present=True):
                    try:
                        candidate = slot.get_token()
                    except pkcs11.PKCS11Error:
                        continue
                    if candidate.label == label:
                        self._tokens[label] = candidate
                        return candidate
        raise pkcs11.exceptions.NoSuchToken(f"no token labelled {label!r}")


class LockTimeout(TimeoutError):
    """A change of a token's objects could not start before its deadline."""


class TokenObjects:
    """Keeps searches and changes (creations, destructions) of one token's objects apart.

    SoftHSM 2.6 (Debian 12's) loses track of objects when they overlap:

    - threads of one process creating objects at once: a creation fails with
      CKR_GENERAL_ERROR or CKR_TEMPLATE_INCONSISTENT (6-7 % of 96 at once on 8 threads);
    - a process re-reads the token's directory whenever another process changed it, on
      any call that looks at an object (a signature's too). Done while a thread of the
      process is making an object, it lists that object twice, and destroying "the
      other one" deletes the only file.

    ``searching()`` is one lock per token in this process; ``changing()`` also takes a
    file lock that every gateway process on this host shares, and the caller searches
    first, under it, so that the process has caught up with the others' changes before
    it makes anything (``Pkcs11Cluster._cleared``: its sweep of the key's leftovers).
    Calls that use a key (sign, decrypt…) take neither.
    """

    def __init__(self, name: str | None) -> None:
        """``name`` names the file lock; None keeps nothing apart (a module safe without it)."""
        self._local = threading.RLock() if name is not None else None
        directory = _lock_dir() if name is not None else None
        self._path = directory / f"{name}.lock" if directory is not None else None

    def searching(self) -> ContextManager[object]:
        return self._local if self._local is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def changing(self, deadline: float) -> Iterator[None]:
        """Both locks, waited for until ``deadline`` (monotonic), else ``LockTimeout``. Not re-entrant."""
        if self._local is None:
            yield
            return
        fd = self._file_lock(deadline)
        try:
            if not self._local.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise LockTimeout("another thread of this process is changing the token's objects")
            try:
                yield
            finally:
                self._local.release()
        finally:
            if fd is not None:
                os.close(fd)  # releases the file lock

    def _file_lock(self, deadline: float) -> int | None:
        if self._path is None:
            return None
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            _warn_once(f"token objects are changed without the lock shared by processes ({exc})")
            return None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout("another process is changing the token's objects") from None
                time.sleep(_FILE_LOCK_POLL)
            except OSError as exc:
                os.close(fd)
                _warn_once(f"token objects are changed without the lock shared by processes ({exc})")
                return None


_FILE_LOCK_POLL = 0.005
"""How often a change looks whether another process has let go of the token's file lock."""

_lock_dir_cache: list[Path | None] = []
_warned: set[str] = set()


def _lock_dir() -> Path | None:
    """``$TMPDIR/hsmgw-<uid>`` (0700), shared by this user's gateway processes; None if unusable."""
    if not _lock_dir_cache:
        path = Path(tempfile.gettempdir()) / f"hsmgw-{os.getuid()}"
        usable: Path | None = path
        try:
            path.mkdir(mode=0o700, exist_ok=True)
            if path.stat().st_uid != os.getuid():
                raise PermissionError(f"{path} belongs to another user")
        except OSError as exc:
            _warn_once(f"no directory for token locks ({exc}); token objects are changed without them")
            usable = None
        _lock_dir_cache.append(usable)
    return _lock_dir_cache[0]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


_loaded: dict[str, Module] = {}
_load_lock = threading.Lock()


def load_module(path: str) -> Module:
    """Load (once per process) and initialise the module at ``path``."""
    real = os.path.realpath(path)
    with _load_lock:
        module = _loaded.get(real)
        if module is None:
            module = _load(real)
            _loaded[real] = module
        return module


def _load(path: str) -> Module:
    if not os.path.exists(path):
        raise FileNotFoundError(f"PKCS #11 module not found: {path}")
    rv, functions = _initialize_with_locking(path)
    signer = _signer(path, functions)
    if rv in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
            log.warning("PKCS #11 module %s was already initialised; serialising calls", path)
        try:
            lib = _PreinitializedLib(path)
        except pkcs11.PKCS11Error:
            # The module gave python-pkcs11 an instance of its own, which nothing has
            # initialised: p11-kit's proxy hands each C_GetFunctionList caller a new one.
            # python-pkcs11 initialises it, without OS locking, so calls are serialised.
            log.warning("PKCS #11 module %s gives each caller an instance of its own; "
                        "python-pkcs11 initialises its own and calls into it are serialised", path)
            own = pkcs11.lib(path)
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(own))  # as below
            return Module(path=path, lib=own, os_locking=False, signer=None, _serial=threading.RLock())
        # Never deallocate: python-pkcs11's __dealloc__ would C_Finalize and
        # dlclose the module at interpreter exit while daemon threads may still
        # be inside it. One extra reference keeps it for the process's life.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(lib))
        serial = None if rv == CKR_OK else threading.RLock()
        return Module(path=path, lib=lib, os_locking=rv == CKR_OK, signer=signer, unwrap_guard=_unwrap_guard(functions),
                      _serial=serial)
    if rv == CKR_CANT_LOCK:
        log.warning("PKCS #11 module %s cannot use OS locking; serialising calls", path)
        return Module(path=path, lib=pkcs11.lib(path), os_locking=False, signer=signer,
                      unwrap_guard=_unwrap_guard(functions), _serial=threading.RLock())
    raise RuntimeError(f"C_Initialize of {path} failed with CKR 0x{rv:x}")


def _unwrap_guard(functions: int) -> UnwrapGuard | None:
    try:
        return UnwrapGuard(functions)
    except ValueError:
        return None


def _signer(path: str, functions: int) -> Signer | None:
    try:
        return Signer(functions)
    except ValueError as exc:
        log.info("PKCS #11 module %s: signing through python-pkcs11 (%s)", path, exc)
        return None


def _initialize_with_locking(path: str) -> tuple[int, int]:
    """C_Initialize with CKF_OS_LOCKING_OK: (its return value, the CK_FUNCTION_LIST's address)."""
    dll = ctypes.CDLL(path)
    function_list = ctypes.c_void_p()
    get_function_list = dll.C_GetFunctionList
    get_function_list.restype = ctypes.c_ulong
    get_function_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    rv = get_function_list(ctypes.byref(function_list))
    if rv != CKR_OK or not function_list.value:
        raise RuntimeError(f"C_GetFunctionList of {path} failed with CKR 0x{rv:x}")
    # CK_FUNCTION_LIST starts with a CK_VERSION (2 bytes, padded to pointer
    # alignment); C_Initialize is the first function pointer after it.
    offset = ctypes.sizeof(ctypes.c_void_p)
    c_initialize_ptr = ctypes.cast(function_list.value + offset, ctypes.POINTER(ctypes.c_void_p))[0]
    c_initialize = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(c_initialize_ptr)
    args = _InitArgs(flags=CKF_OS_LOCKING_OK)
    return int(c_initialize(ctypes.byref(args))), function_list.value
