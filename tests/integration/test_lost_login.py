"""A cluster whose sessions and login are gone (an HSM replacement closes every session, and
the login with the last of them): the next calls repair the login instead of answering
NOT_FOUND, and the health probe repairs it before any call does. A search without the login
lists only public objects, with no error: a destroy, a roll-back or reconcile that decided on
such a search would leave private keys behind, so each logs in again first.

Runs in a process of its own, on a fleet of its own: closing every session of a token
ends this process's login there, which the shared fleet's inspector relies on.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

PREAMBLE = textwrap.dedent("""
    import ctypes, sys, time
    from pathlib import Path
    from gateway.app import build_router
    from gateway.config import load
    from gateway.fleet import init_fleet
    from router.model import KeyAlgorithm, KeySpec, KeyUsage, Operation

    fleet = init_fleet(Path(sys.argv[1]), listen="127.0.0.1:0")
    router = build_router(load(fleet.config_path), reconcile_at_start=False)

    def lose_login(backend):
        # What an HSM replacement does: every session of the token closed, the login with them.
        module = ctypes.CDLL(backend._module.path)
        functions = ctypes.c_void_p()
        module.C_GetFunctionList(ctypes.byref(functions))
        close_all = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)(
            ctypes.cast(functions.value, ctypes.POINTER(ctypes.c_void_p))[1 + 14])  # C_CloseAllSessions
        assert close_all(backend.pool.token.slot.slot_id) == 0

    def left_on(backend, key_id):
        backend.pool.relogin()  # so that the listing sees private objects, whatever the call before did
        return backend.key_objects(time.monotonic() + 10, key_id=key_id)
""")

REPAIRED = PREAMBLE + textwrap.dedent("""
    from router.health import HealthMonitor

    spec = KeySpec(key_id="lost/login", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                   request_id="lost-login", copies=1)
    key = router.generate_key(spec, time.monotonic() + 30)
    backend = router.backends[key.primary]

    def sign():
        return router.sign("lost/login", Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)

    sign()
    lose_login(backend)
    print("after close:", [sign()[1] for _ in range(3)])
    lose_login(backend)
    monitor = HealthMonitor(router.backends, router.breakers)
    print("probe:", monitor.probe_once(key.primary))
    print("after probe:", sign()[1], router.breakers[key.primary].state.value)
    router.close()
""")

DESTROY = PREAMBLE + textwrap.dedent("""
    for algorithm, usage in ((KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY), (KeyAlgorithm.AES_256,
                                                                             KeyUsage.ENCRYPT_DECRYPT)):
        key_id = f"lost/destroy-{algorithm.value}"
        key = router.generate_key(KeySpec(key_id=key_id, algorithm=algorithm, usage=usage, request_id=key_id,
                                          copies=1), time.monotonic() + 30)
        backend = router.backends[key.primary]
        lose_login(backend)
        print(router.destroy_key(key_id, time.monotonic() + 10).state.value, left_on(backend, key_id))
    router.close()
""")

ROLLBACK = PREAMBLE + textwrap.dedent("""
    from router.errors import ClusterDown, Unavailable

    spec = KeySpec(key_id="lost/rollback", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                   request_id="lost-rollback", copies=2)
    primaries = []

    def replaced_meanwhile(key, wrapped, public_der, deadline, **kwargs):
        primaries.append(key.primary)
        lose_login(router.backends[key.primary])  # the primary's HSM is replaced during the copy
        raise ClusterDown("the replica went away mid-copy", cluster="usw2-a")

    router.backends["usw2-a"].import_wrapped = replaced_meanwhile
    try:
        router.generate_key(spec, time.monotonic() + 30)
    except Unavailable as exc:
        print("GenerateKey:", exc.message)
    print("record:", router.store.get(spec.key_id))
    print("left:", left_on(router.backends[primaries[0]], spec.key_id))
    router.close()
""")

RECONCILE = PREAMBLE + textwrap.dedent("""
    from router.reconcile import reconcile

    key = router.generate_key(KeySpec(key_id="lost/secret", algorithm=KeyAlgorithm.AES_256,
                                      usage=KeyUsage.ENCRYPT_DECRYPT, request_id="lost-secret", copies=1),
                              time.monotonic() + 30)
    lose_login(router.backends[key.primary])
    report = reconcile(router, fix=False)
    print("missing:", report.missing)
    router.close()
""")


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fleet")], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_lost_login_is_repaired_by_the_next_call_and_by_the_probe(tmp_path: Path) -> None:
    out = _run(REPAIRED, tmp_path)
    lines = out.stdout.splitlines()
    primary = lines[0].split("'")[1]
    assert lines[0] == f"after close: {[primary] * 3}", out.stdout
    assert lines[1] == "probe: True"
    assert lines[2] == f"after probe: {primary} closed"
    assert "logged in again" in out.stderr


def test_destroy_key_after_a_lost_login_destroys_the_private_and_secret_keys_too(tmp_path: Path) -> None:
    """Without the login, the search behind DestroyKey listed only the public key: DESTROYED was
    answered while the private (or AES) key stayed on the token."""
    out = _run(DESTROY, tmp_path)
    assert out.stdout.splitlines() == ["DESTROYED {}", "DESTROYED {}"], out.stdout


def test_a_creation_rolled_back_after_the_primary_lost_its_login_leaves_no_private_key(tmp_path: Path) -> None:
    """The roll-back's destroy saw only the public key, then deleted the record: the private key
    stayed as an object that no record names, which reconcile never destroys."""
    out = _run(ROLLBACK, tmp_path)
    assert out.stdout.splitlines() == [
        "GenerateKey: cannot copy key 'lost/rollback' to cluster usw2-a (the replica went away mid-copy); "
        "nothing was created",
        "record: None",
        "left: {}",
    ], out.stdout


def test_reconcile_after_a_lost_login_finds_secret_keys_where_they_are(tmp_path: Path) -> None:
    """A listing without the login misses every AES key: reconcile reported it missing (and a fix
    would drop the cluster from the key's record)."""
    out = _run(RECONCILE, tmp_path)
    assert out.stdout.splitlines() == ["missing: []"], out.stdout
