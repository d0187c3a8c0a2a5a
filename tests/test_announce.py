"""VIP announcement by one fastlb (fleet/announce.py), without a routing daemon: the route in its
kernel table (read over netlink inside a namespace the test made), drain-instance, a stop that
withdraws first, a takeover that keeps it, a crash that leaves it until orphan_timeout, the config
keys, and a run without CAP_NET_ADMIN."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from fastlb.config import ConfigError, parse_config
from fastlb.observe.metrics import announce_metrics
from support.clients import cli
from support.helpers import wait_until
from support.netns import socket_in

TABLE, PROTO = 200, 201
ANNOUNCE = {
    "announce": True,
    "announce_protocol": PROTO,
    "announce_rise": "500ms",
    "announce_withdraw_delay": "1500ms",
}


def routes(ns: str) -> set[str]:
    """The destinations of protocol PROTO's routes in table TABLE of namespace ns."""
    from pyroute2 import NetNS

    with NetNS(ns) as nl:
        return {
            m.get_attr("RTA_DST")
            for m in nl.get_routes(family=socket.AF_INET, table=TABLE)
            if m["proto"] == PROTO and m["dst_len"] == 32
        }


def request(lb, cmd: str):
    r = cli(cmd, "--socket", str(lb.dir / "control.sock"))
    assert r.returncode == 0, r.stderr
    return r


def announce_status(lb) -> dict:
    r = cli("status", "--json", "--socket", str(lb.dir / "control.sock"))
    (a,) = json.loads(r.stdout)["announce"]
    return a


def accepts(ns, port: int) -> bool:
    s = socket_in(ns.name, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def serve_in(netns, fastlb, **kw):
    ns = netns()
    g = {**ANNOUNCE, **kw.pop("global_", {})}
    lb = fastlb(
        [("a", "127.0.0.1:9", None), ("b", "127.0.0.1:10", None)], prefix=tuple(ns.prefix), global_=g, **kw
    )
    return ns, lb


def test_route_follows_backends_and_drain_instance(netns, fastlb):
    ns, lb = serve_in(netns, fastlb)
    wait_until(lambda: routes(ns.name) == {"127.0.0.1"}, 5, "the route in table 200")
    assert announce_status(lb)["reason"] == "ready"
    for b in ("a", "b"):
        cli("disable", "web", b, "--socket", str(lb.dir / "control.sock"))
    wait_until(lambda: not routes(ns.name), 3, "the withdrawal (no usable backend)")
    a = announce_status(lb)
    assert (a["announced"], a["reason"], a["withdrawals"]) == (
        False,
        "no_usable_backend",
        {"no_usable_backend": 1},
    )
    cli("enable", "web", "b", "--socket", str(lb.dir / "control.sock"))
    t0 = time.monotonic()
    wait_until(lambda: routes(ns.name), 5, "the route back after announce_rise")
    assert time.monotonic() - t0 >= 0.4  # announce_rise = 500ms, not at once
    r = request(lb, "drain-instance")
    assert "127.0.0.1: withdrawn (draining)" in r.stdout and not routes(ns.name)
    assert accepts(ns, lb.port)  # out of the fleet, still serving
    request(lb, "undrain-instance")
    wait_until(lambda: routes(ns.name), 5, "the route back after undrain-instance")
    text = b"".join(
        m.name.encode() + repr(m.samples).encode()
        for m in announce_metrics({"announce": [announce_status(lb)]})
    )
    assert b"fastlb_announced" in text and b"'draining'" in text


def test_stop_withdraws_first_and_keeps_accepting_for_the_delay(netns, fastlb):
    ns, lb = serve_in(netns, fastlb)
    wait_until(lambda: routes(ns.name), 5, "the route")
    lb.signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_until(lambda: not routes(ns.name), 2, "the withdrawal")
    assert accepts(ns, lb.port)  # the route is gone, the listener is not
    wait_until(lambda: not accepts(ns, lb.port), 5, "the listener to close")
    assert time.monotonic() - t0 >= 1.3  # announce_withdraw_delay = 1500ms
    assert lb.wait_exit(10) == 0


def test_takeover_keeps_the_route(netns, fastlb):
    ns, lb = serve_in(netns, fastlb)
    wait_until(lambda: routes(ns.name), 5, "the route")
    seen = []
    new = fastlb.again(lb, "--takeover", prefix=tuple(ns.prefix), start=False)
    new.start()
    assert lb.wait_exit(20) == 0
    for _ in range(20):
        seen.append(routes(ns.name))
        time.sleep(0.05)
    assert all(s == {"127.0.0.1"} for s in seen)
    a = announce_status(new)
    assert a["announced"] and a["withdrawals"] == {}
    assert "withdrawn" not in lb.log_text() and "adopted" in new.log_text()


def test_crash_keeps_the_route_until_orphan_timeout(netns, fastlb):
    ns, lb = serve_in(netns, fastlb, global_={"orphan_timeout": "2s", "shutdown_timeout": "1s"})
    wait_until(lambda: routes(ns.name), 5, "the route")
    workers = lb.worker_pids()
    os.kill(lb.pid, signal.SIGKILL)
    time.sleep(1.0)
    assert routes(ns.name) == {"127.0.0.1"} and accepts(ns, lb.port)  # orphans serve, route stays
    wait_until(lambda: not routes(ns.name), 10, "orphan_timeout to withdraw the route")
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers), 10, "the orphans to exit")
    assert "orphan_timeout: withdrew the route for 127.0.0.1" in lb.log_text()


def test_without_cap_net_admin_one_line_and_serving(fastlb, backends):
    from support.backends import server

    be = backends(server("a", "id"))
    lb = fastlb(
        [("a", be.address("a"), None)],
        prefix=("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"),
        global_={"announce": True},
    )
    with socket.create_connection(lb.addr, timeout=5) as s:
        assert s.recv(10)  # the listener serves
    log = lb.log_text()
    lines = [ln for ln in log.splitlines() if "CAP_NET_ADMIN" in ln]
    assert len(lines) == 1 and "serving without announcing" in lines[0], log
    assert "Traceback" not in log
    assert announce_status(lb)["reason"] == "no_capability"


@pytest.mark.parametrize(
    ("toml", "key", "words"),
    [
        (
            '[global]\nannounce = true\n[listeners.w]\nbind = "0.0.0.0:80"\npool = "p"\n',
            "listeners.w.bind",
            "specific",
        ),
        (
            '[listeners.w]\nbind = "[::]:80"\npool = "p"\nannounce = true\n',
            "listeners.w.announce",
            "specific",
        ),
        (
            '[global]\nannounce_protocol = 12\n[listeners.w]\nbind = "10.0.0.1:80"\npool = "p"\n',
            "global.announce_protocol",
            "bird",
        ),
        (
            '[global]\nannounce_table = 254\n[listeners.w]\nbind = "10.0.0.1:80"\npool = "p"\n',
            "global.announce_table",
            "main",
        ),
        (
            '[global]\nannounce = "yes"\n[listeners.w]\nbind = "10.0.0.1:80"\npool = "p"\n',
            "global.announce",
            "true or false",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, toml: str, key: str, words: str):
    text = (
        toml + '[pools.p]\nalgorithm = "round_robin"\nbackends = [{ name = "x", address = "127.0.0.1:1" }]\n'
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, "f.toml")
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)
    cfg = tmp_path / "f.toml"
    cfg.write_text(text)
    r = cli("check-config", str(cfg))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and key in r.stderr, r.stderr


def test_config_defaults_and_listener_override():
    text = (
        '[global]\nannounce = true\n[listeners.a]\nbind = "10.0.0.1:80"\npool = "p"\n'
        '[listeners.b]\nbind = "0.0.0.0:81"\npool = "p"\nannounce = false\n'
        '[pools.p]\nalgorithm = "round_robin"\nbackends = [{ name = "x", address = "127.0.0.1:1" }]\n'
    )
    c = parse_config(text)
    a = c.global_.announce
    assert (a.table, a.protocol, a.rise, a.withdraw_delay) == (200, 4, 2.0, 5.0)
    assert {n: lc.announce for n, lc in c.listeners.items()} == {"a": True, "b": False}
