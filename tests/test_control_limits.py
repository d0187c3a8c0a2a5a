"""Local trouble is not a backend failure; the control socket has limits (issue 9 item 8).

End to end: 1,100 idle control connections against a control process limited to 1,024 descriptors
leave health checks passing and `status` answering; 200 clients asking for status at once all get an
answer; an uncreatable control socket stops `fastlb serve` at once (exit 1, one line).  Then the
pieces on their own, over real sockets: a health check that fails with EMFILE changes no backend
state, the control server's idle timeout and request-size limit, and the repeated-line filter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil

from fastlb.control import ControlClient
from fastlb.runtime.control_socket import ControlServer
from fastlb.runtime.log_limit import RepeatFilter
from support.backends import server
from support.clients import backends_of, greet
from support.fastlb import FastLB
from support.helpers import Deadline, wait_until
from support.protocols import log_lines

CHECK = {"type": "tcp", "interval": "250ms", "timeout": "250ms", "rise": 1, "fall": 3}
IDLE_CLIENTS = 1100


def _raise_own_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def _all_up(lb: FastLB) -> dict[str, str]:
    st = ControlClient(str(lb.dir / "control.sock")).status()
    return {name: b["state"] for name, b in backends_of(st).items()}


def test_idle_control_connections_do_not_take_health_checks_down(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb(
        [("a", b.address("a"), 1), ("b", b.address("b"), 1)],
        pool={"health_check": CHECK},
        nofile=1024,
    )
    path = str(lb.dir / "control.sock")
    wait_until(lambda: _all_up(lb) == {"a": "up", "b": "up"}, 10, "both backends up")
    _raise_own_nofile(IDLE_CLIENTS + 200)
    held: list[socket.socket] = []
    try:
        connecting = Deadline(60.0)
        for _ in range(IDLE_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            held.append(s)
            while True:  # a full accept queue says EAGAIN at once: a patient client tries again
                try:
                    s.connect(path)
                    break
                except BlockingIOError:
                    assert not connecting.expired(), f"{len(held)} connections in 60s"
                    time.sleep(0.01)
        # several check intervals with every idle connection held (fall = 3 intervals of 250 ms)
        deadline = Deadline(3.0)
        while not deadline.expired():
            t0 = time.monotonic()
            states = _all_up(lb)  # answered: the control process is not stuck
            took = time.monotonic() - t0
            assert states == {"a": "up", "b": "up"}, states
            assert took < 5.0, f"status took {took:.1f}s"
            time.sleep(0.2)
        fds = psutil.Process(lb.pid).num_fds()
        assert fds < 1024 // 4 + 100, f"control process holds {fds} descriptors"
        assert greet(lb.addr) in ("a", "b")
    finally:
        for s in held:
            s.close()
    assert not log_lines(lb, r"DOWN after"), lb.log_text()
    st = ControlClient(path).status()
    assert st["control_socket"]["evicted"] >= IDLE_CLIENTS - 1024 // 4
    assert st["health_check_local_errors"] == 0
    # a burst of 5 warning lines per 10 s for all those evictions, not one per eviction
    assert 1 <= len(log_lines(lb, r"closed the one idle the longest")) <= 10, lb.log_text()


def test_200_concurrent_status_requests_are_all_answered(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), 1)])
    path = str(lb.dir / "control.sock")
    n = 200
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def ask(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = ControlClient(path, timeout=20).status()["pid"]
        except Exception as exc:  # recorded, asserted below
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    failed = [r for r in results if r != lb.pid]
    assert not failed, f"{len(failed)} of {n} failed, e.g. {failed[:3]}"


def test_uncreatable_control_socket_stops_serve(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the socket's directory should be\n")
    lb = FastLB(
        tmp_path / "lb",
        [("a", "127.0.0.1:9", 1)],
        global_={"control_socket": str(blocker / "control.sock")},
    )
    try:
        try:
            lb.start(timeout=20)
            raise AssertionError("fastlb started without its control socket")
        except AssertionError as exc:
            assert "exited with 1" in str(exc), str(exc)
        lines = [line for line in lb.log_text().splitlines() if " INFO " not in line]
        assert len(lines) == 1, lines  # one line says why (INFO lines of the startup aside)
        assert "control socket" in lines[0] and str(blocker) in lines[0] and "cannot create" in lines[0]
        assert lb.notified("READY=1") is None
    finally:
        lb.stop()


# --- the pieces -------------------------------------------------------------------------------------

EMFILE_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, resource, socket, sys, time
    from dataclasses import dataclass
    from fastlb.runtime.health import CheckTarget, HealthChecker

    @dataclass(frozen=True)
    class Cfg:
        type: str = "tcp"; interval: float = 0.05; timeout: float = 2.0; rise: int = 1; fall: int = 1
        port: int | None = None; address: str | None = None; send: bytes = b""; expect: bytes = b""
        path: str = "/"; host: str | None = None; expect_status: tuple = (200, 399); expect_body: str | None = None

    async def until(pred, what):
        deadline = time.monotonic() + 20
        while not pred():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def main():
        backend = socket.create_server(("127.0.0.1", 0), backlog=1024)
        target = CheckTarget("web", "a", "127.0.0.1", backend.getsockname()[1], Cfg())
        transitions = []
        checker = HealthChecker([target], lambda t, up, why: transitions.append((up, why)))
        task = asyncio.create_task(checker.run())
        await until(lambda: target.checks >= 2, "two healthy checks")
        healthy = target.checks
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        hog = []
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        await until(lambda: target.local_errors >= 3, "three local errors")  # checks fail with EMFILE
        during = (target.up, target.checks, target.local_errors, target.last_reason)
        for fd in hog:
            os.close(fd)
        await until(lambda: target.checks > during[1], "a check after the descriptors are back")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        print(json.dumps({"healthy": healthy, "during": during, "after": [target.up, target.checks],
                          "transitions": transitions, "local_errors": checker.local_errors}))

    asyncio.run(main())
    """
)


def test_health_check_failing_locally_changes_no_backend_state():
    """EMFILE in the checking process: counted as local, the backend stays up, nothing transitions."""
    proc = subprocess.run([sys.executable, "-c", EMFILE_CHILD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    up, checks_during, local_errors, reason = r["during"]
    assert r["healthy"] >= 2, r
    assert up is True and local_errors >= 3 and "local error" in reason and "open files" in reason, r
    assert r["transitions"] == [], r
    assert r["after"][0] is True and r["after"][1] > checks_during, r  # checks resume afterwards
    assert "could not run" in proc.stderr and "not counted against the backend" in proc.stderr


def test_control_server_idle_timeout_and_request_limit(tmp_path):
    path = str(tmp_path / "c.sock")

    async def main() -> dict:
        srv = ControlServer(
            path, lambda line, w: {"ok": True, "echo": len(line)}, idle_timeout=0.5, max_clients=2
        )
        await srv.start()
        loop = asyncio.get_running_loop()

        async def talk(payload: bytes, wait: float = 3.0) -> tuple[bytes, float]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, path)
            if payload:
                await loop.sock_sendall(s, payload)
            t0 = time.monotonic()
            buf = b""
            async with asyncio.timeout(wait):
                while chunk := await loop.sock_recv(s, 1 << 20):
                    buf += chunk
            s.close()
            return buf, time.monotonic() - t0

        idle, idle_took = await talk(b"")  # says nothing: closed after the idle timeout
        ok, _ = await talk(b'{"cmd": "status"}\n')  # answered, then idle: closed
        long, _ = await talk(b"x" * (70 * 1024) + b"\n")
        srv.close()
        return {"idle": (idle, idle_took), "ok": ok, "long": long, "timed_out": srv.timed_out}

    r = asyncio.run(main())
    assert r["idle"][0] == b"" and 0.4 < r["idle"][1] < 2.5, r["idle"]
    assert json.loads(r["ok"]) == {"ok": True, "echo": 18}
    assert json.loads(r["long"]) == {"ok": False, "error": "request too long"}
    assert r["timed_out"] == 2


def test_repeat_filter_counts_what_it_drops():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("fastlb.test.repeat")
    logger.propagate = False
    handler = Keep()
    flt = RepeatFilter(window=0.3, burst=2)
    handler.addFilter(flt)
    logger.addHandler(handler)
    try:
        for _ in range(1000):
            logger.warning("accept failed: %s", "too many open files")
        logger.warning("something else")
        time.sleep(0.35)
        logger.warning("accept failed: %s", "too many open files")
    finally:
        logger.removeHandler(handler)
    assert records[:3] == ["accept failed: too many open files"] * 2 + ["something else"]
    assert records[3].startswith("accept failed: too many open files (repeated 998 times in the last")
    assert len(records) == 4
