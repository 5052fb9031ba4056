"""A policy file others could change is logged at load and on every reload (it decides every
call's authorization); the gateway still serves with it (docs/security.md says why)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.auth import PolicyStore, policy_file_problems
from gateway.fleet import Fleet
from gateway.tls import DevCerts
from tests.security.helpers import POLICY, sighup_and_wait, write_config
from tests.support import GatewayProcess

WARNING = "WARNING gateway.auth: auth.policy_file: "


@pytest.fixture
def policy(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    path = directory / "policy.toml"
    path.write_text(POLICY)
    path.chmod(0o644)
    yield path
    directory.chmod(0o755)


def test_a_policy_file_only_its_owner_may_write_is_quiet(policy: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        PolicyStore(policy).reload()
    assert caplog.records == []
    policy.parent.chmod(0o1777)  # sticky, as /tmp: nobody may replace another's file
    assert policy_file_problems(policy) == []


def test_a_group_or_world_writable_policy_file_or_directory_is_named_with_what_to_run(policy: Path) -> None:
    policy.chmod(0o664)
    assert policy_file_problems(policy) == [f"{policy} is writable by its group (mode 0664); run: chmod go-w {policy}"]
    policy.chmod(0o646)
    assert policy_file_problems(policy) == [f"{policy} is writable by others (mode 0646); run: chmod go-w {policy}"]
    policy.chmod(0o644)
    policy.parent.chmod(0o777)
    assert policy_file_problems(policy) == [
        f"its directory {policy.parent} is writable by everyone, without the sticky bit (mode 0777): anyone may put "
        f"another file in its place; run: chmod o-w {policy.parent}"]


def test_a_gateway_warns_of_a_policy_file_others_may_write_at_start_and_on_reload(
        sec_fleet: Fleet, certs: DevCerts, policy: Path) -> None:
    policy.chmod(0o666)
    gateway = GatewayProcess(write_config(sec_fleet, f"mode-{policy.parent.parent.name}", tls=certs, policy=policy))
    gateway.start()
    try:
        warned = f"{WARNING}{policy} is writable by its group and others (mode 0666); run: chmod go-w {policy}. " \
                 "Whoever can change the policy decides every call's authorization"
        assert gateway.log().count(warned) == 1
        sighup_and_wait(gateway, "policy reloaded")
        assert gateway.log().count(warned) == 2

        os.chmod(policy, 0o644)
        sighup_and_wait(gateway, "policy reloaded")
        assert gateway.log().count(WARNING) == 2  # nothing new: the file is its owner's again
        assert gateway.proc is not None and gateway.proc.poll() is None
    finally:
        gateway.stop()
