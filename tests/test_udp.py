"""UDP listeners end to end (issue 13): real `fastlb serve`, a real UDP server process, real datagrams.

Byte-exact datagrams of every size from 1 to 65,507 bytes (a dense sample one at a time, and every
single one pipelined), 1,000 concurrent flows keeping their order, flow expiry by udp_idle_timeout
and udp_responses, max_flows, ICMP port unreachable, IPv6 and wildcard listeners (0.0.0.0, and [::]
in a network namespace with several IPv6 addresses) replying from the address the client sent to.
"""

from __future__ import annotations

import random
import selectors
import socket

import pytest

from support.clients import cli
from support.helpers import wait_until
from support.protocols import control
from support.udp import MAX_UDP4, echo_every_size, udp_client, udp_server


def udp_lb(
    fastlb,
    backends,
    *,
    workers=1,
    algorithm="weighted_round_robin",
    pool=None,
    host="127.0.0.1",
    prefix=(),
    **udp,
):
    listener = {"protocol": "udp", **udp}
    return fastlb(
        backends=backends,
        workers=workers,
        algorithm=algorithm,
        listener=listener,
        pool=pool,
        host=host,
        prefix=tuple(prefix),
    )


def listener_status(lb) -> dict:
    return control(lb).status()["listeners"][0]


def backend_status(lb) -> dict[str, dict]:
    return {b["name"]: b for b in control(lb).status()["pools"][0]["backends"]}


def sizes() -> list[int]:
    """Every size up to 2,048 and the last 1,024 below 65,507, every 61st in between: the edges
    (MTU, fragmentation, the largest IPv4 UDP payload) densely, the middle sampled."""
    return sorted(set(range(1, 2049)) | set(range(2049, 64483, 61)) | set(range(64483, 65508)))


def test_datagrams_byte_exact_every_size_class(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)])
    rng = random.Random(13)
    c = udp_client(lb.addr, rcvbuf=1 << 20)
    for n in sizes():
        payload = rng.randbytes(n)
        c.send(payload)
        got = c.recv(65536)
        assert got == payload, f"size {n}: got {len(got)} bytes back, content equal={got == payload}"
    st = listener_status(lb)
    assert st["protocol"] == "udp"
    assert st["udp"]["datagrams_in"] == len(sizes()) == st["udp"]["datagrams_out"]
    assert st["udp"]["drop_oversized"] == 0
    assert st["accepted"] == 1  # one client address:port = one flow


def test_datagrams_byte_exact_every_single_size(fastlb, udp_servers):
    """Every size from 1 to 65,507 bytes, once each (2 GiB each way): 4 flows with at most 8
    datagrams (and 3/4 of net.core.rmem_default) each in flight, never a retransmission, every reply
    checked byte for byte and in order."""
    srv = udp_servers(udp_server("a", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)])
    assert echo_every_size(lb.addr, list(range(1, MAX_UDP4 + 1)), flows=4, window=8, timeout=120) == MAX_UDP4
    st = listener_status(lb)
    assert st["udp"]["datagrams_in"] == MAX_UDP4 == st["udp"]["datagrams_out"]
    assert st["udp"]["drop_oversized"] == st["udp"]["drop_send"] == 0
    assert st["accepted"] == 4
    assert srv.received()["a"] == MAX_UDP4


def test_thousand_concurrent_flows_keep_order(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "echo"), udp_server("b", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None), ("b", srv.address("b"), None)], workers=2)
    n_flows, rounds, per_round = 1000, 5, 4
    socks = [udp_client(lb.addr, timeout=0.0) for _ in range(n_flows)]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    got: list[list[int]] = [[] for _ in range(n_flows)]
    try:
        for r in range(rounds):
            for i, s in enumerate(socks):
                for k in range(per_round):
                    s.send(b"%d:%d:" % (i, r * per_round + k) + b"x" * (i % 200))
            want = (r + 1) * per_round * n_flows
            wait_until(
                lambda want=want: _pump(sel, got) >= want,
                30,
                lambda want=want: f"{want} echoes (have {sum(map(len, got))})",
                interval=0,
            )
    finally:
        for s in socks:
            s.close()
    for i in range(n_flows):
        assert got[i] == list(range(rounds * per_round)), f"flow {i} got {got[i]}"
    st = listener_status(lb)
    assert st["accepted"] == n_flows
    assert st["udp"]["drop_table_full"] == st["udp"]["drop_send"] == 0
    assert srv.stats()["peers"]["a"] + srv.stats()["peers"]["b"] == n_flows  # one backend socket per flow


def _pump(sel: selectors.BaseSelector, got: list[list[int]]) -> int:
    """Read every echo waiting (each "FLOW:SEQ:PAD") into got[FLOW]; returns the echoes so far."""
    for key, _ in sel.select(0.2):
        while True:
            try:
                data = key.fileobj.recv(2048)
            except BlockingIOError:
                break
            i, seq, pad = data.split(b":", 2)
            assert int(i) == key.data and len(pad) == key.data % 200
            got[key.data].append(int(seq))
    return sum(map(len, got))


def test_idle_timeout_forgets_the_flow(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)], udp_idle_timeout="300ms")
    c = udp_client(lb.addr)
    c.send(b"one")
    assert c.recv(100) == b"one"
    assert listener_status(lb)["active"] == 1
    wait_until(lambda: listener_status(lb)["active"] == 0, 10, "the idle flow to expire")
    st = listener_status(lb)
    assert st["udp"]["expired_idle"] == 1 and st["udp"]["expired_responses"] == 0
    c.send(b"two")  # the same client port: a new flow, with a new backend socket
    assert c.recv(100) == b"two"
    assert listener_status(lb)["accepted"] == 2
    assert srv.stats()["peers"]["a"] == 2


@pytest.mark.parametrize("responses", [1, 2])
def test_udp_responses_closes_flow_after_the_replies(fastlb, udp_servers, responses):
    srv = udp_servers(udp_server("a", "double"))  # answers every datagram twice
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)], udp_responses=responses, udp_idle_timeout="60s")
    c = udp_client(lb.addr, timeout=5)
    c.send(b"q")
    assert c.recv(100) == b"q"
    if responses == 2:
        assert c.recv(100) == b"q"
    wait_until(lambda: listener_status(lb)["active"] == 0, 10, "the answered flow to close")
    st = listener_status(lb)
    assert st["udp"]["expired_responses"] == 1 and st["udp"]["expired_idle"] == 0
    assert st["udp"]["datagrams_out"] == responses
    c.settimeout(0.3)
    with pytest.raises(TimeoutError):
        c.recv(100)  # with udp_responses = 1 the second copy never reaches the client


def test_max_flows_drops_new_flows_only(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)], workers=2, max_flows=5, udp_idle_timeout="60s")
    clients = [udp_client(lb.addr, timeout=5) for _ in range(5)]
    for i, c in enumerate(clients):
        c.send(b"hello %d" % i)
        assert c.recv(100) == b"hello %d" % i
    extra = udp_client(lb.addr, timeout=0.3)
    for _ in range(3):
        extra.send(b"no room")
        with pytest.raises(TimeoutError):
            extra.recv(100)
    st = listener_status(lb)
    assert st["active"] == 5 and st["accepted"] == 5
    assert st["udp"]["drop_table_full"] == 3
    for i, c in enumerate(clients):  # the existing flows are unaffected
        c.send(b"again %d" % i)
        assert c.recv(100) == b"again %d" % i
    out = cli("status", "--socket", str(lb.dir / "control.sock"))
    assert out.returncode == 0, out.stderr
    assert "listener web udp" in out.stdout and "flows 5 (created 5)" in out.stdout
    assert "dropped table_full=3" in out.stdout, out.stdout


def test_ipv6_listener_and_backends(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "tag", host="::1"), udp_server("b", "tag", host="::1"))
    lb = udp_lb(
        fastlb,
        [("a", srv.address("a"), None), ("b", srv.address("b"), None)],
        host="::1",
        algorithm="round_robin",
    )
    answers = set()
    for i in range(4):
        c = udp_client(lb.addr)
        c.send(b"v6 %d" % i)
        reply = c.recv(100)
        name, _, rest = reply.partition(b" ")
        assert rest == b"v6 %d" % i
        answers.add(name)
    assert answers == {b"a", b"b"}


NS6 = ("::1", "fd00:f1b::1", "fd00:f1b::2")  # in a namespace of the test's own: ::1 and two more on lo


def test_ipv6_wildcard_listener_replies_from_the_address_the_client_used(netns, fastlb, udp_servers):
    """[::] with IPV6_RECVPKTINFO, in a network namespace with three IPv6 addresses on lo: every
    reply leaves from the address its datagram was sent to, also when the client sends from another
    one (then the kernel's own source choice would be the client's address); IPv4 and IPv4-mapped
    datagrams are not taken (IPV6_V6ONLY)."""
    ns = netns("fd00:f1b::1/128", "fd00:f1b::2/128")
    srv = udp_servers(udp_server("a", "echo", host="::1"), prefix=ns.prefix)
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)], host="::", prefix=ns.prefix)
    for src in NS6:
        for dst in NS6:
            # a connected client socket only takes datagrams from dst: a reply from any other source is lost
            c = ns.socket(socket.AF_INET6)
            c.settimeout(5)
            c.bind((src, 0))
            c.connect((dst, lb.port))
            msg = f"{src} -> {dst}".encode()
            c.send(msg)
            assert c.recv(100) == msg, msg
            c.close()
    # one client port sending to each address: a flow each (the local address is part of the key)
    c = ns.socket(socket.AF_INET6)
    c.settimeout(5)
    c.bind(("fd00:f1b::1", 0))
    for dst in NS6:
        c.sendto(dst.encode(), (dst, lb.port))
        data, source = c.recvfrom(100)
        assert (data, source[:2]) == (dst.encode(), (dst, lb.port))
    c.close()
    st = listener_status(lb)
    assert st["accepted"] == len(NS6) ** 2 + len(NS6)
    assert st["udp"]["datagrams_in"] == st["udp"]["datagrams_out"] == len(NS6) ** 2 + len(NS6)
    # the [::] socket is IPV6_V6ONLY: IPv4 to its port finds no socket (ICMP port unreachable)
    for family, dst in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::ffff:127.0.0.1")):
        c = ns.socket(family)
        c.settimeout(5)
        c.connect((dst, lb.port))
        c.send(b"over IPv4")
        with pytest.raises(ConnectionRefusedError):
            c.recv(100)
        c.close()
    assert listener_status(lb)["udp"]["datagrams_in"] == len(NS6) ** 2 + len(NS6)


def test_wildcard_listener_replies_from_the_address_the_client_used(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)], host="0.0.0.0")
    for dst in ("127.0.0.1", "127.0.0.2", "127.3.4.5"):
        # a connected client socket only takes datagrams from dst: a reply from any other source is lost
        c = udp_client((dst, lb.port))
        c.send(dst.encode())
        assert c.recv(100) == dst.encode()


@pytest.mark.parametrize("hash_key", ["source_ip_port", "four_tuple"])
def test_four_tuple_hashes_the_address_the_client_sent_to(fastlb, udp_servers, hash_key):
    """maglev on a wildcard listener, one client address:port sending to 12 local addresses: with
    four_tuple the address it sent to is part of the key (as for TCP), so the flows spread over the
    backends (all 12 on one of 4 by chance: p = 4 / 4**12); with source_ip_port they all agree.
    Each address keeps its backend."""
    srv = udp_servers(*(udp_server(n, "tag") for n in "abcd"))
    lb = udp_lb(
        fastlb,
        [(n, srv.address(n), None) for n in "abcd"],
        host="0.0.0.0",
        algorithm="maglev",
        pool={"hash_key": hash_key},
        udp_idle_timeout="60s",
    )
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.settimeout(5)

    def backend(dst: str) -> str:
        c.sendto(b"q", (dst, lb.port))
        data, src = c.recvfrom(100)
        assert src == (dst, lb.port)
        return data.split()[0].decode()

    dsts = [f"127.0.0.{i}" for i in range(1, 13)]
    first = {d: backend(d) for d in dsts}
    assert {d: backend(d) for d in dsts} == first  # each flow (and its hash) is stable
    picked = set(first.values())
    assert len(picked) > 1 if hash_key == "four_tuple" else len(picked) == 1, first


def test_kernel_drops_on_full_receive_buffers_are_counted(fastlb, udp_servers):
    """A stopped worker: a burst of replies overflows its flow's backend socket, a burst of client
    datagrams its listening socket; the kernel drops the excess, and SO_RXQ_OVFL on the next datagram
    lets the worker count every one of them: forwarded + dropped-and-counted = sent, on each side."""
    srv = udp_servers(udp_server("a", "silent"))  # answers only when told to (burst)
    lb = fastlb(
        [("a", srv.address("a"), None)],
        listener={"protocol": "udp", "udp_idle_timeout": "60s"},
        global_={"worker_stall_timeout": "60s"},  # the watchdog must not replace the stopped worker
    )
    big = bytes(60000)
    c = udp_client(lb.addr)
    c.send(big)
    wait_until(lambda: srv.received()["a"] == 1, 10, "the first datagram at the backend")
    srv.burst("a", 1)
    assert c.recv(65536) == big  # the flow and its backend socket exist

    def udp() -> dict:
        return listener_status(lb)["udp"]

    worker = lb.the_worker()
    worker.suspend()
    try:
        srv.burst("a", 64)  # 3.8 MB of replies into a 2 MiB (1 MiB doubled) receive buffer
    finally:
        worker.resume()
    wait_until(lambda: udp()["datagrams_out"] > 1, 10, "the queued replies")
    srv.burst("a", 1)  # a datagram queued after the drops carries the socket's drop count
    wait_until(
        lambda: (
            udp()["drop_reply_rcvbuf"] > 0
            and udp()["datagrams_out"] + udp()["drop_reply_rcvbuf"] + udp()["drop_send"] == 66
        ),
        10,
        "every reply forwarded or counted",
    )

    worker.suspend()
    try:
        for _ in range(300):  # 18 MB into the listening socket's 8 MiB (4 MiB doubled)
            c.send(big)
    finally:
        worker.resume()
    wait_until(lambda: udp()["datagrams_in"] > 1, 10, "the queued client datagrams")
    c.send(b"after")  # queued after the drops: carries the listening socket's drop count
    wait_until(
        lambda: udp()["drop_rcvbuf"] > 0 and udp()["datagrams_in"] + udp()["drop_rcvbuf"] == 302,
        10,
        "every client datagram forwarded or counted",
    )


def test_icmp_port_unreachable_counts_and_ejects(fastlb, udp_servers):
    srv = udp_servers(udp_server("live", "echo"))
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dead_addr = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there: the kernel answers ICMP port unreachable
    lb = udp_lb(
        fastlb,
        [("dead", dead_addr, None), ("live", srv.address("live"), None)],
        algorithm="round_robin",
        pool={"outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "60s"}},
    )
    answered = 0
    for i in range(40):
        c = udp_client(lb.addr, timeout=0.3)
        c.send(b"%d" % i)
        try:
            if c.recv(100) == b"%d" % i:
                answered += 1
        except TimeoutError:
            pass
        c.close()
    b = backend_status(lb)
    st = listener_status(lb)
    assert st["udp"]["drop_unreachable"] >= 3
    assert b["dead"]["state"] == "ejected", b["dead"]
    assert answered >= 40 - 6  # after the ejection every flow goes to the live backend


def test_answered_flows_reuse_backend_sockets_and_strays_never_reach_the_next_client(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "double"))  # every datagram answered twice
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)], udp_responses=1, udp_idle_timeout="60s")
    for i in range(30):
        c = udp_client(lb.addr, timeout=5)  # a new client port: a new flow each time
        msg = b"client %d" % i
        c.send(msg)
        assert c.recv(100) == msg  # its own reply, never the previous client's second copy
        c.settimeout(0.05)
        with pytest.raises(TimeoutError):
            c.recv(100)
        c.close()
    st = listener_status(lb)
    assert st["accepted"] == 30 and st["udp"]["expired_responses"] == 30
    assert st["udp"]["datagrams_out"] == 30
    assert st["udp"]["drop_unexpected"] == 30  # every second copy was dropped and counted
    # the backend saw far fewer source ports than flows: answered flows hand their socket on
    assert srv.stats()["peers"]["a"] < 10


def test_routes_pick_the_pool_of_a_flow_by_source_address(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "tag"), udp_server("b", "tag"))
    extra = f"""
[pools.other]
backends = [{{ name = "b", address = "{srv.address("b")}" }}]

[[listeners.web.routes]]
name = "lab"
match = {{ source = ["127.0.0.2/32"] }}
backends = [{{ pool = "other" }}]

[[listeners.web.routes]]
name = "default"
backends = [{{ pool = "web" }}]
"""
    lb = fastlb(
        backends=[("a", srv.address("a"), None)],
        listener={"protocol": "udp", "pool": None},
        extra=extra,
    )
    for src, want in (("127.0.0.1", b"a"), ("127.0.0.2", b"b"), ("127.0.0.1", b"a"), ("127.0.0.2", b"b")):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(5)
        c.bind((src, 0))
        c.connect(lb.addr)
        c.send(b"from " + src.encode())
        assert c.recv(100) == want + b" from " + src.encode()
        c.close()
    routes = {r["name"]: r for r in listener_status(lb)["routes"]}
    assert routes["lab"]["connections"] == 2 and routes["default"]["connections"] == 2


def test_replacement_worker_serves_on_the_same_udp_socket(fastlb, udp_servers):
    srv = udp_servers(udp_server("a", "echo"))
    lb = udp_lb(fastlb, [("a", srv.address("a"), None)])
    c = udp_client(lb.addr)
    c.send(b"before")
    assert c.recv(100) == b"before"
    old = lb.the_worker()
    old.kill()
    lb.wait_workers(1, timeout=20, exclude={old.pid})
    # the control process kept the socket: the new worker reads it (a new flow for this client)
    c.send(b"after")
    assert c.recv(100) == b"after"
