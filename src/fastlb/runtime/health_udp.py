"""UDP health checks (issue 13): `udp_send_expect` and `dns`.

runtime/health.py runs them like its TCP checks (same timeout, rise/fall, scheduling); this module
holds only what happens on the datagram socket.  DNS messages are built and parsed by dnspython.

* udp_send_expect: send `send` as one datagram; the first reply must start with `expect`.
* dns: an A query for `query` (random id, RD set); healthy iff a reply that answers it (same id,
  QR set, same question) has rcode NOERROR or NXDOMAIN.  Datagrams that do not answer the query
  (a late reply to an earlier check) are skipped.

On a connected UDP socket an ICMP port unreachable from the backend surfaces as
ConnectionRefusedError: health.py reports it as "connection refused".
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

UDP_CHECK_TYPES = frozenset({"udp_send_expect", "dns"})
# A reply is read into a buffer of this size (the largest UDP payload).
MAX_DATAGRAM = 65535
_REASON_BYTES = 64


class UdpCheckConfig(Protocol):
    """What this module reads from fastlb.config.HealthCheckConfig."""

    @property
    def type(self) -> str: ...
    @property
    def send(self) -> bytes: ...
    @property
    def expect(self) -> bytes: ...
    @property
    def query(self) -> str | None: ...


async def udp_check(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, sockaddr: tuple, cfg: UdpCheckConfig
) -> str:
    """Run one UDP check on `sock` (non-blocking, not yet connected) against sockaddr; returns
    "ok" or the reason it failed.  The caller bounds it with the check's timeout and closes sock."""
    await loop.sock_connect(sock, sockaddr)  # a UDP connect: only sets the peer, never waits
    if cfg.type == "dns":
        return await _dns(loop, sock, cfg.query or ".")
    await loop.sock_sendall(sock, cfg.send)
    data = await loop.sock_recv(sock, MAX_DATAGRAM)
    if not data.startswith(cfg.expect):
        return f"unexpected reply {data[:_REASON_BYTES]!r}"
    return "ok"


async def _dns(loop: asyncio.AbstractEventLoop, sock: socket.socket, name: str) -> str:
    # dnspython is imported by the first dns check: a control process without one never loads it
    import dns.exception
    import dns.message
    import dns.rcode
    import dns.rdatatype

    query = dns.message.make_query(name, dns.rdatatype.A)
    await loop.sock_sendall(sock, query.to_wire())
    while True:
        data = await loop.sock_recv(sock, MAX_DATAGRAM)
        try:
            reply = dns.message.from_wire(data)
        except dns.exception.DNSException as exc:
            return f"bad DNS reply: {exc}"
        if not query.is_response(reply):
            continue  # not the answer to this query (e.g. a late one for an earlier check)
        rcode = reply.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return f"DNS rcode {dns.rcode.to_text(rcode)}"
        return "ok"
