"""Test helpers: a real gateway process, direct token inspection, unique ids."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11
from prometheus_client.parser import text_string_to_metric_families

from gateway.fleet import Fleet, find_module

ROOT = Path(__file__).resolve().parent.parent


def unique(prefix: str = "t") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


class FakeClock:
    """A clock tests move by hand: ``clock.now += 5`` or ``clock.sleep(5)``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""A /metrics page: (sample name, sorted labels) → value."""


def scrape(port: int) -> Samples:
    """The /metrics page a gateway serves on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, lbls), v in samples.items() if n == name and set(labels.items()) <= set(lbls))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class GatewayProcess:
    """``hsmgw serve`` in its own process, on a free loopback port."""

    started: list[GatewayProcess] = []
    """Every gateway started, in order: a failed test's report shows their logs (tests/conftest.py)."""

    def __init__(self, config_path: Path, *, env: dict[str, str] | None = None, workers: int = 1,
                 grace: float = 2.0) -> None:
        self.config_path = config_path
        self.env = env or {}
        self.workers = workers  # `hsmgw serve` defaults to one per core; tests ask for what they test
        self.grace = grace  # `serve --grace`: seconds a stop waits for the calls in flight
        self.command_prefix: list[str] = []  # a program that execs the gateway (chrt, …)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        workdir = config_path.parent
        self.log_path = workdir / f"gateway-{uuid.uuid4().hex[:6]}.log"
        self.port_file = workdir / f"port-{uuid.uuid4().hex[:6]}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        if self not in GatewayProcess.started:
            GatewayProcess.started.append(self)
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "gateway.cli.hsmgw", "serve",
             "--config", str(self.config_path), "--port-file", str(self.port_file), "--grace", str(self.grace),
             "--workers", str(self.workers)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            # Human log lines unless a test asks otherwise: some tests read the log as text
            # (" hsmgw.audit: " prefixes); tests/observability asks for the default, JSON.
            env={**os.environ, "HSMGW_LOG_FORMAT": "human", **self.env},
        )
        log.close()
        end = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"gateway did not start in {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_digest(self, lines: int = 80) -> str:
        """What a failure report needs from the log: its warnings, errors and tracebacks, then its end.

        INFO lines (audit, key created) are most of a busy gateway's log and would push
        the one traceback that explains a failure out of any fixed-size tail.
        """
        text = self.log().splitlines()
        notable = [line for line in text if " INFO " not in line and " DEBUG " not in line]
        return "\n".join(["-- warnings, errors, tracebacks:", *notable[-lines:], "-- last lines:", *text[-20:]])


class TokenInspector:
    """Opens the fleet's tokens directly with python-pkcs11, as an operator would."""

    def __init__(self, softhsm_conf: Path, secrets_path: Path, module_path: str) -> None:
        os.environ["SOFTHSM2_CONF"] = str(softhsm_conf)
        from router.pkcs11 import load_module

        self._module = load_module(module_path)
        self._pins = tomllib.loads(secrets_path.read_text())["clusters"]
        self._sessions: dict[str, Any] = {}

    def session(self, cluster: str) -> Any:
        """A long-lived logged-in session (closing it would log the process out)."""
        if cluster not in self._sessions:
            token = self._module.token(cluster)
            try:
                self._sessions[cluster] = token.open(rw=True, user_pin=self._pins[cluster]["user_pin"])
            except p11.UserAlreadyLoggedIn:
                self._sessions[cluster] = token.open(rw=True)
        return self._sessions[cluster]

    def objects(self, cluster: str, key_id: str) -> list[Any]:
        """Every key object with CKA_LABEL = key_id on the cluster's token (not the fleet marker,
        a data object: a key may be called "hsmgw-fleet" too)."""
        return [obj for obj in self.session(cluster).get_objects({Attribute.LABEL: key_id})
                if obj.object_class is not ObjectClass.DATA]

    def classes(self, cluster: str, key_id: str) -> set[ObjectClass]:
        return {obj.object_class for obj in self.objects(cluster, key_id)}

    def count(self, cluster: str) -> int:
        """Token objects on the cluster, but for its fleet marker (which the first key a store puts
        there may add)."""
        return sum(1 for obj in self.session(cluster).get_objects({Attribute.TOKEN: True})
                   if obj.object_class is not ObjectClass.DATA)

    def fleets(self, cluster: str) -> tuple[str, ...] | None:
        """The fleet ids the token's fleet marker lists; None when it has none."""
        from router.pkcs11 import _fleet

        return _fleet.listed(list(self.session(cluster).get_objects(_fleet.MARKER)))

    def mark(self, cluster: str, fleet_id: str) -> None:
        """Add ``fleet_id`` to the token's fleet marker, as another fleet's gateway that wrote a
        key there (before the gateway refused to, or one that adopted this fleet's id) did."""
        from router.pkcs11 import _fleet

        session = self.session(cluster)
        _fleet.add(session, list(session.get_objects(_fleet.MARKER)), fleet_id)

    def unmark(self, cluster: str) -> None:
        """Take the token's fleet marker away, as on a token from before markers."""
        from router.pkcs11 import _fleet

        for marker in list(self.session(cluster).get_objects(_fleet.MARKER)):
            marker.destroy()

    @property
    def module(self) -> Any:
        return self._module


_ON_TOKEN = """\
import json, os, sys
from pkcs11 import Attribute
from router.pkcs11 import load_module
args = json.load(sys.stdin)
os.environ["SOFTHSM2_CONF"] = args["conf"]
session = load_module(args["module"]).token(args["cluster"]).open(rw=True, user_pin=args["pin"])
"""


def _on_token(fleet: Fleet, cluster: str, body: str, key_id: str) -> str:
    """What ``body`` prints, run with ``session`` logged in to the fleet's token ``cluster`` and
    ``args["key"]`` = ``key_id``; in a child process, since the fleet has its own SoftHSM configuration."""
    pin = tomllib.loads(fleet.secrets_path.read_text())["clusters"][cluster]["user_pin"]
    out = subprocess.run(
        [sys.executable, "-c", _ON_TOKEN + body], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        input=json.dumps({"conf": str(fleet.softhsm_conf), "module": find_module(), "cluster": cluster,
                          "pin": pin, "key": key_id}),
    )
    return out.stdout


def plant_foreign_key(fleet: Fleet, cluster: str, key_id: str) -> None:
    """Make a P-256 key pair of another application's under ``key_id`` (CKA_ID and label) on the
    fleet's token ``cluster``, as that application would, behind the gateway's back."""
    body = (
        "from pkcs11 import KeyType\n"
        "from pkcs11.util.ec import encode_named_curve_parameters\n"
        "session.generate_keypair(KeyType.EC, store=True, id=args['key'].encode(), label=args['key'],\n"
        "    public_template={Attribute.EC_PARAMS: encode_named_curve_parameters('secp256r1')})\n"
    )
    _on_token(fleet, cluster, body, key_id)


def count_copy(fleet: Fleet, cluster: str, key_id: str) -> int:
    """How many objects labelled ``key_id`` the fleet's token ``cluster`` holds."""
    return int(_on_token(fleet, cluster, "print(len(list(session.get_objects({Attribute.LABEL: args['key']}))))\n",
                         key_id))


def destroy_copy(fleet: Fleet, cluster: str, key_id: str) -> int:
    """Destroy the objects labelled ``key_id`` on the fleet's token ``cluster``, behind the gateway's
    back (a lost copy, as an HSM that lost them would); how many there were."""
    body = (
        "found = list(session.get_objects({Attribute.LABEL: args['key']}))\n"
        "for obj in found:\n"
        "    obj.destroy()\n"
        "print(len(found))\n"
    )
    return int(_on_token(fleet, cluster, body, key_id))


@contextlib.contextmanager
def running(config_path: Path, **kwargs: Any) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(config_path, **kwargs).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call ``fn`` and return the RpcError it must raise."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{getattr(fn, '_method', fn)} did not fail")


def stored(key_id: str = "app/key-1", request_id: str | None = None, **changes: Any) -> Any:
    """A placement record as a store keeps it: a P-256 signing key on use1-a, CREATING, with
    replicas use1-b and usw2-a; ``changes`` replace any field."""
    import dataclasses

    from router.model import KeyAlgorithm, KeyState, KeyUsage, Placement

    base = Placement(
        key_id=key_id,
        algorithm=KeyAlgorithm.EC_P256,
        usage=KeyUsage.SIGN_VERIFY,
        state=KeyState.CREATING,
        primary="use1-a",
        replicas=("use1-b", "usw2-a"),
        create_time=1_767_225_600.25,
        request_id=request_id if request_id is not None else f"req-{key_id}",
        fingerprint=f"{key_id}|EC_P256|SIGN_VERIFY|2|TOKEN",
    )
    return dataclasses.replace(base, **changes)


def serving(key_id: str, **changes: Any) -> Any:
    """``stored`` for a key in service: ENABLED, on use1-a with one copy in usw2-a."""
    from router.model import KeyState

    return stored(key_id, **{"state": KeyState.ENABLED, "replicas": ("usw2-a",), "create_time": 1_767_225_600.5,
                             "fingerprint": f"{key_id}|EC_P256|SIGN_VERIFY|2|TOKEN|True", "copies": 2, **changes})


def copy_left(router: Any, key: Any, cluster: str) -> None:
    """A copy of ``key``'s own material on ``cluster`` that its record does not name, as a move or
    repair cut off leaves it (the router's trusted wrap, from the key's primary)."""
    wrapped, public_der = router.backends[key.primary].export_wrapped(key, time.monotonic() + 10)
    router.backends[cluster].import_wrapped(key, wrapped, public_der, time.monotonic() + 10)


def placement(key_id: str, algorithm: Any, usage: Any = None, **kwargs: Any) -> Any:
    """A Placement for driving a backend directly (no store involved)."""
    from router.model import USAGES, KeyState, Placement

    return Placement(key_id=key_id, algorithm=algorithm, usage=usage or USAGES[algorithm][0],
                     state=KeyState.ENABLED, primary=kwargs.pop("primary", "-"), **kwargs)


@contextlib.contextmanager
def audit_bridged(log: Any) -> Iterator[logging.Logger]:
    """The audit logger, its INFO records appended to ``log`` (a ``gateway.audit.AuditLog``)
    until the block ends."""
    from gateway.audit import AUDIT_LOGGER, AuditHandler

    handler = AuditHandler(log)
    logger = logging.getLogger(AUDIT_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def failing_fsync(path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """``fail(True)``: from then on every fsync of the file ``path`` in this process fails with EIO,
    while its writes go through, as on a disk that takes a line but cannot say it is on it;
    ``fail(False)``: fsync works again. Undone with ``monkeypatch``."""
    real = os.fsync
    failing = [False]

    def fsync(fd: int) -> None:
        if failing[0] and os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve()):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return lambda on: failing.__setitem__(0, on)
