"""What `fastlb status` says when the control socket answers nobody: whether the control process is
gone while its orphaned workers still serve (core/orphan.pxi), from the runtime file and their
shared region - never only "cannot reach".

After a kill -9 of the control process its workers keep forwarding with the last published state
until a new `fastlb serve` takes them over or `orphan_timeout` passes.  What is left to read:

- the runtime file (`<control_socket>.run.json`, fastlb.runtime.runfile): the control process's and
  the workers' pids and start times (a pid plus its start time names one process for good);
- each worker's argv (/proc/PID/cmdline, fastlb.worker.command): the descriptor number of the
  shared region's memfd (a worker keeps it open for this) and its `orphan_timeout`;
- the region itself, opened read-only through /proc/PID/fd/N (the same user, or root): when each
  worker saw its control process die (`orphaned_since_ms`) and its connections open now.

Nothing here writes: the region is mapped read-only, the runtime file only read.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastlb.runtime import runfile

_WORKER_MODULE = "fastlb.worker"  # in the BOOT program of the worker's argv (fastlb.worker.BOOT)


def worker_argv(pid: int) -> dict[str, Any] | None:
    """region_fd and orphan_timeout from a worker's command line (fastlb.worker.command), or None
    when pid is not a fastlb worker (or is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        i = argv.index("-c")
        if _WORKER_MODULE not in argv[i + 1]:
            return None
        args = argv[i + 3 :]  # after BOOT and the package's directory
        return {"region_fd": int(args[0]), "index": int(args[1]), "orphan_timeout": float(args[3])}
    except (OSError, ValueError, IndexError):
        return None


def region_records(pid: int, region_fd: int) -> list[dict[str, Any]] | None:
    """The worker records of the region worker `pid` holds open as `region_fd`, or None when it
    cannot be read (another user's process without root, an older worker that closed it)."""
    from fastlb._shm import orphan_workers

    try:
        fd = os.open(f"/proc/{pid}/fd/{region_fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return orphan_workers(fd)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def orphan_report(control_socket: str) -> dict[str, Any] | None:
    """The control process of `control_socket` and its workers when it is gone, or None when there
    is nothing to say (no runtime file: nothing ran there; or its control process is alive).

    {"control_socket", "runtime_file", "config_file", "control_pid", "control_running": false,
     "workers": [{"index", "pid", "orphaned_since" (Unix seconds, null before the worker noticed
     or when its region cannot be read), "orphaned_for" (seconds), "orphan_timeout" (seconds),
     "orphan_timeout_left" (seconds, null when unknown), "active" (connections open, null when
     unknown), "region_read" (whether its shared region could be read)}]} - workers that still
     run only."""
    path = runfile.path_for(control_socket)
    rf = runfile.read(path)
    if rf is None or rf.control_alive():
        return None
    now_ms = time.monotonic() * 1000
    records: dict[int, dict[str, Any]] = {}
    workers = []
    for w in rf.live_workers():
        argv = worker_argv(w.pid)
        if argv is None:
            continue
        if not records:
            records = {r["pid"]: r for r in region_records(w.pid, argv["region_fd"]) or []}
        rec = records.get(w.pid)
        since = rec["orphaned_since_ms"] if rec is not None else 0
        age = max(0.0, (now_ms - since) / 1000) if since else None
        workers.append(
            {
                "index": w.index,
                "pid": w.pid,
                "orphaned_since": round(time.time() - age, 3) if age is not None else None,
                "orphaned_for": round(age, 3) if age is not None else None,
                "orphan_timeout": argv["orphan_timeout"],
                "orphan_timeout_left": (
                    round(max(0.0, argv["orphan_timeout"] - age), 3) if age is not None else None
                ),
                "active": rec["active"] if rec is not None else None,
                "region_read": rec is not None,
            }
        )
    return {
        "control_socket": control_socket,
        "runtime_file": path,
        "config_file": rf.config,
        "control_pid": rf.control_pid,
        "control_running": False,
        "workers": workers,
    }


def format_orphans(rep: dict[str, Any]) -> str:
    """The report as `fastlb status` prints it (after the one-line "cannot reach")."""
    pid, ws = rep["control_pid"], rep["workers"]
    if not ws:
        return f"control process {pid} is gone (runtime file {rep['runtime_file']}); none of its workers runs"
    lines = [
        f"control process {pid} is gone (runtime file {rep['runtime_file']}); "
        f"{len(ws)} orphaned workers still serving with its last published state:"
    ]
    for w in ws:
        if w["orphaned_since"] is None:
            why = "has not seen it exit yet" if w["region_read"] else "its shared region cannot be read"
            when = f"orphaned since: unknown ({why})"
            left = f"orphan_timeout {w['orphan_timeout']:g}s"
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(w["orphaned_since"]))
            when = f"orphaned since {stamp} ({w['orphaned_for']:.0f}s ago)"
            left = f"orphan_timeout {w['orphan_timeout']:g}s: {w['orphan_timeout_left']:.0f}s left"
        active = "" if w["active"] is None else f"; {w['active']} connections open"
        lines.append(f"  worker {w['index']} pid {w['pid']}: {when}, {left}{active}")
    lines.append(
        "they drain when orphan_timeout runs out; "
        f"`fastlb serve -c {rep['config_file'] or 'FILE'}` takes them over without refusing a connection"
    )
    return "\n".join(lines)
