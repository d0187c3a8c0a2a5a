"""Reload applies every change, or names it: `fastlb reload` (the unit's ExecReload) and SIGHUP,
against a running fastlb with real connections, the listening sockets' real backlog (ss), and
the systemd notifications (RELOADING=1 ... READY=1) a Type=notify unit sees."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import urllib.request

from fastlb.control import ControlClient
from support.backends import server
from support.clients import cli, count_backends
from support.fastlb import FastLB, read_config, write_config
from support.helpers import free_port, wait_closed, wait_until


def start(backends, fastlb, **kw):
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb([("a", b.address("a"), 1), ("b", b.address("b"), 1)], workers=2, **kw)
    return b, lb, str(lb.dir / "control.sock")


def listen_backlogs(port: int) -> set[int]:
    """The accept-queue limits of the listening sockets on port (ss shows them as Send-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(line.split()[2]) for line in out.splitlines() if line.strip()}


def listen_backlog(port: int) -> int:
    """The one accept-queue limit all the listening sockets on port have."""
    limits = listen_backlogs(port)
    assert len(limits) == 1, limits
    return limits.pop()


def notes_since(lb, n: int) -> list[str]:
    lb.notified("")  # receive what is queued
    return [text for _, _, text in lb.notifications[n:]]


def test_reload_applies_settings_in_place_and_names_what_needs_a_restart(backends, fastlb):
    b, lb, sock = start(backends, fastlb)
    assert listen_backlog(lb.port) == 4096
    doc = read_config(lb)
    doc["global"]["log_level"] = "debug"
    doc["global"]["workers"] = 3  # needs a restart
    web = doc["listeners"]["web"]
    web.update(
        idle_timeout="1s", connect_timeout="1500ms", max_connections=1000, backlog=77, half_close_timeout="7s"
    )
    doc["listeners"]["extra"] = {"bind": f"127.0.0.1:{free_port()}", "pool": "web"}  # needs a restart
    doc["pools"]["web"].update(
        algorithm="round_robin", retries=1, health_check={"type": "tcp", "interval": "200ms"}
    )
    doc["pools"]["new"] = {"algorithm": "random", "backends": [{"name": "x", "address": b.address("a")}]}
    write_config(lb, doc)
    n = len(lb.notifications)
    r = cli("reload", "--socket", sock)
    assert r.returncode == 3, r.stdout + r.stderr
    applied = re.findall(r"^  applied: (.*)$", r.stdout, re.M)
    restart = re.findall(r"^  restart: (.*)$", r.stdout, re.M)
    assert set(applied) >= {
        "global.log_level: info -> debug",
        "listeners.web.connect_timeout: 2s -> 1.5s",
        "listeners.web.idle_timeout: 300s -> 1s",
        "listeners.web.max_connections: 0 -> 1000",
        "listeners.web.backlog: 4096 -> 77",
        "listeners.web.half_close_timeout: 60s -> 7s",
        "pools.web.algorithm: weighted_round_robin -> round_robin",
        "pools.web.retries: 2 -> 1",
        "pools.web.health_check: off -> on",
    }, r.stdout
    assert any(x.startswith("global.workers: 2 -> 3") for x in restart), r.stdout
    assert any(x.startswith("listeners.extra: new listener") for x in restart), r.stdout
    assert any(x.startswith("pools.new: new pool") for x in restart), r.stdout
    # the same names in the log, and systemd saw the reload begin and end
    log = lb.log_text()
    assert "reload: NOT applied" in log and "listeners.extra: new listener" in log
    notes = notes_since(lb, n)
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", notes[0]), notes
    assert notes[1].startswith("READY=1\nSTATUS=reloaded ") and "3 changes need a restart" in notes[1], notes

    # applied in the workers: status, the kernel's backlog, the idle timeout, the algorithm
    st = ControlClient(sock).status()
    (li,) = st["listeners"]
    assert (li["idle_timeout_ms"], li["connect_timeout_ms"], li["max_connections"], li["backlog"]) == (
        1000,
        1500,
        1000,
        77,
    )
    # every worker calls listen(2) again on its own socket when it sees the publish: wait for all
    wait_until(lambda: listen_backlogs(lb.port) == {77}, 10, "listen(2) again with backlog 77")
    s = socket.create_connection(lb.addr, timeout=5)
    assert s.recv(64) in (b"a\n", b"b\n")
    how, _ = wait_closed(s, 10)  # idle for 1 s: fastlb closes it
    s.close()
    assert how in ("eof", "reset"), how
    assert len(st["workers"]) == 2 and st["pools"][0]["algorithm"] == "round_robin"
    checks = wait_until(
        lambda: all(
            x["check"] and x["check"]["result"] == "ok"
            for x in ControlClient(sock).status()["pools"][0]["backends"]
        ),
        10,
        "health checks run after the reload",
    )
    assert checks
    # a hashing algorithm whose table was never allocated: named, the pool keeps running as it was
    doc["pools"]["web"]["algorithm"] = "maglev"
    write_config(lb, doc)
    r = cli("reload", "--socket", sock)
    assert r.returncode == 3 and any(
        x.startswith("pools.web.algorithm: round_robin -> maglev (its table does not fit")
        for x in re.findall(r"^  restart: (.*)$", r.stdout, re.M)
    ), r.stdout
    assert ControlClient(sock).status()["pools"][0]["algorithm"] == "round_robin"
    doc["pools"]["web"]["algorithm"] = "round_robin"
    write_config(lb, doc)
    # an unchanged file: a reload changes nothing and says so
    r = cli("reload", "--socket", sock)
    restart_again = re.findall(r"^  restart: (.*)$", r.stdout, re.M)
    assert re.findall(r"^  applied: (.*)$", r.stdout, re.M) == [] and restart_again, r.stdout
    assert lb.proc.poll() is None


def test_a_refused_reload_fails_and_changes_nothing(backends, fastlb):
    b, lb, sock = start(backends, fastlb)
    doc = read_config(lb)
    doc["listeners"]["web"]["idle_timeout"] = "forever"
    write_config(lb, doc)
    n = len(lb.notifications)
    r = cli("reload", "--socket", sock)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "reload refused, nothing changed" in r.stderr
    assert "listeners.web.idle_timeout" in r.stderr
    notes = notes_since(lb, n)
    assert notes[0].startswith("RELOADING=1") and notes[1].startswith("READY=1\nSTATUS=reload failed: "), (
        notes
    )
    st = ControlClient(sock).status()
    assert st["listeners"][0]["idle_timeout_ms"] == 300_000
    assert st["reload"]["failed_total"] == 1 and st["reload"]["last"]["ok"] is False
    assert sum(count_backends(lb.addr, 10).values()) == 10


def test_sighup_moves_the_control_socket_and_turns_metrics_on(backends, fastlb):
    b, lb, sock = start(backends, fastlb)
    doc = read_config(lb)
    new_sock = str(lb.dir / "moved.sock")
    port = free_port()
    doc["global"].update(control_socket=new_sock, metrics=f"127.0.0.1:{port}")
    write_config(lb, doc)
    lb.signal(signal.SIGHUP)
    st = wait_until(lambda: _status_or_none(new_sock), 10, "the control socket at its new path")
    assert st["reload"]["last"]["applied"] == [
        f"global.control_socket: {sock} -> {new_sock}",
        f"global.metrics: off -> 127.0.0.1:{port}",
    ]
    wait_until(lambda: not (lb.dir / "control.sock").exists(), 5, "the old control socket removed")
    count_backends(lb.addr, 10)

    def scraped():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()
        except OSError:
            return None

    text = wait_until(scraped, 10, "metrics served after the reload")
    assert re.search(r'^fastlb_listener_connections_accepted_total\{listener="web"\} 10\.0$', text, re.M), (
        text
    )
    assert (
        json.loads(cli("status", "--json", "-c", str(lb.config_path)).stdout)["metrics"]
        == f"127.0.0.1:{port}"
    )


def _status_or_none(path: str):
    try:
        return ControlClient(path, timeout=2).status()
    except Exception:
        return None


def test_status_without_options_uses_the_default_socket():
    r = cli("status")
    if r.returncode == 0:  # a fastlb really runs on this host
        return
    assert r.returncode == 1 and "/run/fastlb/control.sock" in r.stderr, r.stderr


def test_reload_applies_a_route_split_and_says_so(backends, tmp_path):
    b = backends(server("a", "id"), server("b", "id"))
    lb = FastLB(tmp_path / "lb", [("a", b.address("a"), 1)], workers=1)
    doc = read_config(lb)
    doc["pools"]["v2"] = {"backends": [{"name": "b", "address": b.address("b")}]}
    del doc["listeners"]["web"]["pool"]
    doc["listeners"]["web"]["routes"] = [
        {"name": "main", "backends": [{"pool": "web", "weight": 100}, {"pool": "v2", "weight": 0}]}
    ]
    write_config(lb, doc)
    try:
        lb.start()
        sock = str(lb.dir / "control.sock")
        assert set(count_backends(lb.addr, 10)) == {"a"}
        doc["listeners"]["web"]["routes"][0]["backends"] = [
            {"pool": "web", "weight": 0},
            {"pool": "v2", "weight": 100},
        ]
        write_config(lb, doc)
        r = cli("reload", "--socket", sock)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (
            "  applied: listeners.web.routes.main.split: web=100 v2=0 -> web=0 v2=100"
            in r.stdout.splitlines()
        )
        assert set(count_backends(lb.addr, 10)) == {"b"}
    finally:
        lb.stop()
