"""A worker that dies or stalls loses no queued connection: the control process owns the listening
sockets, restarts a killed worker at once on the same sockets, and kills a worker whose heartbeat
stops (worker_stall_timeout).  Connections established on the dead worker are lost; the tests
know exactly which (the worker is frozen with SIGSTOP first and its connections listed) and count
them apart from every other failure, which must be zero."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest

from fastlb.control import ControlClient
from support.backends import server
from support.helpers import wait_until
from support.load import Load


def _frozen_client_ports(pid: int, port: int) -> set[int]:
    """Client ports of the connections worker `pid` holds on the listener `port`, once the SIGSTOP
    sent to it has taken effect (kill() returns before that): the set cannot change any more."""
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10, f"worker {pid} to stop")
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return {c.raddr.port for c in conns if c.laddr and c.laddr.port == port and c.raddr}


def _kill_workers(lb, kills: int, load: Load) -> set[int]:
    lost: set[int] = set()
    rng = random.Random(9)
    for _ in range(kills):
        pids = lb.wait_workers(2)
        victim = rng.choice(sorted(pids))
        os.kill(victim, signal.SIGSTOP)
        lost |= _frozen_client_ports(victim, lb.port)
        os.kill(victim, signal.SIGKILL)
        lb.wait_workers(2, timeout=15, exclude={victim})
        load.wait_short(10)
    return lost


def _check(res, lost: set[int]) -> None:
    other = [f for f in res.failures if f.port not in lost]
    assert other == [], (
        f"{len(other)} failed client connections besides the {len(lost)} established on killed workers: {res.describe()}"
    )
    assert res.short_ok > 100, res.describe()


def test_kill9_worker_under_load_loses_no_queued_connection(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"))
    # the watchdog stays out of it: the victim is frozen (SIGSTOP) while its connections are listed
    lb = fastlb(
        [("a", b.address("a"), None), ("b", b.address("b"), None)],
        workers=2,
        global_={"worker_stall_timeout": "60s"},
    )
    load = Load(lb.addr, short_threads=3).start()
    try:
        load.wait_short(50)
        lost = _kill_workers(lb, 5, load)
    finally:
        res = load.stop()
    _check(res, lost)
    assert "died (signal SIGKILL)" in lb.log_text()
    assert "stalled" not in lb.log_text()  # the watchdog never mistakes a fresh worker for a stuck one


@pytest.mark.slow
def test_kill9_worker_20_times_under_load(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"))
    # the watchdog stays out of it: the victim is frozen (SIGSTOP) while its connections are listed
    lb = fastlb(
        [("a", b.address("a"), None), ("b", b.address("b"), None)],
        workers=2,
        global_={"worker_stall_timeout": "60s"},
    )
    load = Load(lb.addr, short_threads=3).start()
    try:
        load.wait_short(50)
        lost = _kill_workers(lb, 20, load)
    finally:
        res = load.stop()
    _check(res, lost)


def test_stalled_worker_is_replaced_within_the_limit(backends, fastlb):
    b = backends(server("a", "id"))
    # 2 s: time enough for the test to list the frozen worker's connections on a busy machine
    lb = fastlb([("a", b.address("a"), None)], workers=2, global_={"worker_stall_timeout": "2s"})
    load = Load(lb.addr, short_threads=3).start()
    try:
        load.wait_short(50)
        victim = min(lb.wait_workers(2))
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        lost = _frozen_client_ports(victim, lb.port)
        wait_until(
            lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
            15,
            f"the stalled worker {victim} to be killed",
        )
        replaced_after = time.monotonic() - stopped
        lb.wait_workers(2, timeout=15, exclude={victim})
        load.wait_short(50)
    finally:
        res = load.stop()
    _check(res, lost)
    assert "stalled: no heartbeat" in lb.log_text()
    st = ControlClient(str(lb.dir / "control.sock")).status()
    assert sum(w["stalls"] for w in st["workers"]) == 1 and sum(w["restarts"] for w in st["workers"]) == 1, (
        st["workers"]
    )
    # the limit is 2 s; the watchdog looks at least every 0.5 s: generous margin for a busy machine
    assert replaced_after < 7.0, f"stalled worker killed only after {replaced_after:.1f}s"
