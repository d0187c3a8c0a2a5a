"""UDP health checks (issue 13): `udp_send_expect` and `dns` against real servers on loopback.

check_once() of runtime/health.py runs them; the DNS check is answered by a real dnsmasq.
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

from fastlb import config
from fastlb.runtime.health import CheckTarget, check_once
from support.dns import Dnsmasq
from support.udp import udp_server


def target(port: int, host: str = "127.0.0.1", **cfg) -> CheckTarget:
    cfg.setdefault("timeout", 1.0)
    return CheckTarget("p", "b", host, port, config.HealthCheckConfig(**cfg))


def run(coro):
    return asyncio.run(coro)


def closed_udp_port(host: str = "127.0.0.1") -> int:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_dns_check_noerror_ok_refused_fails(dnsmasq):
    d = dnsmasq("127.0.0.9")
    res = run(check_once(target(d.port, type="dns", query="health.test.example")))
    assert res.ok, res.reason
    res = run(check_once(target(d.port, type="dns", query="outside.example")))
    assert not res.ok and res.reason == "DNS rcode REFUSED"


def test_dns_check_ipv6(dnsmasq):
    d = dnsmasq("127.0.0.9", host="::1")
    res = run(check_once(target(d.port, host="::1", type="dns", query="x.test.example")))
    assert res.ok, res.reason


def test_dns_check_dead_server_refused_or_timeout(dnsmasq):
    d = dnsmasq("127.0.0.9")
    d.kill()
    res = run(check_once(target(d.port, type="dns", query="x.test.example", timeout=0.5)))
    assert not res.ok and res.reason == "connection refused"  # ICMP port unreachable


def test_dns_check_ignores_non_dns_silence_as_timeout(udp_servers):
    srv = udp_servers(udp_server("s", "silent"), udp_server("e", "echo"))
    res = run(check_once(target(srv.ports["s"], type="dns", query="x.test.example", timeout=0.3)))
    assert not res.ok and res.reason == "timeout"
    # an echo server sends the query back: a DNS message, but not a response to it -> skipped
    res = run(check_once(target(srv.ports["e"], type="dns", query="x.test.example", timeout=0.3)))
    assert not res.ok and res.reason == "timeout"


def test_udp_send_expect(udp_servers):
    srv = udp_servers(udp_server("t", "tag"))
    port = srv.ports["t"]
    res = run(check_once(target(port, type="udp_send_expect", send=b"ping", expect=b"t ping")))
    assert res.ok, res.reason
    res = run(check_once(target(port, type="udp_send_expect", send=b"ping", expect=b"pong")))
    assert not res.ok and res.reason == "unexpected reply b't ping'"
    res = run(check_once(target(closed_udp_port(), type="udp_send_expect", send=b"x", expect=b"x")))
    assert not res.ok and res.reason in ("connection refused", "timeout")


def test_the_documented_dns_check_query_passes_where_example_com_is_refused(tmp_path):
    """docs/udp.md's dns check against an authoritative-only server (dnsmasq with only its own
    records): the documented query passes; `example.com`, which the page warns about, is REFUSED."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    assert 'query = "example.com"' not in (docs / "config.md").read_text()
    text = (docs / "udp.md").read_text()
    section = text[text.index("## Health checks of DNS servers") :]
    query = re.search(r'health_check = \{ type = "dns", query = "([^"]+)"', section).group(1)
    assert "example.com" in section and query != "example.com"
    d = Dnsmasq(tmp_path / "ns").start(a=[(query, "10.0.0.11")])
    try:
        res = run(check_once(target(d.port, type="dns", query=query)))
        assert res.ok, res.reason
        res = run(check_once(target(d.port, type="dns", query="example.com")))
        assert not res.ok and res.reason == "DNS rcode REFUSED"
    finally:
        d.stop()
