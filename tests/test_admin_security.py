"""The admin API never gives a local user (or a web page in a browser on the host) more than the
0600 control socket gives its owner (issue 24 items 1 and 2; docs/security.md).

Attacks as the unprivileged user `nobody` (runuser + curl): writes to a token-less admin API, a
cross-site text/plain POST, a token file others can read, a gate command in a request body, and
slow clients that send half a request head and go quiet, up to the descriptor limit."""

from __future__ import annotations

import json
import resource
import socket
import time

from fastlb.control import ControlClient
from fastlb.fleet.client import AdminClient
from support.backends import server
from support.clients import backends_of, cli, curl_as, write_token_file
from support.helpers import free_port, wait_until
from support.protocols import wait_log

TOKEN = "a-token-for-the-security-tests-0123456789"
NOBODY = "nobody"
V2_AND_ROLLOUT = """
[pools.v2]
backends = [{{ name = "v2a", address = "{v2}" }}]

[[listeners.web.routes]]
name = "default"
backends = [{{ pool = "web", weight = 100 }}, {{ pool = "v2", weight = 0 }}]

[rollouts.canary]
listener = "web"
route = "default"
to = "v2"
steps = [10, 100]
interval = "1h"
check = "true"
"""


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _admin(fastlb, backends, tmp_path, *, token: bool, extra_global: dict | None = None, **kw):
    b = backends(server("a", "id"), server("v2a", "id"))
    port = free_port("127.0.0.1")
    g = {"admin": f"127.0.0.1:{port}", **(extra_global or {})}
    if token:
        g["admin_token_file"] = str(write_token_file(tmp_path / "token", TOKEN))
    lb = fastlb(
        [("a", b.address("a"), 1)],
        global_=g,
        listener={"pool": None},
        extra=V2_AND_ROLLOUT.format(v2=b.address("v2a")),
        **kw,
    )
    wait_until(lambda: _reachable(port), 10, "the admin API to listen")
    return lb, f"http://127.0.0.1:{port}", ControlClient(str(lb.dir / "control.sock"))


JSON = ("-H", "Content-Type: application/json")


def test_token_less_admin_api_is_read_only_for_a_local_user(fastlb, backends, tmp_path):
    lb, url, client = _admin(fastlb, backends, tmp_path, token=False)
    marker = tmp_path / "pwned"
    s, body = curl_as(NOBODY, f"{url}/v1/status")
    assert s == 200 and json.loads(body)["ok"]
    attacks = [
        ("set-weight", {"pool": "web", "backend": "a", "weight": 0}),
        ("drain", {"pool": "web", "backend": "a"}),
        ("set-split", {"listener": "web", "route": "default", "weights": {"web": 0, "v2": 100}}),
        ("reload", {}),
        ("rollout-start", {"listener": "web", "route": "default", "to": "v2", "check": f"id > {marker}"}),
    ]
    for cmd, body_ in attacks:
        s, body = curl_as(NOBODY, f"{url}/v1/{cmd}", *JSON, "-d", json.dumps(body_))
        assert s == 401 and "read-only" in json.loads(body)["error"], (cmd, s, body)
    st = client.status()
    assert backends_of(st)["a"]["weight"] == 1 and backends_of(st)["a"]["admin"] == "ready"
    assert client.request({"cmd": "rollout-status"})["rollouts"] == []
    assert not marker.exists()
    # the CLI reads through it without a token (status is a GET)
    r = cli("--admin", url, "status", "--json")
    assert r.returncode == 0 and backends_of(json.loads(r.stdout))["a"]["weight"] == 1, r.stderr
    assert AdminClient(url).rollout_status() == []  # a GET too
    # a page that rebinds its DNS name to 127.0.0.1 cannot read it either
    s, _ = curl_as(NOBODY, f"{url}/v1/status", "-H", "Host: evil.example:80")
    assert s == 403
    # check-config says what it is in one line
    r = cli("check-config", str(lb.config_path))
    assert r.returncode == 0 and "read-only without admin_token_file" in r.stdout, r.stdout


def test_cross_site_text_plain_post_never_changes_state(fastlb, backends, tmp_path):
    lb, url, client = _admin(fastlb, backends, tmp_path, token=True)
    weight0 = json.dumps({"pool": "web", "backend": "a", "weight": 0})
    # what a web page's fetch(url, {method: "POST", mode: "no-cors", body}) sends: no token
    browser = ("-H", "Content-Type: text/plain;charset=UTF-8", "-H", "Origin: http://evil.example")
    browser += ("-H", "Sec-Fetch-Site: cross-site", "-H", "Sec-Fetch-Mode: no-cors")
    s, body = curl_as(NOBODY, f"{url}/v1/set-weight", *browser, "-d", weight0)
    assert s == 403 and "cross-site" in json.loads(body)["error"]
    # even with the token a cross-site request is refused, and a body must be JSON-typed
    auth = ("-H", f"Authorization: Bearer {TOKEN}")
    s, _ = curl_as(
        NOBODY, f"{url}/v1/set-weight", *auth, "-H", "Origin: http://evil.example", *JSON, "-d", weight0
    )
    assert s == 403
    s, body = curl_as(NOBODY, f"{url}/v1/set-weight", *auth, "-H", "Content-Type: text/plain", "-d", weight0)
    assert s == 415 and "application/json" in json.loads(body)["error"]
    s, _ = curl_as(NOBODY, f"{url}/v1/set-weight", "-H", "Content-Type: text/plain", "-d", weight0)
    assert s == 401
    assert backends_of(client.status())["a"]["weight"] == 1
    # the operator's own request (same origin, JSON, token) goes through
    s, body = curl_as(NOBODY, f"{url}/v1/set-weight", *auth, *JSON, "-H", f"Origin: {url}", "-d", weight0)
    assert s == 200, body
    assert backends_of(client.status())["a"]["weight"] == 0


def test_token_file_others_can_read_is_refused(fastlb, backends, tmp_path):
    b = backends(server("a", "id"))
    port = free_port("127.0.0.1")
    token = write_token_file(tmp_path / "token", TOKEN, mode=0o644)
    lb = fastlb(
        [("a", b.address("a"), 1)], global_={"admin": f"127.0.0.1:{port}", "admin_token_file": str(token)}
    )
    wait_log(
        lb,
        r"admin API on 127\.0\.0\.1:\d+ not started: .*token: the token file is open to group or others",
        10,
    )
    assert not _reachable(port)
    r = cli("check-config", str(lb.config_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{token}: the token file is open to group or others (mode 0644)" in r.stderr
    # the data plane is not affected
    with socket.create_connection(lb.addr, timeout=5) as c:
        assert c.recv(64).startswith(b"a")
    # a file another user owns (even 0600) is refused too
    import pwd

    nobody = pwd.getpwnam(NOBODY)
    token.chmod(0o600)
    import os

    os.chown(token, nobody.pw_uid, nobody.pw_gid)
    r = cli("check-config", str(lb.config_path))
    assert r.returncode == 2 and f"belongs to uid {nobody.pw_uid}" in r.stderr, r.stderr
    os.chown(token, 0, 0)
    r = cli("check-config", str(lb.config_path))
    assert r.returncode == 0 and "every request needs the bearer token" in r.stdout, r.stdout


def test_no_gate_command_through_the_admin_api(fastlb, backends, tmp_path):
    lb, url, client = _admin(fastlb, backends, tmp_path, token=True)
    marker = tmp_path / "pwned"
    auth = ("-H", f"Authorization: Bearer {TOKEN}", *JSON)
    bodies = [
        json.dumps({"listener": "web", "route": "default", "to": "v2", "check": f"id > {marker}"}),
        json.dumps({"rollout": "canary", "check": f"id > {marker}"}),  # overriding a table's check
        '{"listener": "web", "route": "default", "to": "v2", "\\u0063heck": "id > ' + str(marker) + '"}',
        '{"check": "true", "listener": "web", "route": "default", "to": "v2", "check": "id > '
        + str(marker)
        + '"}',
    ]
    for body_ in bodies:
        s, body = curl_as(NOBODY, f"{url}/v1/rollout-start", *auth, "-d", body_)
        assert s == 400, (s, body)
        assert "not accepted through the admin API" in json.loads(body)["error"]
    assert client.request({"cmd": "rollout-status"})["rollouts"] == []
    # a named [rollouts.NAME] table (its check comes from the config file) still starts remotely
    s, body = curl_as(NOBODY, f"{url}/v1/rollout-start", *auth, "-d", json.dumps({"rollout": "canary"}))
    assert s == 200, body
    assert json.loads(body)["rollout"]["name"] == "canary"
    assert not marker.exists()  # the check that runs is the table's ("true")


def _half_sent(port: int, n: int) -> list[socket.socket]:
    """n connections that each send half a request head and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    deadline = time.monotonic() + 10
    pending = list(socks)
    while pending and time.monotonic() < deadline:
        rest = []
        for s in pending:
            try:
                s.send(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            except BlockingIOError:
                rest.append(s)
            except OSError:
                pass  # refused or closed at once: counted as closed below
        pending = rest
    return socks


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _status_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return c.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _metrics_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return c.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _raise_own_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def test_slow_clients_at_the_descriptor_limit_pin_nothing(fastlb, backends, tmp_path):
    """RLIMIT_NOFILE 2,500 for fastlb and 3,000 connections to its admin API that send half a
    request head: at most admin_max_connections are held (the rest are closed at once), the
    control socket and /metrics answer throughout, the half-open ones are closed after
    admin_header_timeout, and /v1/status answers again."""
    _raise_own_nofile(8000)
    mport = free_port("127.0.0.1")
    lb, url, client = _admin(
        fastlb,
        backends,
        tmp_path,
        token=False,
        extra_global={"admin_header_timeout": "2s", "metrics": f"127.0.0.1:{mport}"},
        nofile=2500,
    )
    port = int(url.rsplit(":", 1)[1])
    t0 = time.monotonic()
    socks = _half_sent(port, 3000)
    try:
        wait_until(
            lambda: sum(_closed(s) for s in socks) >= 3000 - 256, 10, "the excess to be closed at once"
        )
        assert client.status()["pid"] == lb.pid  # the control socket answers
        assert _metrics_ok(mport)
        held = [s for s in socks if not _closed(s)]
        assert 0 < len(held) <= 256
        wait_until(lambda: all(_closed(s) for s in held), 10, "the half-open connections to be closed")
        assert time.monotonic() - t0 >= 1.9  # by the header timeout (2s after their accept), not at once
        assert _status_ok(port)
        assert "Traceback" not in lb.log_text()
    finally:
        for s in socks:
            s.close()


def test_accept_at_emfile_backs_off_and_logs_once(fastlb, backends, tmp_path):
    """With the cap above the descriptor limit accept() fails with EMFILE: one line, no traceback,
    and the API recovers once the header timeout closed the half-open connections."""
    _raise_own_nofile(4000)
    lb, url, client = _admin(
        fastlb,
        backends,
        tmp_path,
        token=False,
        extra_global={"admin_header_timeout": "2s", "admin_max_connections": 5000},
        nofile=400,
    )
    port = int(url.rsplit(":", 1)[1])
    socks = _half_sent(port, 1500)
    try:
        wait_log(lb, r"admin API: cannot accept: Too many open files", 10)
        time.sleep(1.5)  # accept keeps failing meanwhile: still one line
        wait_until(lambda: _status_ok(port), 15, "the admin API to answer again")
        log = lb.log_text()
        assert log.count("admin API: cannot accept") == 1, log[-3000:]
        assert "Traceback" not in log and "socket.accept() out of system resource" not in log
    finally:
        for s in socks:
            s.close()
    assert client.status()["pid"] == lb.pid


def test_idle_and_half_sent_kept_alive_connections_are_closed(fastlb, backends, tmp_path):
    """admin_keepalive_timeout closes an idle kept-alive connection, and one that sent half of its
    second request head; admin_header_timeout one that never completed its first."""
    lb, url, client = _admin(
        fastlb,
        backends,
        tmp_path,
        token=False,
        extra_global={"admin_header_timeout": "1s", "admin_keepalive_timeout": "1s"},
    )
    port = int(url.rsplit(":", 1)[1])
    request = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    idle, half, never = (socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3))
    try:
        for c in (idle, half):
            c.sendall(request)
            assert c.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive (HTTP/1.1 default)
        half.sendall(b"GET /v1/status HTTP/1.1\r\nHost: 12")
        never.sendall(b"GET /v1/status HTTP/1.1\r\n")
        t0 = time.monotonic()
        for c in (idle, half, never):
            c.settimeout(10)
            while c.recv(65536):  # the rest of a response, then EOF
                pass
        assert 0.5 < time.monotonic() - t0 < 5.0
    finally:
        for c in (idle, half, never):
            c.close()
    assert _status_ok(port)


def test_metrics_listener_caps_its_connections(fastlb, backends, tmp_path):
    """/metrics on its own address: 300 half-sent scrapes, 256 held at most (the rest closed at
    once) and closed after 10 s; the control socket answers throughout."""
    b = backends(server("a", "id"))
    mport = free_port("127.0.0.1")
    lb = fastlb([("a", b.address("a"), 1)], global_={"metrics": f"127.0.0.1:{mport}"})
    wait_until(lambda: _metrics_ok(mport), 10, "/metrics to answer")
    socks = _half_sent(mport, 300)
    try:
        wait_until(lambda: sum(_closed(s) for s in socks) >= 300 - 256, 10, "the excess to be closed at once")
        held = [s for s in socks if not _closed(s)]
        assert 0 < len(held) <= 256
        assert ControlClient(str(lb.dir / "control.sock")).status()["pid"] == lb.pid
        wait_until(lambda: all(_closed(s) for s in held), 15, "the half-open scrapes to be closed")
        assert _metrics_ok(mport)
    finally:
        for s in socks:
            s.close()


def test_tls_handshake_that_stalls_is_closed_after_the_header_timeout(fastlb, backends, tmp_path):
    """Over TLS the header timeout covers the handshake: half a ClientHello, then nothing."""
    from support.preludes import make_cert

    cert, key = make_cert(tmp_path, "localhost")
    lb, url, client = _admin(
        fastlb,
        backends,
        tmp_path,
        token=True,
        extra_global={"admin_header_timeout": "1s", "admin_tls_cert": str(cert), "admin_tls_key": str(key)},
    )
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
        t0 = time.monotonic()
        assert c.recv(4096) == b""
        assert 0.5 < time.monotonic() - t0 < 5.0
    r = cli(
        "--admin",
        url.replace("http://127.0.0.1", "https://localhost"),
        "--cafile",
        str(cert),
        "--token-file",
        str(tmp_path / "token"),
        "status",
    )
    assert r.returncode == 0, r.stderr
