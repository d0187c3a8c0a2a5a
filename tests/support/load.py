"""Background load for the restart/takeover tests: short connections in a loop plus long echo transfers.

Backends are `support.backends.server(name, "id")`: they greet with b"NAME\\n" on accept, then echo.
A short connection connects, reads the greeting and closes.  A long transfer connects, reads the
greeting, then sends chunks of seeded bytes and checks each echoed chunk byte for byte, until told to
stop.  Every failure is recorded with the client's local port, so a test can tell connections that
were established on a killed worker (their ports are known) from any other failure.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field

from .helpers import Deadline

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass
class Failure:
    port: int  # the client's local port (0 if the connect itself failed before binding)
    stage: str  # "connect", "greeting", "transfer"
    error: str
    at: float = field(default_factory=time.monotonic)


@dataclass
class LoadResult:
    short_ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    long_ok: int = 0  # long transfers that ended byte-exact
    long_bytes: int = 0  # bytes echoed byte-exact over all long transfers
    long_failures: list[Failure] = field(default_factory=list)

    def describe(self) -> str:
        fs = self.failures[:5] + self.long_failures[:5]
        return (
            f"{self.short_ok} short ok, {len(self.failures)} short failed, {self.long_ok} long ok "
            f"({self.long_bytes} bytes), {len(self.long_failures)} long failed; first: {fs}"
        )


class Load:
    """Start with `Load(addr, short_threads=3, long_transfers=2).start()`, stop with `stop()`.

    All loops are bounded in time (`max_seconds`) and every socket operation has a timeout."""

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        short_threads: int = 3,
        long_transfers: int = 0,
        chunk: int = 64 * 1024,
        max_seconds: float = 120.0,
        timeout: float = 10.0,
    ) -> None:
        self.addr = addr
        self.short_threads = short_threads
        self.long_transfers = long_transfers
        self.chunk = chunk
        self.timeout = timeout
        self.deadline = Deadline(max_seconds)
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._long_started = threading.Barrier(long_transfers + 1) if long_transfers else None

    def start(self) -> Load:
        for i in range(self.short_threads):
            self._threads.append(threading.Thread(target=self._short_loop, name=f"short-{i}", daemon=True))
        for i in range(self.long_transfers):
            self._threads.append(
                threading.Thread(target=self._long, args=(i,), name=f"long-{i}", daemon=True)
            )
        for t in self._threads:
            t.start()
        if self._long_started is not None:
            self._long_started.wait(self.timeout)  # every long transfer is connected and greeted
        return self

    def running(self) -> bool:
        return not self._stop.is_set() and not self.deadline.expired()

    def wait_short(self, n: int, timeout: float = 20.0) -> None:
        """Wait until at least n more short connections succeeded (the load really runs)."""
        target = self.result.short_ok + n
        end = Deadline(timeout)
        while self.result.short_ok < target and not end.expired():
            time.sleep(0.01)
        assert self.result.short_ok >= target, f"load stalled: {self.result.describe()}"

    def stop(self, timeout: float = 30.0) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), f"load thread {t.name} did not stop"
        return self.result

    # --- loops -------------------------------------------------------------------------------------

    def _fail(
        self, bucket: list[Failure], sock: socket.socket | None, stage: str, exc: BaseException
    ) -> None:
        port = 0
        if sock is not None:
            try:
                port = sock.getsockname()[1]
            except OSError:
                pass
        with self._lock:
            bucket.append(Failure(port, stage, f"{type(exc).__name__}: {exc}"))

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        # the port is chosen by connect(), not by bind(): no port search among TIME_WAIT sockets
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((self.addr[0], 0))
        return s

    def _greeting(self, s: socket.socket) -> None:
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(256)
            if not data:
                raise ConnectionError(f"EOF before the greeting, got {buf!r}")
            buf += data
            if len(buf) > 64:
                raise ConnectionError(f"no greeting line in {buf!r}")

    def _short_loop(self) -> None:
        while self.running():
            s = self._connect()
            stage = "connect"
            try:
                s.connect(self.addr)
                stage = "greeting"
                self._greeting(s)
                with self._lock:
                    self.result.short_ok += 1
            except OSError as exc:
                self._fail(self.result.failures, s, stage, exc)
            finally:
                s.close()

    def _long(self, i: int) -> None:
        rng = random.Random(1000 + i)
        s = self._connect()
        stage = "connect"
        moved = 0
        try:
            s.connect(self.addr)
            stage = "greeting"
            self._greeting(s)
            stage = "transfer"
            if self._long_started is not None:
                self._long_started.wait(self.timeout)
            while self.running():
                data = rng.randbytes(self.chunk)
                s.sendall(data)
                got = bytearray()
                while len(got) < len(data):
                    part = s.recv(len(data) - len(got))
                    if not part:
                        raise ConnectionError(f"EOF after {moved + len(got)} echoed bytes")
                    got += part
                if bytes(got) != data:
                    raise AssertionError(f"echoed bytes differ after {moved} bytes")
                moved += len(data)
                time.sleep(0.005)
            with self._lock:
                self.result.long_ok += 1
        except (OSError, AssertionError, threading.BrokenBarrierError) as exc:
            self._fail(self.result.long_failures, s, stage, exc)
        finally:
            with self._lock:
                self.result.long_bytes += moved
            s.close()
