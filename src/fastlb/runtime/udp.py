"""UDP listeners in the control process (issue 13): their sockets, shared-memory fields and status.

The flows themselves live in the workers (core/udp.pxi); this module only creates each worker's
SO_REUSEPORT datagram socket, writes a UDP listener's settings into its shared-memory record and
turns its counters into status fields.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Protocol

# Receive buffer asked for on every UDP listening socket: a burst of datagrams waits there while the
# worker is busy (the kernel caps it at net.core.rmem_max; SO_RCVBUFFORCE lifts that for root).
UDP_RCVBUF = 4 * 1024 * 1024
# Linux constants Python 3.11's socket module does not name
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>
SO_RXQ_OVFL = 40  # <asm-generic/socket.h>
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # <bits/in.h>
WILDCARDS = ("0.0.0.0", "::")
# shared-memory listener counters -> status field names
_COUNTERS = {
    "udp_datagrams_in": "datagrams_in",
    "udp_datagrams_out": "datagrams_out",
    "udp_drop_table_full": "drop_table_full",
    "udp_drop_no_backend": "drop_no_backend",
    "udp_drop_oversized": "drop_oversized",
    "udp_drop_unreachable": "drop_unreachable",
    "udp_drop_send": "drop_send",
    "udp_drop_unexpected": "drop_unexpected",
    "udp_drop_rcvbuf": "drop_rcvbuf",
    "udp_drop_reply_rcvbuf": "drop_reply_rcvbuf",
    "udp_expired_idle": "expired_idle",
    "udp_expired_responses": "expired_responses",
}


class UdpListenerConfig(Protocol):
    """What this module reads from fastlb.config.ListenerConfig."""

    @property
    def protocol(self) -> str: ...
    @property
    def udp_idle_timeout(self) -> float: ...
    @property
    def udp_responses(self) -> int: ...
    @property
    def max_flows(self) -> int: ...
    @property
    def bind(self): ...  # fastlb.config.Address


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def udp_listen_socket(family: int, sockaddr: tuple) -> socket.socket:
    """A non-blocking SO_REUSEPORT datagram socket bound to sockaddr (one per worker: the kernel
    spreads flows over them by 4-tuple hash).  A wildcard bind asks for the destination address of
    every datagram (IP_PKTINFO / IPV6_RECVPKTINFO) so replies leave from it."""
    s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        # SO_REUSEPORT only: for UDP, SO_REUSEADDR would let this socket share the port with any
        # other process's SO_REUSEADDR socket (TCP needs it for TIME_WAIT; UDP has none)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # every datagram carries the socket's drop count once the kernel has dropped one (a full
        # receive buffer): the worker counts the growth in udp_drop_rcvbuf
        s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        if is_wildcard(sockaddr[0]):
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)
        except OSError:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        s.bind(sockaddr)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def udp_listener_fields(lc: UdpListenerConfig) -> dict:
    """Keyword arguments of Region.set_listener() for the UDP part of a listener record."""
    if lc.protocol != "udp":
        return {"protocol": "tcp"}
    return {
        "protocol": "udp",
        "udp_idle_timeout_ms": int(lc.udp_idle_timeout * 1000),
        "udp_responses": lc.udp_responses,
        "max_flows": lc.max_flows,
        "udp_pktinfo": is_wildcard(lc.bind.host),
    }


def udp_listener_status(lc: UdpListenerConfig, record: dict) -> dict:
    """Status fields of a listener: "protocol", and for UDP its settings and counters under "udp"
    (for a UDP listener `active` counts flows open now and `accepted` flows created)."""
    if lc.protocol != "udp":
        return {"protocol": "tcp"}
    udp = {
        "udp_idle_timeout": lc.udp_idle_timeout,
        "udp_responses": lc.udp_responses,
        "max_flows": lc.max_flows,
    }
    udp.update({name: record[key] for key, name in _COUNTERS.items()})
    return {"protocol": "udp", "udp": udp}
