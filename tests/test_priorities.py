"""Backup backends and priority failover (issue 21, item 3), with real kills and restarts.

A backup (or a higher priority group) gets new connections only while no backend of a lower group is
usable; a connection that finds the primaries dead before the control process knows goes on to the
next group on its retry, so no client fails; once a primary is usable again the backup gets no new
connection, and the ones it holds stay.
"""

from __future__ import annotations

import shutil
import time

import pytest

from fastlb.config import ConfigError, parse_config
from fastlb.control import ControlClient
from fastlb.fleet.discovery import backend_name
from support.backends import server
from support.clients import ClientError, backends_of, cli, close_held, greet, open_held
from support.dns import Dnsmasq
from support.helpers import free_port, wait_until

FAST_CHECK = {"type": "tcp", "interval": "200ms", "timeout": "100ms", "rise": 1, "fall": 1}
NO_EJECTION = {"consecutive_failures": 0}


def _status(lb) -> dict:
    return ControlClient(str(lb.dir / "control.sock")).status()


def _pool(lb) -> dict:
    return _status(lb)["pools"][0]


def _total(lb, backend: str) -> int:
    """Connections fastlb established to `backend` (health checks are not counted)."""
    return backends_of(_status(lb))[backend]["total"]


def _greets(lb, n: int, timeout: float = 20.0) -> tuple[list[str], list[str]]:
    """n connections one after another (bounded: n and timeout): (names that answered, failures)."""
    names, failures = [], []
    deadline = time.monotonic() + timeout
    for _ in range(n):
        if time.monotonic() > deadline:
            failures.append("time is up")
            break
        try:
            names.append(greet(lb.addr, timeout=5))
        except (ClientError, OSError) as exc:
            failures.append(str(exc))
    return names, failures


def _start(backends, name: str, port: int):
    return backends(server(name, "id", port=port))


@pytest.mark.parametrize(
    "algorithm", ["round_robin", "weighted_round_robin", "least_conn", "maglev", "ring_hash"]
)
def test_backup_takes_over_while_the_primaries_are_dead_and_hands_back(fastlb, backends, algorithm):
    """Two primaries and a backup.  Both primaries killed: every client is served (by the backup,
    after a refused connect or two), health checks then make the backup the active group.  One
    primary restarted: new connections go to it only, and a connection the backup holds stays."""
    ports = {n: free_port() for n in ("p1", "p2", "bk")}
    procs = {n: _start(backends, n, ports[n]) for n in ports}
    lb = fastlb(
        [],
        algorithm=algorithm,
        pool={
            "backends": [
                {"name": "p1", "address": f"127.0.0.1:{ports['p1']}"},
                {"name": "p2", "address": f"127.0.0.1:{ports['p2']}"},
                {"name": "bk", "address": f"127.0.0.1:{ports['bk']}", "backup": True},
            ],
            "health_check": FAST_CHECK,
            "outlier_detection": NO_EJECTION,
            "hash_key": "source_ip_port",
        },
    )
    pool = _pool(lb)
    assert pool["active_priority"] == 0
    by_name = {b["name"]: b for b in pool["backends"]}
    assert (by_name["bk"]["backup"], by_name["bk"]["priority"]) == (True, 65536)
    assert (by_name["p1"]["backup"], by_name["p1"]["priority"]) == (False, 0)
    names, failures = _greets(lb, 30)
    assert failures == [] and set(names) <= {"p1", "p2"} and len(names) == 30
    assert _total(lb, "bk") == 0  # (the backup's own count includes the health checks)

    procs["p1"].stop()
    procs["p2"].stop()
    names, failures = _greets(lb, 40)  # right away: the checks have not noticed yet
    assert failures == []
    assert names == ["bk"] * 40
    wait_until(lambda: _pool(lb)["active_priority"] == 65536, 5, "the backup group active")
    held = open_held(lb.addr, 1)  # a connection on the backup, kept across the failback
    assert held[0][0] == "bk"

    procs["p1"] = _start(backends, "p1", ports["p1"])
    wait_until(lambda: _pool(lb)["active_priority"] == 0, 5, "the primaries active again")
    before = _total(lb, "bk")
    names, failures = _greets(lb, 30)
    assert failures == [] and names == ["p1"] * 30
    assert _total(lb, "bk") == before  # no new connection on the backup
    held[0][1].sendall(b"still here\n")
    assert held[0][1].recv(64) == b"still here\n"  # the existing one stays
    close_held(held)


def test_priority_groups_fail_over_in_order(fastlb, backends):
    """priorities = [["a"], ["b"], ["c"]]: a, then b, then c; each comes back in order too.  No health
    checks: the data plane's retry and passive ejection (1 failure, 1 s) do the failover."""
    ports = {n: free_port() for n in "abc"}
    procs = {n: _start(backends, n, ports[n]) for n in ports}
    lb = fastlb(
        [],
        algorithm="round_robin",
        pool={
            "backends": [{"name": n, "address": f"127.0.0.1:{ports[n]}"} for n in "abc"],
            "priorities": [["a"], ["b"], ["c"]],
            "outlier_detection": {
                "consecutive_failures": 1,
                "base_ejection_time": "1s",
                "max_ejection_percent": 100,
            },
        },
    )
    assert {b["name"]: b["priority"] for b in _pool(lb)["backends"]} == {"a": 0, "b": 1, "c": 2}
    names, failures = _greets(lb, 10)
    assert (names, failures) == (["a"] * 10, [])
    procs["a"].stop()
    names, failures = _greets(lb, 20)
    assert failures == [] and names == ["b"] * 20
    wait_until(lambda: _pool(lb)["active_priority"] == 1, 5, "group 1 active after the ejection")
    procs["b"].stop()
    names, failures = _greets(lb, 20)
    assert failures == [] and names == ["c"] * 20
    procs["a"] = _start(backends, "a", ports["a"])
    # a's ejection ends (1 s, then 2 s after a second one): it is the first group again
    wait_until(lambda: _greets(lb, 1)[0] == ["a"], 10, "a back in front")
    names, failures = _greets(lb, 10)
    assert (names, failures) == (["a"] * 10, [])


def test_without_a_backup_a_dead_pool_still_refuses(fastlb, backends):
    """The fallback view is empty without priorities: a dead single backend is refused as before."""
    port = free_port()
    proc = _start(backends, "a", port)
    lb = fastlb([("a", f"127.0.0.1:{port}", None)], pool={"outlier_detection": NO_EJECTION})
    assert _pool(lb)["active_priority"] == 0
    proc.stop()
    names, failures = _greets(lb, 3)
    assert names == [] and len(failures) == 3


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
def test_srv_records_of_a_higher_priority_are_backups(fastlb, backends, tmp_path):
    """RFC 2782: a and b at priority 0, c at 10.  c gets nothing while a or b answers; both killed,
    every client goes to c."""
    ports = {n: free_port() for n in "abc"}
    procs = {n: _start(backends, n, ports[n]) for n in ports}
    dns = Dnsmasq(tmp_path / "dns")
    srv = "_web._tcp.test.example"
    try:
        dns.start(
            srv=[(srv, f"{n}.test.example", ports[n], 0 if n != "c" else 10, 1) for n in "abc"],
            a=[(f"{n}.test.example", "127.0.0.1") for n in "abc"],
            ttl=1,
        )
        lb = fastlb(
            [],
            pool={
                "discover": {"srv": srv, "resolvers": [dns.address], "min_interval": "0.2s"},
                "outlier_detection": NO_EJECTION,
                "health_check": FAST_CHECK,
            },
        )
        name = {n: backend_name(f"{n}.test.example", ports[n]) for n in "abc"}
        live = wait_until(lambda: len(b := backends_of(_status(lb))) == 3 and b, 15, "discovered")
        assert {n: live[name[n]]["priority"] for n in "abc"} == {"a": 0, "b": 0, "c": 10}
        names, failures = _greets(lb, 20)
        assert failures == [] and set(names) <= {"a", "b"}
        assert _total(lb, name["c"]) == 0
        procs["a"].stop()
        procs["b"].stop()
        names, failures = _greets(lb, 20)
        assert failures == [] and names == ["c"] * 20
        wait_until(lambda: _pool(lb)["active_priority"] == 10, 5, "priority 10 active")
    finally:
        dns.stop()


@pytest.mark.parametrize(
    ("pool", "words"),
    [
        (
            'backends = [{ name = "a", address = "127.0.0.1:1", backup = true, priority = 1 }]',
            ["priority", "not both"],
        ),
        ('backends = [{ name = "a", address = "127.0.0.1:1", priority = 70000 }]', ["backends[0].priority"]),
        ('backends = [{ name = "a", address = "127.0.0.1:1", backup = "yes" }]', ["backends[0].backup"]),
        (
            'priorities = [["a"], ["x"]]\nbackends = [{ name = "a", address = "127.0.0.1:1" }]',
            ["pools.web.priorities", '"x"', "not a backend"],
        ),
        (
            'priorities = [["a"]]\nbackends = [{ name = "a", address = "127.0.0.1:1" },'
            ' { name = "b", address = "127.0.0.1:2" }]',
            ["pools.web.priorities", '"b"', "no group"],
        ),
        (
            'priorities = [["a"], ["a"]]\nbackends = [{ name = "a", address = "127.0.0.1:1" }]',
            ["priorities", "already in group 0"],
        ),
        (
            'priorities = [["a"]]\nbackends = [{ name = "a", address = "127.0.0.1:1", priority = 2 }]',
            ["priorities", "sets priority too"],
        ),
        (
            'priorities = "a"\nbackends = [{ name = "a", address = "127.0.0.1:1" }]',
            ["priorities", "expected"],
        ),
    ],
)
def test_priority_config_errors_are_one_line(tmp_path, pool, words):
    text = '[listeners.web]\nbind = "127.0.0.1:8080"\npool = "web"\n[pools.web]\n' + pool + "\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.toml")
    line = str(err.value)
    assert "\n" not in line and line.startswith("f.toml: pools.web.")
    for w in words:
        assert w in line, (w, line)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    r = cli("check-config", str(path))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
