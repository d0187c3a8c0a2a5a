"""Socket, data and waiting helpers for the end-to-end tests; every wait here has a deadline."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
CHUNK = 256 * 1024
MiB = 1024 * 1024


# --- waiting ---------------------------------------------------------------------------------


def wait_until(
    pred: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.01
) -> T:
    """Poll `pred` until it returns something truthy and return that; raise AssertionError naming
    `what` (a string, or a callable giving the last observed state) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {desc}")
        time.sleep(interval)


class Deadline:
    """A point in time; `left()` is what remains of it (never negative)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


# --- addresses and connections -------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nothing listens on right now (bind port 0 on a throwaway socket, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_udp_port(host: str = LOCALHOST) -> int:
    """A port free for both UDP and TCP right now (a DNS listener may want both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_STREAM) as t:
                    t.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both UDP and TCP")


def connect(addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A blocking client socket connected to `addr`, with `timeout` on every later operation."""
    s = socket.create_connection(addr, timeout=timeout)
    s.settimeout(timeout)
    return s


def connect_refused(addr: tuple[str, int]) -> bool:
    """True if a connect to `addr` is refused (ECONNREFUSED); a successful one is closed at once."""
    try:
        s = socket.create_connection(addr, timeout=1.0)
    except ConnectionRefusedError:
        return True
    except (TimeoutError, ConnectionResetError):
        # reset: the SYN met a listener in the middle of closing - not refused yet, ask again
        return False
    s.close()
    return False


def reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes (the socket's timeout applies to each recv); AssertionError on an early EOF."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(CHUNK, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_line(sock: socket.socket, limit: int = 256) -> bytes:
    """One line without its b"\\n" (byte at a time: only for short greetings)."""
    buf = bytearray()
    while len(buf) < limit:
        b = sock.recv(1)
        if not b:
            raise AssertionError(f"EOF before a full line, got {bytes(buf)!r}")
        if b == b"\n":
            return bytes(buf)
        buf += b
    raise AssertionError(f"no newline in {limit} bytes: {bytes(buf)!r}")


def drain(sock: socket.socket, hasher=None, limit: int | None = None) -> tuple[int, str]:
    """Read until EOF or reset, feeding `hasher`; returns (bytes read, "eof" | "reset").
    The socket's timeout bounds each recv; `limit` stops early after that many bytes ("limit")."""
    total = 0
    while limit is None or total < limit:
        want = CHUNK if limit is None else min(CHUNK, limit - total)
        try:
            chunk = sock.recv(want)
        except ConnectionResetError:
            return total, "reset"
        if not chunk:
            return total, "eof"
        total += len(chunk)
        if hasher is not None:
            hasher.update(chunk)
    return total, "limit"


def wait_closed(sock: socket.socket, timeout: float) -> tuple[str, float]:
    """Wait until the peer closes `sock` (EOF or reset), discarding data; returns (how, seconds).
    Raises AssertionError if it is still open after `timeout`."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        _, how = drain(sock)
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout:.1f}s") from None
    return how, time.monotonic() - start


# --- data ----------------------------------------------------------------------------------------


def stream_chunks(nbytes: int, seed: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """`nbytes` of pseudo-random data from `seed`, in chunks (same bytes as the backends' blast)."""
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def send_stream(sock: socket.socket, nbytes: int, seed: int) -> str:
    """sendall `nbytes` of seeded data; returns the sha256 hex digest of what was sent."""
    h = hashlib.sha256()
    for chunk in stream_chunks(nbytes, seed):
        h.update(chunk)
        sock.sendall(chunk)
    return h.hexdigest()


def stream_sha256(nbytes: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in stream_chunks(nbytes, seed):
        h.update(chunk)
    return h.hexdigest()


def echo_ok(addr: tuple[str, int], payload: bytes, timeout: float = 5.0) -> bool:
    """One connection through `addr` to an echo backend: send payload, read it back, close."""
    with connect(addr, timeout) as s:
        s.sendall(payload)
        got = recv_exact(s, len(payload))
        return got == payload


# --- many connections at once --------------------------------------------------------------------


def open_many(addr: tuple[str, int], n: int, timeout: float) -> list[socket.socket]:
    """Open n connections to addr with non-blocking connects, at most 256 in flight at a time;
    returns blocking sockets (timeout 5 s). Raises AssertionError if they are not all up in time."""
    deadline = Deadline(timeout)
    done: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    pending = 0
    started = 0
    try:
        while len(done) < n:
            while started < n and pending < 256:
                s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                rc = s.connect_ex(addr)
                if rc not in (0, errno.EINPROGRESS):
                    s.close()
                    raise AssertionError(f"connect #{started} failed at once: {os.strerror(rc)}")
                sel.register(s, selectors.EVENT_WRITE)
                started += 1
                pending += 1
            if deadline.expired():
                raise AssertionError(f"only {len(done)} of {n} connections up after {timeout:.0f}s")
            for key, _ in sel.select(min(0.2, deadline.left())):
                s = key.fileobj
                sel.unregister(s)
                pending -= 1
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    s.close()
                    raise AssertionError(f"connect failed: {os.strerror(err)}")
                s.setblocking(True)
                s.settimeout(5.0)
                done.append(s)
    except BaseException:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        for s in done:
            s.close()
        raise
    finally:
        sel.close()
    return done


def echo_all(socks: list[socket.socket], payloads: list[bytes], timeout: float) -> list[int]:
    """Send payloads[i] on socks[i] (all at once, non-blocking) and read each echo back.
    Returns the indexes whose echo differed; AssertionError if not all answered within timeout."""
    deadline = Deadline(timeout)
    sel = selectors.DefaultSelector()
    got: dict[int, bytearray] = {}
    bad = []
    try:
        for i, (s, p) in enumerate(zip(socks, payloads, strict=True)):
            s.setblocking(False)
            sent = s.send(p)  # payloads are small: the socket buffer takes them whole
            if sent != len(p):
                raise AssertionError(f"short send on connection {i}: {sent} of {len(p)}")
            got[i] = bytearray()
            sel.register(s, selectors.EVENT_READ, i)
        left = len(socks)
        while left:
            if deadline.expired():
                missing = [i for i in got if len(got[i]) < len(payloads[i])]
                raise AssertionError(
                    f"{len(missing)} of {len(socks)} echoes incomplete after {timeout:.0f}s "
                    f"(first: #{missing[:5]})"
                )
            for key, _ in sel.select(min(0.2, deadline.left())):
                i = key.data
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"connection {i} closed after {len(got[i])} echoed bytes")
                got[i] += chunk
                if len(got[i]) >= len(payloads[i]):
                    if bytes(got[i]) != payloads[i]:
                        bad.append(i)
                    sel.unregister(s)
                    left -= 1
    finally:
        sel.close()
        for s in socks:
            if s.fileno() >= 0:
                s.setblocking(True)
                s.settimeout(5.0)
    return bad


# --- threads -------------------------------------------------------------------------------------


class Bg:
    """Run fn(*args) in a thread; result(timeout) returns its value or re-raises its exception."""

    def __init__(self, fn: Callable[..., T], *args) -> None:
        self._value = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the test thread by result()
            self._exc = exc

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"background task still running after {timeout:.0f}s")
        if self._exc is not None:
            raise self._exc
        return self._value


# --- processes -----------------------------------------------------------------------------------


def fd_kinds(pid: int) -> Counter:
    """Open descriptors of `pid` by kind: socket, pipe, anon_inode:[eventpoll], /dev/null, ..."""
    kinds: Counter = Counter()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue
        kind = target.split(":[", 1)[0] if target.startswith(("socket:", "pipe:")) else target
        kinds[kind] += 1
    return kinds
