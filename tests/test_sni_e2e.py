"""TLS SNI peek end to end: real TLS clients (Python ssl, openssl s_client, curl) through fastlb to TLS
servers (Python ssl, nginx) with test-made certificates; fastlb reads the ClientHello's server name and
forwards every byte unchanged (it never terminates TLS).  ClientHello in 1-byte segments, oversized,
plain HTTP, silence (timeout), the reject policy, and PROXY + SNI behind HAProxy."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time

import pytest

from support.helpers import free_port, wait_until
from support.preludes import RecordingServer, TLSServer, haproxy, make_cert, nginx, tls_request
from support.protocols import control

DOMAIN = "example.test"


def sni_listener(**extra) -> dict:
    """A listener with an SNI route (and the default route), both to pool "web"."""
    lst = {
        "pool": None,
        "sni_timeout": "2s",
        "routes": [
            {
                "name": "admin",
                "match": {"sni": [f"admin.{DOMAIN}", f"*.ops.{DOMAIN}"]},
                "backends": [{"pool": "web"}],
            },
            {"name": "default", "backends": [{"pool": "web"}]},
        ],
    }
    lst.update(extra)
    return lst


def preludes(lb) -> dict:
    return control(lb).status()["listeners"][0]["preludes"]


def wait_counter(lb, key: str, n: int, timeout: float = 10.0) -> dict:
    return wait_until(lambda: (lambda p: p if p[key] >= n else None)(preludes(lb)), timeout, f"{key} >= {n}")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("certs"), DOMAIN)


@pytest.fixture
def tls_backend(cert):
    srv = TLSServer("tls-a", *cert)
    yield srv
    srv.close()


@pytest.fixture
def rec():
    servers: list[RecordingServer] = []

    def make() -> RecordingServer:
        servers.append(RecordingServer())
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


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_python_ssl_client_completes_through_the_peek(fastlb, tls_backend) -> None:
    lb = fastlb([("a", tls_backend.address, None)], listener=sni_listener())
    assert tls_request(lb.addr, f"admin.{DOMAIN}") == f"tls-a admin.{DOMAIN} hello\n"
    assert tls_request(lb.addr, f"Deep.Ops.{DOMAIN}", b"x\n").lower() == f"tls-a deep.ops.{DOMAIN} x\n"
    p = wait_counter(lb, "sni_found", 2)
    assert p["sni_missing"] == 0 and p["sni"] is True


def test_openssl_s_client(fastlb, tls_backend) -> None:
    lb = fastlb([("a", tls_backend.address, None)], listener=sni_listener())
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{lb.port}",
            "-servername",
            f"admin.{DOMAIN}",
            "-quiet",
        ],
        input="via-openssl\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert f"tls-a admin.{DOMAIN} via-openssl" in r.stdout, r.stderr
    assert wait_counter(lb, "sni_found", 1)["sni_missing"] == 0


def test_curl_to_nginx_https(fastlb, peers, cert, tmp_path) -> None:
    nport = free_port()
    crt, key = cert
    site = f"""
    server {{
        listen 127.0.0.1:{nport} ssl;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        location / {{ return 200 "nginx $ssl_server_name $ssl_protocol\\n"; }}
    }}
"""
    peers.append(nginx(tmp_path / "nginx", site, [("127.0.0.1", nport)]))
    lb = fastlb([("n", f"127.0.0.1:{nport}", None)], listener=sni_listener())
    name = f"admin.{DOMAIN}"
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--resolve",
            f"{name}:{lb.port}:127.0.0.1",
            f"https://{name}:{lb.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"nginx {name} TLSv1.")
    assert wait_counter(lb, "sni_found", 1)["sni_missing"] == 0


def handshake_in_one_byte_segments(addr: tuple[str, int], name: str) -> str:
    """A TLS client (ssl.MemoryBIO) whose ClientHello goes out one byte per TCP segment."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx().wrap_bio(inc, out, server_hostname=name)
    with socket.create_connection(addr, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = out.read()
        for i in range(len(hello)):
            s.send(hello[i : i + 1])
            time.sleep(0.0005)
        while True:
            data = s.recv(65536)
            assert data, "connection closed during the handshake"
            inc.write(data)
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(out.read())
        obj.write(b"split\n")
        s.sendall(out.read())
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            inc.write(data)
            try:
                answer += obj.read(65536)
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLZeroReturnError:
                break
        return answer.decode()


def test_client_hello_in_one_byte_segments(fastlb, tls_backend) -> None:
    lb = fastlb([("a", tls_backend.address, None)], listener=sni_listener())
    assert handshake_in_one_byte_segments(lb.addr, f"admin.{DOMAIN}") == f"tls-a admin.{DOMAIN} split\n"
    assert wait_counter(lb, "sni_found", 1)["sni_missing"] == 0


def padded_hello(name: str, pad: int, pad_first: bool = False) -> bytes:
    """A real ClientHello for `name` with a padding extension of `pad` bytes (before or after the
    server_name extension), as one handshake message over as many 16 KiB records as needed."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_ctx().wrap_bio(inc, out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    body = hello[5 : 5 + struct.unpack("!H", hello[3:5])[0]]
    p = 4 + 34
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p : p + 2], "big")
    p += 1 + body[p]
    exts = body[p + 2 :]
    padding = struct.pack("!HH", 21, pad) + b"\x00" * pad
    exts = padding + exts if pad_first else exts + padding
    msg_body = body[4:p] + struct.pack("!H", len(exts)) + exts
    msg = b"\x01" + len(msg_body).to_bytes(3, "big") + msg_body
    records = b""
    for i in range(0, len(msg), 16384):
        chunk = msg[i : i + 16384]
        records += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return records


def test_oversized_client_hello_is_forwarded_unchanged(fastlb, rec) -> None:
    be = rec()
    lb = fastlb([("r", be.address, None)], listener=sni_listener())
    big = padded_hello(f"admin.{DOMAIN}", 20000)  # name first: found within the first 16 KiB
    huge = padded_hello(f"admin.{DOMAIN}", 20000, pad_first=True)  # name beyond 16 KiB: too big
    assert len(big) > 16384 and len(huge) > 16384
    for data in (big, huge):
        with socket.create_connection(lb.addr, timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            echoed = b""
            while d := s.recv(65536):
                echoed += d
        assert echoed == data
    assert sorted(be.wait(2)) == sorted([big, huge])
    p = wait_counter(lb, "sni_missing", 1)
    assert p["sni_found"] == 1


def test_plain_http_goes_to_the_default_route(fastlb, rec) -> None:
    be = rec()
    lb = fastlb([("r", be.address, None)], listener=sni_listener())
    req = b"GET / HTTP/1.1\r\nHost: admin.example.test\r\n\r\n"
    with socket.create_connection(lb.addr, timeout=10) as s:
        s.sendall(req)
        assert s.recv(100) == req
    assert wait_counter(lb, "sni_missing", 1)["sni_found"] == 0


def test_reject_policy_closes_non_tls(fastlb, rec) -> None:
    be = rec()
    lb = fastlb([("r", be.address, None)], listener=sni_listener(sni_no_match="reject"))
    with socket.create_connection(lb.addr, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    p = wait_counter(lb, "sni_rejected", 1)
    assert p["sni_missing"] == 1 and be.received == []


def test_silent_client_goes_to_the_default_route_after_the_timeout(fastlb, rec) -> None:
    be = rec()
    lb = fastlb([("r", be.address, None)], listener=sni_listener(sni_timeout="300ms"))
    with socket.create_connection(lb.addr, timeout=10) as s:
        t0 = time.monotonic()
        wait_counter(lb, "prelude_timeouts", 1)
        assert time.monotonic() - t0 >= 0.25
        s.sendall(b"late bytes")
        assert s.recv(100) == b"late bytes"  # connected to the default route's backend
    assert preludes(lb)["sni_missing"] == 1


def test_proxy_then_sni_behind_haproxy(fastlb, tls_backend, peers, tmp_path) -> None:
    lb = fastlb(
        [("a", tls_backend.address, None)],
        listener=sni_listener(proxy_protocol="v2", proxy_protocol_from=["127.0.0.0/8"]),
    )
    hport = free_port()
    peers.append(
        haproxy(
            tmp_path / "haproxy",
            f"listen front\n    bind 127.0.0.1:{hport}\n    server lb 127.0.0.1:{lb.port} send-proxy-v2\n",
            [("127.0.0.1", hport)],
        )
    )
    assert tls_request(("127.0.0.1", hport), f"admin.{DOMAIN}") == f"tls-a admin.{DOMAIN} hello\n"
    p = wait_counter(lb, "sni_found", 1)
    # (our readiness probe of HAProxy may have reached fastlb too: with a header, or as an empty
    # connection HAProxy closed at once, which counts as a missing header)
    assert p["proxy_accepted"] >= 1 and p["proxy_errors"] <= 1


def test_sni_routes_land_on_the_right_pool(fastlb, cert, tmp_path) -> None:
    """Two TLS servers in two pools: the admin names (exact and `*.` wildcard, any case) go to
    pool "admin", every other name and no name to the default route; each session completes."""
    a, b = TLSServer("tls-web", *cert), TLSServer("tls-admin", *cert)
    try:
        lb = fastlb(
            [("a", a.address, None)],
            listener={"pool": None, "sni_timeout": "2s"},
            extra=(
                f'[pools.admin]\nbackends = [{{ name = "b", address = "{b.address}" }}]\n\n'
                '[[listeners.web.routes]]\nname = "admin"\n'
                f'match = {{ sni = ["admin.{DOMAIN}", "*.ops.{DOMAIN}"] }}\nbackends = [{{ pool = "admin" }}]\n\n'
                '[[listeners.web.routes]]\nname = "default"\nbackends = [{ pool = "web" }]\n'
            ),
        )
        assert tls_request(lb.addr, f"admin.{DOMAIN}").startswith("tls-admin ")
        assert tls_request(lb.addr, f"DB.Ops.{DOMAIN}").startswith("tls-admin ")
        assert tls_request(lb.addr, f"www.{DOMAIN}").startswith("tls-web ")
        assert tls_request(lb.addr, f"ops.{DOMAIN}").startswith("tls-web ")  # the wildcard needs a label
        r = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{lb.port}",
                "-servername",
                f"x.ops.{DOMAIN}",
                "-quiet",
            ],
            input="ossl\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert f"tls-admin x.ops.{DOMAIN} ossl" in r.stdout, r.stderr
        assert handshake_in_one_byte_segments(lb.addr, f"admin.{DOMAIN}").startswith("tls-admin ")
        p = wait_counter(lb, "sni_found", 6)
        assert p["sni_missing"] == 0
        st = control(lb).status()["listeners"][0]["routes"]
        assert {r["name"]: r["connections"] for r in st} == {"admin": 4, "default": 2}
    finally:
        a.close()
        b.close()
