"""A cluster whose sessions and login are gone (an HSM replacement closes every session, and
the login with the last of them): the next calls repair the login instead of answering
NOT_FOUND, and the health probe repairs it before any call does.

Runs in a process of its own, on a fleet of its own: closing every session of a token
ends this process's login there, which the shared fleet's inspector relies on.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

SCRIPT = textwrap.dedent("""
    import ctypes, sys, time
    from pathlib import Path
    from gateway.app import build_router
    from gateway.config import load
    from gateway.fleet import init_fleet
    from router.health import HealthMonitor
    from router.model import KeyAlgorithm, KeySpec, KeyUsage, Operation

    fleet = init_fleet(Path(sys.argv[1]), listen="127.0.0.1:0")
    router = build_router(load(fleet.config_path), reconcile_at_start=False)
    spec = KeySpec(key_id="lost/login", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                   request_id="lost-login", copies=1)
    key = router.generate_key(spec, time.monotonic() + 30)
    backend = router.backends[key.primary]
    module = ctypes.CDLL(backend._module.path)
    functions = ctypes.c_void_p()
    module.C_GetFunctionList(ctypes.byref(functions))
    close_all = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)(
        ctypes.cast(functions.value, ctypes.POINTER(ctypes.c_void_p))[1 + 14])  # C_CloseAllSessions
    slot = backend.pool.token.slot.slot_id

    def sign():
        return router.sign("lost/login", Operation.ECDSA_SHA256, bytes(32), None, time.monotonic() + 10)

    sign()
    assert close_all(slot) == 0
    print("after close:", [sign()[1] for _ in range(3)])
    assert close_all(slot) == 0
    monitor = HealthMonitor(router.backends, router.breakers)
    print("probe:", monitor.probe_once(key.primary))
    print("after probe:", sign()[1], router.breakers[key.primary].state.value)
    router.close()
""")


def test_a_lost_login_is_repaired_by_the_next_call_and_by_the_probe(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "fleet")], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    primary = lines[0].split("'")[1]
    assert lines[0] == f"after close: {[primary] * 3}", out.stdout
    assert lines[1] == "probe: True"
    assert lines[2] == f"after probe: {primary} closed"
    assert "logged in again" in out.stderr
