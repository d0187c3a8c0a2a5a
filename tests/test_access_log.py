"""The access log: one line per ended connection (json or text) with who, where, how long, how much
and why it ended; drained from the workers' rings, reopened on SIGUSR1, drops counted, never blocking."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct

from fastlb.control import ControlClient
from support.backends import server
from support.clients import backends_of, cli, greet
from support.helpers import connect, free_port, free_udp_port, recv_exact, wait_until
from support.udp import udp_client, udp_server


def _records(path, n: int, timeout: float = 10.0) -> list[dict]:
    def read():
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return None
        return [json.loads(x) for x in lines] if len(lines) >= n else None

    return wait_until(read, timeout, f"{n} access-log records in {path}")


def _sock(lb) -> str:
    return str(lb.dir / "control.sock")


def test_json_records_say_who_where_how_much_and_why(fastlb, backends, tmp_path):
    log = tmp_path / "access.log"
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), 1)], global_={"access_log": str(log)})
    names = [greet(lb.addr) for _ in range(3)]
    assert names == ["a", "a", "a"]
    recs = _records(log, 3)
    for r in recs:
        assert r["termination"] == "client_close"
        assert (r["listener"], r["route"], r["pool"], r["backend"]) == ("web", "default", "web", "a")
        assert r["bytes_out"] == 2 and r["bytes_in"] == 0 and r["retries"] == 0
        assert (
            r["client"].startswith("127.0.0.1:")
            and r["connect_ms"] > 0
            and r["duration_ms"] >= r["connect_ms"]
        )
        assert r["time"].endswith("Z")

    # the client resets
    s = connect(lb.addr)
    assert recv_exact(s, 2) == b"a\n"
    s.sendall(b"hello")
    wait_until(
        lambda: backends_of(ControlClient(_sock(lb)).status())["a"]["bytes_in"] >= 5, 5, "5 bytes forwarded"
    )
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    port = s.getsockname()[1]
    s.close()
    r = _records(log, 4)[3]
    assert r["termination"] == "client_reset" and r["bytes_in"] == 5 and r["client"] == f"127.0.0.1:{port}"

    # no usable backend
    assert cli("set-weight", "--socket", _sock(lb), "web", "a", "0").returncode == 0
    s = connect(lb.addr)
    assert s.recv(10) == b""
    s.close()
    r = _records(log, 5)[4]
    assert r["termination"] == "no_backend" and r["backend"] is None and r["connect_ms"] is None


def test_backend_close_idle_timeout_and_connect_failure_in_text(fastlb, backends, tmp_path):
    log = tmp_path / "access.log"
    b = backends(server("x", "blast", send_bytes=10000, seed=1), server("i", "id"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connect refused
    lb = fastlb(
        [("x", b.address("x"), 1), ("i", b.address("i"), 0), ("d", dead, 0)],
        global_={"access_log": str(log), "access_log_format": "text"},
        listener={"idle_timeout": "300ms"},
        pool={"retries": 0},
    )
    s = connect(lb.addr)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    assert len(got) == 10000

    def line(n: int) -> list[str]:
        return wait_until(
            lambda: (lambda ls: ls if len(ls) >= n else None)(
                log.read_text().splitlines() if log.exists() else []
            ),
            10,
            f"{n} lines",
        )

    first = line(1)[0].split()
    assert first[2:4] == ["web/default", "web/x"] and "out=10000" in first and first[-1] == "backend_close"

    c = ControlClient(_sock(lb))
    c.set_weight("web", "x", 0)
    c.set_weight("web", "i", 1)
    s = connect(lb.addr)
    assert recv_exact(s, 2) == b"i\n"
    assert s.recv(10) == b""  # idle for 300 ms: fastlb closes
    s.close()
    assert line(2)[1].split()[-1] == "idle_timeout"

    c.set_weight("web", "i", 0)
    c.set_weight("web", "d", 1)
    s = connect(lb.addr)
    assert s.recv(10) == b""
    s.close()
    third = line(3)[2].split()
    assert (
        third[-1] == "connect_failed"
        and third[3] == "web/-"
        and third[2] == "web/default"
        and "connect=-" in third
    )


def test_sigusr1_reopens_and_a_full_ring_drops_and_counts(fastlb, backends, tmp_path):
    log = tmp_path / "access.log"
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), 1)], global_={"access_log": str(log), "access_log_buffer": 64})
    greet(lb.addr)
    _records(log, 1)
    os.rename(log, tmp_path / "access.log.1")  # logrotate moves the file ...
    lb.signal(signal.SIGUSR1)  # ... and tells fastlb
    greet(lb.addr)
    assert _records(log, 1)[0]["termination"] == "client_close"
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1

    # the control process stops draining: workers keep forwarding, the ring fills, records drop
    os.kill(lb.pid, signal.SIGSTOP)
    try:
        assert [greet(lb.addr) for _ in range(200)] == ["a"] * 200
    finally:
        os.kill(lb.pid, signal.SIGCONT)
    st = wait_until(
        lambda: (s := ControlClient(_sock(lb)).status())["access_log"]["written"] >= 66 and s, 10, "drained"
    )
    assert st["access_log"]["dropped"] == 200 - 64
    assert sum(w["log_dropped"] for w in st["workers"]) == 136
    assert len(log.read_text().splitlines()) == 1 + 64


def test_udp_flows_are_logged_when_forgotten(fastlb, udp_servers, tmp_path):
    """A record per UDP flow when it is forgotten: answered (udp_responses), idle (udp_idle_timeout),
    unreachable (the backend's port answers ICMP port unreachable)."""
    log = tmp_path / "access.log"
    srv = udp_servers(udp_server("a", "echo"))
    idle_port, dead_port = free_udp_port(), free_udp_port()
    extra = (
        f'[listeners.idle]\nbind = "127.0.0.1:{idle_port}"\nprotocol = "udp"\npool = "web"\n'
        'udp_responses = 0\nudp_idle_timeout = "300ms"\n\n'
        f'[listeners.dead]\nbind = "127.0.0.1:{dead_port}"\nprotocol = "udp"\npool = "dead"\n\n'
        f'[pools.dead]\nbackends = [{{ name = "gone", address = "127.0.0.1:{free_udp_port()}" }}]\n'
    )
    lb = fastlb(
        [("a", srv.address("a"), None)],
        listener={"protocol": "udp", "udp_responses": 1},
        global_={"access_log": str(log)},
        extra=extra,
    )
    c = udp_client(lb.addr)
    c.send(b"query")
    assert c.recv(100) == b"query"
    (r,) = _records(log, 1)
    assert (r["listener"], r["pool"], r["backend"], r["termination"]) == ("web", "web", "a", "responses")
    assert (r["bytes_in"], r["bytes_out"], r["connect_ms"], r["retries"]) == (5, 5, None, 0)
    assert r["client"] == f"127.0.0.1:{c.getsockname()[1]}"

    i = udp_client(("127.0.0.1", idle_port))
    for payload in (b"one", b"two!"):
        i.send(payload)
        assert i.recv(100) == payload
    r = _records(log, 2)[1]
    assert (r["listener"], r["termination"], r["bytes_in"], r["bytes_out"]) == ("idle", "idle_timeout", 7, 7)
    assert r["duration_ms"] >= 300

    d = udp_client(("127.0.0.1", dead_port))
    d.send(b"x")
    r = _records(log, 3)[2]
    assert (r["listener"], r["backend"], r["termination"]) == ("dead", "gone", "backend_unreachable"), r
    assert (r["bytes_in"], r["bytes_out"]) == (1, 0)
