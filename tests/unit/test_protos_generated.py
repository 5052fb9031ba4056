"""The committed stubs in hsmgw/v1 are exactly what `make protos` generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    protos = sorted((ROOT / "protos/hsmgw/v1").glob("*.proto"))
    assert protos, "no .proto files"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed; run `make protos`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} drifted from protos/; run `make protos`"
    committed_stubs = {p.relative_to(ROOT) for p in (ROOT / "hsmgw/v1").glob("*_pb2*.py*")}
    assert committed_stubs == set(generated), "stale generated files in hsmgw/v1"
