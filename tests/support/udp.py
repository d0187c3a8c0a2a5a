"""UDP peers for the end-to-end tests: a UDP server process (udp_server.py) and UDP client sockets.

DNS servers (dnsmasq) come from support.dns."""

from __future__ import annotations

import socket
from pathlib import Path

from .backends import ServerProcess
from .udp_server import MODES


def udp_server(name: str, mode: str, **params) -> dict:
    """One UDP server's spec: udp_server("a", "echo"), udp_server("b", "tag", host="::1")."""
    if mode not in MODES:
        raise ValueError(f"unknown UDP server mode {mode!r}")
    return {"name": name, "mode": mode, **params}


class UdpServers(ServerProcess):
    """The UDP server process seen from the test: ports and per-server datagram counts."""

    script = str(Path(__file__).with_name("udp_server.py"))
    what = "UDP server process"

    def address(self, name: str) -> str:
        host = next(s.get("host", "127.0.0.1") for s in self.servers if s["name"] == name)
        return f"[{host}]:{self.ports[name]}" if ":" in host else f"{host}:{self.ports[name]}"

    def received(self) -> dict[str, int]:
        return self.stats()["received"]


def udp_client(addr: tuple[str, int], timeout: float = 5.0, rcvbuf: int = 0) -> socket.socket:
    """A UDP socket connected to addr (so only its replies are received), with a timeout."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(addr)
    return s
