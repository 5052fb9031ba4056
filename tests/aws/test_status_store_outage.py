"""`hsmctl status` while the placement store does not answer: the clusters' state, and the outage
named among the warnings, not one UNAVAILABLE line that hides the clusters."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway.fleet import Fleet
from tests.aws.conftest import MotoServer
from tests.support import ROOT, GatewayProcess


def _status(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", target, "--as", "alice",
                           "--output", "json", "status"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_status_during_a_store_outage_shows_the_clusters_and_names_the_store(
        dynamo_fleet: tuple[MotoServer, Fleet]) -> None:
    moto, fleet = dynamo_fleet
    gateway = GatewayProcess(fleet.config_path).start()
    try:
        before = _status(gateway.target)
        assert before.returncode == 0, before.stderr
        healthy = json.loads(before.stdout)
        moto.stop()
        during = _status(gateway.target)
    finally:
        gateway.stop()
    assert during.returncode == 4, (during.returncode, during.stdout, during.stderr)  # degraded, not "unreachable"
    shown = json.loads(during.stdout)
    assert [c["name"] for c in shown["clusters"]] == [c["name"] for c in healthy["clusters"]]
    assert all(c["health"] == "SERVING" for c in shown["clusters"])
    assert any("placement store is unreachable" in w for w in shown["warnings"]), shown["warnings"]
