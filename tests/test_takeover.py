"""Restarts without dropping anything: `fastlb serve --takeover` receives the running instance's
listening sockets over the control socket (SCM_RIGHTS), starts its workers on them, then the old
instance stops accepting and drains.  Under load (short connections in a loop and long byte-exact
echo transfers): 0 failed client connections, every long transfer completes byte-exact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from fastlb.control import ControlClient
from fastlb.runtime import runfile
from support.backends import server
from support.clients import assert_one_line_error, cli
from support.helpers import free_port, wait_until
from support.load import Load


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _restarts(fastlb, backends, n: int) -> None:
    b = backends(server("a", "id"), server("b", "id"))
    # the long transfers live on the first instance through every restart: its drain deadline
    # (shutdown_timeout, a reset when it passes) must outlast n restarts on a busy machine
    lb = fastlb(
        [("a", b.address("a"), None), ("b", b.address("b"), None)],
        workers=2,
        global_={"shutdown_timeout": "300s"},
    )
    first = lb
    instances = [lb]
    load = Load(lb.addr, short_threads=3, long_transfers=2).start()
    try:
        load.wait_short(50)
        for _ in range(n):
            old = instances[-1]
            new = fastlb.again(old, "--takeover")
            instances.append(new)
            assert new.pid != old.pid
            wait_until(lambda o=old: "taken over by pid" in o.log_text(), 15, "the old instance to hand over")
            st = ControlClient(str(lb.dir / "control.sock")).status()
            assert st["pid"] == new.pid, "the control socket does not lead to the new instance"
            load.wait_short(30)
    finally:
        res = load.stop()
    assert res.failures == [], res.describe()
    assert res.long_failures == [] and res.long_ok == 2, res.describe()
    assert res.long_bytes > 0
    # every replaced instance drains (its long transfers ended with the load) and exits 0
    for old in instances[:-1]:
        assert old.wait_exit(40) == 0, old.log_text()
    wait_until(lambda: all(_gone(p) for p in first._known), 20, "the first instance's workers to exit")
    assert instances[-1].proc.poll() is None
    # the runtime file (for a crash takeover later) names the newest instance and its workers
    rf = runfile.read(str(lb.dir / "control.sock.run.json"))
    assert rf is not None and rf.control_pid == instances[-1].pid
    assert {w.pid for w in rf.workers} == instances[-1].worker_pids()


def test_takeover_restarts_under_load_drop_nothing(backends, fastlb):
    _restarts(fastlb, backends, 5)


@pytest.mark.slow
def test_twenty_takeover_restarts_under_load(backends, fastlb):
    _restarts(fastlb, backends, 20)


def test_sigusr2_restarts_in_place_and_hands_systemd_the_new_main_pid(backends, fastlb):
    """The upgrade signal: the control process starts `fastlb serve --takeover` itself (in the same
    cgroup under systemd); the old one tells NOTIFY_SOCKET `MAINPID=new`, the new one sends READY=1."""
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=2)
    load = Load(lb.addr, short_threads=3, long_transfers=1).start()
    try:
        load.wait_short(50)
        lb.signal(signal.SIGUSR2)

        def notes() -> list[tuple[float, int, str]]:
            lb.notified("READY=1")  # receives whatever has arrived
            return lb.notifications

        def main_pid() -> int | None:
            for _, sender, text in notes():
                for line in text.split("\n"):
                    if line.startswith("MAINPID=") and sender == lb.pid:
                        return int(line[len("MAINPID=") :])
            return None

        new_pid = wait_until(main_pid, 20, "MAINPID= from the old main pid")
        new = psutil.Process(new_pid)
        lb._known[new_pid] = new  # teardown: the new instance lives in the old one's process group
        assert new.ppid() == lb.pid and "--takeover" in new.cmdline()
        wait_until(
            lambda: (
                any(s == new_pid and "READY=1" in t.split("\n") for _, s, t in lb.notifications)
                or lb.notified("READY=1") is None
            ),
            20,
            "READY=1 from the new main pid",
        )
        for w in new.children():
            lb._known[w.pid] = w
        load.wait_short(50)
    finally:
        res = load.stop()
    assert res.failures == [] and res.long_failures == [] and res.long_ok == 1, res.describe()
    assert lb.wait_exit(40) == 0
    assert ControlClient(str(lb.dir / "control.sock")).status()["pid"] == new_pid


def test_takeover_applies_a_changed_config_and_more_workers(backends, fastlb):
    """The new instance re-reads the config: here one more worker (a new socket joins the handed-over
    one's SO_REUSEPORT group) and another idle_timeout."""
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=1)
    load = Load(lb.addr, short_threads=3).start()
    try:
        load.wait_short(50)
        new = fastlb.again(lb, "--takeover", start=False)
        new.workers = 2
        new.config_path.write_text(lb.config_text.replace('idle_timeout = "5m"', 'idle_timeout = "7m"'))
        new.start()
        assert "received 1 listening sockets" in new.log_text()
        assert len(new.wait_workers(2)) == 2
        load.wait_short(100)
    finally:
        res = load.stop()
    assert res.failures == [], res.describe()
    assert lb.wait_exit(40) == 0
    st = ControlClient(str(lb.dir / "control.sock")).status()
    assert st["pid"] == new.pid and len(st["workers"]) == 2


def test_takeover_by_a_different_build(backends, fastlb, tmp_path):
    """A binary upgrade: the new instance runs another copy of fastlb (its own compiled data plane,
    another version string) and takes the sockets over all the same."""
    import fastlb as pkg

    build = tmp_path / "build2"
    shutil.copytree(Path(pkg.__file__).parent, build / "fastlb", ignore=shutil.ignore_patterns("__pycache__"))
    (build / "fastlb" / "_version.py").write_text('__version__ = "99.0.0+other-build"\n')
    env = {"PYTHONPATH": str(build)}
    version = subprocess.run(
        [sys.executable, "-m", "fastlb", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert "99.0.0+other-build" in version.stdout, version
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=2)
    load = Load(lb.addr, short_threads=3, long_transfers=1).start()
    try:
        load.wait_short(50)
        new = fastlb.again(lb, "--takeover", start=False)
        new.env = env
        new.start()
        for pid in new.wait_workers(2):
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert str(build / "fastlb" / "_core") in maps, "the new workers run the other build"
        load.wait_short(100)
    finally:
        res = load.stop()
    assert res.failures == [] and res.long_failures == [] and res.long_ok == 1, res.describe()
    assert lb.wait_exit(40) == 0


def test_upgrade_command_restarts_in_place(backends, fastlb):
    """`fastlb upgrade -c FILE`: the running control process starts its successor itself (so under
    systemd it stays in the service), the command waits until the successor answers."""
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=2)
    load = Load(lb.addr, short_threads=3, long_transfers=1).start()
    try:
        load.wait_short(50)
        r = cli("upgrade", "-c", str(lb.config_path), timeout=90)
        assert r.returncode == 0, r
        old, new = (int(x) for x in r.stdout.split("pid ")[1].split(" -> "))
        assert old == lb.pid
        proc = psutil.Process(new)
        lb._known[new] = proc  # teardown: it lives in the old instance's process group
        for w in proc.children():
            lb._known[w.pid] = w
        load.wait_short(50)
    finally:
        res = load.stop()
    assert res.failures == [] and res.long_failures == [] and res.long_ok == 1, res.describe()
    assert lb.wait_exit(40) == 0
    assert ControlClient(str(lb.dir / "control.sock")).status()["pid"] == new
    again = cli("upgrade", "--socket", str(lb.dir / "nowhere.sock"))
    assert_one_line_error(again, "cannot reach fastlb")


def test_takeover_hands_over_the_metrics_and_admin_api_sockets(backends, fastlb):
    """/metrics and the admin API answer through a takeover: their listening sockets move with the
    listeners (no EADDRINUSE in the new instance, no refused scrape in between)."""
    b = backends(server("a", "id"))
    metrics, admin = free_port(), free_port()
    lb = fastlb(
        [("a", b.address("a"), None)],
        global_={"metrics": f"127.0.0.1:{metrics}", "admin": f"127.0.0.1:{admin}"},
    )
    urls = [f"http://127.0.0.1:{metrics}/metrics", f"http://127.0.0.1:{admin}/v1/status"]
    wait_until(lambda: all(_get(u) is not None for u in urls), 10, "metrics and the admin API")
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def poll() -> None:
        end = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < end:
            for u in urls:
                try:
                    with urllib.request.urlopen(u, timeout=5) as resp:
                        resp.read()
                    answered[0] += 1
                except OSError as exc:
                    failures.append(f"{u}: {exc}")

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        r = cli("upgrade", "-c", str(lb.config_path), timeout=90)
        assert r.returncode == 0, r
        new = int(r.stdout.split(" -> ")[1])
        lb._known[new] = psutil.Process(new)
        assert lb.wait_exit(40) == 0
        seen = answered[0]
        wait_until(lambda: answered[0] > seen + 10, 10, "answers from the new instance alone")
    finally:
        stop.set()
        t.join(10)
    assert failures == [], failures[:5]
    assert json.loads(_get(urls[1]) or "{}")["status"]["pid"] == new
    log = (lb.dir / "fastlb.log").read_text()
    assert "not started" not in log and "metrics disabled" not in log, log[-3000:]


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return None
