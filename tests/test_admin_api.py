"""The remote admin API: the control socket's operations over HTTP JSON, with a bearer token (always
for a change: without one the API is read-only), TLS, and errors as JSON; `fastlb --admin URL ...`
and `fastlb fleet -f hosts ...`.  Its security limits: tests/test_admin_security.py."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time

import pytest

from support.backends import server
from support.clients import backends_of, cli, write_token_file
from support.helpers import free_port, wait_until

TOKEN = "s3cret-token-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _admin_lb(fastlb, backends, tmp_path, *, bind_host="127.0.0.1", token=True, tls=None):
    b = backends(server("a", "id"), server("b", "id"))
    port = free_port("127.0.0.1")
    g = {"admin": f"{bind_host}:{port}"}
    if token:
        g["admin_token_file"] = str(write_token_file(tmp_path / "token", TOKEN))
    if tls:
        g["admin_tls_cert"], g["admin_tls_key"] = tls
    lb = fastlb([("a", b.address("a"), 1), ("b", b.address("b"), 1)], global_=g)
    scheme = "https" if tls else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    wait_until(lambda: _reachable(port), 10, "the admin API to listen")
    return lb, url, port


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _call(port, method, path, body=None, headers=AUTH, raw: bytes | None = None, context=None):
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload) if payload.startswith(b"{") else payload


def test_operations_and_errors_on_loopback(fastlb, backends, tmp_path):
    lb, url, port = _admin_lb(fastlb, backends, tmp_path)
    status, reply = _call(port, "GET", "/v1/status")
    assert status == 200 and reply["ok"] and {p["name"] for p in reply["status"]["pools"]} == {"web"}

    status, reply = _call(port, "POST", "/v1/set-weight", {"pool": "web", "backend": "a", "weight": 0})
    assert status == 200 and reply["previous"] == 1 and reply["weight"] == 0
    status, reply = _call(port, "POST", "/v1/drain", {"pool": "web", "backend": "b"})
    assert status == 200 and reply["admin"] == "drain"
    st = _call(port, "GET", "/v1/status")[1]["status"]
    assert backends_of(st)["a"]["weight"] == 0 and backends_of(st)["b"]["admin"] == "drain"

    # validated exactly like the control socket, errors as JSON with a status
    assert _call(port, "POST", "/v1/set-weight", {"pool": "web", "backend": "a", "weight": 5000})[0] == 400
    assert _call(port, "POST", "/v1/set-weight", {"pool": "nope", "backend": "a", "weight": 1})[0] == 400
    s, r = _call(port, "POST", "/v1/frobnicate", {})
    assert s == 404 and "unknown command" in r["error"]
    s, r = _call(port, "POST", "/v1/set-weight", raw=b'{"pool": "web", "backend"')
    assert s == 400 and not r["ok"] and "JSON" in r["error"]
    s, r = _call(port, "POST", "/v1/set-weight", raw=b"[" * 60000)
    assert s == 400 and not r["ok"]
    s, r = _call(port, "POST", "/v1/status", raw=b'{"x": "' + b"y" * 200_000 + b'"}')
    assert s == 413 and not r["ok"]
    s, r = _call(port, "GET", "/nowhere")
    assert s == 404 and not r["ok"]
    s, r = _call(port, "DELETE", "/v1/status")
    assert s == 405 and not r["ok"]
    s, r = _call(port, "GET", "/metrics")
    assert s == 404 and "metrics" in r["error"]  # [global] metrics is off


def test_metrics_on_the_admin_port(fastlb, backends, tmp_path):
    b = backends(server("a", "id"))
    port = free_port("127.0.0.1")
    fastlb(
        [("a", b.address("a"), 1)],
        global_={"admin": f"127.0.0.1:{port}", "metrics": f"127.0.0.1:{free_port('127.0.0.1')}"},
    )
    wait_until(lambda: _reachable(port), 10, "the admin API to listen")
    s, body = _call(port, "GET", "/metrics", headers={})  # read-only without a token
    assert s == 200 and b"fastlb_backend_connections_total" in body


def test_slow_client_does_not_hold_up_others(fastlb, backends, tmp_path):
    lb, url, port = _admin_lb(fastlb, backends, tmp_path)
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(
        b"POST /v1/set-weight HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\n\r\n{{".encode()
    )  # and then nothing
    t0 = time.monotonic()
    assert _call(port, "GET", "/v1/status")[0] == 200
    assert time.monotonic() - t0 < 3.0
    slow.settimeout(15)
    answer = slow.recv(4096)  # the body never completes: 408 after the body timeout, not a hang
    assert b" 408 " in answer.split(b"\r\n", 1)[0]
    slow.close()


def test_token_required_off_loopback(fastlb, backends, tmp_path):
    lb, url, port = _admin_lb(fastlb, backends, tmp_path, bind_host="0.0.0.0", token=True)
    s, r = _call(port, "GET", "/v1/status", headers={})
    assert s == 401 and "token" in r["error"]
    assert (
        _call(port, "GET", "/v1/status", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})[0]
        == 401
    )
    assert _call(port, "GET", "/v1/status", headers={"Authorization": TOKEN})[0] == 401
    s, r = _call(port, "GET", "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert s == 200 and r["ok"]

    # the CLI drives it with --admin / --token-file
    tf = str(tmp_path / "token")
    r = cli("--admin", url, "--token-file", tf, "set-weight", "web", "b", "4")
    assert r.returncode == 0, r.stderr
    assert "weight 1 -> 4" in r.stdout
    r = cli("--admin", url, "--token-file", tf, "status", "--json")
    assert r.returncode == 0 and backends_of(json.loads(r.stdout))["b"]["weight"] == 4
    r = cli("--admin", url, "status")
    assert r.returncode == 1 and "token" in r.stderr and "\n" not in r.stderr.strip()


def test_config_requires_a_token_off_loopback(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[global]\nadmin = "0.0.0.0:9091"\n[listeners.l]\nbind = "127.0.0.1:1"\npool = "p"\n'
        '[pools.p]\nbackends = [{ name = "a", address = "127.0.0.1:2" }]\n'
    )
    r = cli("check-config", str(cfg))
    assert r.returncode == 2 and "global.admin_token_file" in r.stderr


def _self_signed(tmp_path):
    cert, key = tmp_path / "admin.crt", tmp_path / "admin.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def test_tls(fastlb, backends, tmp_path):
    cert, key = _self_signed(tmp_path)
    lb, url, port = _admin_lb(fastlb, backends, tmp_path, token=True, tls=(cert, key))
    ctx = ssl.create_default_context(cafile=cert)
    s, r = _call(port, "GET", "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}, context=ctx)
    assert s == 200 and r["ok"]
    with pytest.raises((ssl.SSLError, ConnectionError)):  # a client without the CA does not trust it
        _call(port, "GET", "/v1/status", context=ssl.create_default_context())
    r = cli("--admin", url.replace("https:", "http:"), "--token-file", str(tmp_path / "token"), "status")
    assert r.returncode == 1 and "looks like TLS" in r.stderr and "https://" in r.stderr, r.stderr
    r = cli("--admin", url, "--token-file", str(tmp_path / "token"), "--cafile", cert, "drain", "web", "a")
    assert r.returncode == 0 and "ready -> drain" in r.stdout, r.stderr


def test_fleet_command_reaches_every_instance(fastlb, backends, tmp_path):
    urls = []
    lbs = []
    b = backends(server("a", "id"), server("b", "id"))
    tf = str(write_token_file(tmp_path / "token", TOKEN))
    for _ in range(3):
        port = free_port("127.0.0.1")
        lb = fastlb(
            [("a", b.address("a"), 1), ("b", b.address("b"), 1)],
            global_={"admin": f"127.0.0.1:{port}", "admin_token_file": tf},
        )
        wait_until(lambda p=port: _reachable(p), 10, "the admin API to listen")
        urls.append(f"http://127.0.0.1:{port}")
        lbs.append(lb)
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# the fleet\n" + "\n".join(urls) + "\n\n")
    r = cli("fleet", "-f", str(hosts), "set-weight", "web", "a", "0")  # no token: refused everywhere
    assert r.returncode == 1 and r.stdout.count("bearer token") == 3, r.stdout + r.stderr
    r = cli("--token-file", tf, "fleet", "-f", str(hosts), "set-weight", "web", "a", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok ") == 3 and "3 of 3 instances ok" in r.stdout
    for url in urls:
        st = json.loads(cli("--admin", url, "--token-file", tf, "status", "--json").stdout)
        assert backends_of(st)["a"]["weight"] == 0
    r = cli("--token-file", tf, "fleet", "-f", str(hosts), "status")
    assert r.returncode == 0 and r.stdout.count("a=up/0") == 3

    # one instance gone: reported, exit 1, the others still changed
    lbs[1].stop()
    r = cli("--token-file", tf, "fleet", "-f", str(hosts), "drain", "web", "b")
    assert r.returncode == 1 and "FAILED" in r.stdout and "2 of 3 instances ok" in r.stdout
    r = cli("--token-file", tf, "fleet", "-f", str(hosts), "set-weight", "web", "a")
    assert r.returncode == 2
