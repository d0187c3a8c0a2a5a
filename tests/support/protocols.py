"""Helpers for the health / ejection / drain / reload end-to-end tests.

Two halves:

* A protocol server process (this file run as a script): named servers whose answers the test can
  change at run time, for what `support.backends` does not do - an HTTP server whose status code
  flips (`http`), a line server answering a configurable reply (`line`, for send_expect checks),
  and a server that resets every connection on accept (`rst`, SO_LINGER 0 close).
  `python support/protocols.py SPEC_JSON`, SPEC_JSON = {"servers": [{"name", "mode", "port", ...}]}.
  Control on stdin, one JSON line answer on stdout:
    stats                -> {"accepted": {name: n}, "received": {name: "last request, latin-1"}}
    set NAME KEY JSON    -> {"ok": true}   (KEY: status for http, reply for line)
  The first stdout line, once every server listens: {"ports": {name: port}}.  EOF on stdin exits.

* Test-side helpers: `ProtoServers` (that process), status and log access for a `support.fastlb.FastLB`,
  one request through an `id` backend, a read/write gate to kill a backend between connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import socket
import struct
import sys
import threading

if __name__ == "__main__":  # run as the server script: make the `support` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from support.backends import ServerProcess  # noqa: E402
from support.helpers import recv_exact, recv_line, wait_until  # noqa: E402

LINGER_ZERO = struct.pack("ii", 1, 0)
REASONS = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}
MODES = ("http", "line", "rst")

# ================================================================================ server side


class _Proto:
    """The protocol server process: one selectors loop for every server and connection."""

    def __init__(self, spec: dict) -> None:
        self.sel = selectors.DefaultSelector()
        self.servers: dict[str, dict] = {}
        self.accepted: dict[str, int] = {}
        self.received: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.stdin = b""
        self.running = True
        for srv in spec["servers"]:
            if srv["mode"] not in MODES:
                raise SystemExit(f"unknown mode {srv['mode']!r}")
            host = srv.get("host", "127.0.0.1")
            ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((host, int(srv.get("port", 0))))
            ls.listen(1024)
            ls.setblocking(False)
            name = srv["name"]
            self.servers[name] = dict(srv)
            self.ports[name] = ls.getsockname()[1]
            self.accepted[name] = 0
            self.received[name] = ""
            self.sel.register(ls, selectors.EVENT_READ, ("listen", name))

    def reply(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def accept(self, ls: socket.socket, name: str) -> None:
        srv = self.servers[name]
        for _ in range(256):
            try:
                s, _ = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                print(f"proto: accept: {exc}", file=sys.stderr, flush=True)
                return
            self.accepted[name] += 1
            if srv["mode"] == "rst":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                s.close()
                continue
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, ("conn", name, bytearray()))

    def close(self, s: socket.socket) -> None:
        self.sel.unregister(s)
        s.close()

    def readable(self, s: socket.socket, name: str, buf: bytearray) -> None:
        """Requests are tiny: read, answer with a blocking send (a few hundred bytes), maybe close."""
        srv = self.servers[name]
        try:
            data = s.recv(65536)
        except OSError:
            self.close(s)
            return
        if not data:
            self.close(s)
            return
        buf += data
        try:
            if srv["mode"] == "http":
                if b"\r\n\r\n" not in buf and len(buf) < 8192:
                    return
                self.received[name] = bytes(buf).decode("latin-1")
                status = int(srv.get("status", 200))
                body = f"{name} {status}\n".encode()
                head = (
                    f"HTTP/1.0 {status} {REASONS.get(status, 'Status')}\r\n"
                    f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                s.setblocking(True)
                s.sendall(head.encode() + body)
                self.close(s)
                return
            # line: one reply per complete line
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                self.received[name] = (line + b"\n").decode("latin-1")
                s.setblocking(True)
                s.sendall(str(srv.get("reply", "+PONG\r\n")).encode())
                s.setblocking(False)
        except OSError:
            self.close(s)

    def command(self) -> None:
        data = os.read(0, 4096)
        if not data:
            self.running = False
            return
        self.stdin += data
        while b"\n" in self.stdin:
            line, self.stdin = self.stdin.split(b"\n", 1)
            parts = line.decode().strip().split(" ", 3)
            if parts == ["stats"]:
                self.reply({"accepted": self.accepted, "received": self.received})
            elif len(parts) == 4 and parts[0] == "set" and parts[1] in self.servers:
                self.servers[parts[1]][parts[2]] = json.loads(parts[3])
                self.reply({"ok": True})
            else:
                self.reply({"error": f"bad command {line!r}"})

    def run(self) -> None:
        self.sel.register(0, selectors.EVENT_READ, ("stdin",))
        self.reply({"ports": self.ports})
        while self.running:
            for key, _ in self.sel.select():
                kind = key.data[0]
                if kind == "stdin":
                    self.command()
                elif kind == "listen":
                    self.accept(key.fileobj, key.data[1])
                else:
                    self.readable(key.fileobj, key.data[1], key.data[2])


# ================================================================================ test side


def proto(name: str, mode: str, **params) -> dict:
    """One protocol server's spec: proto("a", "http", status=200), proto("p", "line", reply="+PONG\\r\\n")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    return {"name": name, "mode": mode, **params}


class ProtoServers(ServerProcess):
    """The protocol server process seen from the test (this file is its script)."""

    script = __file__
    what = "protocol server"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def accepted(self, name: str) -> int:
        return self.stats()["accepted"][name]

    def set(self, name: str, key: str, value) -> None:
        assert self._call(f"set {name} {key} {json.dumps(value)}") == {"ok": True}


# --- fastlb status and log ---------------------------------------------------------------------


def control(lb):
    from fastlb.control import ControlClient

    return ControlClient(str(lb.dir / "control.sock"))


def pool_status(lb, pool: str = "web") -> dict:
    return next(p for p in control(lb).status()["pools"] if p["name"] == pool)


def backends_status(lb, pool: str = "web") -> dict[str, dict]:
    """name -> that backend's status record."""
    return {b["name"]: b for b in pool_status(lb, pool)["backends"]}


def states(lb, pool: str = "web") -> dict[str, str]:
    return {name: b["state"] for name, b in backends_status(lb, pool).items()}


def log_text(lb) -> str:
    """fastlb's whole stderr so far (FastLB.log_text() cuts long logs)."""
    try:
        return lb.log_path.read_text(errors="replace")
    except OSError:
        return ""


def log_lines(lb, pattern: str, since: int = 0) -> list[str]:
    """Lines of fastlb's log after byte offset `since` that match the regex `pattern`."""
    rx = re.compile(pattern)
    return [line for line in log_text(lb)[since:].splitlines() if rx.search(line)]


def log_mark(lb) -> int:
    return len(log_text(lb))


def wait_log(lb, pattern: str, timeout: float, since: int = 0) -> str:
    """The first log line after `since` matching `pattern`, waiting up to `timeout` seconds."""
    return wait_until(
        lambda: (log_lines(lb, pattern, since) or [None])[0],
        timeout,
        lambda: f"a fastlb log line matching {pattern!r}; log:\n{log_text(lb)[since:][-6000:]}",
    )


# --- traffic -------------------------------------------------------------------------------------


def id_request(addr: tuple[str, int], payload: bytes = b"ping\n", timeout: float = 5.0) -> str:
    """One connection through fastlb to a `support.backends` "id" backend: read its name line, check
    that `payload` echoes back, close.  Returns the name; raises OSError / AssertionError on failure."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.settimeout(timeout)
        name = recv_line(s).decode()
        s.sendall(payload)
        got = recv_exact(s, len(payload))
        if got != payload:
            raise AssertionError(f"echo through {name}: sent {payload!r}, got {got!r}")
        return name


def try_id_request(addr: tuple[str, int], timeout: float = 5.0) -> str:
    """id_request, with a failure turned into "FAIL: reason" (for backends expected to misbehave)."""
    try:
        return id_request(addr, timeout=timeout)
    except (OSError, AssertionError) as exc:
        return f"FAIL: {exc!r}"


class Gate:
    """Many clients `with gate.use():` around each connection; `with gate.exclusive():` waits until
    no connection is in flight and holds new ones back meanwhile (a read/write lock)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._inflight = 0
        self._closed = False

    @contextlib.contextmanager
    def use(self):
        with self._cv:
            if not self._cv.wait_for(lambda: not self._closed, timeout=10.0):
                raise AssertionError("gate stayed closed for 10s")
            self._inflight += 1
        try:
            yield
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 10.0):
        with self._cv:
            self._closed = True
            if not self._cv.wait_for(lambda: self._inflight == 0, timeout=timeout):
                self._closed = False
                self._cv.notify_all()
                raise AssertionError(f"connections still in flight after {timeout:.0f}s")
        try:
            yield
        finally:
            with self._cv:
                self._closed = False
                self._cv.notify_all()


if __name__ == "__main__":
    _Proto(json.loads(sys.argv[1])).run()
