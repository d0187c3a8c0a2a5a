"""Backend failures seen through `fastlb serve`: refused and silent backends are retried elsewhere,
all-down closes the client promptly, idle connections time out, resets propagate."""

from __future__ import annotations

import select
import time

from support.backends import server
from support.helpers import (
    Deadline,
    connect,
    free_port,
    recv_exact,
    recv_line,
    reset_close,
    wait_closed,
    wait_until,
)


def test_refused_backend_is_skipped_by_retry(backends, fastlb):
    b = backends(server("good", "id"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connect() is refused
    lb = fastlb(
        [("dead", dead, None), ("good", b.address("good"), None)],
        algorithm="round_robin",
        pool={"retries": 2},
    )
    for i in range(20):
        start = time.monotonic()
        with lb.connect(timeout=3) as s:
            assert recv_line(s) == b"good"
            s.sendall(b"ping %d" % i)
            assert recv_exact(s, len(b"ping %d" % i)) == b"ping %d" % i
        # a refusal is immediate: retrying it must not cost a connect timeout (2s)
        assert time.monotonic() - start < 1.0, f"connection {i} took {time.monotonic() - start:.2f}s"
    assert b.accepted() == {"good": 20}


def test_all_backends_down_closes_the_client_promptly(fastlb):
    dead = [(f"d{i}", f"127.0.0.1:{free_port()}", None) for i in range(3)]
    lb = fastlb(dead, pool={"retries": 2})
    for i in range(3):
        s = lb.connect(timeout=3)
        try:
            if i == 1:
                s.sendall(b"a request nobody will read")
            how, took = wait_closed(s, 3.0)
        finally:
            s.close()
        assert how in ("eof", "reset")
        assert took < 1.0, f"client closed only after {took:.2f}s with every backend refusing"


def test_connect_timeout_moves_to_the_next_backend(backends, fastlb):
    """A backend that drops SYNs (listen(0), queue full) costs one connect_timeout, then the
    connection lands on the next backend."""
    b = backends(server("hole", "blackhole"), server("good", "id"))
    assert b.blackhole_ok == {"hole": True}, "the listen(0) trick did not give a SYN-dropping backend here"
    timeout = 0.3
    lb = fastlb(
        [("hole", b.address("hole"), None), ("good", b.address("good"), None)],
        algorithm="round_robin",
        listener={"connect_timeout": "300ms"},
        pool={"retries": 2},
    )
    took = []
    for _ in range(4):
        start = time.monotonic()
        with lb.connect(timeout=5) as s:
            assert recv_line(s) == b"good"
            took.append(time.monotonic() - start)
            s.sendall(b"still works")
            assert recv_exact(s, 11) == b"still works"
    assert max(took) < timeout + 0.7, f"answer times {took}: slower than connect_timeout + 0.7s"
    # round robin over [hole, good]: some connection must have tried the hole first and waited
    assert any(t >= timeout - 0.05 for t in took), f"no connection waited for the connect timeout: {took}"
    assert b.accepted()["good"] == 4


def test_idle_timeout_closes_idle_connections_only(backends, fastlb):
    """idle_timeout = 1s: an idle connection is closed within a deadline; one with a byte every
    200 ms survives 3 s."""
    b = backends(server("e", "echo"))
    # connect_timeout longer than idle_timeout: the idle deadline must not wait for the connect one
    lb = fastlb([("e", b.address("e"), None)], listener={"idle_timeout": "1s", "connect_timeout": "2s"})
    idle = lb.connect()
    busy = lb.connect()
    try:
        idle.sendall(b"i")
        assert recv_exact(idle, 1) == b"i"
        idle_since = time.monotonic()
        idle.setblocking(False)
        closed_after = None
        run = Deadline(3.0)
        tick = 0
        while not run.expired():
            busy.sendall(b"%d" % (tick % 10))
            assert recv_exact(busy, 1) == b"%d" % (tick % 10), "busy connection lost its echo"
            tick += 1
            next_tick = idle_since + 0.2 * tick
            # until the next tick, watch the idle connection for its EOF/reset
            while (wait := next_tick - time.monotonic()) > 0:
                r, _, _ = select.select([idle] if closed_after is None else [], [], [], wait)
                if r:
                    try:
                        data = idle.recv(16)
                    except ConnectionResetError:
                        data = b""
                    assert data == b"", f"unexpected bytes on the idle connection: {data!r}"
                    closed_after = time.monotonic() - idle_since
                    break
        assert closed_after is not None, "the idle connection is still open after 3s (idle_timeout 1s)"
        assert 0.9 <= closed_after <= 1.5, f"idle connection closed after {closed_after:.2f}s, not ~1s"
        busy.sendall(b"alive after 3s")
        assert recv_exact(busy, 14) == b"alive after 3s"
        assert tick >= 14
        wait_until(lambda: b.active()["e"] == 1, 2, "the idle connection's backend side to close too")
    finally:
        idle.close()
        busy.close()


def test_backend_reset_reaches_the_client(backends, fastlb):
    b = backends(server("r", "reset"))
    lb = fastlb([("r", b.address("r"), None)])
    with lb.connect() as s:
        s.sendall(b"boom")
        how, took = wait_closed(s, 3.0)
    assert how in ("reset", "eof")
    assert took < 1.0, f"client saw the backend's reset only after {took:.2f}s"
    (ev,) = b.wait_events(1, 2)
    assert ev["recv_len"] == 4


def test_client_reset_reaches_the_backend(backends, fastlb):
    b = backends(server("e", "echo"))
    lb = fastlb([("e", b.address("e"), None)])
    s = lb.connect()
    s.sendall(b"hello")
    assert recv_exact(s, 5) == b"hello"
    assert b.active() == {"e": 1}
    reset_close(s)
    start = time.monotonic()
    wait_until(lambda: b.active()["e"] == 0, 3, "the backend connection to close after the client's RST")
    assert time.monotonic() - start < 1.0
    # and the worker is fine afterwards
    with connect(lb.addr) as s2:
        s2.sendall(b"next")
        assert recv_exact(s2, 4) == b"next"
