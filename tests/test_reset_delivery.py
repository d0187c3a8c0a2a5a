"""Issue 9, item 3: the last bytes before a reset arrive, in both directions.

Found by Redis's own test suite ("Protocol desync regression test"): redis answers
`-ERR Protocol error` and closes with the client's junk unread, so its kernel resets the connection
right after the answer.  Directly the client reads the answer, then sees the reset; through fastlb
it must too."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading

import pytest

from support.backends import server
from support.helpers import (
    Deadline,
    MiB,
    stream_chunks,
    stream_sha256,
    wait_until,
)
from support.protocols import control
from support.redis import AVAILABLE as REDIS
from support.redis import redis_server

ANSWER = b"-ERR Protocol error: unbalanced quotes in request\r\n"


def answer_then_reset_client(addr: tuple[str, int]) -> bytes:
    """Send a 2 MB request (in a thread, errors ignored: the backend resets), read what comes back
    until the reset or EOF; return it."""
    s = socket.create_connection(addr, timeout=10)
    s.settimeout(10)

    def sender() -> None:
        try:
            for chunk in stream_chunks(2 * MiB, seed=7):
                s.sendall(chunk)
        except OSError:
            pass

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    got = b""
    try:
        while len(got) < len(ANSWER):
            data = s.recv(4096)
            if not data:
                break
            got += data
    except ConnectionResetError:
        pass
    t.join(10)
    s.close()
    return got


def test_backend_answer_before_its_reset_reaches_the_client(backends, fastlb):
    """The backend reads 16 bytes of a 2 MB request, answers, closes (its kernel resets): 20 of 20
    clients read the answer through fastlb (directly, they all do)."""
    b = backends(server("r", "answer_reset", read_bytes=16, answer=ANSWER.decode()))
    direct = [answer_then_reset_client(b.sockaddr("r")) for _ in range(3)]
    assert direct == [ANSWER] * 3, "the scenario itself is broken"
    lb = fastlb([("r", b.address("r"), None)], workers=2)
    got = [answer_then_reset_client(lb.addr) for _ in range(20)]
    ok = sum(1 for g in got if g == ANSWER)
    assert ok == 20, f"{ok} of 20 clients read the answer; got {got[:3]}"
    workers = control(lb).status()["workers"]
    assert sum(w["flushed_resets"] for w in workers) >= 20


def outq(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def test_client_bytes_before_its_reset_reach_the_backend(backends, fastlb):
    """The reverse direction: a client sends 512 KiB to a backend that only starts reading after
    0.3 s, waits until its own send queue is empty (every byte has left it), then resets.  The
    backend still receives all 512 KiB, byte-exact, then the reset."""
    n = 512 * 1024
    b = backends(server("h", "hold", rcvbuf=16384, read_delay=0.3))
    lb = fastlb([("h", b.address("h"), None)], workers=1)
    for i in range(3):
        s = socket.create_connection(lb.addr, timeout=10)
        s.settimeout(10)
        for chunk in stream_chunks(n, seed=i):
            s.sendall(chunk)
        d = Deadline(5)
        while outq(s) > 0 and not d.expired():
            threading.Event().wait(0.005)
        assert outq(s) == 0, "the client's bytes did not leave it within 5s"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        (ev,) = b.wait_events(1, 10)
        assert ev["end"] == "reset", ev
        assert ev["recv_len"] == n, f"connection {i}: the backend got {ev['recv_len']} of {n} bytes"
        assert ev["recv_sha256"] == stream_sha256(n, seed=i)
    wait_until(lambda: control(lb).status()["listeners"][0]["active"] == 0, 5, "connections closed")


@pytest.mark.skipif(not REDIS, reason="redis-server is not installed")
def test_redis_protocol_desync_answer_arrives_through_fastlb(fastlb, tmp_path):
    """Redis's `unit/protocol` "Protocol desync regression test" scenario against a real
    redis-server through fastlb: a client sends a malformed request start (each of NUL, "*" NUL,
    "$" NUL), then junk until a write fails; it must then read redis's
    "-ERR Protocol error" line (redis answers, then closes with the junk unread: a reset)."""
    with redis_server(tmp_path) as port:
        lb = fastlb([("redis", f"127.0.0.1:{port}", None)], workers=2)
        failures = []
        for run in range(4):
            for seq in (b"\x00", b"*\x00", b"$\x00"):
                line = desync(lb.addr, seq)
                if b"Protocol error" not in line:
                    failures.append((run, seq, line))
        assert failures == [], f"{len(failures)} of 12 desync runs did not read the error: {failures[:3]}"


def desync(addr: tuple[str, int], seq: bytes) -> bytes:
    """Write seq, then junk without a newline until a write fails (redis closes on the too big
    inline request; bounded: 30 s), then read one line."""
    s = socket.create_connection(addr, timeout=10)
    s.settimeout(10)
    s.sendall(seq)
    payload = b"payload" * 146
    d = Deadline(30)
    try:
        while not d.expired():
            s.sendall(payload)
    except OSError:
        pass
    line = b""
    try:
        while not line.endswith(b"\n"):
            data = s.recv(1)
            if not data:
                break
            line += data
    except OSError:
        pass
    s.close()
    return line
