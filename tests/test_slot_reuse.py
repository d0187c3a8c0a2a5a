"""Issue 9, item 10: a reused backend slot starts clean.

Re-adding a backend (SIGHUP reload) while its old slot's drain is closing connections reuses the
slot; before the fix it kept `close_conns`, so from then on every publish (a set-weight here)
closed all of the backend's new connections."""

from __future__ import annotations

import os
import signal

from support.backends import server
from support.fastlb import rewrite_backends
from support.helpers import recv_exact, recv_line
from support.protocols import backends_status, control, log_mark, wait_log


def connect_to(lb, name: str, tries: int = 30):
    for _ in range(tries):
        s = lb.connect()
        if recv_line(s).decode() == name:
            return s
        s.close()
    raise AssertionError(f"no connection reached {name} in {tries} tries")


def echo(s, payload: bytes) -> bool:
    try:
        s.sendall(payload)
        return recv_exact(s, len(payload)) == payload
    except (OSError, AssertionError):
        return False


def test_backend_readded_at_its_drain_deadline_keeps_new_connections(backends, fastlb):
    """b is removed by a reload while a connection holds it; the workers are frozen so that the drain
    cannot finish: drain_timeout passes (close_conns set), and b is re-added by a reload right
    after (well within 100 ms of the deadline's action).  Then the workers run again.  b's new
    connections survive later publishes (set-weight of a, twice)."""
    b = backends(server("a", "id"), server("b", "id"))
    entry = {n: {"name": n, "address": b.address(n), "weight": 1} for n in "ab"}
    lb = fastlb(
        [("a", entry["a"]["address"], 1), ("b", entry["b"]["address"], 1)],
        workers=2,
        pool={"drain_timeout": "1s"},
        global_={"worker_stall_timeout": "30s"},  # the frozen workers are not stalled for the watchdog
    )
    held = connect_to(lb, "b")
    workers = lb.worker_pids()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        mark = log_mark(lb)
        rewrite_backends(lb, [entry["a"]], drain_timeout="1s")
        lb.signal(signal.SIGHUP)
        wait_log(lb, r"pool web backend b: removed from the config; draining", 5, since=mark)
        wait_log(lb, r"pool web backend b: drain_timeout \(1.0s\) passed", 5, since=mark)
        rewrite_backends(lb, [entry["a"], entry["b"]], drain_timeout="1s")
        lb.signal(signal.SIGHUP)
        wait_log(lb, r"pool web backend b: added", 5, since=mark)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    st = backends_status(lb)["b"]
    assert (st["state"], st["removed"]) == ("up", False), st
    fresh = [connect_to(lb, "b") for _ in range(3)]
    assert all(echo(s, b"new on b") for s in fresh)
    c = control(lb)
    c.set_weight("web", "a", 2)
    c.set_weight("web", "a", 1)
    alive = [echo(s, b"after the publishes") for s in fresh]
    assert alive == [True] * 3, f"b's new connections after two publishes: {alive}"
    for s in fresh:
        s.close()
    held.close()
