"""Self-test of the harness: each backend mode talked to directly, without fastlb, so that an
end-to-end failure can be blamed on fastlb and not on the test servers."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

from support.backends import server
from support.helpers import (
    MiB,
    connect,
    drain,
    echo_all,
    open_many,
    recv_exact,
    recv_line,
    reset_close,
    send_stream,
    wait_closed,
    wait_until,
)


def test_echo_id_and_counts(backends):
    b = backends(server("e", "echo"), server("i", "id"))
    with connect(b.sockaddr("i")) as s:
        assert recv_line(s) == b"i"
        s.sendall(b"hello")
        assert recv_exact(s, 5) == b"hello"
        s.shutdown(socket.SHUT_WR)
        assert drain(s) == (0, "eof")
    socks = open_many(b.sockaddr("e"), 200, timeout=10)
    try:
        wait_until(lambda: b.active()["e"] == 200, 5, "200 active echo connections")
        payloads = [f"conn {i} ".encode() * (i % 7 + 1) for i in range(200)]
        assert echo_all(socks, payloads, timeout=10) == []
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: b.active() == {"e": 0, "i": 0}, 5, "all connections closed")
    assert b.accepted() == {"e": 200, "i": 1}


def test_blast_both_directions_and_half_close_answer(backends):
    n = 8 * MiB
    b = backends(
        server("x", "blast", send_bytes=n, seed=7), server("h", "half_close_answer", send_bytes=n, seed=9)
    )
    with connect(b.sockaddr("x")) as s:
        got = hashlib.sha256()
        result = {}
        reader = threading.Thread(target=lambda: result.update(r=drain(s, got)))
        reader.start()
        sent = send_stream(s, n, seed=3)
        s.shutdown(socket.SHUT_WR)
        reader.join(20)
        assert result["r"] == (n, "eof")
    (ev,) = b.wait_events(1, 5)
    assert (ev["recv_len"], ev["recv_sha256"], ev["end"]) == (n, sent, "ok")
    assert ev["sent_sha256"] == got.hexdigest()

    with connect(b.sockaddr("h")) as s:
        req = send_stream(s, 1000, seed=5)
        s.shutdown(socket.SHUT_WR)
        got = hashlib.sha256()
        assert drain(s, got) == (n, "eof")
    (ev,) = b.wait_events(1, 5)
    assert (ev["recv_len"], ev["recv_sha256"], ev["sent_sha256"]) == (1000, req, got.hexdigest())


def test_reset_and_sink(backends):
    b = backends(server("r", "reset"), server("k", "sink"))
    with connect(b.sockaddr("r")) as s:
        s.sendall(b"x")
        how, _ = wait_closed(s, 2)
        assert how == "reset"
    with connect(b.sockaddr("k")) as s:
        s.sendall(b"abc")
        s.shutdown(socket.SHUT_WR)
        assert drain(s) == (0, "eof")
    evs = b.wait_events(2, 5)
    assert sorted((e["name"], e["recv_len"]) for e in evs) == [("k", 3), ("r", 1)]
    # a client reset is seen by the backend as the connection going away
    s = connect(b.sockaddr("k"))
    wait_until(lambda: b.active()["k"] == 1, 2, "sink connection accepted")
    reset_close(s)
    wait_until(lambda: b.active()["k"] == 0, 2, "sink connection closed after client reset")


def test_blackhole_drops_syns(backends):
    b = backends(server("bh", "blackhole"))
    assert b.blackhole_ok == {"bh": True}
    c = socket.socket()
    c.settimeout(0.5)
    start = time.monotonic()
    try:
        c.connect(b.sockaddr("bh"))
        raise AssertionError("connect to the blackhole completed")
    except TimeoutError:
        assert time.monotonic() - start >= 0.45
    finally:
        c.close()
