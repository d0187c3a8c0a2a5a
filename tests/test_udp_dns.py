"""DNS through fastlb (issue 13): real dnsmasq servers on loopback behind a UDP listener.

dig and dnspython get correct answers (UDP, and TCP on the same port); weights 5:3:2 split 10,000
client ports within 2 %; a killed server is taken out by the `dns` health check and comes back
after `rise` checks once it runs again.  Each dnsmasq answers every name under test.example with
its own address, so the answer tells which server a query reached.
"""

from __future__ import annotations

import selectors
import socket
import subprocess
from collections import Counter

import dns.message
import dns.query
import dns.rcode

from support.fastlb import FastLB
from support.helpers import Deadline, wait_until
from support.protocols import control, states
from support.udp import udp_client

ANSWERS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
NAMES = ("a", "b", "c")


def dns_check(**kw) -> dict:
    return {"type": "dns", "query": "health.test.example", "interval": "200ms", "timeout": "150ms", **kw}


def udp_dns_lb(fastlb, servers, weights=(None, None, None), workers=2, health=None, **kw):
    backends = [(NAMES[i], s.address, weights[i]) for i, s in enumerate(servers)]
    pool = {"health_check": health} if health else None
    listener = {"protocol": "udp", "udp_responses": 1, "udp_idle_timeout": "5s"}
    return fastlb(backends=backends, workers=workers, listener=listener, pool=pool, **kw)


def answer_of(wire: bytes) -> str:
    reply = dns.message.from_wire(wire)
    assert reply.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(reply.rcode())
    return reply.answer[0][0].address


def query_many(addr: tuple[str, int], n: int, batch: int = 250, timeout: float = 30.0) -> Counter:
    """n A queries, each from its own client port (its own flow), `batch` in flight at once;
    returns answer address -> count (unanswered queries count under "lost")."""
    got: Counter = Counter()
    deadline = Deadline(timeout)
    sent = 0
    while sent < n:
        k = min(batch, n - sent)
        sel = selectors.DefaultSelector()
        socks = []
        for i in range(k):
            s = udp_client(addr)
            s.setblocking(False)
            q = dns.message.make_query(f"q{sent + i}.test.example", "A")
            s.send(q.to_wire())
            sel.register(s, selectors.EVENT_READ, q)
            socks.append(s)
        waiting = k
        while waiting and not deadline.expired():
            for key, _ in sel.select(min(1.0, deadline.left())):
                reply = dns.message.from_wire(key.fileobj.recv(4096))
                assert key.data.is_response(reply)
                got[answer_of(reply.to_wire())] += 1
                sel.unregister(key.fileobj)
                waiting -= 1
        got["lost"] += waiting
        for s in socks:
            s.close()
        sel.close()
        sent += k
    return got


def test_dig_and_dnspython_through_fastlb_udp_and_tcp_on_one_port(tmp_path, dnsmasq):
    servers = [dnsmasq(a) for a in ANSWERS]
    backends = [(NAMES[i], s.address, None) for i, s in enumerate(servers)]
    lb = FastLB(tmp_path / "lb", backends, listener={"protocol": "udp", "udp_responses": 1})
    # DNS over both: a TCP listener on the same address and port, same pool
    bind = f"{lb.host}:{lb.port}"
    lb.config_text += f'\n[listeners.webtcp]\nbind = "{bind}"\npool = "web"\n'
    lb.config_path.write_text(lb.config_text)
    lb.start()
    try:
        for proto in ("+notcp", "+tcp"):
            out = subprocess.run(
                [
                    "dig",
                    "@127.0.0.1",
                    "-p",
                    str(lb.port),
                    proto,
                    "+short",
                    "+tries=1",
                    "+time=3",
                    "www.test.example",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() in ANSWERS, (proto, out.stdout)
        seen = set()
        for i in range(6):
            q = dns.message.make_query(f"n{i}.test.example", "A")
            r = dns.query.udp(q, "127.0.0.1", port=lb.port, timeout=3)
            assert q.is_response(r) and r.rcode() == dns.rcode.NOERROR
            seen.add(r.answer[0][0].address)
            r = dns.query.tcp(q, "127.0.0.1", port=lb.port, timeout=3)
            assert q.is_response(r) and r.answer[0][0].address in ANSWERS
        assert seen == set(ANSWERS)  # weighted round robin per flow: every server answered
        q = dns.message.make_query("outside.example", "A")
        r = dns.query.udp(q, "127.0.0.1", port=lb.port, timeout=3)
        assert r.rcode() == dns.rcode.REFUSED  # the server's own answer, passed through unchanged
        udp = next(li for li in control(lb).status()["listeners"] if li["name"] == "web")
        assert udp["protocol"] == "udp" and udp["udp"]["expired_responses"] >= 8
    finally:
        lb.stop()


def test_weights_5_3_2_split_10000_flows_within_2_percent(fastlb, dnsmasq):
    servers = [dnsmasq(a) for a in ANSWERS]
    lb = udp_dns_lb(fastlb, servers, weights=(5, 3, 2))
    got = query_many(lb.addr, 10_000)
    assert got["lost"] == 0, got
    total = sum(got[a] for a in ANSWERS)
    for a, w in zip(ANSWERS, (5, 3, 2), strict=True):
        assert abs(got[a] / total - w / 10) <= 0.02, got
    st = control(lb).status()["listeners"][0]
    assert st["accepted"] == 10_000 and st["udp"]["drop_table_full"] == 0


def test_killed_server_leaves_after_fall_and_returns_after_rise(fastlb, dnsmasq):
    servers = [dnsmasq(a) for a in ANSWERS]
    lb = udp_dns_lb(fastlb, servers, health=dns_check(fall=2, rise=2))
    wait_until(lambda: set(states(lb).values()) == {"up"}, 10, "all three up")
    victim = servers[1]
    victim.kill()
    wait_until(lambda: states(lb)["b"] == "down", 10, lambda: f"b down (states {states(lb)})")
    got = query_many(lb.addr, 600)
    assert got["lost"] == 0 and got[ANSWERS[1]] == 0, got
    assert got[ANSWERS[0]] > 0 and got[ANSWERS[2]] > 0, got
    victim.restart()
    wait_until(lambda: states(lb)["b"] == "up", 10, lambda: f"b up again (states {states(lb)})")
    got = query_many(lb.addr, 300)
    assert got["lost"] == 0 and got[ANSWERS[1]] >= 50, got


def test_ipv6_dns(fastlb, dnsmasq):
    servers = [dnsmasq(a, host="::1") for a in ANSWERS[:2]]
    backends = [(NAMES[i], s.address, None) for i, s in enumerate(servers)]
    lb = fastlb(
        backends=backends,
        host="::1",
        listener={"protocol": "udp", "udp_responses": 1},
        pool={"health_check": dns_check()},
    )
    seen = set()
    for i in range(4):
        q = dns.message.make_query(f"v6-{i}.test.example", "A")
        r = dns.query.udp(q, "::1", port=lb.port, timeout=3)
        assert q.is_response(r)
        seen.add(r.answer[0][0].address)
    assert seen == set(ANSWERS[:2])
    assert socket.has_ipv6
