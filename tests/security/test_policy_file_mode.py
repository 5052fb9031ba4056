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
        f"another file in its place; run: chmod go-w {policy.parent}"]


def test_a_directory_its_group_may_write_is_named_unless_it_has_the_sticky_bit(
        policy: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/etc/hsmgw 0775 root:ops with policy.toml 0644: any member of ops may mv another policy over it,
    which the next SIGHUP loads."""
    policy.parent.chmod(0o775)
    group = (f"its directory {policy.parent} is writable by its group, without the sticky bit (mode 0775): any "
             f"member of its group may put another file in its place; run: chmod g-w {policy.parent}")
    assert policy_file_problems(policy) == [group]
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        PolicyStore(policy)
    assert [r.getMessage() for r in caplog.records] == [
        f"auth.policy_file: {group}. Whoever can change the policy decides every call's authorization"]
    policy.parent.chmod(0o757)
    assert policy_file_problems(policy) == [
        f"its directory {policy.parent} is writable by everyone, without the sticky bit (mode 0757): anyone may put "
        f"another file in its place; run: chmod o-w {policy.parent}"]
    policy.parent.chmod(0o1775)  # only the file's owner (or the directory's) may rename or remove it
    assert policy_file_problems(policy) == []


def test_a_symlinked_policy_names_the_directory_of_the_file_it_resolves_to(tmp_path: Path) -> None:
    """A Kubernetes ConfigMap mount: policy.toml -> ..data/policy.toml, ..data -> ..2026_01_01_00_00_00.1/."""
    mount = tmp_path / "etc"
    version = mount / "..2026_01_01_00_00_00.1"
    version.mkdir(parents=True)
    (version / "policy.toml").write_text(POLICY)
    (version / "policy.toml").chmod(0o644)
    (mount / "..data").symlink_to(version.name)
    policy = mount / "policy.toml"
    policy.symlink_to("..data/policy.toml")
    mount.chmod(0o755)
    version.chmod(0o755)
    try:
        assert policy_file_problems(policy) == []
        version.chmod(0o775)
        assert policy_file_problems(policy) == [
            f"its target's directory {version} is writable by its group, without the sticky bit (mode 0775): any "
            f"member of its group may put another file in its place; run: chmod g-w {version}"]
        version.chmod(0o755)
        mount.chmod(0o777)  # where the links are: anyone may point policy.toml elsewhere
        assert policy_file_problems(policy) == [
            f"its directory {mount} is writable by everyone, without the sticky bit (mode 0777): anyone may put "
            f"another file in its place; run: chmod go-w {mount}"]
    finally:
        mount.chmod(0o755)
        version.chmod(0o755)


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
