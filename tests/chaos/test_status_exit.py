"""`hsmctl status`'s exit status tells a monitoring script all well (0), degraded (4: warnings,
every cluster serving) and down (5: a cluster not serving) apart, and apart from a usage error (1)
and a gateway out of reach (2)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT, wait_for


def _status(target: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", target, "--as", "alice", *options,
                           "status"], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _approved(target: str, *command: str) -> None:
    asked = subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", target, "--as", "alice",
                            "--output", "json", *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert asked.returncode == 3, asked.stderr
    change_id = json.loads(asked.stdout)["id"]
    approved = subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", target, "--as", "bob",
                               "changes", "approve", change_id], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert approved.returncode == 0, approved.stdout + approved.stderr


def test_status_exits_0_when_well_4_when_degraded_and_5_when_a_cluster_is_down(chaos) -> None:
    _, control, gateway = chaos
    well = _status(gateway.target)
    assert (well.returncode, well.stdout.splitlines()[-1]) == (0, "no warnings"), well.stdout + well.stderr

    _approved(gateway.target, "clusters", "drain", "use1-b")
    degraded = _status(gateway.target)
    assert degraded.returncode == 4, degraded.stdout + degraded.stderr
    assert "WARNING: cluster use1-b is drained" in degraded.stdout
    assert _status(gateway.target, "--output", "json").returncode == 4

    control.set("use1-a", "device_error")
    try:
        down = wait_for(lambda: (result := _status(gateway.target)).returncode == 5 and result, timeout=30,
                        what="status to see use1-a down")
        assert "cluster use1-a (us-east-1) is not serving" in down.stdout
        assert _status(gateway.target, "--output", "json").returncode == 5
    finally:
        control.clear("use1-a")
    wait_for(lambda: _status(gateway.target).returncode == 4, timeout=30, what="use1-a serving again")
    _approved(gateway.target, "clusters", "undrain", "use1-b")
    assert _status(gateway.target).returncode == 0

    assert _status(gateway.target, "--no-such-option").returncode == 1
    unreachable = _status("127.0.0.1:1")
    assert unreachable.returncode == 2, unreachable.stderr
