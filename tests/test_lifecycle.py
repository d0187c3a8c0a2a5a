"""Lifecycle of `fastlb serve`: sd_notify from the main pid, graceful SIGTERM during a transfer,
SIGINT, a killed worker being replaced, lean workers and an idle control process that sleeps."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time

import psutil

from support.backends import server
from support.helpers import (
    MiB,
    connect_refused,
    drain,
    echo_all,
    echo_ok,
    fd_kinds,
    open_many,
    send_stream,
    stream_sha256,
    wait_until,
)


def _gone(p: psutil.Process) -> bool:
    """Dead: no such process any more, or a zombie (whoever reaps orphans here may not)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reaped_by(p: psutil.Process, parent: int) -> bool:
    try:
        return not p.is_running() or p.ppid() != parent
    except psutil.NoSuchProcess:
        return True


def test_sigterm_refuses_new_connections_and_finishes_the_transfer(backends, fastlb):
    n = 200 * MiB
    first = 4 * MiB
    b = backends(server("x", "blast", send_bytes=n, seed=41))
    lb = fastlb([("x", b.address("x"), None)], workers=2, global_={"shutdown_timeout": "30s"})
    workers = lb.workers_now()
    s = lb.connect(timeout=30)
    try:
        got = hashlib.sha256()
        # read only the start: the rest of the 200 MiB is in flight, held back by our slow reading
        assert drain(s, got, limit=first) == (first, "limit")
        signalled = time.monotonic()
        lb.signal(signal.SIGTERM)
        _, sender, _ = lb.wait_notify("STOPPING=1", 5)
        assert sender == lb.pid, f"STOPPING=1 came from pid {sender}, not the main pid {lb.pid}"
        wait_until(lambda: connect_refused(lb.addr), 2.0, "new connections to be refused after SIGTERM")
        refused_after = time.monotonic() - signalled
        assert lb.proc.poll() is None, "fastlb exited with a transfer in flight"
        # the connection still works both ways
        sent = send_stream(s, MiB, seed=42)
        s.shutdown(socket.SHUT_WR)
        rest, how = drain(s, got)
        assert (first + rest, how) == (n, "eof"), f"transfer cut short at {first + rest} of {n} bytes"
        assert got.hexdigest() == stream_sha256(n, 41), "bytes received during shutdown differ"
    finally:
        s.close()
    events = b.wait_events(1, 10)
    mine = [e for e in events if e["recv_len"] == MiB]
    assert len(mine) == 1, events
    assert (mine[0]["recv_sha256"], mine[0]["sent_len"]) == (sent, n)
    assert lb.wait_exit(15) == 0
    assert refused_after < 2.0
    wait_until(lambda: all(_gone(w) for w in workers), 5, "the workers to exit")


def test_sigint_exits_zero_and_notifies_from_the_main_pid(backends, fastlb):
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)], workers=2)
    workers = lb.workers_now()
    assert len(workers) == 2
    _, ready_sender, _ = lb.notified("READY=1")
    # systemd's NotifyAccess=main drops datagrams from any other pid
    assert ready_sender == lb.pid, f"READY=1 came from pid {ready_sender}, not the main pid {lb.pid}"
    assert echo_ok(lb.addr, b"before SIGINT")
    lb.signal(signal.SIGINT)
    _, stop_sender, _ = lb.wait_notify("STOPPING=1", 5)
    assert stop_sender == lb.pid
    assert lb.wait_exit(10) == 0
    wait_until(lambda: all(_gone(w) for w in workers), 5, "the workers to exit")
    assert connect_refused(lb.addr)


def test_killed_worker_is_replaced(backends, fastlb):
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)], workers=2)
    before = lb.wait_workers(2)
    victim = psutil.Process(min(before))
    os.kill(victim.pid, signal.SIGKILL)
    after = lb.wait_workers(2, timeout=10, exclude={victim.pid})
    assert len(after - before) == 1, f"workers before {before}, after {after}"
    # the control process reaped the dead worker: no zombie child left
    wait_until(
        lambda: _reaped_by(victim, lb.pid),
        5,
        f"the killed worker {victim.pid} to be reaped",
    )
    assert lb.proc.poll() is None
    # connections work, and the replacement worker takes its share (SO_REUSEPORT)
    socks = open_many(lb.addr, 100, timeout=10)
    try:
        payloads = [b"after restart %d" % i for i in range(100)]
        assert echo_all(socks, payloads, timeout=10) == []
        per_worker = lb.established_per_worker()
        assert set(per_worker) == after and all(per_worker.values()), per_worker
    finally:
        for s in socks:
            s.close()


def test_workers_are_bare_interpreters_holding_only_their_own_descriptors(backends, fastlb):
    """Workers are exec'd (python -I -S running fastlb.worker), not forks of the control process:
    none of the control process's modules (asyncio's C part) is mapped in them, the region's memfd
    is closed once mapped, and their descriptors are the loop's own.  The control process itself
    has not loaded OpenSSL, which it never uses."""
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)], workers=2)
    pids = lb.wait_workers(2)
    control_maps = open(f"/proc/{lb.pid}/maps").read()
    assert "_asyncio" in control_maps  # the probe below means something
    assert "_ssl" not in control_maps, "the control process loaded OpenSSL (asyncio imports ssl if it can)"
    names = set()
    for pid in pids:
        p = psutil.Process(pid)
        names.add(p.name())
        cmd = p.cmdline()
        assert cmd[1:3] == ["-I", "-S"] and "fastlb.worker" in cmd[4], cmd
        maps = open(f"/proc/{pid}/maps").read()
        assert "_asyncio" not in maps, f"worker {pid} carries the control process's asyncio"
        assert "memfd:fastlb-shm" in maps, f"worker {pid} has not mapped the shared region"
        kinds = fd_kinds(pid)
        # only the shared region's memfd: kept open so that `fastlb status` can read an orphan's state
        assert [k for k in kinds if k.startswith("/memfd:")] == ["/memfd:fastlb-shm (deleted)"], kinds
        assert kinds["/memfd:fastlb-shm (deleted)"] == 1, kinds
        assert kinds["anon_inode:[eventpoll]"] == 1 and kinds["anon_inode:[signalfd]"] == 1, kinds
        assert kinds["socket"] == 1, kinds  # its listening socket only
    assert names == {"fastlb-w0", "fastlb-w1"}
    assert echo_ok(lb.addr, b"through an exec'd worker")


def test_idle_control_process_sleeps(backends, fastlb):
    """With nothing to do (no health checks, no failing backend, no drain) the control process
    wakes a few times a second at most: it does not poll."""
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)], workers=1)
    lb.wait_workers(1)
    assert echo_ok(lb.addr, b"one request, then idle")
    control = psutil.Process(lb.pid)
    before = control.num_ctx_switches().voluntary
    window = 3.0
    time.sleep(window)  # a measurement window, not a wait for a condition
    woke = control.num_ctx_switches().voluntary - before
    assert woke <= 10 * window, f"the idle control process woke {woke} times in {window:.0f}s"
