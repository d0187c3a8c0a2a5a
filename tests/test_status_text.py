"""`fastlb status` as an operator reads it (issue 19 item 5), against real `fastlb serve` processes:
every route with its live split and connections per pool and the rollout in progress (not only the
listener's first pool); a listener's PROXY-protocol counters; `rejected` counting every refused
connection (PROXY refusals too); and, after a kill -9 of the control process, the orphaned workers
that still serve (pids, since when, orphan_timeout left) instead of only "cannot reach"."""

from __future__ import annotations

import json
import os
import re
import signal
import socket

from fastlb.control import ControlClient
from support.backends import server
from support.clients import cli, count_backends
from support.helpers import free_port, wait_until

ROUTES = '[[listeners.web.routes]]\nname = "default"\nbackends = [{ pool = "web", weight = 100 }, { pool = "v2", weight = 0 }]\n'


def _reset_by_fastlb(port: int) -> bool:
    """Connect and read: True when fastlb closes the connection without a byte (a reset, which on
    loopback may already end the connect)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(16) == b""
    except ConnectionResetError:
        return True


def test_status_shows_every_route_split_rollout_prelude_counters_and_every_refusal(backends, fastlb):
    b = backends(server("v1a", "id"), server("v2a", "id"))
    pp = free_port()
    lb = fastlb(
        [("v1a", b.address("v1a"), None)],
        workers=2,
        listener={"pool": None},
        extra=f'[pools.v2]\nbackends = [{{ name = "v2a", address = "{b.address("v2a")}" }}]\n'
        + ROUTES
        + f'[listeners.pp]\nbind = "127.0.0.1:{pp}"\npool = "web"\nproxy_protocol = "v1"\n'
        'proxy_protocol_from = ["10.0.0.0/8"]\n',  # loopback is not a trusted sender: reset
    )
    sock = str(lb.dir / "control.sock")
    r = cli(
        "rollout",
        "start",
        "web",
        "default",
        "--to",
        "v2",
        "--steps",
        "50,100",
        "--interval",
        "5m",
        "--socket",
        sock,
    )
    assert r.returncode == 0, r.stderr
    got = count_backends(lb.addr, 40, concurrency=4)
    assert set(got) == {"v1a", "v2a"}, got
    assert all(_reset_by_fastlb(pp) for _ in range(3))
    text = wait_until(
        lambda: (t := cli("status", "--socket", sock).stdout) and "rejected 3" in t and t,
        10,
        "the 3 PROXY refusals in status",
    )
    lines = text.splitlines()
    # the routed listener: no "-> web" (its first pool); the route line has both pools, their
    # weights now and connections, and the rollout running on it
    assert f"listener web 127.0.0.1:{lb.port}: active 0, accepted 40, rejected 0" in lines, text
    route = next(line for line in lines if line.startswith("  route default"))
    m = re.fullmatch(
        r"  route default \[default\]: web=50 \((\d+) conns\) v2=50 \((\d+) conns\) \*; 40 connections; "
        r"rollout web-default: v2 progressing at 50%",
        route,
    )
    assert m and int(m.group(1)) + int(m.group(2)) == 40 and int(m.group(2)) > 0, route
    # the PROXY listener: every refused connection counted, and why; its prelude counters
    i = lines.index(f"listener pp 127.0.0.1:{pp} -> web: active 0, accepted 3, rejected 3 (proxy refused 3)")
    assert lines[i + 1] == "  proxy v1 from 10.0.0.0/8: accepted 0, refused 3, errors 0, timeouts 0", text
    assert "rollout web-default web/default web -> v2: progressing at 50%" in text
    st = ControlClient(sock).status()
    li = next(x for x in st["listeners"] if x["name"] == "pp")
    assert (li["rejected"], li["rejected_by"]) == (
        3,
        {"no_backend": 0, "proxy_refused": 3, "proxy_errors": 0},
    )
    # no backend left: the data plane's own refusals add up in the same field
    assert cli("disable", "web", "v1a", "--socket", sock).returncode == 0
    assert all(_reset_by_fastlb(pp) for _ in range(2))  # still refused as PROXY senders first
    assert cli("disable", "v2", "v2a", "--socket", sock).returncode == 0
    assert all(_reset_by_fastlb(lb.port) for _ in range(2))
    web = wait_until(
        lambda: (x := ControlClient(sock).status()["listeners"][0])["rejected"] == 2 and x,
        10,
        "2 connections refused for want of a backend",
    )
    assert web["rejected_by"] == {"no_backend": 2, "proxy_refused": 0, "proxy_errors": 0}


def test_status_after_kill_9_of_the_control_process_names_the_orphans_still_serving(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=2, global_={"orphan_timeout": "2m"})
    workers = lb.wait_workers(2)
    sock = str(lb.dir / "control.sock")
    os.kill(lb.pid, signal.SIGKILL)
    lb.proc.wait(10)
    wait_until(
        lambda: lb.log_text().count("control process gone") == 2, 10, "both workers to notice (one line each)"
    )
    held = socket.create_connection(lb.addr, timeout=5)  # the orphans still serve: one stays open
    try:
        assert held.recv(16) == b"a\n"
        r = cli("status", "--socket", sock)
        assert r.returncode == 1
        assert r.stderr.startswith(f"fastlb: cannot reach fastlb at {sock}: "), r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == (
            f"control process {lb.pid} is gone (runtime file {sock}.run.json); "
            "2 orphaned workers still serving with its last published state:"
        ), r.stdout
        pids = set()
        for line in lines[1:3]:
            m = re.fullmatch(
                r"  worker [01] pid (\d+): orphaned since \d\d:\d\d:\d\d \((\d+)s ago\), "
                r"orphan_timeout 120s: (\d+)s left; ([01]) connections open",
                line,
            )
            assert m, r.stdout
            pids.add(int(m.group(1)))
            assert int(m.group(2)) < 30 and 90 < int(m.group(3)) <= 120, line
        assert pids == workers
        assert lines[3].startswith("they drain when orphan_timeout runs out; `fastlb serve -c "), r.stdout
        doc = json.loads(cli("status", "--json", "--socket", sock).stdout)
        assert doc["control_pid"] == lb.pid and doc["control_running"] is False
        assert {w["pid"] for w in doc["workers"]} == workers
        assert sum(w["active"] for w in doc["workers"]) == 1  # the connection held open
        for w in doc["workers"]:
            assert w["orphan_timeout"] == 120 and 0 < w["orphan_timeout_left"] <= 120
    finally:
        held.close()
        for pid in workers:  # the orphans would serve 2 more minutes
            os.kill(pid, signal.SIGTERM)
