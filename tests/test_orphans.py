"""The data plane outlives its control process.  kill -9 of the control process under load: the
workers notice (a pidfd, not PR_SET_PDEATHSIG, not getppid() == 1), keep serving with the last
published state (0 failed connections, 0 transfers cut), and a new `fastlb serve` with the same
config takes over their listening sockets and tells them to drain (0 failed connections).  Under a
subreaper the orphans are noticed the same way and drain at orphan_timeout."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import psutil

from support.backends import server
from support.helpers import wait_until
from support.load import Load

SUBREAPER = str(Path(__file__).resolve().parent / "support" / "subreaper.py")
GONE_LINE = "control process gone"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_control_process_orphans_serve_then_a_new_serve_takes_over(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb(
        [("a", b.address("a"), None), ("b", b.address("b"), None)],
        workers=2,
        global_={"orphan_timeout": "2m"},
    )
    orphans = lb.wait_workers(2)
    load = Load(lb.addr, short_threads=3, long_transfers=2).start()
    try:
        load.wait_short(50)
        os.kill(lb.pid, signal.SIGKILL)
        lb.proc.wait(10)
        wait_until(lambda: lb.log_text().count(GONE_LINE) == 2, 10, "both workers to notice (one line each)")
        assert all(not _gone(p) for p in orphans)
        load.wait_short(200)  # orphans accept and balance on their own
        assert load.result.failures == [], load.result.describe()
        new = fastlb.again(lb)  # no --takeover: a dead control process is not a running instance
        assert "orphaned workers" in new.log_text()
        assert "joining their SO_REUSEPORT groups" not in new.log_text()  # the sockets themselves moved
        for p in orphans:
            assert f"orphaned worker {p} told to drain" in new.log_text()
        new_workers = new.wait_workers(2)
        assert not (new_workers & orphans)
        load.wait_short(200)
        # the orphans hold the long transfers until the clients end them: they are still there
    finally:
        res = load.stop()
    assert res.failures == [], res.describe()
    assert res.long_failures == [] and res.long_ok == 2, res.describe()
    wait_until(lambda: all(_gone(p) for p in orphans), 20, "the orphans to exit after their last connection")
    assert new.proc.poll() is None


def test_orphans_under_a_subreaper_drain_at_orphan_timeout(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb(
        [("a", b.address("a"), None)],
        workers=2,
        global_={"orphan_timeout": "2s", "shutdown_timeout": "1s"},
        prefix=(sys.executable, SUBREAPER),
    )
    wrapper = psutil.Process(lb.pid)
    control = wait_until(lambda: wrapper.children(), 10, "the serve process under the subreaper")[0]
    workers = wait_until(lambda: len(control.children()) == 2 and control.children(), 10, "two workers")
    for w in workers:
        lb._known[w.pid] = w  # teardown kills them if the test fails
    control.kill()
    # re-parented to the subreaper, not to pid 1: getppid() == 1 would never notice
    wait_until(lambda: all(w.ppid() == wrapper.pid for w in workers if not _gone(w.pid)), 10, "re-parenting")
    wait_until(
        lambda: lb.log_text().count(GONE_LINE) == 2, 10, "both workers to notice the control process died"
    )
    load = Load(lb.addr, short_threads=2).start()
    try:
        load.wait_short(20)  # orphans still serve
    finally:
        res = load.stop()
    assert res.failures == [], res.describe()
    # and they stop at orphan_timeout (2 s) + shutdown_timeout (1 s): nobody serves frozen state forever
    wait_until(lambda: all(_gone(w.pid) for w in workers), 20, "the orphans to exit at orphan_timeout")


def test_crash_takeover_without_pidfd_getfd_joins_the_orphans_sockets(backends, fastlb):
    """Where pidfd_getfd(2) is refused (no ptrace rights, a seccomp filter), the new instance opens
    its own SO_REUSEPORT sockets next to the orphans' instead and still takes over.  Here the
    runtime file's descriptor numbers are made invalid, so every pidfd_getfd fails (EBADF).  The
    orphans' queues move to the new sockets only with net.ipv4.tcp_migrate_req = 1, so failures are
    counted, and must be 0 only then."""
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=2, global_={"orphan_timeout": "2m"})
    orphans = lb.wait_workers(2)
    path = lb.dir / "control.sock.run.json"
    os.kill(lb.pid, signal.SIGKILL)
    lb.proc.wait(10)
    wait_until(lambda: lb.log_text().count(GONE_LINE) == 2, 10, "both workers to notice")
    doc = json.loads(path.read_text())
    for w in doc["workers"]:
        for entry in w["listeners"]:
            entry["fd"] = 100000 + entry["fd"]
    path.write_text(json.dumps(doc))
    load = Load(lb.addr, short_threads=2).start()
    try:
        load.wait_short(50)
        new = fastlb.again(lb)
        assert "joining their SO_REUSEPORT groups" in new.log_text()
        wait_until(lambda: all(_gone(p) for p in orphans), 20, "the orphans to drain and exit")
        load.wait_short(100)  # the new instance's own sockets serve everything now
    finally:
        res = load.stop()
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        migrate = f.read().strip() == "1"
    if migrate:
        assert res.failures == [], res.describe()
    else:  # only connections queued on an orphan's socket at the moment it closed
        assert len(res.failures) <= 20, res.describe()
    assert new.proc.poll() is None
