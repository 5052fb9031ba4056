"""The container image definition and the systemd unit: non-root, the right command
line for the gateway, room for its graceful shutdown, hardening in place."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "deploy" / "container"
UNIT = ROOT / "deploy" / "hsmgw.service"


def hsmgw_accepts(argv: list[str], tmp_path: Path) -> None:
    """``hsmgw ARGV`` parses: run with a config that does not exist, it must fail on the
    config (exit 78, EX_CONFIG, one line), not on its arguments (argparse: exit 2 and a usage)."""
    argv = [str(tmp_path / "missing.toml") if a.endswith(".toml") else a for a in argv]
    out = subprocess.run([sys.executable, "-m", "gateway.cli.hsmgw", *argv], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 78, out.stderr
    assert "usage:" not in out.stderr and "config file not found" in out.stderr, out.stderr


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def test_image_runs_the_gateway_as_a_numeric_non_root_user(tmp_path: Path) -> None:
    final = dockerfile_stages(CONTAINER / "Dockerfile")[-1]
    users = [rest for instruction, rest in final if instruction == "USER"]
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    entrypoint = [rest for instruction, rest in final if instruction == "ENTRYPOINT"][-1]
    cmd = [rest for instruction, rest in final if instruction == "CMD"][-1]
    import json

    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[argv.index("/opt/hsmgw/bin/hsmgw") + 1:][:3] == ["serve", "--config", "/etc/hsmgw/hsmgw.toml"]
    hsmgw_accepts(argv[argv.index("/opt/hsmgw/bin/hsmgw") + 1:], tmp_path)
    assert ("STOPSIGNAL", "SIGTERM") in final
    # The derived CloudHSM image goes back to the same user after installing as root.
    cloudhsm = dockerfile_stages(CONTAINER / "cloudhsm.Dockerfile")[-1]
    assert [rest for instruction, rest in cloudhsm if instruction == "USER"][-1] == users[-1]


def test_image_copies_only_files_that_exist_and_the_ignore_file_lets_them_in() -> None:
    ignore = (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for stage in dockerfile_stages(CONTAINER / "Dockerfile"):
        for instruction, rest in stage:
            if instruction != "COPY" or rest.startswith("--from"):
                continue
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"
    # Everything the package needs to install is copied in.
    copied = " ".join(rest for stage in dockerfile_stages(CONTAINER / "Dockerfile") for i, rest in stage if i == "COPY")
    for package in ("gateway", "router", "hsmgw", "pyproject.toml"):
        assert package in copied


def unit(path: Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_systemd_unit_runs_the_gateway_unprivileged_with_time_to_drain(tmp_path: Path) -> None:
    service = unit()["Service"]
    assert service["User"] not in ("root", "0") and service["Group"] not in ("root", "0")
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/hsmgw/bin/hsmgw" and argv[1] == "serve"
    hsmgw_accepts(argv[1:], tmp_path)
    grace = float(argv[argv.index("--grace") + 1])
    # --grace, then what the supervisor lets a worker's stop take after it (calls stuck in a
    # hung HSM, the pools' close, the exit), and a moment for the supervisor's own exit.
    from gateway.server import CALLS_TIMEOUT
    from gateway.workers import STOP_AFTER_GRACE
    from router.router import CLOSE_TIMEOUT

    assert STOP_AFTER_GRACE > CALLS_TIMEOUT + CLOSE_TIMEOUT, "the supervisor would kill a worker mid-stop"
    assert float(service["TimeoutStopSec"]) >= grace + STOP_AFTER_GRACE + 1, "systemd would SIGKILL a draining gateway"
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID", "reload = SIGHUP (TLS files and policy)"
    assert service["Restart"] == "on-failure"
    from gateway.workers import EXIT_CONFIG

    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG), "a refused PIN is not tried again and again"


def test_systemd_unit_is_hardened() -> None:
    service = unit()["Service"]
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "RestrictNamespaces": "yes", "CapabilityBoundingSet": "", "UMask": "0077",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}"
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["StateDirectory"] == "hsmgw", "the only writable place (ProtectSystem=strict)"
    assert "server-key.pem" in service["LoadCredential"], "the TLS key reaches the service user alone"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys, bad values and typos are errors. The binary
    path is pointed at this checkout's hsmgw (verify checks that it is executable)."""
    hsmgw = Path(sys.executable).parent / "hsmgw"
    if not hsmgw.exists():
        pytest.skip("no hsmgw console script next to this Python")
    text = UNIT.read_text().replace("/opt/hsmgw/bin/hsmgw", str(hsmgw))
    text = text.replace("EnvironmentFile=/etc/hsmgw/pins.env", "EnvironmentFile=-/etc/hsmgw/pins.env")
    copy = tmp_path / "hsmgw.service"
    copy.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "hsmgw.service" in line]
    assert not problems, "\n".join(problems)


CHECK_UNIT = ROOT / "deploy" / "hsmgw-alarms-check.service"
CHECK_TIMER = ROOT / "deploy" / "hsmgw-alarms-check.timer"


def test_the_alarms_check_runs_unprivileged_every_15_minutes_and_parses(tmp_path: Path) -> None:
    service = unit(CHECK_UNIT)["Service"]
    assert service["Type"] == "oneshot" and service["User"] == unit()["Service"]["User"]
    assert "EnvironmentFile" in service and "pins" not in service["EnvironmentFile"], "no PINs for a check"
    assert "LoadCredential" not in service, "nor the TLS key"
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateDevices", "CapabilityBoundingSet"):
        assert service[key] == unit()["Service"][key], key
    argv = shlex.split(service["ExecStart"].replace("$HSMGW_ALARMS_ARGS", "--cloudhsm a=cluster-1234abcd"))
    assert argv[:3] == ["/opt/hsmgw/bin/hsmgw", "alarms", "check"]
    argv = [str(tmp_path / "missing.toml") if a.endswith(".toml") else a for a in argv[1:]]
    out = subprocess.run([sys.executable, "-m", "gateway.cli.hsmgw", *argv], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "usage:" not in out.stderr and "missing.toml" in out.stderr, out.stderr
    timer = unit(CHECK_TIMER)["Timer"]
    assert timer["Unit"] == CHECK_UNIT.name and timer["OnUnitActiveSec"] == "15min"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_alarms_check_units(tmp_path: Path) -> None:
    hsmgw = Path(sys.executable).parent / "hsmgw"
    if not hsmgw.exists():
        pytest.skip("no hsmgw console script next to this Python")
    (tmp_path / CHECK_UNIT.name).write_text(CHECK_UNIT.read_text().replace("/opt/hsmgw/bin/hsmgw", str(hsmgw)))
    (tmp_path / CHECK_TIMER.name).write_text(CHECK_TIMER.read_text())
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / CHECK_TIMER.name),
                          str(tmp_path / CHECK_UNIT.name)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "hsmgw-alarms-check" in line]
    assert not problems, "\n".join(problems)
