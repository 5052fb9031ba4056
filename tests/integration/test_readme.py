"""The README's Python example works against a real gateway, as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsmgw.v1 import crypto_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs(gateway, crypto) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("127.0.0.1:50051", gateway.target)
    for _ in range(2):  # idempotent: running it twice works
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    cluster, signature_hex = out.stdout.split()
    assert cluster in ("use1-a", "use1-b")
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id="demo/signing"), timeout=10).pem
    public = serialization.load_pem_public_key(pem.encode())
    public.verify(bytes.fromhex(signature_hex), b"hello", ec.ECDSA(hashes.SHA256()))


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()
