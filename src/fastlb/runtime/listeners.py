"""Listening sockets owned by the control process.

The control process opens one SO_REUSEPORT listening socket per (listener, worker index) and keeps
it open for as long as it runs.  Worker i inherits its sockets at spawn; a worker that dies (or is
killed by the watchdog) is replaced by one that gets the very same sockets back, so the connections
waiting in their accept queues are accepted by the replacement instead of being reset.  On a
takeover the sockets themselves move to the new instance (runtime/takeover.py), queues included.

Closing a listening socket on purpose (fewer workers after a takeover, a listener gone from the
config) resets its queued connections unless `net.ipv4.tcp_migrate_req` is 1, in which case the
kernel moves them to the other sockets of the same SO_REUSEPORT group (Linux >= 5.14).  fastlb only
reads that setting and says what it is; see docs/failure-behaviour.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket

from fastlb.config import Config, ListenerConfig

log = logging.getLogger("fastlb")

MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"

Key = tuple[str, int]  # (bind_key(listener), worker index)


def bind_key(lc: ListenerConfig) -> str:
    """A listening socket's name across instances: the bind address as str(Address) writes it,
    "udp/" before it for a UDP listener (a TCP and a UDP listener may share an address)."""
    return f"udp/{lc.bind}" if lc.protocol == "udp" else str(lc.bind)


def open_socket(lc: ListenerConfig) -> socket.socket:
    """lc's listening socket: TCP (listen_socket) or UDP (runtime/udp.py)."""
    if lc.protocol == "udp":
        from fastlb.runtime.udp import udp_listen_socket

        return udp_listen_socket(lc.bind.family, lc.bind.sockaddr())
    return listen_socket(lc.bind.family, lc.bind.sockaddr(), lc.backlog)


class BindError(Exception):
    """A listener address cannot be bound (message names the listener and the reason)."""


def listen_socket(family: int, sockaddr: tuple, backlog: int) -> socket.socket:
    """A non-blocking SO_REUSEPORT listening socket bound to sockaddr (TCP_NODELAY, which accepted
    sockets inherit; IPv6 sockets are IPv6-only)."""
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(sockaddr)
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def check_free(lc: ListenerConfig) -> None:
    """Raise BindError if lc's address is bound by any other socket.  The probe does NOT set
    SO_REUSEPORT (that would join another process's group instead of failing); SO_REUSEADDR (TCP
    only) ignores connections in TIME_WAIT - for UDP it would share the port with another
    SO_REUSEADDR socket, so a UDP probe sets neither."""
    kind = socket.SOCK_DGRAM if lc.protocol == "udp" else socket.SOCK_STREAM
    s = socket.socket(lc.bind.family, kind | socket.SOCK_CLOEXEC)
    try:
        if lc.protocol != "udp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if lc.bind.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(lc.bind.sockaddr())
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BindError(
                f"listener {lc.name}: {lc.bind} is already in use by another process (not this fastlb's workers)"
            ) from None
        raise BindError(f"listener {lc.name}: cannot bind {lc.bind}: {exc.strerror}") from None
    finally:
        s.close()


def is_listening_on(sock: socket.socket, lc: ListenerConfig) -> bool:
    """True if sock is a TCP socket listening on lc's address (checks a socket received from
    elsewhere before trusting it)."""
    try:
        if lc.protocol == "udp":
            if sock.family != lc.bind.family or sock.type != socket.SOCK_DGRAM:
                return False
        elif sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
            return False
        elif sock.family != lc.bind.family or sock.type != socket.SOCK_STREAM:
            return False
        host, port = sock.getsockname()[:2]
    except OSError:
        return False
    return (host, port) == (lc.bind.host, lc.bind.port)


def migrate_req() -> int | None:
    """net.ipv4.tcp_migrate_req of this network namespace, or None where the kernel lacks it."""
    try:
        with open(MIGRATE_REQ) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def log_migrate_req() -> None:
    value = migrate_req()
    if value is None:
        log.info(
            "net.ipv4.tcp_migrate_req is not available (Linux < 5.14): connections queued on a listening "
            "socket fastlb closes on purpose are reset"
        )
    elif value == 0:
        log.info(
            "net.ipv4.tcp_migrate_req = 0: connections queued on a listening socket fastlb closes on purpose "
            "(fewer workers after a takeover, a removed listener) are reset; set it to 1 to move them to "
            "the remaining sockets"
        )
    else:
        log.info("net.ipv4.tcp_migrate_req = %d: queued connections move to sibling sockets on close", value)


class ListenerSockets:
    """Every listening socket of this instance: key (bind, worker index) -> socket, plus the config
    order of listeners so that worker i gets its fds in listener order."""

    def __init__(self, config: Config, n_workers: int) -> None:
        self.config = config
        self.n_workers = n_workers
        self.socks: dict[Key, socket.socket] = {}

    @staticmethod
    def key(lc: ListenerConfig, index: int) -> Key:
        return (bind_key(lc), index)

    def open(self, inherited: dict[Key, socket.socket] | None = None) -> None:
        """Take the inherited sockets that match a listener and worker index, open the missing ones,
        close inherited sockets nobody will use (their queues move only with tcp_migrate_req = 1).
        Raises BindError naming the listener."""
        inherited = dict(inherited or {})
        try:
            for lc in self.config.listeners.values():
                for i in range(self.n_workers):
                    k = self.key(lc, i)
                    s = inherited.pop(k, None)
                    if s is not None and is_listening_on(s, lc):
                        s.setblocking(False)
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1:
                            s.listen(lc.backlog)  # listen() again on a listening socket: new backlog
                            self.socks[k] = s
                            continue
                    if s is not None:
                        s.close()
                    try:
                        self.socks[k] = open_socket(lc)
                    except OSError as exc:
                        raise BindError(
                            f"listener {lc.name}: cannot bind {lc.bind}: {exc.strerror}"
                        ) from None
        except BaseException:
            self.close()
            raise
        finally:
            if inherited:
                log.info(
                    "closing %d inherited listening sockets this configuration does not use: %s",
                    len(inherited),
                    ", ".join(f"{b} #{i}" for b, i in sorted(inherited)),
                )
            for s in inherited.values():
                s.close()

    def fds(self, index: int) -> list[int]:
        """Worker index's listening fds, in config listener order (what worker.command takes)."""
        return [self.socks[self.key(lc, index)].fileno() for lc in self.config.listeners.values()]

    def table(self) -> list[dict]:
        """[{"name", "bind", "worker", "fd"}] for the runtime file and the handover reply."""
        out = []
        for lc in self.config.listeners.values():
            for i in range(self.n_workers):
                s = self.socks.get(self.key(lc, i))
                if s is not None:
                    out.append({"name": lc.name, "bind": bind_key(lc), "worker": i, "fd": s.fileno()})
        return out

    def close(self) -> None:
        for s in self.socks.values():
            with contextlib.suppress(OSError):
                s.close()
        self.socks.clear()
