"""The runtime file names processes by pid AND start time (field 22 of /proc/PID/stat), robust to a
process name with spaces and parentheses, to zombies and to reused pids; bad files read as absent."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from fastlb.runtime import runfile
from support.helpers import wait_until

WEIRD = "x) y (z"  # comm, the field that breaks a naive split of /proc/PID/stat


def test_start_time_and_alive_identify_one_process(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", f"open('/proc/self/comm', 'w').write({WEIRD!r}); import time; time.sleep(30)"]
    )
    try:
        wait_until(lambda: psutil.Process(child.pid).name() == WEIRD, 10, "the child to rename itself")
        started = runfile.start_time(child.pid)
        assert started is not None
        ticks = os.sysconf("SC_CLK_TCK")
        assert abs(psutil.boot_time() + started / ticks - psutil.Process(child.pid).create_time()) < 1.0
        assert runfile.alive(child.pid, started)
        assert not runfile.alive(child.pid, started + 1)  # same pid, another process
        child.kill()
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
        assert not runfile.alive(child.pid, started)  # a zombie serves nobody
    finally:
        child.kill()
        child.wait()
    assert runfile.start_time(child.pid) is None or not runfile.alive(child.pid, started)


def test_write_read_round_trip_and_bad_files(tmp_path):
    path = str(tmp_path / "c.sock.run.json")
    me = runfile.start_time(os.getpid())
    runfile.write(
        path, "/etc/fastlb.toml", [runfile.WorkerEntry(0, os.getpid(), me, [{"bind": "a", "fd": 5}])]
    )
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    rf = runfile.read(path)
    assert rf is not None and rf.control_pid == os.getpid() and rf.control_alive()
    assert [(w.pid, w.listeners) for w in rf.live_workers()] == [(os.getpid(), [{"bind": "a", "fd": 5}])]
    assert os.listdir(tmp_path) == ["c.sock.run.json"]  # no temporary file left behind
    for junk in ("", "{", "[]", '{"version": 1}', '{"version": 2, "control": {}, "workers": []}', "\xff"):
        with open(path, "w") as f:
            f.write(junk)
        assert runfile.read(path) is None, junk
    runfile.remove_if_mine(path)  # not ours any more (unreadable): left alone
    assert os.path.exists(path)
