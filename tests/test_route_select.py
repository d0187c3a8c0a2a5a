"""route_select() itself, called from C through fastlb._core.route_probe() on a region the control
process built from a config (no workers, no sockets): the matching rules (source prefixes,
server names exact before `*.` wildcards, case-insensitive, sni_no_match), and the split
arithmetic of split_affinity = "source_ip" (monotonic: raising a share only adds clients), which
the end-to-end tests can only sample with 500 loopback addresses."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from fastlb import _core
from fastlb.config import Address, parse_config
from fastlb.runtime.supervisor import Supervisor
from fastlb.shm import sockaddr_bytes

POOLS = "".join(
    f'[pools.{p}]\nbackends = [{{ name = "{p}1", address = "127.0.0.1:{9000 + i}" }}]\n\n'
    for i, p in enumerate(("a", "b", "c", "d"))
)


def supervisor(listener: str, routes: str) -> Supervisor:
    text = f'[global]\nworkers = 1\n\n[listeners.web]\nbind = "127.0.0.1:8080"\n{listener}\n{routes}\n{POOLS}'
    return Supervisor(parse_config(text, "t.toml"))


def peer(ip: str, port: int = 40000) -> bytes:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return sockaddr_bytes(Address(ip, port, family))


class Probe:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.route_names = {st.index: name for name, st in sup.routes.routes["web"].items()}
        self.pool_names = {ps.index: name for name, ps in sup.pools.items()}

    def __call__(self, ip: str, sni: bytes = b"") -> tuple[str | None, str | None]:
        r, p, _ = _core.route_probe(self.sup.region.address, 0, peer(ip), sni)
        return (self.route_names.get(r), self.pool_names.get(p))


def route(name: str, pools: str, match: str = "", extra: str = "") -> str:
    m = f"match = {match}\n" if match else ""
    return f'[[listeners.web.routes]]\nname = "{name}"\n{m}backends = {pools}\n{extra}\n'


SNI_ROUTES = (
    route("wild", '[{ pool = "a" }]', '{ sni = ["*.example.com"] }')
    + route("admin", '[{ pool = "b" }]', '{ sni = ["admin.example.com"] }')
    + route("office", '[{ pool = "d" }]', '{ source = ["10.1.0.0/16"], sni = ["intra.example.org"] }')
    + route("default", '[{ pool = "c" }]')
)


def test_server_names_exact_before_wildcards() -> None:
    probe = Probe(supervisor("", SNI_ROUTES))
    assert probe("127.0.0.1", b"admin.example.com") == ("admin", "b")  # exact beats the earlier wildcard
    assert probe("127.0.0.1", b"ADMIN.Example.COM") == ("admin", "b")  # case-insensitive
    assert probe("127.0.0.1", b"x.example.com") == ("wild", "a")
    assert probe("127.0.0.1", b"a.b.example.com") == ("wild", "a")  # suffix match: several labels
    assert probe("127.0.0.1", b"example.com") == ("default", "c")  # never the bare domain
    assert probe("127.0.0.1", b"xexample.com") == ("default", "c")
    assert probe("127.0.0.1", b"") == ("default", "c")  # no server name: the default route
    # source and sni together: both must hold
    assert probe("10.1.2.3", b"intra.example.org") == ("office", "d")
    assert probe("10.2.2.3", b"intra.example.org") == ("default", "c")
    assert probe("10.1.2.3", b"") == ("default", "c")


def test_sni_no_match_reject() -> None:
    probe = Probe(supervisor('sni_no_match = "reject"', SNI_ROUTES))
    assert probe("127.0.0.1", b"") == (None, None)
    assert probe("127.0.0.1", b"unknown.org") == ("default", "c")  # a name no route has: default
    assert probe("127.0.0.1", b"x.example.com") == ("wild", "a")
    assert probe.sup.region.listener(0)["no_route"] == 1


def test_source_prefixes_v4_v6_and_mapped() -> None:
    routes = (
        route("v6", '[{ pool = "a" }]', '{ source = ["2001:db8:20::/48"] }')
        + route("v4", '[{ pool = "b" }]', '{ source = ["10.20.0.0/16", "192.168.1.7"] }')
        + route("default", '[{ pool = "c" }]')
    )
    probe = Probe(supervisor("", routes))
    assert probe("2001:db8:20:ffff::1") == ("v6", "a")
    assert probe("2001:db8:21::1") == ("default", "c")
    assert probe("10.20.255.255") == ("v4", "b")
    assert probe("10.21.0.0") == ("default", "c")
    assert probe("192.168.1.7") == ("v4", "b")
    assert probe("192.168.1.8") == ("default", "c")
    assert probe("::ffff:10.20.1.1") == ("v4", "b")  # IPv4-mapped counts as IPv4
    assert probe("::1") == ("default", "c")


def test_no_default_route() -> None:
    probe = Probe(supervisor("", route("only", '[{ pool = "a" }]', '{ source = ["10.0.0.0/8"] }')))
    assert probe("10.9.9.9") == ("only", "a")
    assert probe("11.0.0.1") == (None, None)


def _sides(sup: Supervisor, ips: list[str]) -> list[str | None]:
    probe = Probe(sup)
    return [probe(ip)[1] for ip in ips]


@pytest.mark.parametrize("canary_first", [False, True])
def test_affinity_is_monotonic_and_exact(canary_first: bool) -> None:
    pools = '[{ pool = "b", weight = 0 }, { pool = "a", weight = 100 }]'
    if not canary_first:
        pools = '[{ pool = "a", weight = 100 }, { pool = "b", weight = 0 }]'
    sup = supervisor("", route("default", pools, extra='split_affinity = "source_ip"'))
    base = int(ipaddress.ip_address("10.0.0.0"))
    ips = [str(ipaddress.ip_address(base + k * 7919)) for k in range(4000)]
    on_canary: set[str] = set()
    for pct in (1, 5, 10, 30, 50, 90, 100):
        sup.routes.set_split("web", "default", {"a": 100 - pct, "b": pct})
        now = {ip for ip, side in zip(ips, _sides(sup, ips), strict=True) if side == "b"}
        assert on_canary <= now, f"{len(on_canary - now)} clients moved back at {pct} %"
        assert abs(len(now) / len(ips) * 100 - pct) <= 2.5, (pct, len(now))
        on_canary = now
    assert len(on_canary) == len(ips)


def test_affinity_skips_a_pool_without_backends_keeping_the_others() -> None:
    pools = '[{ pool = "a", weight = 40 }, { pool = "b", weight = 20 }, { pool = "c", weight = 40 }]'
    sup = supervisor("", route("default", pools, extra='split_affinity = "source_ip"'))
    ips = [f"10.0.{k // 250}.{k % 250}" for k in range(2000)]
    before = _sides(sup, ips)
    sup.backends.set_admin(sup.backends.find("b", "b1"), "maint")
    after = _sides(sup, ips)
    assert "b" not in after
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert all(x == "b" for x, _ in moved)  # only b's clients move
    assert {y for _, y in moved} == {"a", "c"}


def test_cost_is_reported() -> None:
    sup = supervisor("", SNI_ROUTES)
    _, _, ns = _core.route_probe(sup.region.address, 0, peer("10.1.2.3"), b"intra.example.org", 10000)
    assert ns > 0
