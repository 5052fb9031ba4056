"""A PKCS #11 module that refuses the fleet marker (a CKO_DATA object, C_CreateObject).

The refusal comes from faultmod in front of SoftHSM: the real module's error flows through
python-pkcs11 and the cluster's error mapping. Keys are still made and sign; the token stays
unmarked; the operator is told once, and the module is not asked again for ``MARK_RETRY``
seconds (each key written there meanwhile costs no failed write).

The router runs in a child process: one process must not load SoftHSM both directly (other
tests' fixtures) and through faultmod.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.fleet import find_module, init_fleet
from tests.faults import FaultControl
from tests.support import ROOT

CHILD = '''
import json, logging, sys, time, tomllib

from gateway.config import load
from router.model import KeyAlgorithm, KeySpec, KeyUsage, Operation
from router.pkcs11 import Pkcs11Cluster, load_module
from router.backend import MARK_RETRY
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology
from router.secret import Secret
from tests.faults import FaultControl
from tests.support import FakeClock

args = json.loads(sys.argv[1])
phase = "start"
logs = []


class Keep(logging.Handler):
    def emit(self, record):
        logs.append([phase, record.levelname, record.name, record.getMessage()])


logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.INFO)

spec = next(c for c in load(args["config"]).clusters if c.name == "use1-a")
pin = tomllib.loads(open(args["secrets"]).read())["clusters"]["use1-a"]["user_pin"]
# The cluster checks the router's deadlines (time.monotonic) against its own clock: this one
# stands 2 x MARK_RETRY behind it, so moving it on by MARK_RETRY never makes a deadline look past.
clock = FakeClock(time.monotonic() - 2 * MARK_RETRY)
backend = Pkcs11Cluster(load_module(args["module"]), spec, Secret(pin), clock=clock)
router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a",)}), {"use1-a": backend},
                SqliteStore(args["store"]))  # one copy per key: no copy is made elsewhere
control = FaultControl(args["control"])
phases = {}


def enter(name):
    global phase
    phase = name
    print(f"phase: {name}", file=sys.stderr, flush=True)  # splits faultmod's trace lines


def key(n):
    deadline = time.monotonic() + 30
    made = router.generate_key(KeySpec(key_id=f"app/k{n}", algorithm=KeyAlgorithm.EC_P256,
                                       usage=KeyUsage.SIGN_VERIFY, request_id=f"r{n}"), deadline)
    message = f"payment {n}".encode()
    signature, _ = router.sign(made.key_id, Operation.ECDSA_SHA256, None, message, deadline)
    _, der = router.public_key(made.key_id, deadline)
    return {"state": made.state.value, "primary": made.primary, "message": message.hex(),
            "signature": signature.hex(), "public_der": der.hex(),
            "objects": backend.key_objects(deadline, key_id=made.key_id).get(made.key_id)}


def run(name, *numbers):
    enter(name)
    phases[name] = {"keys": [key(n) for n in numbers]}
    enter(f"{name}: done")
    phases[name]["fleets"] = backend.fleets(time.monotonic() + 30)


enter("before")
phases["before"] = {"fleets": backend.fleets(time.monotonic() + 30)}
control.set("use1-a", *args["rule"], on="C_CreateObject")
run("refused", 1, 2, 3)
clock.sleep(MARK_RETRY - 1)
run("not yet", 4)
clock.sleep(1)
run("asked again", 5)
control.clear("use1-a")
clock.sleep(MARK_RETRY)
run("taken", 6)
print(json.dumps({"fleet_id": router.fleet_id, "phases": phases, "logs": logs}), flush=True)
'''


def _marker_writes(stderr: str) -> dict[str, list[str]]:
    """The module's answers to C_CreateObject (faultmod's trace: "0xd1", or "0x0" for a call it
    passed on), by the child's phase."""
    writes: dict[str, list[str]] = {}
    phase = "start"
    for line in stderr.splitlines():
        if line.startswith("phase: "):
            phase = line.removeprefix("phase: ")
        elif line.startswith("faultmod-trace: C_CreateObject "):
            writes.setdefault(phase, []).append(line.rsplit("-> ", 1)[1])
    return writes


def _signs(key: dict[str, Any]) -> None:
    """The key signs, and its signature verifies outside any HSM."""
    public = serialization.load_der_public_key(bytes.fromhex(key["public_der"]))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(bytes.fromhex(key["signature"]), bytes.fromhex(key["message"]), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(("rule", "answer", "why"), [
    (("error", "0xD1"), "0xd1", "unexpected PKCS #11 error on cluster use1-a"),  # CKR_TEMPLATE_INCONSISTENT
    (("function_failed",), "0x6", "cluster use1-a is busy"),
], ids=["template_inconsistent", "function_failed"])
def test_a_module_that_refuses_the_marker_makes_keys_and_is_asked_again_only_after_a_while(
    tmp_path: Path, faultmod: Path, rule: tuple[str, ...], answer: str, why: str,
) -> None:
    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    control = FaultControl(tmp_path / "faults")
    control.clear()
    args = {"config": str(fleet.config_path), "secrets": str(fleet.secrets_path), "module": str(faultmod),
            "store": str(tmp_path / "placements.db"), "control": str(control.path), "rule": list(rule)}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOFTHSM2_CONF": str(fleet.softhsm_conf),
           "FAULTMOD_TRACE": "1", **control.env(target=find_module())}
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), json.dumps(args)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, f"child failed ({child.returncode}):\n{child.stdout}\n{child.stderr[-5000:]}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    phases, fleet_id = result["phases"], result["fleet_id"]

    assert phases["before"]["fleets"] is None  # a new token: no gateway has marked it

    # Each key is made on the refusing token, and signs.
    keys = [k for name in ("refused", "not yet", "asked again", "taken") for k in phases[name]["keys"]]
    assert len(keys) == 6
    for key in keys:
        assert (key["state"], key["primary"]) == ("ENABLED", "use1-a")
        assert key["objects"] == {"private key": 1, "public key": 1}
        _signs(key)

    # The module was asked for the marker by the first key, not by the two after it nor by one
    # a second short of MARK_RETRY later, then again at MARK_RETRY. Key creation itself makes
    # no object with C_CreateObject: every such call is a marker's.
    assert _marker_writes(child.stderr) == {"refused": [answer], "asked again": [answer], "taken": ["0x0"]}
    for name in ("refused", "not yet", "asked again"):
        assert phases[name]["fleets"] is None, f"{name}: the token is marked"
    assert phases["taken"]["fleets"] == [fleet_id]  # once the module takes the marker

    warned = [(phase, message) for phase, level, name, message in result["logs"]
              if level == "WARNING" and name == "router.router"]
    said = (f"cluster use1-a: could not record fleet {fleet_id} on its token ({why}); tried again at a key "
            "written there 10 minutes from now")
    assert warned == [("refused", said), ("asked again", said)]
