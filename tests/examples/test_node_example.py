"""The Node.js example (examples/node) signs through a real gateway, and Node's own
``crypto`` module verifies the signature against GetPublicKey's PEM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsmgw.v1 import crypto_pb2 as pb
from tests.support import unique

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="`node` is not installed: the Node.js example cannot run")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """examples/node/node_modules as `npm ci` makes it (.ci/run does it first; done here if missing)."""
    modules = EXAMPLE / "node_modules"
    lock = EXAMPLE / "package-lock.json"
    marker = modules / ".package-lock.json"  # npm writes it on every install
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("examples/node/node_modules is missing and `npm` is not installed: run `npm ci` there")
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, f"npm ci failed:\n{out.stdout}\n{out.stderr}"
    return modules


def run_example(target: str, **env: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, "sign.js"], cwd=EXAMPLE, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HSMGW_TARGET": target, **env},
    )


def test_node_example_signs_and_verifies_with_node_crypto(node_modules, gateway, crypto) -> None:
    key_id = unique("node")
    message = "signed from node"
    for _ in range(2):  # the second run finds the key instead of creating it
        out = run_example(gateway.target, HSMGW_KEY_ID=key_id, HSMGW_MESSAGE=message)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["key_id"] == key_id
        assert result["algorithm"] == "KEY_ALGORITHM_EC_P256"
        assert result["verified_locally"] is True  # Node's crypto.verify accepted the DER signature
        assert result["tampered_rejected"] is True
        assert result["verified_by_gateway"] is True
        assert result["cluster"] in ("use1-a", "use1-b")
    # The same signature verifies in Python too: the example did not print something made up.
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).pem
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(bytes.fromhex(result["signature"]), message.encode(), ec.ECDSA(hashes.SHA256()))


def test_node_example_reports_a_gateway_error_in_one_line(node_modules, gateway) -> None:
    out = run_example(gateway.target, HSMGW_KEY_ID="no such key#")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error (INVALID_ARGUMENT): key_id")
    assert len(out.stderr.strip().splitlines()) == 1
