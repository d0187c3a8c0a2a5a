"""The control socket's listener in the control process: a unix stream socket with limits.

One JSON request line in, one reply line out (fastlb.control.server decides the reply).  The limits
keep a flood of clients from taking the control process down with it (issue 9 item 8: 1,100 idle
connections once used every descriptor, and health checks then failed with EMFILE):

* at most `max_clients` connections (256, and never more than a quarter of RLIMIT_NOFILE); when a
  new one arrives at the limit, the connection idle the longest is closed to make room, so that an
  operator's `fastlb status` still gets through a crowd of idle clients;
* a connection that sends no complete request line for IDLE_TIMEOUT, or does not read its reply for
  IDLE_TIMEOUT, is closed;
* a request line is at most MAX_REQUEST (64 KiB): a longer one is refused and the connection closed;
* the listen backlog is BACKLOG, so that hundreds of clients connecting at once wait in the queue
  instead of failing with EAGAIN.

`start()` raises ControlSocketError (one line) if the socket cannot be created: `fastlb serve` then
refuses to start rather than run uncontrollable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import NoReturn

from fastlb.control import MAX_REQUEST

log = logging.getLogger("fastlb")

MAX_CLIENTS = 256
IDLE_TIMEOUT = 10.0  # seconds for a request line to arrive, and for the reply to be read
BACKLOG = 1024
ACCEPT_BATCH = 32  # connections asyncio accepts per wake-up

# handler(line, writer) -> the reply object, or None when the handler has answered by itself.
Handler = Callable[[bytes, asyncio.StreamWriter], dict | None]


class ControlSocketError(Exception):
    """The control socket cannot be created; str() is one line naming the path and the reason."""


def client_limit(requested: int = MAX_CLIENTS) -> int:
    """`requested`, but at most a quarter of this process's descriptor limit (at least 4)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(4, min(requested, soft // 4))


class ControlServer:
    """Listens on `path` and runs `handler` for every request line, within the limits above."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        max_clients: int | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        backlog: int = BACKLOG,
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_clients = max_clients if max_clients is not None else client_limit()
        self.idle_timeout = idle_timeout
        self.backlog = backlog
        self.evicted = 0  # idle connections closed to make room for a new one
        self.timed_out = 0  # connections closed by the idle timeout
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None  # bound and listening (bind())
        self._tmp = ""  # the name it is bound under until publish()
        self._ino = 0  # the path's inode once published
        # writer -> monotonic time it last finished a reply (or connected); None while busy
        self._clients: dict[asyncio.StreamWriter, float | None] = {}

    @property
    def clients(self) -> int:
        return len(self._clients)

    def bind(self, publish: bool = True) -> None:
        """Bind under a temporary name and listen; with publish, rename(2) it over the path at once
        (see publish()).  From here on connections queue; they are served once start() has run.
        Raises ControlSocketError."""
        if self._sock is None:
            self._tmp = f"{self.path}.{os.getpid()}.new"
            sock = None
            try:
                os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                old_umask = os.umask(0o177)
                try:
                    sock.bind(self._tmp)
                finally:
                    os.umask(old_umask)
                sock.listen(self.backlog)
                os.chmod(self._tmp, 0o600)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                self._fail(exc)
            self._sock = sock
        if publish:
            self.publish()

    def publish(self) -> None:
        """rename(2) the bound socket over the path: a client connecting meanwhile reaches the old
        socket or the new one, never nothing.  (A takeover publishes only once its workers run, so
        a successor that fails to start leaves the old instance's socket in place.)"""
        if self._ino or self._sock is None:
            return
        try:
            os.rename(self._tmp, self.path)
            self._ino = os.stat(self.path).st_ino
        except OSError as exc:
            self._sock.close()
            self._sock = None
            self._fail(exc)

    def _fail(self, exc: OSError) -> NoReturn:
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)
        raise ControlSocketError(
            f"control socket {self.path}: cannot create it: {exc.strerror or exc}"
        ) from None

    async def start(self, publish: bool = True) -> None:
        """bind() if not done yet, then serve.  Raises ControlSocketError."""
        self.bind(publish)
        sock = self._sock
        assert sock is not None
        # asyncio accepts up to `backlog` connections per wake-up before any of them is served
        # (and so before the limit can close one): give it a small batch, then widen the
        # kernel's queue to self.backlog again with a second listen().
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_REQUEST + 1, backlog=ACCEPT_BATCH
        )
        sock.listen(self.backlog)

    def close(self) -> None:
        """Stop listening, close every client, unlink the path if it is still this server's socket."""
        if self._sock is None:
            return
        if self._server is not None:
            self._server.close()
            self._server = None
        else:
            self._sock.close()
        self._sock = None
        for writer in list(self._clients):
            writer.transport.abort()
        with contextlib.suppress(OSError):
            if not self._ino:
                os.unlink(self._tmp)  # never published
            elif os.stat(self.path).st_ino == self._ino:  # not a successor's
                os.unlink(self.path)

    def _make_room(self) -> bool:
        """At the limit: close the connection idle the longest; False if every one is busy."""
        idle = [(since, w) for w, since in self._clients.items() if since is not None]
        if not idle:
            return False
        _, writer = min(idle, key=lambda item: item[0])
        self._clients.pop(writer, None)
        writer.transport.abort()
        self.evicted += 1
        log.warning(
            "control socket: %d connections (the limit); closed the one idle the longest", self.max_clients
        )
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.max_clients and not self._make_room():
            writer.write(b'{"ok": false, "error": "too many control connections"}\n')
            writer.transport.close()
            return
        self._clients[writer] = time.monotonic()
        abort = False  # close at once, dropping unsent bytes (a client that does not read)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        line = await reader.readline()
                except TimeoutError:
                    self.timed_out += 1
                    log.warning(
                        "control socket: closed a connection idle for %.0fs without a request",
                        self.idle_timeout,
                    )
                    break
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    break
                if not line:
                    break
                self._clients[writer] = None
                reply = self.handler(line, writer)
                if reply is not None:
                    writer.write(json.dumps(reply).encode() + b"\n")
                    try:
                        async with asyncio.timeout(self.idle_timeout):
                            await writer.drain()
                    except TimeoutError:
                        self.timed_out += 1
                        log.warning("control socket: closed a connection that did not read its reply")
                        abort = True
                        break
                if writer not in self._clients:  # evicted meanwhile
                    break
                self._clients[writer] = time.monotonic()
        except (ConnectionError, OSError):
            abort = True
        finally:
            self._clients.pop(writer, None)
            if abort:
                writer.transport.abort()
            else:
                writer.close()  # after the last reply (or the refusal) has gone out
