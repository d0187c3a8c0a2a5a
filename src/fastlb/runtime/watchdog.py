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
START_TIMEOUT = 15.0  # seconds a restarted worker may take to set up (the supervisor's READY_TIMEOUT)


class Watchdog:
    """Checks the heartbeats of a supervisor's workers; call check() a few times a second."""

    __slots__ = ("sup", "timeout_ms", "killed", "stalls", "stalls_of")

    def __init__(self, sup: Any, timeout: float) -> None:
        self.sup = sup
        self.timeout_ms = int(timeout * 1000)
        self.killed: set[int] = set()  # pids already sent SIGKILL (until reaped)
        self.stalls = 0  # workers killed for a stale heartbeat, since start
        self.stalls_of: dict[int, int] = {}  # worker index -> such kills (status: workers[].stalls)

    def check(self) -> None:
        now_ms = time.monotonic_ns() // 1_000_000
        region = self.sup.region
        self.killed &= set(self.sup.pids)
        for pid, index in list(self.sup.pids.items()):
            w = region.worker(index)
            if pid in self.killed:
                continue
            if w["pid"] != pid or w["state"] not in RUNNING_STATES:
                # not set up yet: a replacement that hangs in its start is killed too (at startup the
                # supervisor's ready wait reports it instead)
                started = self.sup.started_at.get(index, 0.0)
                if self.sup.ready and w["state"] == 0 and time.monotonic() - started > START_TIMEOUT:
                    self._kill(pid, index, f"did not start within {START_TIMEOUT:.0f}s", 0)
                continue
            beat = w["heartbeat_ms"]
            if beat == 0:  # an older build's worker between setup and its first turn
                beat = int(self.sup.started_at.get(index, 0.0) * 1000)
            age = now_ms - beat
            if age <= self.timeout_ms:
                continue
            why = f"stalled: no heartbeat for {age / 1000:.1f}s (limit {self.timeout_ms / 1000:.1f}s)"
            self._kill(pid, index, why, w["active"])

    def _kill(self, pid: int, index: int, why: str, active: int) -> None:
        self.stalls += 1
        self.stalls_of[index] = self.stalls_of.get(index, 0) + 1
        self.killed.add(pid)
        log.error(
            "worker %d (pid %d) %s, %d connections on it; killing and replacing it", index, pid, why, active
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
