"""The runtime file: who this fastlb is, for the next `fastlb serve` with the same config.

`<control_socket>.run.json`, written atomically (temporary file, fsync, rename) whenever a worker
starts or exits:

    {"version": 1, "config": PATH,
     "control": {"pid": P, "start_time": T},
     "workers": [{"index": I, "pid": P, "start_time": T,
                  "listeners": [{"name": N, "bind": "HOST:PORT", "fd": FD}, ...]}, ...]}

start_time is field 22 of /proc/PID/stat (clock ticks since boot): a pid plus its start time names
one process for good, where a pid alone may have been reused.  `fd` is the listening socket's
descriptor number inside that worker (a crash takeover fetches it with pidfd_getfd(2)).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

VERSION = 1


def path_for(control_socket: str) -> str:
    return control_socket + ".run.json"


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (starttime), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) is in parentheses and may contain spaces or ')': split after the last ')'
    rest = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])  # rest[0] is field 3
    except (IndexError, ValueError):
        return None


def alive(pid: int, started: int) -> bool:
    """True if pid is running and is the process that started at `started` (not a zombie)."""
    if pid <= 0 or start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")
    except OSError:
        return False


@dataclass
class WorkerEntry:
    index: int
    pid: int
    start_time: int
    listeners: list[dict] = field(default_factory=list)  # {"name", "bind", "fd"}


@dataclass
class RunFile:
    config: str
    control_pid: int
    control_start: int
    workers: list[WorkerEntry]

    def control_alive(self) -> bool:
        return alive(self.control_pid, self.control_start)

    def live_workers(self) -> list[WorkerEntry]:
        return [w for w in self.workers if alive(w.pid, w.start_time)]


def read(path: str) -> RunFile | None:
    """The runtime file at path, or None if it is absent or unreadable (never raises)."""
    try:
        with open(path) as f:
            d = json.load(f)
        if d.get("version") != VERSION:
            return None
        c = d["control"]
        workers = [
            WorkerEntry(int(w["index"]), int(w["pid"]), int(w["start_time"]), list(w.get("listeners", [])))
            for w in d["workers"]
        ]
        return RunFile(str(d.get("config", "")), int(c["pid"]), int(c["start_time"]), workers)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write(path: str, config: str, workers: list[WorkerEntry]) -> None:
    """Write this process's runtime file atomically (raises OSError)."""
    me = os.getpid()
    doc = {
        "version": VERSION,
        "config": config,
        "control": {"pid": me, "start_time": start_time(me) or 0},
        "workers": [
            {"index": w.index, "pid": w.pid, "start_time": w.start_time, "listeners": w.listeners}
            for w in workers
        ],
    }
    tmp = f"{path}.{me}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_if_mine(path: str) -> None:
    """Remove the runtime file if it is this process's (a successor may already own the path)."""
    rf = read(path)
    if rf is not None and rf.control_pid == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
