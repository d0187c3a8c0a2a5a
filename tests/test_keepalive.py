"""TCP keepalive and user timeout on both sides (issue 21, item 2): a peer that vanishes without a FIN
is noticed by the kernel (keepalive probes unanswered, or data unacknowledged past tcp_user_timeout)
and the other side is reset within idle + interval x count.

fastlb, its backends and the clients run in a network namespace of the test's own; an nftables rule
there drops every packet of one address (tests/support/netns.py Netns.drop): the peer is gone as if
its cable was pulled.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from fastlb.control import ControlClient
from support.backends import server
from support.clients import cli
from support.helpers import recv_exact, wait_closed, wait_until

FAST = {"idle": "1s", "interval": "1s", "count": 2}  # reset 1 + 1 x 2 = 3 s after the last traffic
BOUND = 1 + 1 * 2
SLACK = 1.5  # timer granularity of the kernel and of the test's own wait


def _status(lb) -> dict:
    return ControlClient(str(lb.dir / "control.sock")).status()


def _ns_client(ns, lb, source: str | None = None) -> socket.socket:
    c = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(5)
    if source is not None:
        c.bind((source, 0))
    c.connect(lb.addr)
    return c


def _config_error(path, *words: str) -> None:
    """check-config refuses the file with one line naming the file, the key and the problem (exit 2)."""
    r = cli("check-config", str(path))
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    for w in (str(path), *words):
        assert w in lines[0], (w, lines[0])


def _access_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_backend_keepalive_resets_the_client_of_a_vanished_backend(netns, fastlb, backends, tmp_path):
    """An echo backend on 127.0.0.2 answers, then its packets are dropped: with backend_keepalive
    1s/1s/2 the client gets a reset 3 s after the last traffic (without keepalive it would wait for
    idle_timeout, 5 minutes); the worker counts a lost backend, the access log says backend_lost."""
    ns = netns()
    srv = backends(server("a", "echo", host="127.0.0.2"), prefix=ns.prefix)
    log = tmp_path / "access.log"
    lb = fastlb(
        [("a", srv.address("a"), None)],
        prefix=ns.prefix,
        pool={"backend_keepalive": FAST},
        global_={"access_log": str(log)},
    )
    st = _status(lb)
    assert st["pools"][0]["backend_keepalive"] == {"idle_s": 1, "interval_s": 1, "count": 2}
    assert st["pools"][0]["tcp_user_timeout_ms"] == 0
    assert st["listeners"][0]["client_keepalive"] is None
    c = _ns_client(ns, lb)
    c.sendall(b"hello")
    assert recv_exact(c, 5) == b"hello"
    last = time.monotonic()
    ns.drop("127.0.0.2")
    how, _ = wait_closed(c, BOUND + 10)
    took = time.monotonic() - last
    assert how == "reset"
    assert BOUND - 0.5 <= took <= BOUND + SLACK, took
    st = wait_until(lambda: (s := _status(lb))["workers"][0]["backends_lost"] == 1 and s, 5, "counted")
    assert st["workers"][0]["clients_lost"] == 0
    assert st["workers"][0]["sockopt_errors"] == 0
    recs = wait_until(lambda: _access_log(log) or None, 5, "access log line")
    assert [r["termination"] for r in recs] == ["backend_lost"]


def test_client_keepalive_resets_the_backend_of_a_vanished_client(netns, fastlb, backends):
    """A client on 127.0.0.3 sends, then vanishes: with client_keepalive 1s/1s/2 the backend (a
    `hold` server, which reports the reset it gets) is reset within idle + interval x count."""
    ns = netns()
    srv = backends(server("h", "hold", host="127.0.0.2"), prefix=ns.prefix)
    lb = fastlb([("h", srv.address("h"), None)], prefix=ns.prefix, listener={"client_keepalive": FAST})
    assert _status(lb)["listeners"][0]["client_keepalive"] == {"idle_s": 1, "interval_s": 1, "count": 2}
    c = _ns_client(ns, lb, source="127.0.0.3")
    c.sendall(b"x" * 10)
    wait_until(lambda: _status(lb)["pools"][0]["backends"][0]["bytes_in"] == 10, 5, "bytes forwarded")
    last = time.monotonic()
    ns.drop("127.0.0.3")
    events = srv.wait_events(1, BOUND + 10)
    took = time.monotonic() - last
    assert [(e["name"], e["recv_len"], e["end"]) for e in events] == [("h", 10, "reset")]
    assert took <= BOUND + SLACK, took
    st = _status(lb)
    assert (st["workers"][0]["clients_lost"], st["workers"][0]["backends_lost"]) == (1, 0)
    c.close()


def test_backend_tcp_user_timeout_resets_when_data_goes_unacknowledged(netns, fastlb, backends):
    """No keepalive, tcp_user_timeout = 1s on the pool: bytes the client sends after the backend
    vanished stay unacknowledged, and 1 s later (plus one retransmission timeout) the client is reset."""
    ns = netns()
    srv = backends(server("a", "echo", host="127.0.0.2"), prefix=ns.prefix)
    lb = fastlb([("a", srv.address("a"), None)], prefix=ns.prefix, pool={"tcp_user_timeout": "1s"})
    assert _status(lb)["pools"][0]["tcp_user_timeout_ms"] == 1000
    c = _ns_client(ns, lb)
    c.sendall(b"hello")
    assert recv_exact(c, 5) == b"hello"
    ns.drop("127.0.0.2")
    c.sendall(b"lost")
    sent = time.monotonic()
    how, _ = wait_closed(c, 10)
    assert how == "reset"
    assert time.monotonic() - sent <= 1 + SLACK
    assert wait_until(lambda: _status(lb)["workers"][0]["backends_lost"] == 1, 5, "counted")


@pytest.mark.parametrize(
    ("table", "key", "value", "words"),
    [
        ("listeners.web", "client_keepalive", {"idle": "1.5s"}, ["client_keepalive.idle", "whole number"]),
        ("listeners.web", "client_keepalive", {"count": 0}, ["client_keepalive.count"]),
        ("listeners.web", "client_keepalive", {"idel": "1s"}, ["client_keepalive", "idel"]),
        ("listeners.web", "client_keepalive", "60s", ["client_keepalive", "expected a table"]),
        ("listeners.web", "tcp_user_timeout", "25h", ["tcp_user_timeout", "1 day"]),
        ("pools.web", "backend_keepalive", {"interval": "40000s"}, ["backend_keepalive.interval", "32767"]),
        ("pools.web", "tcp_user_timeout", "x", ["pools.web.tcp_user_timeout"]),
    ],
)
def test_keepalive_config_errors_are_one_line(tmp_path, table, key, value, words):
    from support.fastlb import toml_value

    path = tmp_path / "bad.toml"
    listener = {"bind": "127.0.0.1:8080", "pool": "web"}
    pool = {"backends": [{"name": "a", "address": "127.0.0.1:9000"}]}
    (listener if table.startswith("listeners") else pool)[key] = value
    text = "[listeners.web]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in listener.items())
    text += "[pools.web]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in pool.items())
    path.write_text(text)
    _config_error(path, *words)


def test_keepalive_on_a_udp_listener_is_refused(tmp_path):
    path = tmp_path / "udp.toml"
    path.write_text(
        '[listeners.dns]\nbind = "127.0.0.1:5353"\nprotocol = "udp"\npool = "dns"\n'
        'client_keepalive = { idle = "10s" }\n'
        '[pools.dns]\nbackends = [{ name = "a", address = "127.0.0.1:53" }]\n'
    )
    _config_error(path, "listeners.dns.client_keepalive", 'protocol = "tcp"')
