"""The worker watchdog: a worker whose heartbeat stops is killed and replaced.

Every worker writes `heartbeat_ms` (CLOCK_MONOTONIC milliseconds, the clock time.monotonic() reads)
into its shared-memory record once per loop turn, and its loop turns at least every 100 ms even
when idle.  A heartbeat older than `[global] worker_stall_timeout` (default 3 s) means the worker
is stopped (SIGSTOP, a debugger), spinning, or blocked in the kernel: the control process sends it
SIGKILL, and the normal restart path (supervisor.reap) starts a replacement at once on the same
listening sockets, so the connections waiting in its accept queue are served by the replacement.
The connections the stuck worker had established are lost (they are counted in `stalls` and shown
in status as the worker's `active` at the time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

log = logging.getLogger("fastlb")

RUNNING_STATES = (1, 2)  # running, draining: both turn the loop


class Watchdog:
    """Checks the heartbeats of a supervisor's workers; call check() a few times a second."""

    __slots__ = ("sup", "timeout_ms", "killed", "stalls")

    def __init__(self, sup: Any, timeout: float) -> None:
        self.sup = sup
        self.timeout_ms = int(timeout * 1000)
        self.killed: set[int] = set()  # pids already sent SIGKILL (until reaped)
        self.stalls = 0  # workers killed for a stale heartbeat, since start

    def check(self) -> None:
        now_ms = time.monotonic_ns() // 1_000_000
        region = self.sup.region
        self.killed &= set(self.sup.pids)
        for pid, index in list(self.sup.pids.items()):
            w = region.worker(index)
            if w["pid"] != pid or w["state"] not in RUNNING_STATES or pid in self.killed:
                continue  # still starting (the ready wait covers that), or already handled
            beat = w["heartbeat_ms"]
            if beat == 0:  # an older build's worker between setup and its first turn
                beat = int(self.sup.started_at.get(index, 0.0) * 1000)
            age = now_ms - beat
            if age <= self.timeout_ms:
                continue
            self.stalls += 1
            self.killed.add(pid)
            log.error(
                "worker %d (pid %d) stalled: no heartbeat for %.1fs (limit %.1fs, %d connections on it); "
                "killing and replacing it",
                index,
                pid,
                age / 1000,
                self.timeout_ms / 1000,
                w["active"],
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
