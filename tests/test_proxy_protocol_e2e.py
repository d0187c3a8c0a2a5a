"""PROXY protocol end to end, with real peers: HAProxy in front of fastlb (send-proxy, send-proxy-v2),
fastlb in front of nginx (`listen ... proxy_protocol`, logging $proxy_protocol_addr) and HAProxy
(`accept-proxy`); untrusted senders, garbage, truncated, oversized and late headers."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time

import pytest

from fastlb import _prelude as P
from support.backends import server
from support.helpers import free_port, wait_until
from support.preludes import RecordingServer, haproxy, nginx
from support.protocols import control, states

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def preludes(lb) -> dict:
    return control(lb).status()["listeners"][0]["preludes"]


def wait_counter(lb, key: str, n: int, timeout: float = 10.0) -> dict:
    return wait_until(lambda: (lambda p: p if p[key] >= n else None)(preludes(lb)), timeout, f"{key} >= {n}")


def exchange(
    addr: tuple[str, int], payload: bytes, source: str | None = None, timeout: float = 10.0
) -> bytes:
    """Send payload (then FIN), read to EOF; ConnectionResetError propagates."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect(addr)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:  # reset before we were done sending (ENOTCONN, EPIPE, ECONNRESET)
            raise ConnectionResetError(str(exc)) from exc
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                return out
            out += d


@pytest.fixture
def rec():
    servers: list[RecordingServer] = []

    def make(host: str = "127.0.0.1") -> RecordingServer:
        servers.append(RecordingServer(host))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def peers():
    started = []
    yield started
    for p in started:
        p.stop()


def lb_proxy(fastlb, backend: str, accept: str = "any", trusted=("127.0.0.0/8", "::1/128"), send="off", **kw):
    listener = {"proxy_protocol": accept, "proxy_protocol_from": list(trusted), "sni_timeout": "1s"}
    listener.update(kw.pop("listener", {}))
    return fastlb([("a", backend, None)], listener=listener, pool={"send_proxy": send}, **kw)


# ---------------------------------------------------------------------------------------------------
# accept


@pytest.mark.parametrize("version", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_the_backend_sees_the_real_client(fastlb, rec, peers, tmp_path, version) -> None:
    """client (127.0.0.7) -> HAProxy send-proxy[-v2] -> fastlb (accepts, re-announces v1) -> backend."""
    be = rec()
    lb = lb_proxy(fastlb, be.address, send="v1")
    hport = free_port()
    peers.append(
        haproxy(
            tmp_path / "haproxy",
            f"listen front\n    bind 127.0.0.1:{hport}\n    server lb 127.0.0.1:{lb.port} {version}\n",
            [("127.0.0.1", hport)],
        )
    )
    out = exchange(("127.0.0.1", hport), b"hello through two proxies", source="127.0.0.7")
    line, _, rest = out.partition(b"\r\n")
    assert rest == b"hello through two proxies"
    f = line.split()
    assert f[:3] == [b"PROXY", b"TCP4", b"127.0.0.7"] and f[3] == b"127.0.0.1" and int(f[5]) == hport
    p = wait_counter(lb, "proxy_accepted", 1)
    assert p["proxy_errors"] == 0 and p["proxy_refused"] == 0


def test_haproxy_over_ipv6_v2(fastlb, rec, peers, tmp_path) -> None:
    be = rec("::1")
    lb = lb_proxy(fastlb, be.address, accept="v2", send="v2", host="::1")
    hport = free_port("::1")
    peers.append(
        haproxy(
            tmp_path / "haproxy",
            f"listen front\n    bind [::1]:{hport}\n    server lb [::1]:{lb.port} send-proxy-v2\n",
            [("::1", hport)],
        )
    )
    out = exchange(("::1", hport), b"six")
    rc, info = P.parse_proxy(out)
    assert rc > 0 and info["version"] == 2 and out[rc:] == b"six"
    assert info["src"][0] == "::1" and info["dst"] == ("::1", hport)


def test_untrusted_sender_is_refused(fastlb, rec) -> None:
    be = rec()
    lb = lb_proxy(fastlb, be.address, trusted=("10.0.0.0/8",))
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        exchange(lb.addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nx")
    p = wait_counter(lb, "proxy_refused", 1)
    assert p["proxy_accepted"] == 0 and be.received == []


BAD_HEADERS = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "malformed": b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
    "truncated": b"PROXY TCP4 1.2.3.4 5.6",
    "oversized": b"PROXY UNKNOWN " + b"x" * 200,
    "v2_truncated": V2_SIG + b"\x21\x11\x00\x0c\x01\x02",
    "v2_bad_tlv": V2_SIG + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x01\x00\x09x",
}


def test_bad_headers_reset_only_their_own_connection(fastlb, rec) -> None:
    be = rec()
    lb = lb_proxy(fastlb, be.address)
    # one good connection stays open across all the bad ones
    good = socket.create_connection(lb.addr, timeout=10)
    good.sendall(b"PROXY TCP4 192.0.2.9 192.0.2.1 4000 80\r\nfirst")
    assert good.recv(100) == b"first"
    for name, data in BAD_HEADERS.items():
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            exchange(lb.addr, data)
        del name
    p = wait_counter(lb, "proxy_errors", len(BAD_HEADERS))
    assert p["proxy_accepted"] == 1
    good.sendall(b"second")
    assert good.recv(100) == b"second"
    good.close()
    assert be.wait(1) == [b"firstsecond"]  # no bad connection ever reached the backend


def test_version_mismatch_is_an_error(fastlb, rec) -> None:
    be = rec()
    lb = lb_proxy(fastlb, be.address, accept="v1")
    v2 = P.write_proxy(2, ("10.0.0.1", 1), ("10.0.0.2", 2))
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        exchange(lb.addr, v2 + b"x")
    assert wait_counter(lb, "proxy_errors", 1)["proxy_accepted"] == 0
    assert exchange(lb.addr, P.write_proxy(1, ("10.0.0.1", 1), ("10.0.0.2", 2)) + b"ok") == b"ok"


def test_header_in_one_byte_segments_and_local(fastlb, rec) -> None:
    be = rec()
    lb = lb_proxy(fastlb, be.address, send="v2")
    hdr = P.write_proxy(1, ("198.51.100.4", 777), ("198.51.100.1", 443))
    with socket.create_connection(lb.addr, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in hdr:
            s.send(bytes([b]))
            time.sleep(0.002)
        s.sendall(b"tail")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while d := s.recv(4096):
            out += d
    rc, info = P.parse_proxy(out)
    assert (
        info["src"] == ("198.51.100.4", 777) and info["dst"] == ("198.51.100.1", 443) and out[rc:] == b"tail"
    )
    # v2 LOCAL (a health check of the sender): the real endpoints are used
    out = exchange(lb.addr, P.write_proxy(2) + b"local", source="127.0.0.9")
    rc, info = P.parse_proxy(out)
    assert info["src"][0] == "127.0.0.9" and out[rc:] == b"local"


def test_missing_header_times_out(fastlb, rec) -> None:
    be = rec()
    lb = lb_proxy(fastlb, be.address, listener={"sni_timeout": "300ms"})
    t0 = time.monotonic()
    with socket.create_connection(lb.addr, timeout=10) as s:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            if s.recv(10) == b"":
                raise ConnectionResetError  # a FIN would do too, but fastlb resets
    assert time.monotonic() - t0 >= 0.25
    p = wait_counter(lb, "prelude_timeouts", 1)
    assert p["proxy_errors"] == 1 and be.received == []


def test_v2_with_tlvs_from_a_raw_sender(fastlb, rec) -> None:
    be = rec()
    lb = lb_proxy(fastlb, be.address, send="v1")
    body = socket.inet_aton("203.0.113.50") + socket.inet_aton("203.0.113.1") + struct.pack("!HH", 5, 6)
    body += b"\x01\x00\x02h2" + b"\xea\x00\x08vpce-123"
    hdr = V2_SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body
    out = exchange(lb.addr, hdr + b"data")
    assert out == b"PROXY TCP4 203.0.113.50 203.0.113.1 5 6\r\ndata"


# ---------------------------------------------------------------------------------------------------
# send


NGINX_SITE = """
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        listen [::1]:{port} proxy_protocol;
        access_log {log} pp;
        location / {{ return 200 "ok $proxy_protocol_addr\\n"; }}
    }}
"""


@pytest.mark.parametrize("send", ["v1", "v2"])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_nginx_behind_fastlb_logs_the_client(fastlb, peers, tmp_path, send, family) -> None:
    host = "127.0.0.1" if family == "ipv4" else "::1"
    nport = free_port()
    log = tmp_path / "nginx" / "access.log"
    peers.append(nginx(tmp_path / "nginx", NGINX_SITE.format(port=nport, log=log), [("127.0.0.1", nport)]))
    baddr = f"127.0.0.1:{nport}" if family == "ipv4" else f"[::1]:{nport}"
    lb = fastlb([("n", baddr, None)], pool={"send_proxy": send}, host=host)
    source = "127.0.0.23" if family == "ipv4" else "::1"
    url_host = lb.host if family == "ipv4" else f"[{lb.host}]"
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--interface", source, f"http://{url_host}:{lb.port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {source}"
    lines = wait_until(lambda: log.exists() and log.read_text().splitlines(), 10, "nginx access log line")
    addr, port, remote = lines[-1].split()
    assert addr == source and int(port) > 0
    assert remote == ("127.0.0.1" if family == "ipv4" else "::1")  # nginx's peer is fastlb


@pytest.mark.parametrize("send", ["v1", "v2"])
def test_haproxy_accept_proxy_behind_fastlb(fastlb, peers, tmp_path, send) -> None:
    hport = free_port()
    peers.append(
        haproxy(
            tmp_path / "haproxy",
            f"frontend web\n    mode http\n    bind 127.0.0.1:{hport} accept-proxy\n"
            f"    bind [::1]:{hport} accept-proxy\n"
            '    http-request return status 200 content-type text/plain lf-string "%ci %cp\\n"\n',
            [("127.0.0.1", hport)],
        )
    )
    for host, source in (("127.0.0.1", "127.0.0.44"), ("::1", "::1")):
        baddr = f"127.0.0.1:{hport}" if host == "127.0.0.1" else f"[::1]:{hport}"
        lb = fastlb([("h", baddr, None)], pool={"send_proxy": send}, host=host)
        url_host = host if ":" not in host else f"[{host}]"
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--interface", source, f"http://{url_host}:{lb.port}/"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        ip, port = r.stdout.split()
        assert ip == source and int(port) > 0
        lb.stop()


@pytest.mark.parametrize("send", ["v1", "v2"])
def test_health_checks_send_proxy_only_when_configured(fastlb, peers, tmp_path, send) -> None:
    """nginx expects PROXY on every connection: an http check that does not send it fails, one with
    health_check.send_proxy = true passes; traffic gets the header either way."""
    nport = free_port()
    log = tmp_path / "nginx" / "access.log"
    peers.append(nginx(tmp_path / "nginx", NGINX_SITE.format(port=nport, log=log), [("127.0.0.1", nport)]))
    check = {"type": "http", "interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 1}
    plain = fastlb([("n", f"127.0.0.1:{nport}", None)], pool={"send_proxy": send, "health_check": check})
    wait_until(lambda: states(plain) == {"n": "down"}, 15, "the check without PROXY fails against nginx")
    with_pp = fastlb(
        [("n", f"127.0.0.1:{nport}", None)],
        pool={"send_proxy": send, "health_check": {**check, "send_proxy": True}},
    )
    # the checks with a header reach nginx as requests (its access log has them); it stays up
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, 15, "3 checks in nginx's log")
    assert states(with_pp) == {"n": "up"}
    # v1 announces the check's own endpoints, v2 sends LOCAL (nginx then has no PROXY address)
    first = log.read_text().splitlines()[0].split()
    assert first[0] == ("127.0.0.1" if send == "v1" else "-"), first
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{with_pp.port}/"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.stdout.strip() == "ok 127.0.0.1", r.stderr


def test_source_routes_use_the_proxy_address(fastlb, backends, peers, tmp_path) -> None:
    """HAProxy (send-proxy) in front: fastlb routes on the client address in the header, not on
    HAProxy's; a raw v2 header with a 10.20/16 source goes the same way."""
    b = backends(server("v1a", "id"), server("v2a", "id"))
    lb = fastlb(
        [("v1a", b.address("v1a"), None)],
        listener={"pool": None, "proxy_protocol": "any", "proxy_protocol_from": ["127.0.0.0/8"]},
        extra=(
            f'[pools.v2]\nbackends = [{{ name = "v2a", address = "{b.address("v2a")}" }}]\n\n'
            '[[listeners.web.routes]]\nname = "beta"\nmatch = { source = ["10.20.0.0/16", "127.0.0.7/32"] }\n'
            'backends = [{ pool = "v2" }]\n\n[[listeners.web.routes]]\nname = "default"\nbackends = [{ pool = "web" }]\n'
        ),
    )
    hport = free_port()
    peers.append(
        haproxy(
            tmp_path / "haproxy",
            f"listen front\n    bind 127.0.0.1:{hport}\n    server lb 127.0.0.1:{lb.port} send-proxy\n",
            [("127.0.0.1", hport)],
        )
    )

    def first_line(data: bytes) -> bytes:
        return data.split(b"\n", 1)[0]

    for _ in range(3):
        assert first_line(exchange(("127.0.0.1", hport), b"x", source="127.0.0.7")) == b"v2a"
        assert first_line(exchange(("127.0.0.1", hport), b"x", source="127.0.0.8")) == b"v1a"
    v2 = P.write_proxy(2, ("10.20.3.4", 5000), ("10.0.0.1", 443))
    assert first_line(exchange(lb.addr, v2 + b"y")) == b"v2a"
    v2 = P.write_proxy(2, ("10.21.3.4", 5000), ("10.0.0.1", 443))
    assert first_line(exchange(lb.addr, v2 + b"y")) == b"v1a"


def test_access_log_shows_the_proxy_address_and_prelude_errors(fastlb, rec, tmp_path) -> None:
    be = rec()
    log = tmp_path / "access.log"
    lb = lb_proxy(fastlb, be.address, global_={"access_log": str(log)})
    assert exchange(lb.addr, P.write_proxy(2, ("203.0.113.50", 4321), ("203.0.113.1", 443)) + b"hi") == b"hi"
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        exchange(lb.addr, b"NOT A HEADER\r\n")

    def records():
        if not log.exists():
            return None
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return recs if len(recs) >= 2 else None

    recs = wait_until(records, 10, "2 access-log records")
    by_term = {r["termination"]: r for r in recs}
    assert by_term["client_close"]["client"] == "203.0.113.50:4321"
    assert by_term["prelude_error"]["client"].startswith("127.0.0.1:")


def test_maglev_hashes_the_proxy_source(fastlb, backends) -> None:
    """A hashing pool behind a PROXY listener keys on the address in the header: each announced
    client keeps its backend, and different clients spread (they all come from 127.0.0.1)."""
    b = backends(*(server(n, "id") for n in ("a", "b", "c", "d")))
    lb = fastlb(
        [(n, b.address(n), None) for n in ("a", "b", "c", "d")],
        algorithm="maglev",
        pool={"hash_key": "source_ip"},
        listener={"proxy_protocol": "v2", "proxy_protocol_from": ["127.0.0.0/8"]},
    )
    seen: dict[str, set[bytes]] = {}
    for i in range(40):
        src = f"198.51.100.{i + 1}"
        for port in (4000, 4001):
            header = P.write_proxy(2, (src, port), ("198.51.100.200", 443))
            name = exchange(lb.addr, header + b"x").split(b"\n", 1)[0]
            seen.setdefault(src, set()).add(name)
    assert all(len(names) == 1 for names in seen.values()), seen  # affinity by the announced address
    assert len({next(iter(n)) for n in seen.values()}) >= 3  # and spread over the backends


def test_v2_datagram_transport_on_a_tcp_listener_is_reset_and_counted(fastlb, rec) -> None:
    """Issue 24, item 9: a trusted sender's v2 PROXY header announcing UDP4 (0x12), UDP6 or
    UNIX_DGRAM, or an undefined family byte, is malformed on a TCP listener: reset, counted in
    proxy_errors, never forwarded; TCP4 from the same sender still passes."""
    be = rec()
    lb = lb_proxy(fastlb, be.address)
    bad = [0x12, 0x22, 0x32, 0x10, 0x01]
    for fam in bad:
        body = socket.inet_aton("10.1.2.3") + socket.inet_aton("10.9.9.9") + struct.pack("!HH", 4000, 53)
        hdr = V2_SIG + bytes([0x21, fam]) + struct.pack("!H", 216) + body + b"\x00" * (216 - 12)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            exchange(lb.addr, hdr + b"payload")
    p = wait_counter(lb, "proxy_errors", len(bad))
    assert p["proxy_accepted"] == 0 and be.received == []
    good = P.write_proxy(2, ("10.1.2.3", 4000), ("10.9.9.9", 53))
    assert exchange(lb.addr, good + b"ok") == b"ok"
    assert preludes(lb)["proxy_accepted"] == 1
