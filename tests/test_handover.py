"""What a successor inherits from its predecessor (fastlb.runtime.handover): DNS-discovered backend
sets (against a real dnsmasq), a reload asked for during the takeover, the foreground process the
operator started (stdout/stderr, the process name, signals), systemd's MAINPID, and the HTTP
requests the old instance had already accepted."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fastlb.control import ControlClient, ControlError
from support.backends import server
from support.clients import backends_of, cli, greet
from support.dns import Dnsmasq
from support.fastlb import FastLB, read_config, write_config
from support.helpers import free_port, wait_until
from support.load import Load

needs_dnsmasq = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
SRV = "_web._tcp.test.example"


@pytest.fixture
def dnsmasq(tmp_path):
    d = Dnsmasq(tmp_path / "dns")
    yield d
    d.stop()


def _status(lb) -> dict:
    return ControlClient(str(lb.dir / "control.sock")).status()


def _live(lb) -> set[str]:
    return {n for n, b in backends_of(_status(lb)).items() if not b["removed"]}


def _adopt(lb, pid: int) -> psutil.Process:
    """Teardown kills what lb knows: a successor (in lb's process group) and its workers."""
    proc = psutil.Process(pid)
    lb._known[pid] = proc
    for w in proc.children():
        lb._known[w.pid] = w
    return proc


def _discovered_lb(fastlb, backends, dnsmasq, **discover):
    b = backends(server("a", "id"), server("b", "id"))
    srv = [(SRV, f"{n}.test.example", b.ports[n], 0, 1) for n in "ab"]
    dnsmasq.start(srv=srv, a=[(f"{n}.test.example", "127.0.0.1") for n in "ab"], ttl=1)
    conf = {"srv": SRV, "resolvers": [dnsmasq.address], "min_interval": "0.2s", **discover}
    return fastlb([], workers=2, pool={"discover": conf})


def _upgrade(lb) -> int:
    r = cli("upgrade", "-c", str(lb.config_path), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    new = int(r.stdout.split(" -> ")[1])
    _adopt(lb, new)
    return new


@needs_dnsmasq
def test_a_discovered_pool_is_served_through_three_upgrades(fastlb, backends, dnsmasq):
    """Each successor serves its predecessor's last good set at once (the handover carries it):
    no connection fails in between, and discovery goes on from there."""
    lb = _discovered_lb(fastlb, backends, dnsmasq)
    wait_until(lambda: len(_live(lb)) == 2, 15, "a and b discovered")
    load = Load(lb.addr, short_threads=3).start()
    try:
        load.wait_short(50)
        pids = [lb.pid]
        for _ in range(3):
            pids.append(_upgrade(lb))
            load.wait_short(50)
    finally:
        res = load.stop()
    assert res.failures == [], res.describe()
    assert res.short_ok > 200
    st = _status(lb)
    assert st["pid"] == pids[-1]
    pool = next(p for p in st["pools"] if p["name"] == "web")
    assert pool["discovery"]["inherited_from"] == pids[-2]
    wait_until(lambda: _status(lb)["pools"][0]["discovery"]["last_ok"], 15, "the successor's own answer")
    assert "serving the 2 backends pid" in lb.log_text()


@needs_dnsmasq
def test_an_upgrade_with_the_resolver_down_keeps_the_last_good_set(fastlb, backends, dnsmasq):
    """docs/fleet.md: never emptied by DNS trouble, across an upgrade too."""
    lb = _discovered_lb(fastlb, backends, dnsmasq)
    wait_until(lambda: len(_live(lb)) == 2, 15, "a and b discovered")
    dnsmasq.stop()
    load = Load(lb.addr, short_threads=3).start()
    try:
        load.wait_short(30)
        new = _upgrade(lb)
        wait_until(lambda: _status(lb)["pid"] == new, 15, "the successor answering")
        load.wait_short(200)  # all of these after the upgrade
    finally:
        res = load.stop()
    assert res.failures == [], res.describe()
    assert len(_live(lb)) == 2
    wait_until(lambda: _status(lb)["pools"][0]["discovery"]["failures"] >= 1, 15, "a failed answer")
    assert len(_live(lb)) == 2
    assert {greet(lb.addr) for _ in range(20)} == {"a", "b"}


@needs_dnsmasq
def test_a_pool_with_only_discovered_backends_opens_after_its_first_answer(fastlb, backends, dnsmasq):
    """The first connections right after READY=1 find backends (they were refused or reset before)."""
    lb = _discovered_lb(fastlb, backends, dnsmasq)
    answers = [greet(lb.addr) for _ in range(30)]
    assert set(answers) == {"a", "b"}, answers


@needs_dnsmasq
def test_no_first_answer_within_initial_timeout_opens_anyway_and_says_so(fastlb, backends, dnsmasq):
    dnsmasq.stop()  # nothing answers on the resolver's port
    t0 = time.monotonic()
    lb = fastlb(
        [],
        pool={"discover": {"srv": SRV, "resolvers": [dnsmasq.address], "initial_timeout": "1s"}},
    )
    assert time.monotonic() - t0 >= 1.0
    lines = [x for x in lb.log_text().splitlines() if "no answer within initial_timeout 1s" in x]
    assert len(lines) == 1, lb.log_text()
    assert "opening the listeners without backends" in lines[0]


def test_a_reload_during_a_takeover_is_applied_by_the_successor(fastlb, backends):
    """Edit 1 adds a pool (a takeover), edit 2 changes a weight while the takeover is under way;
    SIGHUP to the main pid each time: both end up applied, and the log says how."""
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb([("a", b.address("a"), 1)], workers=1, workers_flag=False)
    doc = read_config(lb)
    port = free_port()
    doc["listeners"]["v2"] = {"bind": f"127.0.0.1:{port}", "pool": "v2"}
    doc["pools"]["v2"] = {"backends": [{"name": "b", "address": b.address("b")}]}
    write_config(lb, doc)
    lb.signal(signal.SIGHUP)
    wait_until(lambda: "takeover: received" in lb.log_text(), 20, "the successor to read edit 1")
    doc["pools"]["web"]["backends"][0]["weight"] = 7
    write_config(lb, doc)
    lb.signal(signal.SIGHUP)

    def applied() -> dict | None:
        try:
            st = _status(lb)
        except (OSError, ControlError):
            return None
        if st["pid"] == lb.pid or "v2" not in [p["name"] for p in st["pools"]]:
            return None
        return st if backends_of(st)["a"]["weight"] == 7 else None

    st = wait_until(applied, 30, "edit 1 and edit 2 applied by the successor")
    new = st["pid"]
    _adopt(lb, new)
    log = lb.log_text()
    assert "is under way; it re-reads" in log or "forwarding the reload" in log, log[-3000:]
    assert greet(("127.0.0.1", port)) == "b"
    assert lb.wait_exit(40) == 0
    # systemd follows the successor: the old main pid hands MAINPID over, the successor says it too
    lb.notified("")
    notes = [(sender, text.split("\n")) for _, sender, text in lb.notifications]
    assert any(s == lb.pid and f"MAINPID={new}" in t for s, t in notes), notes
    assert any(s == new and "READY=1" in t and f"MAINPID={new}" in t for s, t in notes), notes


def _read_lines(stream, into: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        into.append(raw.decode(errors="replace"))


def test_a_foreground_serve_stays_the_parent_through_takeovers(backends, tmp_path):
    """`fastlb serve` started with pipes as stdout/stderr and no NOTIFY_SOCKET (a terminal): after a
    reload that needs a takeover the process the operator started is still there (the shell keeps
    waiting), the successor logs to the same pipe and is named `fastlb serve`; a second takeover's
    successor is adopted by it too; SIGTERM to it stops whichever instance serves, exit 0."""
    b = backends(server("a", "id"), server("b", "id"))
    lb = FastLB(tmp_path / "fg", [("a", b.address("a"), None)])
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "FASTLB_KEEPER")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlb", "serve", "-c", str(lb.config_path)],
        cwd=lb.dir,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    lines: list[str] = []
    readers = [
        threading.Thread(target=_read_lines, args=(s, lines), daemon=True) for s in (proc.stdout, proc.stderr)
    ]
    for t in readers:
        t.start()
    seen: set[int] = {proc.pid}
    try:
        client = ControlClient(str(lb.dir / "control.sock"))

        def serving(not_pid: int) -> int | None:
            try:
                pid = client.status()["pid"]
            except (OSError, ControlError):
                return None
            return pid if pid != not_pid else None

        wait_until(lambda: serving(0), 20, "fastlb to answer")
        assert psutil.Process(proc.pid).name() == "fastlb serve"
        doc = read_config(lb)
        doc["listeners"]["v2"] = {"bind": f"127.0.0.1:{free_port()}", "pool": "v2"}
        doc["pools"]["v2"] = {"backends": [{"name": "b", "address": b.address("b")}]}
        write_config(lb, doc)
        os.kill(proc.pid, signal.SIGHUP)
        first = wait_until(lambda: serving(proc.pid), 30, "the successor")
        seen.add(first)
        wait_until(
            lambda: any(f"fastlb[{proc.pid}] INFO stopped" in x for x in lines), 30, "the old one drained"
        )
        time.sleep(0.5)  # observation window: the process the operator started must not exit
        assert proc.poll() is None, "".join(lines)[-3000:]
        keeper = psutil.Process(proc.pid)
        wait_until(lambda: "fastlb.runtime.handover" in keeper.cmdline(), 10, "the keeper")
        assert keeper.name() == "fastlb serve"
        assert keeper.net_connections(kind="all") == [] and keeper.num_fds() <= 4  # no socket, no region
        succ = psutil.Process(first)
        assert succ.name() == "fastlb serve" and succ.ppid() == proc.pid
        wait_until(lambda: any(f"fastlb[{first}] INFO ready:" in x for x in lines), 10, "its log on the pipe")
        assert greet(lb.addr) == "a"

        r = cli("upgrade", "-c", str(lb.config_path), timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
        second = int(r.stdout.split(" -> ")[1])
        seen.add(second)
        wait_until(
            lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie", 30, "1st gone"
        )
        wait_until(lambda: psutil.Process(second).ppid() == proc.pid, 10, "the keeper to adopt the 2nd")
        assert proc.poll() is None
        wait_until(
            lambda: any(f"fastlb[{second}] INFO ready:" in x for x in lines), 10, "its log on the pipe"
        )

        os.kill(proc.pid, signal.SIGTERM)  # forwarded to whichever instance serves
        assert proc.wait(40) == 0, "".join(lines)[-3000:]
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie"
        assert any(f"fastlb[{second}] INFO stopped" in x for x in lines)
    finally:
        for pid in seen:
            try:
                for c in psutil.Process(pid).children(recursive=True):
                    c.kill()
                os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait(10)


def test_http_requests_accepted_before_the_handover_are_answered(backends, fastlb):
    """A /metrics scrape and an admin API request whose connections the old instance accepted
    before the takeover, with the request sent after it: both answered (not closed unanswered);
    an idle keep-alive connection is closed cleanly (FIN after its response)."""
    b = backends(server("a", "id"))
    metrics, admin = free_port(), free_port()
    lb = fastlb(
        [("a", b.address("a"), None)],
        global_={"metrics": f"127.0.0.1:{metrics}", "admin": f"127.0.0.1:{admin}"},
    )
    early = {p: socket.create_connection(("127.0.0.1", p), timeout=10) for p in (metrics, admin)}
    keep = socket.create_connection(("127.0.0.1", admin), timeout=10)
    keep.sendall(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert keep.recv(65536).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)  # observation window: the old instance's servers accept the early connections
    new = _upgrade(lb)
    wait_until(lambda: f"taken over by pid {new}" in lb.log_text(), 20, "the handover")
    for port, path in ((metrics, "/metrics"), (admin, "/v1/status")):
        s = early[port]
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), (path, data[:200])
        s.close()
    assert keep.recv(65536) == b""  # closed with a FIN, not a reset
    keep.close()
    assert lb.wait_exit(40) == 0
