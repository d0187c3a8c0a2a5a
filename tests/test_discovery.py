"""DNS service discovery against a real DNS server (dnsmasq): backends appear, vanish (draining),
change weight; a silent server keeps the last good set; the record's TTL paces re-resolution."""

from __future__ import annotations

import shutil
import time

import pytest

from fastlb.config import parse_config
from fastlb.control import ControlClient
from fastlb.fleet.discovery import backend_name
from support.backends import server
from support.clients import backends_of, greet
from support.dns import Dnsmasq
from support.helpers import free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")

SRV = "_web._tcp.test.example"


@pytest.fixture
def dnsmasq(tmp_path):
    d = Dnsmasq(tmp_path / "dns")
    yield d
    d.stop()


def _pool_status(lb) -> dict:
    st = ControlClient(str(lb.dir / "control.sock")).status()
    return next(p for p in st["pools"] if p["name"] == "web")


def _live(lb) -> dict[str, dict]:
    """name -> backend record of the live (not removed) backends."""
    st = ControlClient(str(lb.dir / "control.sock")).status()
    return {n: b for n, b in backends_of(st).items() if not b["removed"]}


def _srv(b, names, weights=None):
    weights = weights or {}
    return [(SRV, f"{n}.test.example", b.ports[n], 0, weights.get(n, 1)) for n in names]


def _a(names):
    return [(f"{n}.test.example", "127.0.0.1") for n in names]


def _discover(dnsmasq, **extra) -> dict:
    return {"srv": SRV, "resolvers": [dnsmasq.address], "min_interval": "0.2s", **extra}


def test_srv_backends_appear_vanish_and_change_weight(fastlb, backends, dnsmasq):
    b = backends(server("a", "id"), server("b", "id"), server("c", "id"))
    dnsmasq.start(srv=_srv(b, "ab", {"a": 3}), a=_a("abc"), ttl=1)
    lb = fastlb([], pool={"discover": _discover(dnsmasq)})
    name = {n: backend_name(f"{n}.test.example", b.ports[n]) for n in "abc"}

    live = wait_until(lambda: _live(lb) if len(_live(lb)) == 2 else None, 15, "a and b discovered")
    assert set(live) == {name["a"], name["b"]}
    assert live[name["a"]]["weight"] == 3 and live[name["b"]]["weight"] == 1
    seen = {greet(lb.addr) for _ in range(40)}
    assert seen == {"a", "b"}

    # b vanishes, c appears, a's weight changes: all through the usual lifecycle
    dnsmasq.reload(srv=_srv(b, "ac", {"a": 7}), a=_a("abc"), ttl=1)

    def changed():
        live = _live(lb)
        return live if set(live) == {name["a"], name["c"]} and live[name["a"]]["weight"] == 7 else None

    wait_until(changed, 15, "b removed, c added, a at weight 7")
    gone = backends_of(ControlClient(str(lb.dir / "control.sock")).status()).get(name["b"])
    assert gone is None or gone["removed"] and gone["state"] == "drain"  # drained, then freed
    seen = {greet(lb.addr) for _ in range(60)}
    assert seen == {"a", "c"}
    assert "discovery for pool web" in lb.log_text()


def test_failing_dns_keeps_the_last_good_set(fastlb, backends, dnsmasq):
    b = backends(server("a", "id"), server("b", "id"))
    dnsmasq.start(srv=_srv(b, "ab"), a=_a("ab"), ttl=1)
    lb = fastlb([], pool={"discover": _discover(dnsmasq)})
    wait_until(lambda: len(_live(lb)) == 2, 15, "both discovered")

    dnsmasq.stop()  # the resolver is gone: answers time out
    wait_until(lambda: _pool_status(lb)["discovery"]["failures"] >= 2, 30, "two failed resolutions")
    pool = _pool_status(lb)
    assert len([x for x in pool["backends"] if not x["removed"]]) == 2
    assert pool["discovery"]["last_error"]
    assert {greet(lb.addr) for _ in range(30)} == {"a", "b"}  # still balancing over the last good set

    # an empty answer (the name no longer exists) is not "no backends" either
    dnsmasq.start(srv=[], a=_a("ab"), ttl=1)
    failures = _pool_status(lb)["discovery"]["failures"]
    wait_until(lambda: _pool_status(lb)["discovery"]["failures"] > failures, 15, "an empty answer counted")
    assert len(_live(lb)) == 2
    assert "keeping the last good set" in lb.log_text()


def test_ttl_paces_resolution(fastlb, backends, dnsmasq):
    b = backends(server("a", "id"))
    dnsmasq.start(srv=_srv(b, "a"), a=_a("a"), ttl=2)
    lb = fastlb([], pool={"discover": _discover(dnsmasq, min_interval="0.1s", max_interval="60s")})
    wait_until(lambda: len(_live(lb)) == 1, 15, "a discovered")
    first = _pool_status(lb)["discovery"]
    assert 1.5 <= first["next_in"] <= 2.0  # the record's TTL, within [min_interval, max_interval]
    t0, n0 = time.monotonic(), first["resolutions"]
    time.sleep(6.5)  # observation window: resolutions in 6.5 s at a 2 s TTL
    n = _pool_status(lb)["discovery"]["resolutions"] - n0
    elapsed = time.monotonic() - t0
    assert elapsed / 2.0 - 1.5 <= n <= elapsed / 2.0 + 1.5, f"{n} resolutions in {elapsed:.1f}s at TTL 2s"


def test_a_records_with_a_port(fastlb, backends, dnsmasq):
    port = free_port("127.0.0.2")
    b = backends(
        server("x", "id", host="127.0.0.2", port=port), server("y", "id", host="127.0.0.3", port=port)
    )
    dnsmasq.start(a=[("web.test.example", "127.0.0.2"), ("web.test.example", "127.0.0.3")], ttl=1)
    lb = fastlb(
        [], pool={"discover": {"a": "web.test.example", "port": port, "resolvers": [dnsmasq.address]}}
    )
    live = wait_until(lambda: _live(lb) if len(_live(lb)) == 2 else None, 15, "two A records")
    assert set(live) == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
    assert {greet(lb.addr) for _ in range(40)} == {"x", "y"}
    assert b.ports["x"] == b.ports["y"] == port


def test_discover_config_errors():
    base = '[listeners.l]\nbind = "127.0.0.1:1"\npool = "p"\n[pools.p]\n'
    ok = parse_config(base + 'discover = { a = "db.internal", port = 5432 }\n')
    assert ok.pools["p"].backends == () and ok.pools["p"].discover.name == "db.internal."
    for text, key in (
        ('discover = { a = "db.internal" }\n', "pools.p.discover.port"),
        ('discover = { srv = "_x._tcp.a", a = "b", port = 1 }\n', "pools.p.discover.srv"),
        ('discover = { srv = "not a name!" }\n', "pools.p.discover.srv"),
        ('discover = { srv = "_x._tcp.a", port = 80 }\n', "pools.p.discover.port"),
        (
            'discover = { srv = "_x._tcp.a", min_interval = "5s", max_interval = "1s" }\n',
            "pools.p.discover.max_interval",
        ),
    ):
        with pytest.raises(Exception) as exc:
            parse_config(base + text)
        assert key in str(exc.value) and "\n" not in str(exc.value)
