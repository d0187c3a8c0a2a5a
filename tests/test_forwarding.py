"""Forwarding through `fastlb serve`, end to end: byte-exact bulk transfer in both directions at
once, a thousand concurrent connections over two workers, half-close from either side, IPv6."""

from __future__ import annotations

import hashlib
import random
import socket

import pytest

from support.backends import server
from support.helpers import (
    Bg,
    MiB,
    drain,
    echo_all,
    open_many,
    recv_exact,
    send_stream,
    stream_sha256,
    wait_until,
)


def test_64mib_each_way_at_the_same_time(backends, fastlb):
    n = 64 * MiB
    b = backends(server("x", "blast", send_bytes=n, seed=11))
    lb = fastlb([("x", b.address("x"), None)], workers=1)
    with lb.connect(timeout=30) as s:
        got = hashlib.sha256()
        reader = Bg(drain, s, got)  # the backend's 64 MiB comes back while we send ours
        sent = send_stream(s, n, seed=12)
        s.shutdown(socket.SHUT_WR)
        assert reader.result(60) == (n, "eof")
    (ev,) = b.wait_events(1, 10)
    assert ev["end"] == "ok"
    assert (ev["recv_len"], ev["recv_sha256"]) == (n, sent), "client -> backend bytes differ"
    assert (ev["sent_len"], ev["sent_sha256"]) == (n, got.hexdigest()), "backend -> client bytes differ"
    assert got.hexdigest() == stream_sha256(n, 11)


def test_1000_concurrent_connections_over_two_workers(backends, fastlb):
    n = 1000
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)], workers=2)
    workers = lb.wait_workers(2)
    socks = open_many(lb.addr, n, timeout=20)
    try:
        wait_until(lambda: b.active()["e"] == n, 15, lambda: f"{n} backend connections ({b.active()})")
        payloads = [b"%04d:" % i + random.Random(i).randbytes(64 + i % 1500) for i in range(n)]
        assert echo_all(socks, payloads, timeout=30) == [], "some connections echoed other bytes"
        # all 1000 are open at once, and SO_REUSEPORT spread them over both workers
        per_worker = lb.established_per_worker()
        assert sum(per_worker.values()) == n, per_worker
        assert all(count > 0 for count in per_worker.values()) and len(per_worker) == 2, per_worker
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: b.active()["e"] == 0, 15, lambda: f"backend connections to close ({b.active()})")
    assert b.accepted() == {"e": n}
    assert lb.worker_pids() == workers, "a worker died or was replaced"


def test_half_close_from_the_client(backends, fastlb):
    """Request, shutdown(SHUT_WR); the backend answers only after it saw EOF, then closes."""
    answer = MiB
    b = backends(server("h", "half_close_answer", send_bytes=answer, seed=21))
    lb = fastlb([("h", b.address("h"), None)])
    with lb.connect(timeout=10) as s:
        request = send_stream(s, 100_000, seed=22)
        s.shutdown(socket.SHUT_WR)
        got = hashlib.sha256()
        assert drain(s, got) == (answer, "eof")
    (ev,) = b.wait_events(1, 5)
    assert (ev["recv_len"], ev["recv_sha256"]) == (100_000, request)
    assert (ev["sent_len"], ev["sent_sha256"], ev["end"]) == (answer, got.hexdigest(), "ok")


def test_half_close_from_the_backend(backends, fastlb):
    """The backend sends 1 MiB and shuts down its side first; the client sees EOF and can still
    send 2 MiB that all reach the backend."""
    b = backends(server("x", "blast", send_bytes=MiB, seed=31))
    lb = fastlb([("x", b.address("x"), None)])
    with lb.connect(timeout=10) as s:
        got = hashlib.sha256()
        assert drain(s, got) == (MiB, "eof")
        sent = send_stream(s, 2 * MiB, seed=32)
        s.shutdown(socket.SHUT_WR)
        assert drain(s) == (0, "eof")
    (ev,) = b.wait_events(1, 5)
    assert (ev["sent_sha256"], ev["end"]) == (got.hexdigest(), "ok")
    assert (ev["recv_len"], ev["recv_sha256"]) == (2 * MiB, sent), (
        "bytes sent after the backend's EOF were lost"
    )


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_listener_and_backend(backends, fastlb):
    b = backends(server("v6", "id", host="::1"))
    lb = fastlb([("v6", b.address("v6"), None)], host="::1")
    with lb.connect() as s:
        assert recv_exact(s, 3) == b"v6\n"
        s.sendall(b"over ipv6")
        assert recv_exact(s, 9) == b"over ipv6"
    assert b.accepted() == {"v6": 1}
