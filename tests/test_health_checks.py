"""Active health checks against real servers on 127.0.0.1 / ::1 (threads in this process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import fastlb.runtime.health as health
from fastlb.runtime.health import CheckResult, CheckTarget, HealthChecker, check_once, update_state


@dataclass(frozen=True)
class HC:
    """Stand-in for fastlb.config.HealthCheckConfig (same fields), so these tests do not
    depend on the config module."""

    type: str = "tcp"
    interval: float = 0.05
    timeout: float = 0.5
    rise: int = 2
    fall: int = 3
    port: int | None = None
    address: str | None = None
    send: bytes = b""
    expect: bytes = b""
    path: str = "/"
    host: str | None = None
    expect_status: tuple[int, int] = (200, 399)
    expect_body: str | None = None


# --------------------------------------------------------------------------- helpers


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(coro: Coroutine[Any, Any, Any], limit: float = 20.0) -> Any:
    """Run a test coroutine with a hard time limit."""

    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def wait_until_sync(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


Handler = Callable[[socket.socket], None]


def accept_close(conn: socket.socket) -> None:
    conn.close()


def read_line(conn: socket.socket, limit: int = 65536) -> bytes:
    """Read until a newline, EOF, timeout or ``limit`` bytes."""
    buf = b""
    with contextlib.suppress(OSError):
        while b"\n" not in buf and len(buf) < limit:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf


def replier(reply: bytes) -> Handler:
    """Read one line, answer ``reply``, close."""

    def handle(conn: socket.socket) -> None:
        read_line(conn)
        with contextlib.suppress(OSError):
            conn.sendall(reply)
        conn.close()

    return handle


class Server:
    """A TCP server in one thread: accepts on host:port (0 = any free port) and runs
    ``handler(conn)`` on each connection (conn has a 1 s timeout; handler closes it)."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop_r, self._stop_w = socket.socketpair()
        # Every fd exists before __init__ returns, so fd counts taken after it are stable.
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._sel.register(self._stop_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self._sel as sel:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._stop_r:
                        return
                    for _ in range(64):  # bounded burst per wakeup
                        try:
                            conn, _addr = self.sock.accept()
                        except (BlockingIOError, ConnectionAbortedError):
                            break
                        self.accepted += 1
                        conn.settimeout(1.0)
                        try:
                            self.handler(conn)
                        finally:
                            conn.close()

    def close(self) -> None:
        """Stop the thread and close the listener; idempotent."""
        if self.sock.fileno() == -1:
            return
        self._stop_w.send(b"x")
        self._thread.join(5.0)
        assert not self._thread.is_alive()
        for s in (self.sock, self._stop_r, self._stop_w):
            s.close()


@contextlib.contextmanager
def server(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> Iterator[Server]:
    srv = Server(handler, host, port)
    try:
        yield srv
    finally:
        srv.close()


@contextlib.contextmanager
def dead_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port where connects are refused: bound but not listening, so no other test (or
    process) can take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def target(
    backend_port: int, ip: str = "127.0.0.1", name: str = "b", pool: str = "web", **cfg: Any
) -> CheckTarget:
    """A target whose traffic address is ip:backend_port; ``cfg`` are HC fields."""
    return CheckTarget(pool=pool, backend=name, host=ip, port=backend_port, config=HC(**cfg))


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Recorder:
    """on_transition callback that records (backend, up, reason, consecutive count)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bool, str, int]] = []

    def __call__(self, t: CheckTarget, up: bool, reason: str) -> None:
        self.events.append((t.backend, up, reason, t.consecutive_ok if up else t.consecutive_fail))


@contextlib.asynccontextmanager
async def running(checker: HealthChecker) -> Any:
    task = asyncio.create_task(checker.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- rise / fall


def test_update_state_rise_fall() -> None:
    t = target(1, rise=2, fall=3)
    ok, bad = CheckResult(True, "ok", 0.0), CheckResult(False, "timeout", 0.0)
    assert t.up  # starts up
    assert [update_state(t, r) for r in (ok, bad, bad, ok, bad, bad)] == [False] * 6  # run broken by an ok
    assert t.up and t.consecutive_fail == 2
    assert update_state(t, bad) is True and not t.up and t.consecutive_fail == 3
    assert update_state(t, bad) is False and not t.up
    assert [update_state(t, r) for r in (ok, bad, ok)] == [False] * 3
    assert update_state(t, ok) is True and t.up and t.consecutive_ok == 2
    assert (t.checks, t.last_reason) == (12, "ok")

    down = CheckTarget("p", "b", "127.0.0.1", 1, HC(rise=1, fall=1), up=False)
    assert update_state(down, ok) is True and down.up
    assert update_state(down, bad) is True and not down.up


# --------------------------------------------------------------------------- tcp


def test_tcp_down_after_fall_and_up_after_rise(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastlb.runtime.health")
    srv = Server(accept_close)
    port = srv.port
    rec = Recorder()
    t = target(port, rise=2, fall=3, interval=0.03, timeout=0.5)
    checker = HealthChecker([t], rec, jitter=0.1)

    async def main() -> None:
        async with running(checker):
            await wait_until(lambda: t.checks >= 2, 3.0, "first checks")
            assert t.up and t.last_reason == "ok" and rec.events == []
            srv.close()
            await wait_until(lambda: len(rec.events) == 1, 3.0, "DOWN transition")
            assert rec.events[0] == ("b", False, "connection refused", 3)
            assert not t.up
            srv2 = Server(accept_close, port=port)  # reopen on the same port
            try:
                await wait_until(lambda: len(rec.events) == 2, 3.0, "UP transition")
            finally:
                srv2.close()
            assert rec.events[1] == ("b", True, "ok", 2)

    try:
        run(main())
    finally:
        srv.close()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "pool web backend b DOWN after 3 failed checks: connection refused" in messages
    assert "pool web backend b UP after 2 successful checks: ok" in messages


def test_tcp_refused_and_ipv6() -> None:
    async def main() -> None:
        with dead_port() as port:
            res = await check_once(target(port))
        assert (res.ok, res.reason) == (False, "connection refused")
        if not has_ipv6():
            return
        with server(accept_close, host="::1") as srv:
            res = await check_once(target(srv.port, ip="::1"))
            assert (res.ok, res.reason) == (True, "ok")
            res = await check_once(target(srv.port, ip="[::1]"))
            assert res.ok
        with dead_port("::1") as port:
            res = await check_once(target(port, ip="::1"))
        assert res.reason == "connection refused"

    run(main())


def test_tcp_timeout_when_backlog_full() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers = []
    try:
        for _ in range(2):  # never accepted: the queue is full, further SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(addr)
            fillers.append(s)
        res = run(check_once(target(addr[1], timeout=0.3)))
        assert (res.ok, res.reason) == (False, "timeout")
        assert 0.25 <= res.duration < 0.3 + 0.5
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_check_address_and_port_override() -> None:
    with server(accept_close) as srv, dead_port() as port:
        # The traffic address has nothing listening; the check goes to config.address/port.
        t = target(port, ip="127.0.0.2", address="127.0.0.1", port=srv.port)
        res = run(check_once(t))
        assert res.ok, res.reason
        assert t.check_address() == ("127.0.0.1", srv.port)


def test_check_once_never_raises() -> None:
    res = run(check_once(target(1, type="bogus")))
    assert not res.ok and "unknown check type" in res.reason


def test_real_config_type_is_accepted() -> None:
    config = pytest.importorskip("fastlb.config")
    with server(accept_close) as srv:
        t = CheckTarget("web", "b", "127.0.0.1", srv.port, config.HealthCheckConfig(type="tcp"))
        assert run(check_once(t)).ok


# --------------------------------------------------------------------------- http


class HttpServer:
    """Answers every request with ``self.response``; remembers the last request."""

    def __init__(self) -> None:
        self.response = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.requests: list[bytes] = []

    def __call__(self, conn: socket.socket) -> None:
        req = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in req and len(req) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                req += chunk
        self.requests.append(req)
        with contextlib.suppress(OSError):
            conn.sendall(self.response)
        conn.close()


def http_response(status: int, body: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def test_http_200_503_200() -> None:
    app = HttpServer()
    rec = Recorder()

    async def main(srv: Server) -> None:
        t = target(srv.port, type="http", path="/healthz", rise=2, fall=2, interval=0.03)
        checker = HealthChecker([t], rec)
        async with running(checker):
            await wait_until(lambda: t.checks >= 2, 3.0, "first checks")
            assert t.up and t.last_reason == "ok" and rec.events == []
            app.response = http_response(503)
            await wait_until(lambda: len(rec.events) == 1, 3.0, "DOWN")
            assert rec.events[0] == ("b", False, "bad status 503", 2)
            app.response = http_response(200)
            await wait_until(lambda: len(rec.events) == 2, 3.0, "UP")
            assert rec.events[1] == ("b", True, "ok", 2)

    with server(app) as srv:
        run(main(srv))
        req = app.requests[0]
    assert req.startswith(b"GET /healthz HTTP/1.0\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % srv.port in req
    assert b"\r\nConnection: close\r\n" in req


def test_http_checks() -> None:
    app = HttpServer()

    async def check(**cfg: Any) -> CheckResult:
        return await check_once(target(srv.port, type="http", **cfg))

    async def main() -> None:
        app.response = http_response(200, b"status: healthy")
        assert (await check(expect_body="healthy")).ok
        res = await check(expect_body="ready")
        assert not res.ok and res.reason == "body does not contain 'ready'"
        assert (await check(expect_status=(200, 200))).ok
        app.response = http_response(302)
        assert (await check()).ok  # default 200..399
        assert (await check(expect_status=(200, 299))).reason == "bad status 302"
        app.response = b"SSH-2.0-OpenSSH_9.2\r\n"
        res = await check()
        assert not res.ok and res.reason == "bad status line b'SSH-2.0-OpenSSH_9.2\\r'"
        app.response = b""
        assert (await check()).reason == "connection closed"
        app.response = b"HTTP/1.0 204"  # status line cut by EOF: still a status
        assert (await check()).ok
        app.response = b"HTTP/1.0 2000 X\r\n\r\n"
        assert (await check()).reason == "bad status line b'HTTP/1.0 2000 X\\r'"
        app.response = http_response(200)
        assert (await check(host="example.test", path="/x?y=1")).ok
        assert app.requests[-1].startswith(b"GET /x?y=1 HTTP/1.0\r\nHost: example.test\r\n")

    with server(app) as srv:
        run(main())


def test_http_ipv6_host_header() -> None:
    if not has_ipv6():
        pytest.skip("no IPv6 loopback")
    app = HttpServer()
    with server(app, host="::1") as srv:
        res = run(check_once(target(srv.port, ip="::1", type="http")))
    assert res.ok, res.reason
    assert b"\r\nHost: [::1]:%d\r\n" % srv.port in app.requests[0]
    checker = HealthChecker([target(srv.port, ip="[::1]", name="v6")], Recorder())
    assert checker.snapshot()[0]["address"] == f"[::1]:{srv.port}"


# --------------------------------------------------------------------------- send_expect


def test_send_expect_redis() -> None:
    redis: dict[str, Any] = {"send": b"PING\r\n", "expect": b"+PONG", "type": "send_expect"}

    async def main() -> None:
        with server(replier(b"+PONG\r\n")) as srv:
            res = await check_once(target(srv.port, **redis))
            assert (res.ok, res.reason) == (True, "ok")
        with server(replier(b"-ERR unknown command\r\n")) as srv:
            res = await check_once(target(srv.port, **redis))
            assert not res.ok and res.reason == "unexpected reply b'-ERR unknown command\\r\\n'"
        with server(replier(b"")) as srv:  # reads the PING, closes without a reply
            res = await check_once(target(srv.port, **redis))
            assert (res.ok, res.reason) == (False, "connection closed")
        with server(accept_close) as srv:  # closes at once: FIN, or RST if the PING was already in
            res = await check_once(target(srv.port, **redis))
            assert not res.ok and res.reason in ("connection closed", "connection reset")
        with server(replier(b"+PO")) as srv:  # short reply then EOF
            res = await check_once(target(srv.port, **redis))
            assert not res.ok and res.reason == "unexpected reply b'+PO'"

    run(main())


def test_send_expect_banner_and_silence() -> None:
    def banner(conn: socket.socket) -> None:
        conn.sendall(b"220 mail.example ESMTP\r\n")
        conn.close()

    def silent(conn: socket.socket) -> None:
        read_line(conn)  # holds the connection until the client gives up (1 s timeout)

    async def main() -> None:
        with server(banner) as srv:  # send nothing, just read
            assert (await check_once(target(srv.port, type="send_expect", expect=b"220 "))).ok
        with server(silent) as srv:
            res = await check_once(target(srv.port, type="send_expect", send=b"x", expect=b"y", timeout=0.2))
            assert (res.ok, res.reason) == (False, "timeout")
            assert res.duration < 0.2 + 0.5

    run(main())


# --------------------------------------------------------------------------- fd hygiene


def test_no_fd_leak_over_many_checks() -> None:
    app = HttpServer()
    app.response = http_response(503)

    async def main(ok_port: int, http_port: int, dead_port: int) -> None:
        checks: list[Awaitable[CheckResult]] = []
        for _ in range(50):
            checks += [
                check_once(target(ok_port)),
                check_once(target(dead_port)),
                check_once(target(http_port, type="http")),
                check_once(target(ok_port, type="send_expect", send=b"PING\r\n", expect=b"+PONG")),
                check_once(target(1, type="bogus")),
            ]
        results = await asyncio.gather(*checks)
        assert sum(r.ok for r in results) == 50

        # Checks cancelled mid-flight (connect to a silent port) close their sockets too.
        def silent_handler(conn: socket.socket) -> None:
            read_line(conn)

        with server(silent_handler) as silent:
            tasks = [
                asyncio.create_task(
                    check_once(target(silent.port, type="send_expect", expect=b"+", timeout=5))
                )
                for _ in range(20)
            ]
            await asyncio.sleep(0)
            await wait_until(lambda: silent.accepted >= 1, 3.0, "a connection to the silent server")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    with server(accept_close) as ok, server(app) as http, dead_port() as dead:
        before = fd_count()
        run(main(ok.port, http.port, dead))
        wait_until_sync(lambda: fd_count() == before, 5.0, f"fd count back to {before} (now {fd_count()})")


# --------------------------------------------------------------------------- the scheduler


def test_checker_500_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    max_conc = 32
    before = fd_count()
    servers = [Server(accept_close) for _ in range(4)]
    targets = [
        target(servers[i % 4].port, name=f"b{i}", pool=f"p{i % 7}", interval=0.5, timeout=0.5)
        for i in range(500)
    ]
    starts: dict[str, list[float]] = {t.backend: [] for t in targets}
    state = {"now": 0, "peak": 0}
    real_check = health.check_once

    async def counting_check(t: CheckTarget) -> CheckResult:
        starts[t.backend].append(time.monotonic())
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            return await real_check(t)
        finally:
            state["now"] -= 1

    monkeypatch.setattr(health, "check_once", counting_check)
    rec = Recorder()
    checker = HealthChecker(targets, rec, max_concurrency=max_conc)

    async def main() -> float:
        t0 = time.monotonic()
        async with running(checker):
            await wait_until(
                lambda: all(len(s) >= 2 for s in starts.values()), 2.0, "every target checked twice"
            )
        return t0

    try:
        t0 = run(main())
        assert 1 <= state["peak"] <= max_conc
        assert rec.events == []
        assert all(t.up and t.last_reason == "ok" for t in targets)
        # First checks are spread over the first interval, not fired at once.
        first = sorted(s[0] - t0 for s in starts.values())
        assert first[-1] - first[0] > 0.3
        buckets: dict[int, int] = {}
        for x in first:
            buckets[int(x / 0.01)] = buckets.get(int(x / 0.01), 0) + 1
        assert max(buckets.values()) < 50, f"{max(buckets.values())} checks started in one 10 ms"
        # Two checks of one target are about an interval apart (0.5 s +- 10% jitter).
        gaps = [s[1] - s[0] for s in starts.values()]
        assert min(gaps) >= 0.45 and max(gaps) < 1.0
        snap = checker.snapshot()
        assert len(snap) == 500 and snap[0]["up"] and snap[0]["consecutive_ok"] >= 2
    finally:
        for s in servers:
            s.close()
    wait_until_sync(lambda: fd_count() == before, 5.0, f"fd count back to {before} (now {fd_count()})")


def test_concurrency_limit_is_reached_not_exceeded(monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"now": 0, "peak": 0, "done": 0}

    async def slow_check(t: CheckTarget) -> CheckResult:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(0.02)  # holds a slot: demand (1000/s) far above capacity (250/s)
            return CheckResult(True, "ok", 0.02)
        finally:
            state["now"] -= 1
            state["done"] += 1

    monkeypatch.setattr(health, "check_once", slow_check)
    targets = [target(1, name=f"b{i}", interval=0.1) for i in range(100)]
    checker = HealthChecker(targets, Recorder(), max_concurrency=5)

    async def main() -> None:
        async with running(checker):
            await wait_until(lambda: state["done"] >= 100, 5.0, "100 checks")

    run(main())
    assert state["peak"] == 5


def test_set_targets_keeps_surviving_state() -> None:
    rec = Recorder()

    async def main(port: int, dead: int) -> None:
        a = target(port, name="a", interval=0.02)
        b = target(dead, name="b", interval=0.02, fall=2)
        c = target(port, name="c", interval=0.02)
        checker = HealthChecker([a, b, c], rec)
        async with running(checker):
            await wait_until(lambda: not b.up and a.checks >= 2, 3.0, "b down")
            # Reload: a and b survive as new objects, c goes, d arrives.
            a2 = target(port, name="a", interval=0.02)
            b2 = target(dead, name="b", interval=0.02, fall=2)
            d = target(port, name="d", interval=0.02)
            checker.set_targets([a2, b2, d])
            assert not b2.up and b2.consecutive_fail >= 2 and a2.checks >= 2
            c_checks = c.checks
            await wait_until(lambda: d.checks >= 2 and b2.checks > b.checks + 2, 3.0, "new targets checked")
            assert c.checks == c_checks  # removed: no longer checked, an in-flight result is dropped
            assert [s["backend"] for s in checker.snapshot()] == ["a", "b", "d"]
            with pytest.raises(ValueError):
                checker.set_targets([a2, a2])
        assert [e[:3] for e in rec.events] == [("b", False, "connection refused")]  # one DOWN, no repeat

    with server(accept_close) as srv, dead_port() as dead:
        run(main(srv.port, dead))


def test_callback_exception_does_not_stop_checker(caplog: pytest.LogCaptureFixture) -> None:
    def boom(t: CheckTarget, up: bool, reason: str) -> None:
        raise RuntimeError("callback bug")

    async def main(port: int) -> None:
        x = target(port, name="x", interval=0.02, fall=1, rise=1)
        checker = HealthChecker([x], boom)
        async with running(checker):
            await wait_until(lambda: x.checks >= 3, 3.0, "checks after the failing callback")
        assert not x.up

    with dead_port() as port:
        run(main(port))
    assert any("on_transition failed" in r.getMessage() for r in caplog.records)
