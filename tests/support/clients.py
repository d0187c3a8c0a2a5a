"""Helpers for the selection and runtime-control end-to-end tests: a fast many-connection client that
records which backend answered each connection, the `fastlb` CLI, and views of the status document.

Backends are `support.backends.server(name, "id")`: they send b"NAME\\n" on accept, then echo.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

from fastlb.control import ControlClient
from support.helpers import Deadline, wait_until

NAME = re.compile(rb"[A-Za-z0-9_.:-]{1,63}")  # a backend name, as fastlb's config allows them

# --- many short connections ---------------------------------------------------------------------


class ClientError(AssertionError):
    """A connection through fastlb did not deliver a backend's greeting."""


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def client_socket(family: int, source: str | None) -> socket.socket:
    """A non-blocking TCP socket, bound to `source` if given.  The port is left to connect()
    (IP_BIND_ADDRESS_NO_PORT), so thousands of connections from one address do not exhaust bind()'s
    port search among TIME_WAIT sockets."""
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    if source is not None:
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source, 0))
        except BaseException:
            s.close()
            raise
    return s


def count_backends(
    addr: tuple[str, int],
    n: int,
    *,
    concurrency: int = 64,
    timeout: float = 60.0,
    source: str | None = None,
) -> Counter:
    """Make n short connections to addr, at most `concurrency` open at a time; each one reads the
    backend's greeting line (its name), then closes.  Returns Counter(name -> connections).

    One epoll loop without threads: a Python client is the slowest party on a 2-core machine, so it
    must not waste time.  source: local address to bind (port chosen by the kernel).  Any connection
    that ends before a full greeting line, or a greeting that is not a plain name, raises ClientError;
    so does missing the deadline.
    """
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    deadline = Deadline(timeout)
    ep = select.epoll()
    open_: dict[int, tuple[socket.socket, bytearray]] = {}
    counts: Counter = Counter()
    started = finished = 0
    try:
        while finished < n:
            while started < n and len(open_) < concurrency:
                s = client_socket(family, source)
                rc = s.connect_ex(addr)
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    raise ClientError(f"connect #{started} failed at once: {os.strerror(rc)}")
                fd = s.fileno()
                open_[fd] = (s, bytearray())
                ep.register(fd, select.EPOLLIN)  # readable: greeting, EOF or error
                started += 1
            if deadline.expired():
                raise ClientError(
                    f"{finished} of {n} connections done after {timeout:.0f}s ({len(open_)} open, counts {dict(counts)})"
                )
            for fd, _ in ep.poll(min(0.2, deadline.left())):
                s, buf = open_[fd]
                try:
                    data = s.recv(256)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise ClientError(f"connection #{finished}: {exc} after {bytes(buf)!r}") from None
                if not data:
                    raise ClientError(f"connection closed before a greeting line, got {bytes(buf)!r}")
                buf += data
                if b"\n" not in buf:
                    if len(buf) > 64:
                        raise ClientError(f"no greeting line in {bytes(buf)!r}")
                    continue
                line, rest = bytes(buf).split(b"\n", 1)
                if rest or not NAME.fullmatch(line):
                    raise ClientError(f"unexpected greeting {bytes(buf)!r}")
                counts[line.decode()] += 1
                ep.unregister(fd)
                del open_[fd]
                s.close()
                finished += 1
    finally:
        for s, _ in open_.values():
            s.close()
        ep.close()
    return counts


def open_held(addr: tuple[str, int], n: int, *, timeout: float = 20.0, source: str | None = None):
    """Open n connections at once and read each greeting; the connections stay open.
    Returns [(name, blocking socket with a 5 s timeout)], in the order they were opened."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    deadline = Deadline(timeout)
    socks = []
    try:
        for _ in range(n):
            s = client_socket(family, source)
            socks.append(s)
            rc = s.connect_ex(addr)
            if rc not in (0, errno.EINPROGRESS):
                raise ClientError(f"connect failed at once: {os.strerror(rc)}")
        bufs = {s.fileno(): bytearray() for s in socks}
        names: dict[int, str] = {}
        ep = select.epoll()
        try:
            for s in socks:
                ep.register(s.fileno(), select.EPOLLIN)
            while len(names) < n:
                if deadline.expired():
                    raise ClientError(f"{len(names)} of {n} greetings after {timeout:.0f}s")
                for fd, _ in ep.poll(min(0.2, deadline.left())):
                    try:
                        data = os.read(fd, 256)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise ClientError(f"held connection: {exc}") from None
                    if not data:
                        raise ClientError(f"held connection closed after {bytes(bufs[fd])!r}")
                    bufs[fd] += data
                    if bufs[fd].endswith(b"\n"):
                        names[fd] = bufs[fd][:-1].decode()
                        ep.unregister(fd)
                    elif len(bufs[fd]) > 64:
                        raise ClientError(f"no greeting line in {bytes(bufs[fd])!r}")
        finally:
            ep.close()
        out = []
        for s in socks:
            s.setblocking(True)
            s.settimeout(5.0)
            out.append((names[s.fileno()], s))
        return out
    except BaseException:
        for s in socks:
            s.close()
        raise


def close_held(held, timeout: float = 10.0) -> None:
    """Close held connections the polite way: FIN, then read to EOF (the echo backend answers the FIN
    with its own).  AssertionError if one is reset or sends unexpected bytes."""
    for _, s in held:
        s.shutdown(socket.SHUT_WR)
    deadline = Deadline(timeout)
    for name, s in held:
        s.settimeout(max(0.1, deadline.left()))
        try:
            rest = s.recv(64)
        except ConnectionResetError:
            raise AssertionError(f"connection to {name} was reset while closing") from None
        finally:
            s.close()
        assert rest == b"", f"connection to {name}: unexpected bytes {rest!r} before EOF"


def greet(addr: tuple[str, int], timeout: float = 5.0) -> str:
    """One connection: the backend's name from its greeting, then a polite close (FIN, read to EOF)."""
    held = open_held(addr, 1, timeout=timeout)
    close_held(held, timeout)
    return held[0][0]


class Load:
    """Short connections to addr from a background thread until stop(), `concurrency` in flight,
    each reading the backend's greeting: records (monotonic time the connect was started, name) in
    `done`, and any connection that failed in `failures`.  For changes made under load."""

    def __init__(self, addr: tuple[str, int], *, concurrency: int = 16, limit: int = 200_000) -> None:
        self.addr = addr
        self.concurrency = concurrency
        self.limit = limit
        self.done: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def wait_count(self, n: int, timeout: float = 30.0) -> None:
        wait_until(lambda: len(self.done) >= n or self.failures, timeout, f"{n} connections under load")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load thread did not stop"

    def _run(self) -> None:
        family = socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET
        ep = select.epoll()
        open_: dict[int, tuple[socket.socket, bytearray, float]] = {}
        started = 0
        try:
            while not self._stop.is_set() or open_:
                while not self._stop.is_set() and started < self.limit and len(open_) < self.concurrency:
                    s = client_socket(family, None)
                    t0 = time.monotonic()
                    rc = s.connect_ex(self.addr)
                    if rc not in (0, errno.EINPROGRESS):
                        s.close()
                        self.failures.append(f"connect failed at once: {os.strerror(rc)}")
                        continue
                    open_[s.fileno()] = (s, bytearray(), t0)
                    ep.register(s.fileno(), select.EPOLLIN)
                    started += 1
                if started >= self.limit and not open_:
                    break
                for fd, _ in ep.poll(0.2):
                    s, buf, t0 = open_[fd]
                    try:
                        data = s.recv(256)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        data = None
                        self.failures.append(f"{exc} after {bytes(buf)!r}")
                    if data:
                        buf += data
                        if not buf.endswith(b"\n") and len(buf) < 64:
                            continue
                        line = bytes(buf).rstrip(b"\n")
                        if NAME.fullmatch(line):
                            self.done.append((t0, line.decode()))
                        else:
                            self.failures.append(f"unexpected greeting {bytes(buf)!r}")
                    elif data is not None:
                        self.failures.append(f"closed before a greeting, got {bytes(buf)!r}")
                    ep.unregister(fd)
                    del open_[fd]
                    s.close()
        finally:
            for s, _, _ in open_.values():
                s.close()
            ep.close()


def names_by_source(
    addr: tuple[str, int], sources: list[str], *, concurrency: int = 64, timeout: float = 60.0
) -> dict[str, str]:
    """One connection from each source address (bound, port left to the kernel): source -> the
    name of the backend that greeted it."""
    out: dict[str, str] = {}
    for k in range(0, len(sources), concurrency):
        batch = sources[k : k + concurrency]
        held = []
        try:
            for src in batch:
                held.extend((src, h) for h in open_held(addr, 1, timeout=timeout, source=src))
            for src, (name, _) in held:
                out[src] = name
        finally:
            close_held([h for _, h in held], timeout)
    return out


# --- the fastlb command line and status -----------------------------------------------------------


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`python -m fastlb ARGS...` with captured text output (never raises on a non-zero exit)."""
    return subprocess.run(
        [sys.executable, "-m", "fastlb", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def cli_process(*args: str) -> subprocess.Popen:
    """`python -m fastlb ARGS...` started, not waited for (text pipes for communicate())."""
    return subprocess.Popen(
        [sys.executable, "-m", "fastlb", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def curl_as(user: str, url: str, *args: str, timeout: float = 10.0) -> tuple[int, str]:
    """`curl ARGS URL` run as another (unprivileged) local user through runuser: the HTTP status
    (0: no answer) and the body."""
    r = subprocess.run(
        ["runuser", "-u", user, "--", "curl", "-sS", "-m", str(timeout), "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
        stdin=subprocess.DEVNULL,
    )
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def write_token_file(path, token: str, mode: int = 0o600):
    """An admin API bearer token file (0600 unless told: the admin API refuses one others can read)."""
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def backends_of(st: dict, pool: str = "web") -> dict[str, dict]:
    """name -> backend record of one pool in a status document."""
    p = next(p for p in st["pools"] if p["name"] == pool)
    return {b["name"]: b for b in p["backends"]}


CONFIG_KEYS = ("state", "admin", "health", "weight", "effective_weight", "draining", "removed")


def config_view(st: dict) -> dict:
    """What an operator command may change: per backend states and weights, plus the generation."""
    return {
        "generation": st["generation"],
        "pools": {
            p["name"]: {b["name"]: {k: b[k] for k in CONFIG_KEYS} for b in p["backends"]} for p in st["pools"]
        },
    }


def wait_published(client: ControlClient, timeout: float = 5.0) -> dict:
    """Wait until every worker has seen the region's current generation; returns that status."""

    def seen():
        st = client.status()
        gens = [w["generation_seen"] for w in st["workers"]]
        return st if all(g == st["generation"] for g in gens) else None

    return wait_until(seen, timeout, "every worker to see the current generation")


def wait_status(client: ControlClient, pred, what: str, timeout: float = 5.0) -> dict:
    """Wait until pred(status) is true; returns that status."""

    def check():
        st = client.status()
        return st if pred(st) else None

    return wait_until(check, timeout, what)


def raw_request(path: str, payload: bytes, timeout: float = 5.0) -> list[dict]:
    """Send raw bytes to a control socket and read reply lines until the server closes or the
    replies stop; returns the parsed replies.  For requests that are not what ControlClient sends."""
    replies: list[dict] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse a request before reading all of it; its reply still counts
        s.shutdown(socket.SHUT_WR)
        buf = b""
        deadline = Deadline(timeout)
        while not deadline.expired():
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    for line in buf.splitlines():
        replies.append(json.loads(line))
    return replies


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """A CLI call failed as documented: exit 1, nothing on stdout, exactly one stderr line
    `fastlb: ...` containing every word.  Returns that line."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr {proc.stderr!r}"
    assert proc.stdout == "", f"stdout {proc.stdout!r}"
    assert len(lines) == 1 and lines[0].startswith("fastlb: "), f"stderr {proc.stderr!r}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


# --- a backend whose connects are slow ------------------------------------------------------------


class GatedBackend:
    """An `id` backend (greets with b"NAME\\n", then echoes) in a thread of the test process, whose
    accept queue is held full until release().

    It listens with backlog 0 (a queue of one) and parks one connection of its own in the queue, so
    the kernel drops the SYNs of anyone else: a connect started before release() completes only when
    its SYN is retransmitted, one initial RTO (1 s) later.  That makes the connect time fastlb
    measures for this backend about 1 s, where loopback connects otherwise take microseconds.
    """

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.ls.bind((host, 0))
        self.ls.listen(0)
        self.host, self.port = self.ls.getsockname()
        self.accepted = 0
        self._parked: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.gated = self._fill()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _fill(self) -> bool:
        """Connect until a connect does not complete within 0.3 s: the queue is then full."""
        for _ in range(8):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            rc = c.connect_ex((self.host, self.port))
            if rc not in (0, errno.EINPROGRESS):
                c.close()
                return False
            _, w, _ = select.select([], [c], [], 0.3)
            if not w:
                c.close()  # still in SYN_SENT: its SYN was dropped; closing it sends nothing
                return True
            if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                c.close()
                return False
            self._parked.append(c)
        return False

    def release(self) -> None:
        """Empty the queue (accept and close the parked connections) and start serving."""
        self.ls.settimeout(2.0)
        for c in self._parked:
            conn, _ = self.ls.accept()
            conn.close()
            c.close()
        self._parked = []
        self.ls.setblocking(False)
        self._thread = threading.Thread(target=self._serve, name=f"gated-{self.name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.ls, selectors.EVENT_READ, None)
        greeting = self.name.encode() + b"\n"
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        try:
                            conn, _ = self.ls.accept()
                        except BlockingIOError:
                            continue
                        self.accepted += 1
                        conn.settimeout(5.0)
                        conn.sendall(greeting)  # a few bytes: the socket buffer takes them at once
                        sel.register(conn, selectors.EVENT_READ, conn)
                        continue
                    conn = key.data
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        conn.sendall(data)
                    else:
                        sel.unregister(conn)
                        with contextlib.suppress(OSError):
                            conn.shutdown(socket.SHUT_WR)
                        conn.close()
        finally:
            for key in list(sel.get_map().values()):
                if key.data is not None:
                    key.data.close()
            sel.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        for c in self._parked:
            c.close()
        self.ls.close()
