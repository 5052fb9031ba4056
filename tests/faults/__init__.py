"""Fault injection at the PKCS #11 boundary, for chaos tests.

``faultmod.c`` is a real PKCS #11 module that forwards every call to another
module (SoftHSM by default) and, per token label, injects what a control file
asks for: error codes (``device_error``, ``token_not_present``…), a failure
ratio, latency, a hang, or the loss of every open session. Nothing in Python
is mocked: the gateway loads it like any vendor module. The file's header
comment is the reference for the rules and for which calls they reach.

Using it from a test::

    lib = build_faultmod(tmp_path_factory.mktemp("faultmod"))
    control = FaultControl(state_dir / "faults")
    # the gateway's TOML (``[pkcs11]`` section); the gateway sets ``env``
    # before it loads the module, so the module reads them at C_Initialize:
    #   [pkcs11]
    #   module = "<lib>"
    #   env = { SOFTHSM2_CONF = "<conf>", FAULTMOD_TARGET = "<softhsm .so>", FAULTMOD_CONTROL = "<faults>" }
    # (one line: a TOML inline table cannot span lines)
    control.set("use1-a", "device_error")        # the cluster is down
    ...                                           # requests fail over to use1-b
    control.clear("use1-a")                       # it is back
    control.set("use1-a", "device_error", on="C_DestroyObject")  # only destroys fail
    assert control.stats()["use1-a"].faults > 0

Rules apply from the next PKCS #11 call after ``set``/``clear`` return (the
module stats the file on every call). A process must not load the module and
SoftHSM directly at once: both would share one SoftHSM instance, initialised
twice. Load it after ``fork``, as the gateway does with any module. Worker
processes sharing one control file share its rules but overwrite each other's
stats file: give each its own control file to count per process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

__all__ = ["ERROR_MODES", "SOURCE", "BuildError", "FaultControl", "LabelStats", "build_faultmod"]

SOURCE = Path(__file__).resolve().with_name("faultmod.c")
"""The C source of the module."""

ERROR_MODES = {
    "device_error": 0x30,
    "device_memory": 0x31,
    "device_removed": 0x32,
    "token_not_present": 0xE0,
    "token_not_recognized": 0xE1,
    "function_failed": 0x06,
    "general_error": 0x05,
    "host_memory": 0x02,
    "session_handle_invalid": 0xB3,
    "session_closed": 0xB0,
    "session_count": 0xB1,
    "user_not_logged_in": 0x101,
}
"""Modes that answer one CKR code (the C module's table, by name)."""

_ARITY = {"ok": (0, 0), "hang": (0, 0), "invalidate_sessions": (0, 0), "latency": (1, 1),
          "fail_ratio": (1, 2), "error": (1, 1), **{mode: (0, 0) for mode in ERROR_MODES}}

_COMPILE = ("gcc", "-shared", "-fPIC", "-O2")
_LINK = ("-ldl", "-lpthread")


class BuildError(RuntimeError):
    """The module could not be compiled (no gcc, no p11-kit header…)."""


def build_faultmod(out_dir: Path | str) -> Path:
    """Compile ``faultmod.c`` into ``out_dir/libfaultmod.so``, once per source.

    The library is rebuilt only when the source (or the compiler command)
    changed; the new file replaces the old one atomically, so a process that
    has the old one loaded keeps it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "libfaultmod.so"
    stamp = out_dir / "libfaultmod.so.sha256"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_COMPILE + _LINK).encode()).hexdigest()
    if target.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return target
    gcc = shutil.which(_COMPILE[0])
    if gcc is None:
        raise BuildError("gcc not found; on Debian: apt-get install gcc")
    tmp = out_dir / f".libfaultmod-{uuid.uuid4().hex[:8]}.so"
    result = subprocess.run(
        [gcc, *_COMPILE[1:], "-o", str(tmp), str(SOURCE), *_LINK],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"compiling {SOURCE.name} failed:\n{result.stderr.strip()}")
    os.replace(tmp, target)
    stamp.write_text(digest + "\n")
    return target


class LabelStats(NamedTuple):
    calls: int
    """Calls on this token that reached the rules (the label look-ups excluded)."""
    faults: int
    """Calls that got an injected error, latency, hang or invalidated session."""


class FaultControl:
    """The control file of a faultmod: one rule list per token label.

    Each change reads the file, edits it and replaces it atomically (temp file
    + rename), so several controllers (a test and its child process) may share
    one file. Every write starts with a unique comment: it is a new version for
    the module, which matters for the one-shot ``invalidate_sessions``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._rules: dict[str, list[tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    @property
    def stats_path(self) -> Path:
        return self.path.with_name(self.path.name + ".stats")

    def env(self, target: str | None = None) -> dict[str, str]:
        """The module's environment variables for this control file."""
        env = {"FAULTMOD_CONTROL": str(self.path)}
        if target is not None:
            env["FAULTMOD_TARGET"] = target
        return env

    def set(self, label: str, mode: str, *args: object, on: str | None = None) -> None:
        """Make ``mode`` the only rule for ``label`` (``"*"``: every token); ``on``: for that
        PKCS #11 call only (``"C_DestroyObject"``)."""
        rule = self._rule(label, mode, args, on)
        with self._lock:
            self._load()
            self._rules[label] = [rule]
            self._write()

    def add(self, label: str, mode: str, *args: object, on: str | None = None) -> None:
        """Add a rule after ``label``'s others (``latency`` then ``fail_ratio``…)."""
        rule = self._rule(label, mode, args, on)
        with self._lock:
            self._load()
            self._rules.setdefault(label, []).append(rule)
            self._write()

    def clear(self, label: str | None = None) -> None:
        """Remove ``label``'s rules, or every rule."""
        with self._lock:
            self._load()
            if label is None:
                self._rules.clear()
            else:
                self._rules.pop(label, None)
            self._write()

    def text(self) -> str:
        """The control file as it is written."""
        with self._lock:
            self._load()
            return self._render()

    def stats(self) -> dict[str, LabelStats]:
        """Counters per label, as the module last wrote them (every 100 ms, at exit)."""
        try:
            text = self.stats_path.read_text()
        except FileNotFoundError:
            return {}
        stats = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) == 3 and not line.startswith("#"):
                stats[fields[0]] = LabelStats(int(fields[1]), int(fields[2]))
        return stats

    def wait_stats(self, label: str, *, calls: int = 0, faults: int = 0, timeout: float = 2.0) -> LabelStats:
        """Wait until ``label`` has at least ``calls`` calls and ``faults`` faults."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.stats().get(label, LabelStats(0, 0))
            if current.calls >= calls and current.faults >= faults:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"faultmod stats for {label}: {current}, wanted calls>={calls} faults>={faults}")
            time.sleep(0.02)

    @staticmethod
    def _rule(label: str, mode: str, args: tuple[object, ...], on: str | None = None) -> tuple[str, ...]:
        if not label or any(c.isspace() for c in label) or len(label.encode()) > 32:
            raise ValueError(f"token label {label!r}: 1 to 32 bytes, no spaces")
        if mode not in _ARITY:
            raise ValueError(f"unknown faultmod mode {mode!r}; one of {sorted(_ARITY)}")
        least, most = _ARITY[mode]
        if not least <= len(args) <= most:
            raise ValueError(f"mode {mode!r} takes {least}..{most} arguments, got {len(args)}")
        if mode == "fail_ratio" and not 0.0 <= float(str(args[0])) <= 1.0:
            raise ValueError(f"fail_ratio {args[0]!r}: expected a fraction in 0..1")
        if mode == "latency" and not float(str(args[0])) >= 0:
            raise ValueError(f"latency {args[0]!r}: expected milliseconds >= 0")
        code = args[0] if mode == "error" else args[1] if mode == "fail_ratio" and len(args) == 2 else None
        if code is not None and str(code) not in ERROR_MODES and int(str(code), 0) <= 0:
            raise ValueError(f"error code {code!r}: a mode name ({', '.join(ERROR_MODES)}) or a CKR number")
        if on is not None and (mode == "invalidate_sessions" or not on.startswith("C_") or len(on) > 40
                               or any(c.isspace() for c in on)):
            raise ValueError(f"on={on!r}: a PKCS #11 function name (C_DestroyObject…), not for {mode!r}")
        return (label, mode, *(str(a) for a in args), *(("on", on) if on is not None else ()))

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        rules: dict[str, list[tuple[str, ...]]] = {}
        for line in text.splitlines():
            fields = tuple(line.split())
            if len(fields) >= 2 and not fields[0].startswith("#"):
                rules.setdefault(fields[0], []).append(fields)
        self._rules = rules

    def _render(self) -> str:
        # A unique first line: every write is a new version, even with the same rules.
        lines = [f"# faultmod control {uuid.uuid4().hex} (pid {os.getpid()})"]
        for rules in self._rules.values():
            lines += [" ".join(rule) for rule in rules]
        return "\n".join(lines) + "\n"

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(self._render())
        os.replace(tmp, self.path)
