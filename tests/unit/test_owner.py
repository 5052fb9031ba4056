"""router._owner: a creation's record names the process making the key, and a retry on the
same host tells from it whether that process is gone (so the creation can be taken over at
once) or may still be making the key (so the retry waits for creation_grace)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router._owner import Liveness, liveness, this_process


def _parts(owner: str) -> list[str]:
    parts = owner.split(":")
    assert len(parts) == 5, owner
    return parts


@pytest.fixture
def me() -> str:
    owner = this_process()
    if not owner:
        pytest.skip("this /proc cannot name this process")
    return owner


def test_this_process_is_named_by_boot_id_namespaces_pid_and_start_time(me: str) -> None:
    boot_id, pid_ns, _time_ns, pid, start = _parts(me)
    assert boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert os.readlink("/proc/self/ns/pid") == f"pid:[{pid_ns}]"
    assert int(pid) == os.getpid()
    assert int(start) == int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_this_process_is_alive(me: str) -> None:
    assert liveness(me) is Liveness.ALIVE


def test_a_running_child_is_alive_and_once_exited_and_reaped_is_gone(me: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        owner = _owner_of(me, child.pid)
        assert liveness(owner) is Liveness.ALIVE
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert liveness(owner) is Liveness.GONE


def test_a_child_that_exited_and_awaits_its_parent_is_gone(me: str) -> None:
    """A killed worker is a zombie until its supervisor reaps it: it makes nothing any more."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        owner = _owner_of(me, child.pid)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        assert liveness(owner) is Liveness.GONE
    finally:
        child.wait()


def test_a_pid_given_to_another_process_is_not_taken_for_the_owner(me: str) -> None:
    boot_id, pid_ns, time_ns, pid, start = _parts(me)
    earlier = ":".join((boot_id, pid_ns, time_ns, pid, str(int(start) - 1)))
    assert liveness(earlier) is Liveness.GONE


@pytest.mark.parametrize("where", [0, 1, 2], ids=["another boot or host", "another pid namespace",
                                                  "another time namespace"])
def test_an_owner_elsewhere_is_unknown_not_gone(me: str, where: int) -> None:
    """Another host, container or boot: its pids mean nothing here, alive or not."""
    parts = _parts(me)
    parts[where] = "1" + parts[where] if where else "00000000-0000-4000-8000-000000000000"
    for pid in (parts[3], "999999999"):  # this process's pid, and one that no process here has
        assert liveness(":".join([*parts[:3], pid, parts[4]])) is Liveness.UNKNOWN


@pytest.mark.parametrize("owner", ["", "garbage", "a:b:c:d", "a:b:c:x:1", "a:b:c:1:"])
def test_no_owner_or_an_unreadable_one_is_unknown(owner: str) -> None:
    """Records written before owners were recorded have none."""
    assert liveness(owner) is Liveness.UNKNOWN


def test_an_unreadable_proc_names_no_one_and_knows_no_one(tmp_path: Path, me: str) -> None:
    assert this_process(tmp_path) == ""
    assert liveness(me, tmp_path) is Liveness.UNKNOWN
    assert liveness(_owner_of(me, 999999999), tmp_path) is Liveness.UNKNOWN


def test_a_proc_of_another_pid_namespace_knows_no_one(tmp_path: Path, me: str) -> None:
    """A /proc mounted for another PID namespace than the process's: its pids are not ours."""
    boot_id, pid_ns, time_ns, pid, start = _parts(me)
    (tmp_path / "sys/kernel/random").mkdir(parents=True)
    (tmp_path / "sys/kernel/random/boot_id").write_text(boot_id + "\n")
    (tmp_path / "self/ns").mkdir(parents=True)
    (tmp_path / "self/ns/pid").symlink_to(f"pid:[{pid_ns}]")
    if time_ns:
        (tmp_path / "self/ns/time").symlink_to(f"time:[{time_ns}]")
    (tmp_path / "self/stat").write_text(f"{int(pid) + 1} (python) S" + " 0" * 18 + f" {start} 0 0\n")
    assert this_process(tmp_path) == ""
    assert liveness(_owner_of(me, 999999999), tmp_path) is Liveness.UNKNOWN


def _owner_of(me: str, pid: int) -> str:
    """The owner naming process ``pid`` of this host and namespaces, as that process would write it."""
    boot_id, pid_ns, time_ns, _, _ = _parts(me)
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        start = "1"
    return ":".join((boot_id, pid_ns, time_ns, str(pid), start))
