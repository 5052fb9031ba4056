"""Who is making a key: the process named on a creation's record, and whether it is gone.

A creation's record (its intent, and the claim a take-over or a roll-back writes) names the
process that makes the key's objects, so that a retry can tell an attempt that is still
running from one whose process died (``kill -9``, an out-of-memory kill, a crash). Another
process on the same host can only tell that a process is gone if the name means the same to
both, so the owner is:

- the host's boot id (``/proc/sys/kernel/random/boot_id``): another host, or this one before
  a reboot, has another;
- the PID namespace (``/proc/self/ns/pid``): processes in other containers on one host share
  the hostname and the boot id, but a pid there means nothing here;
- the time namespace (``/proc/self/ns/time``, empty on kernels without them): a process's
  start time is shown shifted by the reader's time namespace;
- the pid, and the process's start time (field 22 of ``/proc/<pid>/stat``, clock ticks since
  boot), so that a pid the kernel gave to another process since is not taken for the owner.

``liveness`` answers ``GONE`` only when it is sure: the owner was on this host, in this PID
(and time) namespace, and no process has its pid, or the one that has it started at another
time, or it has exited and awaits its parent (a zombie). Everything else is ``UNKNOWN``: another
host or namespace, a record written before owners were recorded (``""``), an owner that cannot
be parsed, a ``/proc`` that cannot be read or is not this namespace's.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

PROC = Path("/proc")


class Liveness(enum.Enum):
    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"


def this_process(proc: Path = PROC) -> str:
    """The owner naming this process; ``""`` when ``proc`` cannot name it (unreadable, or the
    ``/proc`` of another PID namespace). Read each time: a forked worker is another process."""
    here = _where(proc)
    if here is None:
        return ""
    pid = os.getpid()
    stat = _stat(proc / "self")
    if stat is None or stat[0] != pid:
        return ""
    return ":".join((*here, str(pid), str(stat[2])))


def liveness(owner: str, proc: Path = PROC) -> Liveness:
    """Whether the process ``owner`` names (``this_process`` in it) is still running."""
    parts = owner.split(":")
    if len(parts) != 5 or not parts[3].isdigit() or not parts[4].isdigit():
        return Liveness.UNKNOWN
    here = _where(proc)
    if here is None or tuple(parts[:3]) != here:
        return Liveness.UNKNOWN
    own = _stat(proc / "self")
    if own is None or own[0] != os.getpid():
        return Liveness.UNKNOWN  # this /proc shows another namespace's pids
    pid, start = int(parts[3]), int(parts[4])
    if pid <= 0:
        return Liveness.UNKNOWN
    if not _exists(pid):
        return Liveness.GONE
    stat = _stat(proc / str(pid))
    if stat is None:
        # No /proc entry for a pid that exists: hidden (``hidepid``), or it exited in between.
        return Liveness.UNKNOWN if _exists(pid) else Liveness.GONE
    if stat[2] != start:
        return Liveness.GONE  # the pid was given to another process: the owner's is gone
    if stat[1] in "ZX" and not _running_task(proc / str(pid)):
        return Liveness.GONE  # exited, not yet reaped by its parent (a worker's supervisor)
    return Liveness.ALIVE


def _where(proc: Path) -> tuple[str, str, str] | None:
    """This process's boot id, PID namespace and time namespace ("" without one); None if unreadable."""
    try:
        boot_id = (proc / "sys/kernel/random/boot_id").read_text().strip()
        pid_ns = _namespace(proc / "self/ns/pid")
    except (OSError, ValueError):
        return None
    try:
        time_ns = _namespace(proc / "self/ns/time")
    except FileNotFoundError:  # a kernel before time namespaces (5.6): every process shares the clock
        time_ns = ""
    except (OSError, ValueError):
        return None
    if not boot_id or ":" in boot_id:
        return None
    return boot_id, pid_ns, time_ns


def _namespace(link: Path) -> str:
    """The namespace's inode number, from a link such as ``pid:[4026531836]``."""
    target = os.readlink(link)
    number = target[target.index("[") + 1 : target.index("]")]
    if not number.isdigit():
        raise ValueError(target)
    return number


def _stat(directory: Path) -> tuple[int, str, int] | None:
    """(pid, state, start time) from ``directory/stat``; None if it cannot be read."""
    try:
        text = (directory / "stat").read_text()
    except OSError:  # no such process (ENOENT, or ESRCH as it exits), or not ours to read
        return None
    try:
        # The command name (field 2) is in parentheses and may hold spaces and parentheses.
        head, rest = text.rsplit(")", 1)
        fields = rest.split()
        return int(head.split("(", 1)[0]), fields[0], int(fields[19])
    except (ValueError, IndexError):
        return None


def _exists(pid: int) -> bool:
    """Whether a process has ``pid`` in this PID namespace (seen whatever ``/proc`` hides)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _running_task(directory: Path) -> bool:
    """Whether any thread of an exited thread-group leader still runs (its process then does)."""
    try:
        tasks = list((directory / "task").iterdir())
    except FileNotFoundError:  # reaped meanwhile
        return False
    except OSError:  # cannot tell: it may run
        return True
    for task in tasks:
        stat = _stat(task)
        if stat is not None and stat[1] not in "ZX":
            return True
    return False
