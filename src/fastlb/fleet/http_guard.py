"""The accept loop of the control process's HTTP listeners (the admin API and /metrics): a cap on
concurrent connections, a deadline for each request head, and accept back-off at the descriptor
limit, so that slow or numerous clients never pin the control process (issue 24 item 2).

    server = GuardedServer(sock, protocol_factory, limits, "admin API", ssl_context)
    server.start()  ...  server.close()

- At most `limits.max_connections` connections are open at once; one more is accepted and closed
  at once (counted in `refused`), so the descriptors these listeners can hold are bounded and the
  control socket (and whatever else the control process opens) always finds one.
- A connection must deliver its first request head (up to the blank line) within
  `limits.header_timeout` seconds of its accept, the TLS handshake included; else it is closed.
  Between requests on a kept-alive connection the server's own idle timeout applies (aiohttp's
  keepalive_timeout for the admin API; /metrics answers one request per connection).
- accept() failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) stops
  accepting for a back-off (0.1 s doubling to 2 s) and logs one line at most once per
  LOG_INTERVAL, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ssl is imported only where TLS is configured (fastlb.cli._keep_openssl_out)
    import ssl

log = logging.getLogger("fastlb")

LOG_INTERVAL = 60.0  # seconds between two "cannot accept" lines of one listener
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0
ACCEPT_BATCH = 64  # accept() calls per readiness event, so one listener cannot starve the loop
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0
    max_connections: int = 256


class _Guarded(asyncio.Protocol):
    """Stands between the transport and the real protocol until the first request head is in;
    it forwards every event, and closes the connection if the head is not complete in time."""

    def __init__(self, server: GuardedServer, inner: asyncio.BaseProtocol) -> None:
        self.server = server
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen, to find a head end split across reads
        self.head_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_at(self.server.deadline_of(transport), self._expire)
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        self.timer = None
        if not self.head_done and self.transport is not None:
            self.server.timed_out += 1
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.head_done:
            seen = self.tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self.head_done = True
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.active -= 1
        self.inner.connection_lost(exc)


class GuardedServer:
    """Serves `factory`'s protocol on a listening socket with the limits above; `close()` stops
    accepting (and closes the listening socket if `close_socket`); open connections finish."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        limits: HttpLimits,
        what: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.factory = factory
        self.limits = limits
        self.what = what
        self.ssl = ssl_context
        self.active = 0  # connections accepted and not yet closed
        self.refused = 0  # accepted over the cap and closed at once
        self.timed_out = 0  # closed for a request head not in within header_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._backoff = BACKOFF_MIN
        self._retry: asyncio.TimerHandle | None = None
        self._last_log = -LOG_INTERVAL
        self._accepted_at: dict[int, float] = {}
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._resume()

    def close(self, close_socket: bool = False) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._pause()
        self._loop = None
        if close_socket:
            self.sock.close()

    async def stop_accepting(self) -> None:
        """A takeover: stop accepting (the listening socket stays open: the successor serves a copy
        of it) and wait until every connection accepted already has its protocol attached, so each is
        answered by this process rather than dropped."""
        self.close()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def deadline_of(self, transport: asyncio.BaseTransport) -> float:
        """When the connection's first request head must be in: header_timeout after its accept."""
        sock = transport.get_extra_info("socket")
        started = self._accepted_at.pop(sock.fileno(), None) if sock is not None else None
        return (started if started is not None else time.monotonic()) + self.limits.header_timeout

    def _resume(self) -> None:
        self._retry = None
        if self._loop is not None and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._reading = True

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    log.warning("%s: accept failed: %s", self.what, exc.strerror or exc)
                    return
                self._out_of_resources(exc)
                return
            self._backoff = BACKOFF_MIN
            if self.active >= self.limits.max_connections:
                self.refused += 1
                conn.close()  # accepted and closed at once: the cap bounds the descriptors held
                continue
            self._serve(conn)

    def _out_of_resources(self, exc: OSError) -> None:
        assert self._loop is not None
        self._pause()
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            log.warning(
                "%s: cannot accept: %s (%d connections open); retrying in %gs (this line at most once in %gs)",
                self.what,
                exc.strerror or exc,
                self.active,
                self._backoff,
                LOG_INTERVAL,
            )
        self._retry = self._loop.call_later(self._backoff, self._resume)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)

    def _serve(self, conn: socket.socket) -> None:
        assert self._loop is not None
        conn.setblocking(False)
        self.active += 1
        self._accepted_at[conn.fileno()] = time.monotonic()
        task = self._loop.create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fd = conn.fileno()
        try:
            await loop.connect_accepted_socket(
                lambda: _Guarded(self, self.factory()),
                conn,
                ssl=self.ssl,
                ssl_handshake_timeout=self.limits.header_timeout if self.ssl else None,
            )
        except BaseException as exc:
            # no protocol ever saw the connection (a failed or too slow TLS handshake: ssl.SSLError
            # is an OSError)
            self._accepted_at.pop(fd, None)
            self.active -= 1
            conn.close()
            if not isinstance(exc, (OSError, TimeoutError)):
                raise
