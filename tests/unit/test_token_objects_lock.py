"""TokenObjects: changes of a token's objects wait for every other gateway process's."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from router.pkcs11 import _module


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(_module, "_lock_dir_cache", [tmp_path])
    return tmp_path


def test_a_change_waits_for_the_lock_another_process_holds(lock_dir: Path) -> None:
    objects = _module.TokenObjects("t1")
    # flock belongs to an open file: a second open of the file stands for another process.
    other = os.open(lock_dir / "t1.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    entered = threading.Event()

    def change() -> None:
        with objects.changing(time.monotonic() + 30):
            entered.set()

    worker = threading.Thread(target=change)
    worker.start()
    try:
        assert not entered.wait(0.3), "changed while another process held the token's lock"
        with objects.searching():  # searches in this process go on meanwhile
            pass
    finally:
        os.close(other)  # the other process is done
    assert entered.wait(5)
    worker.join(5)


def test_searches_in_this_process_wait_for_its_change(lock_dir: Path) -> None:
    objects = _module.TokenObjects("t2")
    searched = threading.Event()

    def search() -> None:
        with objects.searching():
            searched.set()

    with objects.changing(time.monotonic() + 30):
        with objects.searching():  # the changing thread may search (its sweep does)
            pass
        searcher = threading.Thread(target=search)
        searcher.start()
        assert not searched.wait(0.3), "a search ran while the token's objects were changing"
    assert searched.wait(5)
    searcher.join(5)


def test_without_a_usable_lock_directory_changes_still_exclude_each_other_in_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_module, "_lock_dir_cache", [tmp_path / "gone"])  # cannot be opened
    monkeypatch.setattr(_module, "_warned", set())
    objects = _module.TokenObjects("t3")
    inside: list[int] = []
    overlaps: list[list[int]] = []

    def change(i: int) -> None:
        with objects.changing(time.monotonic() + 30):
            inside.append(i)
            time.sleep(0.05)
            if inside != [i]:
                overlaps.append(list(inside))
            inside.remove(i)

    with caplog.at_level(logging.WARNING, logger=_module.__name__):
        threads = [threading.Thread(target=change, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    assert overlaps == []
    warnings = [r.getMessage() for r in caplog.records if "without the lock shared by processes" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_the_lock_directory_is_private_to_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_module, "_lock_dir_cache", [])
    monkeypatch.setattr(_module.tempfile, "gettempdir", lambda: str(tmp_path))
    path = _module._lock_dir()
    assert path == tmp_path / f"hsmgw-{os.getuid()}"
    assert path.stat().st_mode & 0o777 == 0o700


def test_a_change_gives_up_at_its_deadline_while_another_process_holds_the_lock(lock_dir: Path) -> None:
    objects = _module.TokenObjects("t4")
    other = os.open(lock_dir / "t4.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(_module.LockTimeout, match="another process"):
            with objects.changing(started + 0.2):
                raise AssertionError("changed while another process held the lock")
        assert time.monotonic() - started < 5
    finally:
        os.close(other)
    with objects.changing(time.monotonic() + 5):  # and the file lock was let go of
        pass


def test_a_change_gives_up_at_its_deadline_while_a_thread_of_this_process_searches(lock_dir: Path) -> None:
    objects = _module.TokenObjects("t5")
    holding, done = threading.Event(), threading.Event()

    def search() -> None:
        with objects.searching():
            holding.set()
            done.wait(10)

    searcher = threading.Thread(target=search)
    searcher.start()
    assert holding.wait(5)
    try:
        with pytest.raises(_module.LockTimeout, match="another thread"):
            with objects.changing(time.monotonic() + 0.2):
                pass
        # the file lock it took was let go of: another opener gets it at once
        probe = os.open(lock_dir / "t5.lock", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        done.set()
        searcher.join(5)


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory another user owns needs root")
def test_a_lock_directory_another_user_owns_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone else made $TMPDIR/hsmgw-<uid> first: their lock files could stall or fool ours."""
    taken = tmp_path / f"hsmgw-{os.getuid()}"
    taken.mkdir(mode=0o777)
    os.chown(taken, 65534, 65534)
    monkeypatch.setattr(_module, "_lock_dir_cache", [])
    monkeypatch.setattr(_module, "_warned", set())
    monkeypatch.setattr(_module.tempfile, "gettempdir", lambda: str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=_module.__name__):
        assert _module._lock_dir() is None
        objects = _module.TokenObjects("t6")
        with objects.changing(time.monotonic() + 5):  # kept apart in this process only
            pass
    assert list(taken.iterdir()) == [], "a lock file was made in the other user's directory"
    assert any("belongs to another user" in r.getMessage() for r in caplog.records), caplog.text
