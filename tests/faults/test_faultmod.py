"""faultmod injects real PKCS #11 faults in front of real SoftHSM tokens.

The pytest process may already have SoftHSM loaded (other tests' fixtures),
and one process must not load SoftHSM both directly and through faultmod, so
every test runs a small script in a child process: it loads faultmod with
``router.pkcs11.load_module`` (C_Initialize with CKF_OS_LOCKING_OK, as the
gateway does), drives python-pkcs11 and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.fleet import Fleet, FleetError, find_module, init_fleet
from tests.faults import BuildError, FaultControl, build_faultmod

ROOT = Path(__file__).resolve().parents[2]

CHILD_PRELUDE = '''
import json, os, sys, threading, time, tomllib
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters
from router.pkcs11 import load_module
from tests.faults import FaultControl

MODULE = load_module(os.environ["FAULTMOD_LIB"])
PINS = tomllib.loads(open(os.environ["FLEET_SECRETS"]).read())["clusters"]
CONTROL = FaultControl(os.environ["FAULTMOD_CONTROL"])
DIGEST = bytes(range(32))


TOKENS = {}


def session(label):
    """A new rw session; logs in unless the token already is (login is per token)."""
    if label not in TOKENS:
        # Looked up once: python-pkcs11's get_token reads every slot's token
        # info, so a lookup fails while any token answers an error.
        TOKENS[label] = MODULE.token(label)
    token = TOKENS[label]
    try:
        return token.open(rw=True, user_pin=PINS[label]["user_pin"])
    except p11.UserAlreadyLoggedIn:
        return token.open(rw=True)


def ec_key(s):
    """A P-256 session key pair (public, private)."""
    params = s.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    return params.generate_keypair(store=False)


def sign(key):
    return key[1].sign(DIGEST, mechanism=Mechanism.ECDSA)


def sign_verify(key):
    if not key[0].verify(DIGEST, sign(key), mechanism=Mechanism.ECDSA):
        raise AssertionError("signature does not verify")


def outcome(fn, *args):
    """'ok' or the name of the python-pkcs11 exception raised."""
    try:
        fn(*args)
        return "ok"
    except p11.PKCS11Error as exc:
        return type(exc).__name__


def report(**result):
    print(json.dumps(result), flush=True)

'''


@pytest.fixture(scope="module")
def fault_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A fleet of our own (3 SoftHSM tokens): faults here touch no other test's keys."""
    try:
        return init_fleet(tmp_path_factory.mktemp("faultfleet"), listen="127.0.0.1:0")
    except FleetError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def faultmod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_faultmod(tmp_path_factory.mktemp("faultmod"))
    except BuildError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def control(tmp_path: Path) -> FaultControl:
    return FaultControl(tmp_path / "faults")


@pytest.fixture
def child(tmp_path: Path, fault_fleet: Fleet, faultmod: Path, control: FaultControl):
    """Run a script body in a child process with faultmod loaded; its JSON report."""

    def run(body: str, timeout: float = 60.0) -> dict[str, Any]:
        script = tmp_path / "child.py"
        script.write_text(CHILD_PRELUDE + textwrap.dedent(body))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "SOFTHSM2_CONF": str(fault_fleet.softhsm_conf),
            "FLEET_SECRETS": str(fault_fleet.secrets_path),
            "FAULTMOD_LIB": str(faultmod),
            **control.env(target=find_module()),
        }
        result = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=timeout, check=False)
        assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        assert "faultmod:" not in result.stderr, result.stderr  # a control line it could not parse
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run


def test_pass_through_is_safe_under_concurrency(child) -> None:
    report = child("""
        labels = ["use1-a", "use1-b", "use1-a", "use1-b"]
        work = [(label, ec_key(s)) for label in labels for s in [session(label)]]
        errors = []

        def worker(key):
            try:
                for _ in range(500):
                    sign_verify(key)
            except Exception as exc:
                errors.append(repr(exc))

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(key,)) for _, key in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        stats = {label: CONTROL.wait_stats(label, calls=4000)._asdict() for label in ("use1-a", "use1-b")}
        report(errors=errors, seconds=seconds, stats=stats, os_locking=MODULE.os_locking)
    """)
    assert report["os_locking"] is True  # C_Initialize's CKF_OS_LOCKING_OK reached SoftHSM
    assert report["errors"] == []
    for label in ("use1-a", "use1-b"):
        # 2 threads x 500 x (SignInit, Sign, VerifyInit, Verify) at least, none faulted
        assert report["stats"][label]["calls"] >= 4000
        assert report["stats"][label]["faults"] == 0


def test_device_error_downs_one_token_until_cleared(child) -> None:
    report = child("""
        a, b = session("use1-a"), session("use1-b")
        ka, kb = ec_key(a), ec_key(b)
        token_a = MODULE.token("use1-a")
        before = outcome(sign_verify, ka)
        CONTROL.set("use1-a", "device_error")
        during = {
            "sign_a": outcome(sign_verify, ka),
            "random_a": outcome(a.generate_random, 128),
            "open_a": outcome(token_a.open),
            "sign_b": outcome(sign_verify, kb),
        }
        slots = len(MODULE.lib.get_slots())  # listing slots is never faulted
        CONTROL.clear("use1-a")
        after = outcome(sign_verify, ka)
        report(before=before, during=during, slots=slots, after=after)
    """)
    assert report["before"] == "ok"
    assert report["during"]["sign_a"] == "DeviceError"
    assert report["during"]["random_a"] == "DeviceError"
    assert report["during"]["open_a"] == "DeviceError"
    assert report["during"]["sign_b"] == "ok"
    assert report["slots"] >= 3
    assert report["after"] == "ok"  # the same session works again


@pytest.mark.parametrize(
    ("rule", "exception"),
    [
        (("device_removed",), "DeviceRemoved"),
        (("token_not_present",), "TokenNotPresent"),
        (("function_failed",), "FunctionFailed"),
        (("session_handle_invalid",), "SessionHandleInvalid"),
        (("user_not_logged_in",), "UserNotLoggedIn"),
        (("error", "0x31"), "DeviceMemory"),
    ],
)
def test_error_modes_answer_their_ckr(child, rule: tuple[str, ...], exception: str) -> None:
    report = child(f"""
        a = session("use1-a")
        ka = ec_key(a)
        CONTROL.set("use1-a", *{rule!r})
        during = outcome(sign, ka)
        CONTROL.clear()
        report(during=during, after=outcome(sign_verify, ka))
    """)
    assert report == {"during": exception, "after": "ok"}


def test_fail_ratio_fails_about_that_fraction(child) -> None:
    report = child("""
        a = session("use1-a")
        ka = ec_key(a)
        CONTROL.set("use1-a", "fail_ratio", 0.5, "function_failed")
        results = [outcome(sign, ka) for _ in range(400)]
        CONTROL.clear()
        report(results={r: results.count(r) for r in set(results)}, after=outcome(sign_verify, ka))
    """)
    results = report["results"]
    # Only C_SignInit takes the error, never C_Sign: no operation is left active.
    assert set(results) <= {"ok", "FunctionFailed"}, results
    assert 120 <= results.get("FunctionFailed", 0) <= 280, results
    assert report["after"] == "ok"


def test_latency_delays_every_call_of_that_token(child) -> None:
    report = child("""
        a, b = session("use1-a"), session("use1-b")
        CONTROL.set("use1-a", "latency", 50)

        def timed(fn, *args):
            started = time.monotonic()
            fn(*args)
            return time.monotonic() - started

        slow = [timed(a.generate_random, 128) for _ in range(5)]  # one C_GenerateRandom each
        fast = [timed(b.generate_random, 128) for _ in range(5)]
        CONTROL.clear()
        restored = [timed(a.generate_random, 128) for _ in range(5)]
        report(slow=slow, fast=fast, restored=restored)
    """)
    assert min(report["slow"]) >= 0.040
    assert sorted(report["fast"])[2] < 0.040  # medians: a busy machine may stall one call
    assert sorted(report["restored"])[2] < 0.040


def test_hang_blocks_until_the_rule_is_removed(child) -> None:
    report = child("""
        a, b = session("use1-a"), session("use1-b")
        ka, kb = ec_key(a), ec_key(b)
        # Read the keys' attributes first: python-pkcs11 caches them with
        # functools.cached_property, whose lock (Python <= 3.11) is shared by
        # every key; a thread hung inside it would block the other token too.
        sign_verify(ka), sign_verify(kb)
        CONTROL.set("use1-a", "hang")
        result = {}

        def stuck():
            started = time.monotonic()
            result["outcome"] = outcome(sign_verify, ka)
            result["seconds"] = time.monotonic() - started

        t = threading.Thread(target=stuck, daemon=True)
        t.start()
        t.join(0.6)
        alive_while_hung = t.is_alive()
        other = outcome(sign_verify, kb)  # another token is not held up
        hung = CONTROL.wait_stats("use1-a", faults=1)._asdict()
        CONTROL.clear("use1-a")
        t.join(5)
        report(alive_while_hung=alive_while_hung, other=other, hung=hung,
               alive_after_clear=t.is_alive(), **result)
    """)
    assert report["alive_while_hung"] is True
    assert report["other"] == "ok"
    assert report["hung"]["faults"] >= 1
    assert report["alive_after_clear"] is False
    assert report["outcome"] == "ok"
    assert report["seconds"] > 0.5


def test_invalidate_sessions_kills_existing_sessions_once(child) -> None:
    report = child("""
        a1, a2, b = session("use1-a"), session("use1-a"), session("use1-b")
        k1, kb = ec_key(a1), ec_key(b)
        before = outcome(sign_verify, k1)
        CONTROL.set("use1-a", "invalidate_sessions")
        first = outcome(sign_verify, k1)
        second = outcome(sign_verify, k1)
        other_session = outcome(a2.generate_random, 128)
        other_token = outcome(sign_verify, kb)
        a3 = session("use1-a")  # opened after the rule was seen
        k3 = ec_key(a3)
        fresh = outcome(sign_verify, k3)
        time.sleep(0.1)  # same file version: the one-shot does not fire again
        fresh_later = outcome(sign_verify, k3)
        CONTROL.set("use1-a", "invalidate_sessions")  # a new version fires again
        fresh_new_version = outcome(sign_verify, k3)
        report(before=before, first=first, second=second, other_session=other_session,
               other_token=other_token, fresh=fresh, fresh_later=fresh_later,
               fresh_new_version=fresh_new_version)
    """)
    assert report == {
        "before": "ok",
        "first": "SessionHandleInvalid",
        "second": "SessionHandleInvalid",
        "other_session": "SessionHandleInvalid",
        "other_token": "ok",
        "fresh": "ok",
        "fresh_later": "ok",
        "fresh_new_version": "SessionHandleInvalid",
    }


def test_module_loads_and_lists_slots_while_a_token_is_down(child, control: FaultControl) -> None:
    control.set("use1-a", "device_error")  # down before the module even loads
    report = child("""
        slots = MODULE.lib.get_slots()
        described = [s.slot_description for s in slots]  # C_GetSlotInfo is never faulted
        # python-pkcs11's own get_token reads every slot's token info, so one token
        # answering CKR_DEVICE_ERROR hides the others from a lookup by label...
        lookup_while_device_error = outcome(lambda: MODULE.lib.get_token(token_label="use1-b"))
        # ...which the gateway's lookup (slot by slot, skipping failures) survives.
        gateway_lookup_while_device_error = outcome(MODULE.token, "use1-b")
        # ...while CKR_TOKEN_NOT_PRESENT is skipped.
        CONTROL.set("use1-a", "token_not_present")
        lookup_while_absent = outcome(lambda: sign_verify(ec_key(session("use1-b"))))
        lookup_absent_token = outcome(MODULE.token, "use1-a")
        CONTROL.clear()
        back = outcome(lambda: sign_verify(ec_key(session("use1-a"))))
        report(slots=len(slots), described=len(described), lookup_while_device_error=lookup_while_device_error,
               gateway_lookup_while_device_error=gateway_lookup_while_device_error,
               lookup_while_absent=lookup_while_absent, lookup_absent_token=lookup_absent_token, back=back)
    """)
    assert report["slots"] >= 3 and report["described"] == report["slots"]
    assert report["lookup_while_device_error"] == "DeviceError"
    assert report["gateway_lookup_while_device_error"] == "ok"
    assert report["lookup_while_absent"] == "ok"
    assert report["lookup_absent_token"] == "NoSuchToken"
    assert report["back"] == "ok"


def test_stats_count_calls_and_faults_per_label(child, control: FaultControl) -> None:
    report = child("""
        a, b = session("use1-a"), session("use1-b")
        ka, kb = ec_key(a), ec_key(b)
        CONTROL.set("use1-b", "device_error")
        failed = [outcome(b.generate_random, 128) for _ in range(25)]  # one C_GenerateRandom each
        for _ in range(50):
            sign_verify(ka)
        live = CONTROL.wait_stats("use1-b", faults=25)._asdict()  # written while running
        report(failed=sorted(set(failed)), live=live)
    """)
    assert report["failed"] == ["DeviceError"]
    assert report["live"]["faults"] == 25
    final = control.stats()  # written again at exit
    assert final["use1-b"].faults == 25
    assert final["use1-b"].calls >= 25 + 3  # + open, login, key generation
    assert final["use1-a"].faults == 0
    assert final["use1-a"].calls >= 50 * 4
    # usw2-a is at most looked at (the token lookup may walk past its slot), never faulted.
    assert "usw2-a" not in final or final["usw2-a"].faults == 0


def test_concurrent_faults_leave_the_module_consistent(child) -> None:
    """Failures and lost sessions under load: only the injected errors, no crash."""
    report = child("""
        import collections

        seen = {"use1-a": collections.Counter(), "use1-b": collections.Counter()}

        def worker(label):
            key = None
            for _ in range(500):
                try:
                    if key is None:
                        key = ec_key(session(label))
                    sign_verify(key)
                    seen[label]["ok"] += 1
                except p11.SessionHandleInvalid:
                    seen[label]["SessionHandleInvalid"] += 1
                    key = None  # the session is gone: open another
                except p11.PKCS11Error as exc:
                    seen[label][type(exc).__name__] += 1
                except AttributeError:
                    # python-pkcs11 builds a key object from C_GetAttributeValue;
                    # when reading CKA_CLASS answers CKR_FUNCTION_FAILED it
                    # silently returns a bare Object, without sign() or verify().
                    seen[label]["degraded key object"] += 1
                    key = None

        for label in ("use1-a", "use1-b"):
            session(label)  # log in once, before the threads
        threads = [threading.Thread(target=worker, args=(label,)) for label in ["use1-a", "use1-b"] * 2]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            CONTROL.set("use1-a", "fail_ratio", 0.2, "function_failed")
            CONTROL.add("use1-a", "invalidate_sessions")
            time.sleep(0.02)
        for t in threads:
            t.join()
        CONTROL.clear()
        report(seen={label: dict(counter) for label, counter in seen.items()})
    """)
    a, b = report["seen"]["use1-a"], report["seen"]["use1-b"]
    # Never OperationActive: an error is injected only where no operation is left open.
    assert {"ok", "FunctionFailed", "SessionHandleInvalid"} <= set(a) <= {
        "ok", "FunctionFailed", "SessionHandleInvalid", "degraded key object"}, a
    assert sum(a.values()) == 1000, a  # no thread died
    assert b == {"ok": 1000}


def test_wildcard_rules_and_ok_exemptions(child) -> None:
    report = child("""
        a, b, c = session("use1-a"), session("use1-b"), session("usw2-a")
        CONTROL.set("*", "device_removed")  # the whole fleet is gone...
        CONTROL.set("use1-b", "ok")  # ...but this one, whose exact rule is read first
        CONTROL.add("usw2-a", "latency", 1)  # exact rules then "*": delayed, then removed
        during = {label: outcome(s.generate_random, 128) for label, s in (("use1-a", a), ("use1-b", b), ("usw2-a", c))}
        CONTROL.clear("*")
        after = {label: outcome(s.generate_random, 128) for label, s in (("use1-a", a), ("use1-b", b), ("usw2-a", c))}
        report(during=during, after=after)
    """)
    assert report["during"] == {"use1-a": "DeviceRemoved", "use1-b": "ok", "usw2-a": "DeviceRemoved"}
    assert report["after"] == {"use1-a": "ok", "use1-b": "ok", "usw2-a": "ok"}


def test_a_rule_on_one_call_faults_that_call_only(child) -> None:
    """``on="C_DestroyObject"``: the token answers everything else, and its objects stay."""
    report = child("""
        from pkcs11 import ObjectClass
        a = session("use1-a")
        CONTROL.set("use1-a", "device_error", on="C_DestroyObject")
        key = ec_key(a)
        during = {"sign": outcome(sign_verify, key), "random": outcome(a.generate_random, 128),
                  "destroy": outcome(key[1].destroy)}
        left = len(list(a.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.TOKEN: False})))
        CONTROL.clear("use1-a")
        after = outcome(key[1].destroy)
        report(during=during, left=left, after=after)
    """)
    assert report == {"during": {"sign": "ok", "random": "ok", "destroy": "DeviceError"}, "left": 1, "after": "ok"}


def test_a_search_keeps_the_error_it_failed_with_when_ending_it_fails_too(child) -> None:
    """C_FindObjects fails with a device error, then C_FindObjectsFinal with
    CKR_OPERATION_NOT_INITIALIZED (a module that ended the search itself): the search's error
    is the device error, which fails over, not an unexpected one; the session serves again."""
    report = child("""
        from router.pkcs11 import _search
        a = session("use1-a")
        CONTROL.set("use1-a", "device_error", on="C_FindObjects")
        CONTROL.add("use1-a", "error", "0x91", on="C_FindObjectsFinal")
        during = outcome(_search.find, a, {Attribute.LABEL: "nothing-here"})
        CONTROL.clear("use1-a")
        after = len(_search.find(a, {Attribute.LABEL: "nothing-here"}))
        report(during=during, after=after)
    """)
    assert report == {"during": "DeviceError", "after": 0}
