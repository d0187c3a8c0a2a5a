"""Rolling updates end to end: `fastlb drain --wait`, `fastlb wait --healthy`, and
scripts/rolling-update replacing real backend processes (restarted on the same port) under load."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastlb import __version__
from support.clients import cli
from support.helpers import Deadline, free_port, recv_line
from support.protocols import backends_status, try_id_request

ROOT = Path(__file__).resolve().parent.parent
RESTARTABLE = Path(__file__).resolve().parent / "support" / "restartable.py"
HEALTH = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "rise": 2, "fall": 1}


@pytest.fixture
def restartable(tmp_path):
    """Factory: restartable(names) -> {name: port}, each an "id" server process of its own that
    `python restartable.py restart NAME PORT DIR` really restarts on the same port."""
    d = tmp_path / "restartable"
    d.mkdir()
    names: list[str] = []

    def start(*wanted: str) -> dict[str, int]:
        ports = {}
        for n in wanted:
            ports[n] = free_port()
            subprocess.run(
                [sys.executable, str(RESTARTABLE), "start", n, str(ports[n]), str(d)], check=True, timeout=20
            )
            names.append(n)
        return ports

    start.dir = d
    yield start
    for n in names:
        subprocess.run([sys.executable, str(RESTARTABLE), "stop", n, str(d)], timeout=20, check=False)


class Load:
    """Short id/echo connections through fastlb, one after another in `n` threads, until stopped
    (bounded: at most `limit` connections and `seconds`).  Counts successes and failures."""

    def __init__(self, addr, n: int = 4, limit: int = 20000, seconds: float = 120.0) -> None:
        self.addr = addr
        self.ok = 0
        self.failures: list[str] = []
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._limit = limit
        self._deadline = Deadline(seconds)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self._deadline.expired():
            with self._lock:
                if self.ok + len(self.failures) >= self._limit:
                    return
            got = try_id_request(self.addr)
            with self._lock:
                if got.startswith("FAIL"):
                    self.failures.append(got)
                else:
                    self.ok += 1
                    self.seen[got] = self.seen.get(got, 0) + 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_drain_wait_returns_at_zero_or_fails_at_the_timeout_with_the_count(backends, fastlb):
    from support.backends import server

    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb([("a", b.address("a"), 1), ("b", b.address("b"), 1)])
    sock = str(lb.dir / "control.sock")
    held = []
    while len([h for h in held if h[1] == "a"]) < 2:
        s = lb.connect()
        held.append((s, recv_line(s).decode()))
    try:
        r = cli("drain", "--socket", sock, "web", "a", "--wait", "--timeout", "1s")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stdout.strip() == "web/a: ready -> drain"
        assert r.stderr.strip() == "fastlb: web/a: 2 connections still open after 1s"
        t0 = time.monotonic()
        closer = threading.Timer(0.5, lambda: [s.close() for s, who in held if who == "a"])
        closer.start()
        r = cli("drain", "--socket", sock, "web", "a", "--wait", "--timeout", "30s")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == "web/a: drained (0 connections)"
        assert time.monotonic() - t0 >= 0.5
        assert backends_status(lb)["a"]["active"] == 0
    finally:
        for s, _ in held:
            s.close()
    r = cli("drain", "--socket", sock, "web", "zz", "--wait")
    assert r.returncode == 1 and "unknown backend 'zz'" in r.stderr


def test_wait_healthy_needs_fresh_rise_checks_and_times_out_when_down(restartable, fastlb):
    ports = restartable("a", "b")
    lb = fastlb([(n, f"127.0.0.1:{p}", 1) for n, p in ports.items()], pool={"health_check": HEALTH})
    sock = str(lb.dir / "control.sock")
    r = cli("wait", "--socket", sock, "web", "a", "--healthy", "--timeout", "20s")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "web/a: healthy (up, weight 1/1)"
    subprocess.run(
        [sys.executable, str(RESTARTABLE), "stop", "a", str(restartable.dir)], check=True, timeout=20
    )
    r = cli("wait", "--socket", sock, "web", "a", "--healthy", "--timeout", "1s")
    assert r.returncode == 1
    assert "web/a: not healthy after 1s (health down" in r.stderr


@pytest.mark.parametrize("max_unavailable", [1, 2])
def test_rolling_update_of_three_backends_under_load(restartable, fastlb, max_unavailable):
    ports = restartable("a", "b", "c")
    lb = fastlb(
        [(n, f"127.0.0.1:{p}", 1) for n, p in ports.items()], workers=2, pool={"health_check": HEALTH}
    )
    sock = str(lb.dir / "control.sock")
    d = restartable.dir
    replace = f"{sys.executable} {RESTARTABLE} restart {{backend}} {{port}} {d}"
    out_max = [0]
    sampling = threading.Event()

    def sample() -> None:  # how many backends are out of service (not ready, or not up), over time
        while not sampling.is_set():
            st = backends_status(lb)
            out = sum(1 for x in st.values() if x["admin"] != "ready" or x["health"] != "up")
            out_max[0] = max(out_max[0], out)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load = Load(lb.addr)
    try:
        time.sleep(0.3)
        env = dict(os.environ, PYTHON=sys.executable)
        r = subprocess.run(
            [
                str(ROOT / "scripts" / "rolling-update"),
                "--socket",
                sock,
                "web",
                replace,
                "--max-unavailable",
                str(max_unavailable),
                "--drain-timeout",
                "30s",
                "--healthy-timeout",
                "30s",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        time.sleep(0.3)
    finally:
        load.stop()
        sampling.set()
        sampler.join(10)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[-1].startswith("rolling-update: pool web: done, 3 backends replaced")
    # every backend process really was restarted: two pids in its .starts file, the first one gone
    for n in ports:
        pids = (d / f"{n}.starts").read_text().split()
        assert len(pids) == 2 and pids[0] != pids[1], (n, pids)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50 and set(load.seen) == {"a", "b", "c"}, (load.ok, load.seen)
    assert 1 <= out_max[0] <= max_unavailable, out_max[0]
    st = backends_status(lb)
    assert {n: (x["admin"], x["health"]) for n, x in st.items()} == {n: ("ready", "up") for n in ports}


def test_rolling_update_stops_on_a_failing_command_and_leaves_that_backend_drained(restartable, fastlb):
    ports = restartable("a", "b")
    lb = fastlb([(n, f"127.0.0.1:{p}", 1) for n, p in ports.items()], pool={"health_check": HEALTH})
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(
        [str(ROOT / "scripts" / "rolling-update"), "--socket", str(lb.dir / "control.sock"), "web", "exit 3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"scripts/rolling-update: using fastlb {__version__} from {sys.executable} (PYTHON)",
        "rolling-update: FAILED: web/a: replace command exited 3; left drained",
    ]
    assert {n: x["admin"] for n, x in backends_status(lb).items()} == {"a": "drain", "b": "ready"}


def test_wait_ramped_returns_at_the_end_of_slow_start(restartable, fastlb):
    ports = restartable("a", "b")
    lb = fastlb(
        [(n, f"127.0.0.1:{p}", 10) for n, p in ports.items()],
        pool={"health_check": HEALTH, "slow_start": "2s"},
    )
    sock = str(lb.dir / "control.sock")
    assert cli("disable", "--socket", sock, "web", "a").returncode == 0
    assert cli("enable", "--socket", sock, "web", "a").returncode == 0
    assert backends_status(lb)["a"]["effective_weight"] < 10  # ramping
    t0 = time.monotonic()
    r = cli("wait", "--socket", sock, "web", "a", "--healthy", "--ramped", "--timeout", "20s")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 1.0
    assert r.stdout.strip() == "web/a: healthy (up, weight 10/10)"
